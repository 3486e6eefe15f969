"""`kvlab report DIR`: tables and figures from a directory of runs (simulate mode, tiny model)."""
from __future__ import annotations

import re

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from allocators.stats import STAT_FIELDS
from experiments import report
from experiments.run import CONF_DIR, run_experiment

SIM = ["mode=simulate", "progress=false", "report=false", "engine.max_model_len=256", "engine.kv_cache_tokens=1024",
       "engine.max_num_seqs=16", "engine.max_num_batched_tokens=256", "workload.num_requests=24"]


def run(out, *overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*SIM, *overrides])
    return run_experiment(cfg, out)


@pytest.fixture(scope="module")
def rate_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("rate_sweep")
    for alloc in ("paged", "contiguous"):
        for rate in (20, 80, 320):
            run(root / f"{alloc}-{rate}", f"allocator={alloc}", f"workload.request_rate={rate}")
    return root


@pytest.fixture(scope="module")
def block_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("block_sweep")
    for bs in (4, 16, 64):
        run(root / "nested" / f"b{bs}", "allocator=paged", f"allocator.args.block_size={bs}")
    return root


def test_report_of_a_rate_sweep(rate_sweep):
    out = report.write_report(rate_sweep)
    wide = pd.read_csv(out / "summary.csv")
    assert len(wide) == 6
    assert sorted(wide["cfg.workload.request_rate"].unique()) == [20, 80, 320]
    assert pytest.approx(1.0) == wide[list(STAT_FIELDS)].sum(axis=1).min()
    long = pd.read_parquet(out / "summary_long.parquet")
    assert list(long.columns) == ["run_id", "metric", "value", "unit"]
    assert set(long["run_id"]) == set(wide["run_id"])
    units = long.drop_duplicates("metric").set_index("metric")["unit"]
    assert units["output_throughput"] == "tok/s" and units["p99_ttft_ms"] == "ms"
    assert units["normalized_latency"] == "s/token" and units["token_states_saturated"] == "fraction"
    assert long["unit"].notna().all()
    # a row per figure a run has: the wide table's nulls (figures that do not apply) are no rows
    assert long["value"].notna().all()
    assert len(long) == int(wide[long["metric"].unique()].notna().sum().sum())
    for png in ("throughput.png", "memory_breakdown.png", "latency_cdf.png", "kv_usage_over_time.png",
                "rate_curves.png"):
        assert (out / png).stat().st_size > 5000, png
    # plots only where the data for them exists: nothing here varies the block size
    assert not (out / "block_size_curves.png").exists()
    assert not (out / "page_size_curves.png").exists()
    md = (out / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (out / png).exists()
    assert "rate_curves.png" in md and "`workload.request_rate`" in md
    # normalized latency grows with load, throughput follows the offered rate until saturation
    paged = wide[wide["allocator"] == "paged"].sort_values("cfg.workload.request_rate")
    assert paged["normalized_latency"].is_monotonic_increasing
    assert paged["request_throughput"].iloc[0] < paged["request_throughput"].iloc[-1]


def test_report_of_a_block_size_sweep(block_sweep):
    out = report.write_report(block_sweep, block_sweep / "elsewhere")
    assert (out / "block_size_curves.png").stat().st_size > 5000
    assert not (out / "rate_curves.png").exists()
    wide = pd.read_csv(out / "summary.csv")
    assert sorted(wide["run_id"]) == ["nested/b16", "nested/b4", "nested/b64"]  # unique: relative paths
    # small blocks waste less of each sequence's last block
    by = wide.set_index("cfg.allocator.args.block_size")
    assert by.loc[4, "internal_frag"] + by.loc[4, "reservation"] <= by.loc[64, "internal_frag"] + by.loc[64, "reservation"]


def test_figures_have_units_on_their_axes(rate_sweep, block_sweep):
    for root, axis in ((rate_sweep, "cfg.workload.request_rate"), (block_sweep, "cfg.allocator.args.block_size")):
        wide = report.order_runs(report.collect(root))
        fig = report.plot_sweep(wide, axis)
        for ax in fig.axes:
            assert re.search(r"\(.+\)", ax.get_xlabel()) and re.search(r"\(.+\)", ax.get_ylabel())
        plt.close(fig)
    wide = report.order_runs(report.collect(rate_sweep))
    figs = [report.plot_memory(wide), report.plot_throughput(wide),
            report.plot_latency_cdfs(wide, report._read_runs(wide, "requests.parquet")),
            report.plot_usage_over_time(wide, report._read_runs(wide, "steps.parquet"))]
    for fig in figs:
        for ax in fig.axes:
            assert "(" in ax.get_ylabel(), ax.get_ylabel()
        plt.close(fig)
    # strategies in the paper's order, labels say what differs
    assert wide["allocator"].tolist() == ["contiguous"] * 3 + ["paged"] * 3
    assert wide["label"].iloc[0] == "contiguous-max, rate=20"


def test_report_without_per_run_tables(tmp_path, rate_sweep):
    """Runs whose requests/steps tables are gone still report; the figures needing them are skipped."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(rate_sweep, root, ignore=shutil.ignore_patterns("*.parquet", "report"))
    out = report.write_report(root)
    assert (out / "summary.csv").exists() and (out / "memory_breakdown.png").exists()
    assert not (out / "latency_cdf.png").exists() and not (out / "kv_usage_over_time.png").exists()


def test_report_cli_on_empty_dir(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no run under" in capsys.readouterr().err


def test_runs_are_ordered_by_value_where_a_swept_key_mixes_numbers_and_text():
    """A page-size sweep with ``auto`` beside sizes: sizes by value (not as text, "1048576" before
    "131072"), then ``auto``; a swept key of text alone goes by its text."""
    wide = pd.DataFrame({"run_id": list("abcdef"), "allocator": ["virtual"] * 6,
                         "cfg.allocator.args.page_size": [1048576, "auto", 131072, 2097152, 65536, 4096],
                         "cfg.workload.name": ["z", "a", "m", "a", "z", "m"]})
    out = report.order_runs(wide)
    assert out["cfg.allocator.args.page_size"].tolist() == [4096, 65536, 131072, 1048576, 2097152, "auto"]
    text = report.order_runs(wide.drop(columns=["cfg.allocator.args.page_size"]))
    assert text["cfg.workload.name"].tolist() == ["a", "a", "m", "m", "z", "z"]
    numbers_as_text = wide.assign(**{"cfg.allocator.args.page_size": ["1048576", "auto", "131072", "2097152",
                                                                         "65536", "4096"]})
    assert report.order_runs(numbers_as_text)["cfg.allocator.args.page_size"].tolist() == [
        "4096", "65536", "131072", "1048576", "2097152", "auto"]
