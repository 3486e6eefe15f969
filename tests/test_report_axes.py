"""The report's figures of categorical KV axes (cache dtype, layer grouping): one group of bars
per allocator (and other swept key), one bar per value of the axis, each bar the run's figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from experiments.report_axes import CATEGORIES, add_axis_columns, plot_axis, plot_categories

DTYPE = "cfg.engine.kv_cache_dtype"
GROUPING = "cfg.engine.kv_grouping"


def _wide() -> pd.DataFrame:
    rows = []
    for alloc, base in (("paged", 100.0), ("contiguous", 40.0)):
        for dtype, factor in (("auto", 1.0), ("fp8", 1.9)):
            rows.append({"allocator": alloc, DTYPE: dtype, "mean_batch_size": base * factor / 10,
                         "output_throughput": base * factor, "kv_capacity_tokens": 1000 * factor})
    return pd.DataFrame(rows)


def _bars(ax) -> dict[str, list[float]]:
    """Bar heights by legend label, in x order."""
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


def test_dtype_bars_are_the_runs_figures_grouped_by_allocator():
    wide = _wide()
    fig = plot_axis(wide, DTYPE, [DTYPE, "allocator"])
    try:
        axes = fig.axes
        metrics = [m for m, _ in CATEGORIES[DTYPE][2]]
        assert len([a for a in axes if a.containers]) == len(metrics)
        ticks = [t.get_text() for t in axes[0].get_xticklabels()]
        assert ticks == ["paged", "contiguous"]  # one group per allocator, in the runs' order
        for ax, metric in zip(axes, metrics):
            bars = _bars(ax)
            assert set(bars) == {"auto", "fp8"}
            for dtype, heights in bars.items():
                want = [wide[(wide.allocator == a) & (wide[DTYPE] == dtype)][metric].item() for a in ticks]
                assert heights == pytest.approx(want)
    finally:
        plt.close(fig)


def test_only_swept_axes_with_figures_are_drawn():
    wide = _wide()
    figs = plot_categories(wide, [DTYPE, "allocator"])
    try:
        assert list(figs) == [CATEGORIES[DTYPE][0]]
    finally:
        for _, fig in figs.values():
            plt.close(fig)
    assert plot_categories(wide, ["allocator"]) == {}  # the dtype is not swept: no figure
    # a swept axis none of whose metrics the runs have: no empty figure
    bare = wide[["allocator", DTYPE]]
    assert plot_axis(bare, DTYPE, [DTYPE, "allocator"]) is None
    # a metric the runs did not measure (all NaN) gets no panel
    fig = plot_axis(wide.assign(kv_capacity_tokens=float("nan")), DTYPE, [DTYPE, "allocator"])
    try:
        assert [ax.get_ylabel() for ax in fig.axes if ax.containers] == ["mean batch size (seqs)",
                                                                          "output throughput (tok/s)"]
    finally:
        plt.close(fig)


def test_other_swept_keys_split_the_groups_and_bytes_become_gb():
    wide = pd.concat([_wide().assign(**{"cfg.engine.block_size": b}) for b in (16, 32)], ignore_index=True)
    fig = plot_axis(wide, DTYPE, [DTYPE, "allocator", "cfg.engine.block_size"])
    try:
        ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert ticks == ["paged, block_size=16", "contiguous, block_size=16", "paged, block_size=32",
                         "contiguous, block_size=32"]
    finally:
        plt.close(fig)
    g = pd.DataFrame({GROUPING: ["none", "shared"], "allocator": ["paged", "paged"],
                      "kv_windowed_groups_mean_bytes": [2e9, 5e8], "kv_padding_mean_bytes": [0, 1.5e9]})
    add_axis_columns(g)
    assert g["kv_windowed_groups_mean_gb"].tolist() == [2.0, 0.5]
    assert g["kv_padding_mean_gb"].tolist() == [0.0, 1.5]
    assert "kv_full_groups_mean_gb" not in g  # no bytes column, no GB column
    fig = plot_axis(g.assign(mean_batch_size=[3.0, 5.0]), GROUPING, [GROUPING])
    try:
        windowed = [ax for ax in fig.axes if ax.get_ylabel().startswith("KV held")]
        assert len(windowed) == 1
        assert {k: v[0] for k, v in _bars(windowed[0]).items()} == {"none": 2.0, "shared": 0.5}
    finally:
        plt.close(fig)


def test_repeats_average_the_layer_group_bytes_with_their_interval():
    """Two seeds of one grouped run: the row's windowed bytes (what kv_grouping.png draws) are their mean,
    with the Student-t 95% half-width t(0.975, 1) * s / sqrt(2) = 12.7062 * |a - b| / 2, not the first seed's."""
    from experiments.report import group_repeats

    runs = pd.DataFrame({"allocator": ["paged", "paged"], GROUPING: ["shared", "shared"], "cfg.seed": [0, 1],
                         "seed": [0, 1], "run_id": ["g/rep0", "g/rep1"], "run_dir": ["g/rep0", "g/rep1"],
                         "output_throughput": [100.0, 110.0],
                         "kv_windowed_groups_mean_bytes": [1.0e9, 3.0e9], "kv_padding_mean_bytes": [0.0, 2.0e9]})
    row = group_repeats(runs).iloc[0]
    assert row["n"] == 2
    assert row["kv_windowed_groups_mean_bytes"] == pytest.approx(2.0e9)
    assert row["kv_windowed_groups_mean_bytes_ci95"] == pytest.approx(12.7062047 * 1.0e9, rel=1e-7)
    assert row["kv_padding_mean_bytes"] == pytest.approx(1.0e9)


def test_bars_of_repeated_rows_draw_their_95_ci():
    """A row of repeats carries ``<metric>_ci95``: its bar spans mean ± that half-width (GB for the
    layer-group bytes), as the report's other bars do."""
    from matplotlib.container import ErrorbarContainer

    wide = pd.DataFrame({GROUPING: ["none", "shared"], "allocator": ["paged", "paged"],
                         "output_throughput": [100.0, 150.0], "output_throughput_ci95": [4.0, 6.0],
                         "kv_windowed_groups_mean_bytes": [2e9, 5e8],
                         "kv_windowed_groups_mean_bytes_ci95": [3e8, 1e8]})
    add_axis_columns(wide)
    assert wide["kv_windowed_groups_mean_gb_ci95"].tolist() == pytest.approx([0.3, 0.1])
    fig = plot_axis(wide, GROUPING, [GROUPING])
    try:
        want = {"output throughput (tok/s)": {"none": (96.0, 104.0), "shared": (144.0, 156.0)},
                "KV held by windowed layers (GB, mean)": {"none": (1.7, 2.3), "shared": (0.4, 0.6)}}
        for ax in fig.axes:
            if ax.get_ylabel() not in want:
                continue
            errs = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
            assert len(errs) == 2, ax.get_ylabel()
            for value, c in zip(("none", "shared"), errs):  # one bar per value, in the axis' order
                (lo, hi), = [seg[:, 1] for seg in c.lines[2][0].get_segments()]
                assert (lo, hi) == pytest.approx(want[ax.get_ylabel()][value])
    finally:
        plt.close(fig)
