"""Every preset's report (tables and figures) from a small run of its sweep."""
from __future__ import annotations

import itertools

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import report
from experiments.run import CONF_DIR, run_experiment

PRESETS = ["waste_breakdown", "rate_sweep", "block_size", "page_size", "parallel_sampling", "shared_prefix",
           "preemption"]


def _sweep_points(preset: str, per_key: int = 2, cap: int = 6) -> list[list[str]]:
    """Up to ``per_key`` values of each key the preset sweeps, crossed, at most ``cap`` runs."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        base = compose("config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    params = OmegaConf.to_container(base.hydra.sweeper.params)
    axes = [[f"{k}={v.strip()}" for v in str(vals).split(",")[:per_key]] for k, vals in params.items()]
    return [list(p) for p in itertools.product(*axes)][:cap]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_reports_from_a_small_sweep(preset, tmp_path):
    points = _sweep_points(preset)
    assert len(points) >= 2, f"{preset}: a sweep of one point draws no comparison"
    for i, point in enumerate(points):
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"+experiment={preset}", *point, "workload.num_requests=8",
                                               "progress=false", "report=false"])
        run_experiment(cfg, tmp_path / "runs" / f"run{i}")
    out = report.write_report(tmp_path / "runs")
    wide = pd.read_csv(out / "summary.csv")
    assert len(wide) == len(points)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"throughput.png", "memory_breakdown.png"} <= set(pngs), pngs
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    md = (out / "report.md").read_text()
    assert all(f"({p})" in md for p in pngs)  # every figure is linked from the report
