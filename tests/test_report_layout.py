"""Figures that stay readable with many runs: small multiples, no overlapping tick labels."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from experiments import report
from tests.test_report import run


@pytest.fixture(scope="module")
def big_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("big_sweep")
    for alloc in ("paged", "contiguous"):
        for rate in (10, 20, 40, 80, 160, 320):
            run(root / f"{alloc}-{rate}", f"allocator={alloc}", f"workload.request_rate={rate}",
                "workload.num_requests=8")
    return root


def test_many_runs_get_one_panel_per_series(big_sweep):
    wide = report.order_runs(report.collect(big_sweep))
    assert len(wide) == 12 > report.SMALL_MULTIPLES_AFTER
    fig = report.plot_usage_over_time(wide, report._read_runs(wide, "steps.parquet"))
    visible = [ax for ax in fig.axes if ax.get_visible()]
    tops = [ax for ax in visible if ax.get_title()]
    assert len(visible) == 4 and len(tops) == 2  # two series (strategies), usage over batch size each
    for ax in tops:
        assert len(ax.get_lines()) == 12  # its 6 rates: pool in use and token states
        assert ax.get_title() in ("contiguous-max", "paged-b16")
    assert "(" in visible[0].get_ylabel()
    plt.close(fig)


def test_few_runs_keep_one_panel(big_sweep):
    wide = report.order_runs(report.collect(big_sweep)).head(4)
    fig = report.plot_usage_over_time(wide, report._read_runs(wide, "steps.parquet"))
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2
    plt.close(fig)


def test_log2_sweep_axes_have_no_minor_labels(tmp_path):
    for bs in (4, 16, 64):
        run(tmp_path / f"b{bs}", "allocator=paged", f"allocator.args.block_size={bs}", "workload.num_requests=8")
    wide = report.order_runs(report.collect(tmp_path))
    fig = report.plot_sweep(wide, "cfg.allocator.args.block_size")
    for ax in fig.axes:
        assert not [t for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    plt.close(fig)
