"""The README's sweep over allocators and block sizes, and the report's block-size curve."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments import report
from experiments.run import CONF_DIR, applicable_config, config_hash, run_experiment

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def readme_sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("readme_sweep") / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "run", "-m", "allocator=paged,contiguous",
         "allocator.args.block_size=8,16,32", "workload.num_requests=8", "progress=false", "report=false",
         f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return sweep, proc


def test_block_size_sweep_over_allocators_runs(readme_sweep):
    sweep, proc = readme_sweep
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "not in struct" not in out and "unexpected keyword" not in out
    # one line per contiguous run saying what it ignores
    for bs in (8, 16, 32):
        assert out.count(f"contiguous ignores allocator.args.block_size={bs}") == 1, out[-3000:]
    # contiguous x 3 block sizes is one run: the repeats are not run and leave no folder
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert [r.split("-", 1)[1] for r in runs] == [
        "paged-b8-tiny-llama-uniform", "paged-b16-tiny-llama-uniform", "paged-b32-tiny-llama-uniform",
        "contiguous-max-tiny-llama-uniform"]
    assert out.count("not run twice") >= 2


def test_readme_sweep_report_draws_one_paged_curve(readme_sweep):
    sweep, proc = readme_sweep
    assert proc.returncode == 0
    out = report.write_report(sweep)
    assert (out / "block_size_curves.png").stat().st_size > 5000
    wide = report.order_runs(report.collect(sweep))
    data = report.sweep_data(wide, "cfg.allocator.args.block_size")
    assert list(data["_series"].unique()) == ["paged"]  # one connected line
    assert sorted(data["_x"]) == [8, 16, 32]
    assert "contiguous" in set(wide["allocator"])  # on the other figures, not on the curve


def _sim(out, *overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["mode=simulate", "progress=false", "report=false",
                                           "workload.num_requests=12", *overrides])
    return run_experiment(cfg, out)


def test_paged_only_block_size_study_is_one_curve(tmp_path):
    """paged-b8, paged-b16, paged-b32 (labels that differ per run) are points of one line."""
    for bs in (8, 16, 32):
        _sim(tmp_path / f"b{bs}", f"allocator.args.block_size={bs}")
    wide = report.order_runs(report.collect(tmp_path))
    assert sorted(wide["label"]) == ["paged-b16", "paged-b32", "paged-b8"]
    data = report.sweep_data(wide, "cfg.allocator.args.block_size")
    assert data["_series"].nunique() == 1 and sorted(data["_x"]) == [8, 16, 32]
    # and a second workload makes a second curve, not six points
    for bs in (8, 32):
        _sim(tmp_path / f"fixed-b{bs}", f"allocator.args.block_size={bs}", "workload=fixed")
    data = report.sweep_data(report.collect(tmp_path), "cfg.allocator.args.block_size")
    assert data.groupby("_series")["_x"].nunique().to_dict() == {"fixed": 2, "uniform": 3}


def test_inapplicable_allocator_options_are_dropped():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["allocator=contiguous", "++allocator.args.block_size=8"])
        paged = compose("config", overrides=["allocator=paged", "allocator.args.block_size=8"])
    clean, dropped = applicable_config(cfg)
    assert dropped == {"allocator.args.block_size": 8} and "block_size" not in clean.allocator.args
    assert clean.allocator.args.policy == "max" and "block_size" in cfg.allocator.args  # a copy
    assert applicable_config(paged) == (paged, {})


def test_host_tier_settings_are_dropped_where_they_change_nothing():
    """A sweep of the tier off / on x granularity x allocators runs each distinct run once."""
    tier = ["engine.enable_prefix_caching=true", "engine.host_kv_cache_memory=32", "engine.host_transfer_blocks=16"]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        virtual = compose("config", overrides=["allocator=virtual", *tier])
        paged_on = compose("config", overrides=["allocator=paged", *tier])
        paged_off = compose("config", overrides=["allocator=paged", "engine.host_kv_cache_memory=0",
                                                 "engine.host_transfer_blocks=16"])
    clean, dropped = applicable_config(virtual)
    assert dropped == {"engine.host_kv_cache_memory": 32, "engine.host_transfer_blocks": 16}
    assert clean.engine.host_kv_cache_memory == 0 and clean.engine.host_transfer_blocks == 1
    assert applicable_config(paged_on) == (paged_on, {})
    clean, dropped = applicable_config(paged_off)  # off: its granularity means nothing
    assert dropped == {"engine.host_transfer_blocks": 16} and clean.engine.host_transfer_blocks == 1


def test_prefix_caching_is_dropped_for_an_allocator_without_a_prefix_cache():
    """Contiguous regions share nothing: caching on runs as off, and its summary says off (a sweep
    of caching off / on runs contiguous once)."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        contiguous = compose("config", overrides=["allocator=contiguous", "engine.enable_prefix_caching=true"])
        paged = compose("config", overrides=["allocator=paged", "engine.enable_prefix_caching=true"])
    clean, dropped = applicable_config(contiguous)
    assert dropped == {"engine.enable_prefix_caching": True} and clean.engine.enable_prefix_caching is False
    assert applicable_config(paged) == (paged, {})


def test_swap_preemption_is_dropped_for_an_allocator_that_cannot_swap():
    """Contiguous and virtual preempt by recompute whatever preemption_mode says: their summaries
    say recompute (a report labelled "preempt=swap" showed recompute runs), and a sweep of
    recompute / swap runs them once."""
    swap = ["engine.preemption_mode=swap", "engine.swap_space=4"]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        virtual = compose("config", overrides=["allocator=virtual", *swap])
        contiguous = compose("config", overrides=["allocator=contiguous", "engine.preemption_mode=swap"])
        paged = compose("config", overrides=["allocator=paged", *swap])
        recompute = compose("config", overrides=["allocator=virtual", "engine.preemption_mode=recompute"])
    clean, dropped = applicable_config(virtual)
    assert dropped == {"engine.preemption_mode": "swap", "engine.swap_space": 4}
    assert clean.engine.preemption_mode == "recompute" and clean.engine.swap_space is None
    assert config_hash(clean) == config_hash(recompute)  # the same run as recompute: not run twice
    clean, dropped = applicable_config(contiguous)
    assert dropped == {"engine.preemption_mode": "swap"} and clean.engine.preemption_mode == "recompute"
    assert applicable_config(paged) == (paged, {})


def test_report_lists_what_it_skipped(tmp_path, capsys):
    _sim(tmp_path / "done")
    interrupted = tmp_path / "interrupted"
    (interrupted / ".hydra").mkdir(parents=True)
    (interrupted / ".hydra" / "config.yaml").write_text("mode: simulate\n")
    (interrupted / "run.log").write_text("[x][kvlab.run][WARNING] - paged: interrupted, no results written\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    assert report.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 run folder(s)" in err
    assert "interrupted" in err and "summary.json unreadable" in err
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Skipped" in md and "`interrupted`: interrupted" in md and "`broken`" in md
    wide = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert list(wide["run_id"]) == ["done"]
