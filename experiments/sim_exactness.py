"""Is a simulated run the same as before a change? Run a fixed set of simulate cases into a
folder, then compare two such folders table by table.

    python -m experiments.sim_exactness run /tmp/ref            # at the commit before a change
    python -m experiments.sim_exactness run /tmp/new            # after it
    python -m experiments.sim_exactness compare /tmp/ref /tmp/new
    # simulate's bulk path against every step through LLMEngine.step, 100k requests:
    python -m experiments.sim_exactness run /tmp/steps --case paged-100k --no-bulk
    python -m experiments.sim_exactness run /tmp/bulk --case paged-100k
    python -m experiments.sim_exactness compare /tmp/steps /tmp/bulk

``compare`` checks every case's ``steps.parquet`` and ``requests.parquet`` for exact equality
(every float to the bit) and its ``summary.json`` for equal values, but for the keys that
describe the process, not the run (wall time, date, commit). It exits 1 naming the first
differences.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

# the process, not the simulated run
VOLATILE = {"wall_time_s", "time", "git_commit", "run_id"}

WASTE = ["+experiment=waste_breakdown", "progress=false", "report=false", "resume=false"]
CASES: dict[str, list[str]] = {
    # all at t=0: the pool saturates, recompute preemption every few steps
    "paged-2k": [*WASTE, "+strategy=paged", "workload.num_requests=2000", "workload.request_rate=inf"],
    "contiguous-max-2k": [*WASTE, "+strategy=contiguous-max", "workload.num_requests=2000",
                          "workload.request_rate=inf"],
    "contiguous-oracle-1k": [*WASTE, "+strategy=contiguous-oracle", "workload.num_requests=1000",
                             "workload.request_rate=inf"],
    "virtual-2k": [*WASTE, "+strategy=virtual", "workload.num_requests=2000", "workload.request_rate=inf"],
    # online: Poisson arrivals at the preset's 8 req/s (runs stop at each arrival)
    "paged-online-2k": [*WASTE, "+strategy=paged", "workload.num_requests=2000"],
    "virtual-online-1k": [*WASTE, "+strategy=virtual", "workload.num_requests=1000"],
    # preemption by swapping (4 req/s, the pool overflows)
    "paged-swap-1k": ["+experiment=preemption", "progress=false", "report=false", "resume=false",
                      "engine.preemption_mode=swap", "allocator.args.block_size=16"],
    # parallel sampling: forks share prompt blocks (copy-on-write of shared tails)
    "paged-n4": ["mode=simulate", "model=opt-13b", "workload=parallel", "workload.n=4", "workload.num_requests=200",
                 "workload.input_len=256", "workload.output_len=256",
                 "engine.max_model_len=2048", "engine.max_num_batched_tokens=2048", "engine.kv_cache_tokens=8192",
                 "engine.max_num_seqs=128", "progress=false", "report=false", "resume=false"],
    # prefix caching (admission looks the head up every step)
    "paged-prefix": ["mode=simulate", "model=opt-13b", "workload=shared_prefix", "workload.num_requests=300",
                     "engine.max_model_len=2048", "engine.max_num_batched_tokens=2048", "engine.kv_cache_tokens=8192",
                     "engine.max_num_seqs=64", "engine.enable_prefix_caching=true", "progress=false",
                     "report=false", "resume=false"],
}


# the benchmark's run (experiments/bench_simulate.py) at full size: run on request only
LARGE: dict[str, list[str]] = {
    "paged-100k": [*WASTE, "+strategy=paged", "workload.num_requests=100000", "workload.request_rate=inf"],
}


def run_cases(out: Path, names: list[str] | None = None, bulk: bool = True) -> None:
    """Run the cases into ``out``; ``bulk=False``: every step through ``LLMEngine.step`` (the
    simulated engine's bulk path off)."""
    import experiments.run as run

    build = run.build_engine

    def steps_one_by_one(cfg):
        engine = build(cfg)
        engine.decode_fast_forward = None  # the driver then steps every step
        return engine

    if not bulk:
        run.build_engine = steps_one_by_one
    try:
        for name in names or list(CASES):
            t = time.process_time()
            run.run_experiment(run.compose({**CASES, **LARGE}[name]), out / name)
            print(f"{name}: {time.process_time() - t:.1f} s CPU", flush=True)
    finally:
        run.build_engine = build


def _frames_differ(a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    except AssertionError as e:
        return str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[1:4])
    return None


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x):
        return math.isnan(y)
    return x == y


def compare_run(a: Path, b: Path) -> list[str]:
    """What differs between two run folders (empty: the same run)."""
    problems = []
    for table in ("steps.parquet", "requests.parquet"):
        why = _frames_differ(pd.read_parquet(a / table), pd.read_parquet(b / table))
        if why:
            problems.append(f"{table}: {why}")
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    for k in sorted((set(sa) | set(sb)) - VOLATILE):
        if not _same(sa.get(k), sb.get(k)):
            problems.append(f"summary[{k}]: {sa.get(k)!r} != {sb.get(k)!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the cases into a folder")
    r.add_argument("out", type=Path)
    r.add_argument("--case", action="append", choices=[*CASES, *LARGE],
                   help=f"only these (default: all but {', '.join(LARGE)})")
    r.add_argument("--no-bulk", action="store_true",
                   help="every step through LLMEngine.step (simulate's bulk path off): the reference")
    c = sub.add_parser("compare", help="compare two folders of cases")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    if args.cmd == "run":
        run_cases(args.out, args.case, bulk=not args.no_bulk)
        return 0
    bad = 0
    for case in sorted(p.name for p in args.a.iterdir() if (p / "summary.json").exists()):
        if not (args.b / case / "summary.json").exists():
            print(f"{case}: not in {args.b}")
            continue
        problems = compare_run(args.a / case, args.b / case)
        print(f"{case}: {'same' if not problems else 'DIFFERENT'}")
        for p in problems[:10]:
            print(f"  {p}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
