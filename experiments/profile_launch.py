"""Where a step's launch CPU time goes, decode steps against prefill/mixed steps (GPU).

    python -m experiments.profile_launch model=qwen3-0.6b allocator=paged [--steps 400]

In the sim validation's synchronous real runs (qwen3-0.6b, 8 req/s) a mixed step's launch took
0.76-0.92 ms of CPU against 0.2 ms for a decode step (the step record's ``launch_s``), and
simulate, which prices a step's host part from the profile's host steps, came out 0.1-0.5 ms
short on those steps: mean TTFT 9-13% low. This runs the validation's engine (a ``kvlab run``
config's, overrides as for ``kvlab run``; synchronous steps unless overridden) on a light-load
pattern: four long requests decoding, a new prompt (20-600 tokens) every 25 steps. It times the
parts of ``ModelRunner.launch`` by step kind (median ms: the whole launch, input preparation,
metadata, the forward's graph replay, logits, sampling), then profiles 12 mixed launches
with cProfile (Python functions by own time) and torch.profiler (CPU calls that wait for the
device or allocate memory, CPU ops by self time).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import statistics
import time
from collections import defaultdict

SETUP = ["engine.kv_cache_tokens=40000", "engine.max_model_len=2048", "engine.max_num_seqs=256",
         "engine.max_num_batched_tokens=8192", "device=cuda", "engine.async_scheduling=false"]
PROMPTS = (20, 128, 300, 600)


class PartTimer:
    """Wall time of named calls, per step, summed within the step (``wrap`` replaces a method)."""

    def __init__(self):
        self.step: dict[str, float] = defaultdict(float)

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.step[label] += time.perf_counter() - t0
        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        out, self.step = dict(self.step), defaultdict(float)
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=400)
    a = ap.parse_args(argv)
    import torch

    from engine import SamplingParams
    from experiments.profile_wave import CALLS
    from experiments.run import build_engine, compose

    eng = build_engine(compose([*SETUP, *a.overrides]))
    runner = eng.runner
    timer = PartTimer()
    timer.wrap(runner, "launch", "launch")
    timer.wrap(runner, "_metadata", "metadata")
    timer.wrap(runner, "forward", "forward")
    timer.wrap(runner.sampler, "sample", "sample")
    timer.wrap(runner.model, "compute_logits", "logits")
    if runner.mixed_graphs is not None:
        timer.wrap(runner.mixed_graphs, "run", "graph_run")
    if runner.graphs is not None:
        timer.wrap(runner.graphs, "run", "graph_run")
    vocab = eng.model_config.vocab_size
    params = SamplingParams(max_tokens=100_000, ignore_eos=True, temperature=0)
    for i in range(4):
        eng.add_request(f"long-{i}", [5 + (7 * i + j) % (vocab - 10) for j in range(100)], params)
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    cp = cProfile.Profile()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])
    profiled = 0
    short = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0)
    for step in range(a.steps + 12 * 25):
        if step % 25 == 10:
            n = PROMPTS[(step // 25) % len(PROMPTS)]
            eng.add_request(f"p-{step}", [11 + (step + j) % (vocab - 20) for j in range(n)], short)
        if step == a.steps:  # the profiled phase (its steps are not timed): torch.profiler throughout
            prof.start()
        late = step >= a.steps and step % 25 == 10  # cProfile: the mixed steps only
        if late:
            cp.enable()
        eng.step()
        if late:
            cp.disable()
            profiled += 1
        rec = eng.step_records[-1]
        parts = timer.take()
        parts["prep"] = runner.last_prep_s
        parts["record_launch_s"] = rec.launch_s
        parts["host_s"], parts["duration"] = rec.host_s, rec.duration
        if 20 <= step < a.steps:
            rows["mixed" if rec.prefill_tokens else "decode"].append(parts)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.stop()
    keys = ("duration", "host_s", "record_launch_s", "launch", "prep", "metadata", "forward", "graph_run", "logits",
            "sample")
    print("median ms per step (launch = ModelRunner.launch, whole; record_launch_s = the step record's)")
    print(f"{'kind':8s} {'steps':>5s} " + " ".join(f"{k:>15s}" for k in keys))
    for kind, rs in rows.items():
        print(f"{kind:8s} {len(rs):5d} " + " ".join(
            f"{1e3 * statistics.median(r.get(k, 0.0) for r in rs):15.3f}" for k in keys))
    buf = io.StringIO()
    pstats.Stats(cp, stream=buf).sort_stats("tottime").print_stats(30)
    print(f"cProfile of {profiled} mixed steps (whole step), by own time:")
    print(buf.getvalue())
    avg = prof.key_averages()
    for e in sorted(avg, key=lambda e: -e.cpu_time_total):
        if CALLS.search(e.key):
            print(f"  CPU {e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.2f} ms")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=25))
    eng.close()


if __name__ == "__main__":
    main()
