"""A profile's host steps beside a real run's steps, part by part.

    python -m experiments.host_compare PROFILE RUN_DIR --model llama3-8b --allocator paged [--scheduling sync]

The profiled cost model takes a step's host part from ``kvlab profile``'s host steps (their wall
time less the modelled device time); a simulated run is only as close to a real one as those steps
are to the real run's own. This sets them side by side on one footing, per step kind (decode graph,
prefill/mixed graph, eager) and batch-size bin: the engine's own host work (``host_s``), the CPU
time of the launch (the profile's ``launch_cpu``, the run's ``launch_s``: runs from before that
column have none), and the residual the cost model calibrates on (wall time less the modelled
device time, each step's work taken as uniform on both sides: a real run does not record its
longest context). ``RUN_DIR``: a run folder holding ``steps.parquet`` (e.g. a validate-sim
configuration's ``real/offline``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from engine.config import EngineConfig


def compare(profile, steps: pd.DataFrame, *, model: str, allocator: str, scheduling: str = "sync",
            block_size: int = 16, graph_max_tokens: int = EngineConfig.cuda_graph_max_tokens,
            graph_mode: str = "full") -> pd.DataFrame:
    """One row per (step kind, batch bin) present on both sides: counts, medians of host work and
    launch CPU time, means of the residual, profile over run ratios. ``profile``: a path or a
    ``DeviceProfile``; ``steps``: a run's ``steps.parquet``."""
    from experiments.device_profile import HOST_BINS, host_model_of, host_scheduling_of, load_profile
    from experiments.profiled_costmodel import ProfiledCostModel, _calibration_work, _shape

    prof = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    host = prof.table("host")
    host = host[(host_model_of(prof, host) == model).to_numpy() & (host_scheduling_of(host) == scheduling).to_numpy()
                & (host["allocator"] == allocator).to_numpy()]
    if host.empty:
        raise ValueError(f"profile {prof.path} has no {scheduling} host steps of {model} with {allocator}")
    cm = ProfiledCostModel(prof, _shape(model), model=model, paged=allocator == "paged", block_size=block_size,
                           allocator=allocator, calibrate_host=False, graph_max_tokens=graph_max_tokens,
                           graph_mode=graph_mode)
    cm.ragged = None  # neither side's longest context is known to both: uniform work on both
    steps = steps[steps["num_seqs"] > 0]
    sides = {
        "profile": pd.DataFrame({"batch": host["batch"], "prefill_tokens": host["prefill_tokens"],
                                 "decode": host["decode_tokens"], "context": host["context"],
                                 "wall": host["duration"] + (host["gap"].fillna(0) if "gap" in host else 0.0),
                                 "host": host.get("host_s", np.nan), "launch": host.get("launch_cpu", np.nan)}),
        "run": pd.DataFrame({"batch": steps["num_seqs"], "prefill_tokens": steps["prefill_tokens"],
                             "decode": steps["decode_tokens"], "context": steps["context_tokens"],
                             "wall": steps["duration"], "host": steps["host_s"],
                             "launch": steps["launch_s"] if "launch_s" in steps else np.nan}),
    }
    stats = {}
    for side, d in sides.items():
        d = d.reset_index(drop=True)
        # the cost model's own reading of a recorded step (no longest context on either side: uniform)
        d["device"] = [cm.device_time(_calibration_work(r)) for r in d.itertuples()]
        d["residual"] = d["wall"] - d["device"]
        d["kind"] = cm.step_kinds(d["batch"].to_numpy(), d["prefill_tokens"].to_numpy(), d["decode"].to_numpy())
        d["bin"] = pd.cut(d["batch"], HOST_BINS)
        stats[side] = d.groupby(["kind", "bin"], observed=True).agg(
            n=("wall", "size"), host_ms=("host", "median"), launch_ms=("launch", "median"),
            residual_ms=("residual", "mean"))
    out = pd.merge(stats["profile"], stats["run"], left_index=True, right_index=True, suffixes=("_profile", "_run"))
    for c in ("host_ms", "launch_ms", "residual_ms"):
        out[[f"{c}_profile", f"{c}_run"]] *= 1e3
        out[f"{c.removesuffix('_ms')}_ratio"] = out[f"{c}_profile"] / out[f"{c}_run"]
    return out


def run_graph_tokens(run_dir: Path) -> int:
    """The prefill/mixed graphs' token bound a run's engine had (its summary's settings, capped at
    its token budget as the engine caps it; the engine's default where the summary has none)."""
    import json

    from experiments.run import summary_graph_tokens

    path = Path(run_dir) / "summary.json"
    return summary_graph_tokens(json.loads(path.read_text()) if path.exists() else {},
                                EngineConfig.cuda_graph_max_tokens)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.host_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("run_dir", type=Path, help="a run folder with steps.parquet")
    ap.add_argument("--model", required=True)
    ap.add_argument("--allocator", required=True, choices=["paged", "contiguous", "virtual"])
    ap.add_argument("--scheduling", default="sync", choices=["sync", "async"])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--graph-max-tokens", type=int, default=None,
                    help="the runs' prefill/mixed CUDA graphs (engine.cuda_graph_max_tokens; 0: eager; default: "
                         "what the run's summary.json records, capped at its max_num_batched_tokens)")
    ap.add_argument("--graph-mode", default="full", choices=["full", "piecewise"])
    a = ap.parse_args(argv)
    steps_path = a.run_dir / "steps.parquet"
    if not steps_path.exists():
        ap.error(f"{steps_path} does not exist: name a run folder (e.g. <config>/real/offline)")
    graphs = a.graph_max_tokens if a.graph_max_tokens is not None else run_graph_tokens(a.run_dir)
    table = compare(a.profile, pd.read_parquet(steps_path), model=a.model, allocator=a.allocator,
                    scheduling=a.scheduling, block_size=a.block_size, graph_max_tokens=graphs,
                    graph_mode=a.graph_mode)
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
