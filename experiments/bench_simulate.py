"""How simulate mode scales: wall time, CPU time and peak memory of one ShareGPT run.

    python -m experiments.bench_simulate --requests 100000            # -> results/sim_scale/
    python -m experiments.bench_simulate --requests 10000 --profile   # + a cProfile of the run
    python -m experiments.bench_simulate --setup h200 --requests 100000 engine.async_scheduling=true

The run is N ShareGPT-like requests at t=0, through ``experiments.run.run_experiment`` as
``kvlab run`` does it, in one of two setups (``--setup``):

- ``waste_breakdown`` (default): the PagedAttention waste-breakdown setup, OPT-13B on a
  simulated A100-40GB (``+experiment=waste_breakdown``): the roofline cost model;
- ``h200``: the sim validation's (results/sim_validation): llama3-8b on the H200 profile (the
  profiled cost model), a 40,000-token pool, 256 sequences, 8,192-token steps.

Paged unless ``--strategy``. Peak memory is the process's maximum resident set (``ru_maxrss``),
so run one size per process for a clean figure. ``bulk_steps``: the steps simulate's bulk path
advanced (the others went through ``LLMEngine.step``).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

from experiments.atomic import write_text

RESULTS = Path(__file__).resolve().parent.parent / "results" / "sim_scale"


SETUPS = {
    "waste_breakdown": ["+experiment=waste_breakdown"],
    "h200": ["mode=simulate", "sim=h200", "model=llama3-8b", "workload=sharegpt", "engine.kv_cache_tokens=40000",
             "engine.max_model_len=2048", "engine.max_num_seqs=256", "engine.max_num_batched_tokens=8192"],
}


def overrides(requests: int, strategy: str, extra: list[str], setup: str = "waste_breakdown") -> list[str]:
    if setup not in SETUPS:
        raise ValueError(f"--setup {setup!r}: choose one of {sorted(SETUPS)}")
    # all at t=0, as measured since the start (the waste-breakdown preset itself runs at 8 req/s)
    return [*SETUPS[setup], f"+strategy={strategy}", f"workload.num_requests={requests}",
            "workload.request_rate=inf", "progress=false", "report=false", "resume=false", *extra]


def run(requests: int, strategy: str = "paged", extra: list[str] = (), profile: bool = False,
        setup: str = "waste_breakdown") -> dict:
    import experiments.run as run_module
    from experiments.run import compose, run_experiment

    cfg = compose(overrides(requests, strategy, list(extra), setup))
    prof = cProfile.Profile() if profile else None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bulk: dict = {}  # how much of the run simulate's bulk path advanced (experiments/sim_fastpath.py)
    build = run_module.build_engine

    def build_and_watch(c):
        engine = bulk["engine"] = build(c)
        bulk["ff"] = getattr(engine, "decode_fast_forward", None)
        return engine

    run_module.build_engine = build_and_watch
    with tempfile.TemporaryDirectory(prefix="sim_scale_") as out:
        wall, cpu = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        try:
            summary = run_experiment(cfg, out)
        finally:
            run_module.build_engine = build
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        steps_bytes = (Path(out) / "steps.parquet").stat().st_size
        import pyarrow.parquet as pq

        num_steps = pq.ParquetFile(Path(out) / "steps.parquet").metadata.num_rows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = dict(
        requests=requests, setup=setup, strategy=strategy, overrides=list(extra), cost_model=summary.get("cost_model"),
        async_scheduling=bool(bulk["engine"].config.async_scheduling), wall_s=round(wall, 2), cpu_s=round(cpu, 2),
        peak_rss_mib=round(peak / 1024, 1), rss_before_mib=round(rss0 / 1024, 1),
        steps=num_steps, steps_parquet_bytes=steps_bytes,
        simulated_duration_s=round(summary["duration"], 2), output_throughput=round(summary["output_throughput"], 1),
        preemptions=summary["preemptions"], token_states=summary["token_states"],
        bulk_runs=getattr(bulk.get("ff"), "runs", 0), bulk_steps=getattr(bulk.get("ff"), "steps", 0),
        python=platform.python_version(), machine=platform.machine(), git_commit=summary.get("git_commit"),
    )
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
        result["profile"] = buf.getvalue()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--setup", default="waste_breakdown", choices=sorted(SETUPS),
                    help="waste_breakdown (OPT-13B, simulated A100, roofline) or h200 (llama3-8b, H200 profile)")
    ap.add_argument("--strategy", default="paged", help="conf/strategy/*: paged, contiguous-max, virtual, ...")
    ap.add_argument("--profile", action="store_true", help="cProfile the run (slower), top 45 by cumulative time")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    ap.add_argument("--tag", default="", help="suffix of the result file name (e.g. before/after)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    r = run(args.requests, args.strategy, args.overrides, args.profile, args.setup)
    prof = r.pop("profile", None)
    print(json.dumps(r, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "" if args.setup == "waste_breakdown" else f"{args.setup}-"
    # asynchronous steps in the name, so that the two runs of a pair never share a file
    steps = "-async" if r.get("async_scheduling") else ""
    name = f"{prefix}{args.strategy}-{args.requests}{steps}{'-' + args.tag if args.tag else ''}"
    write_text(args.out / f"{name}.json", json.dumps(r, indent=1) + "\n")  # atomic: no partial file
    if prof:
        write_text(args.out / f"{name}.profile.txt", prof)
        print(prof, file=sys.stderr)


if __name__ == "__main__":
    main()
