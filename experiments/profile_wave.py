"""Where an offline run's first prefill wave spends its time (GPU).

    python -m experiments.profile_wave model=qwen3-0.6b allocator=paged engine.async_scheduling=true [--steps 6] \
        [--no-warm-gemms]

Builds the engine of a ``kvlab run`` config (overrides as for ``kvlab run``; the sim-validation
setup by default) and runs its workload three times, all requests at t=0: the first ``--steps``
steps of wave 1 under torch.profiler (device busy time, CPU calls that wait for the device or
allocate memory, CPU ops by self time), of wave 2 under cProfile (Python functions by own time),
wave 3 plain. Prints each wave's first steps: duration, host and launch CPU time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re

SETUP = ["workload=sharegpt", "workload.num_requests=300", "engine.kv_cache_tokens=40000", "engine.max_model_len=2048",
         "engine.max_num_seqs=256", "engine.max_num_batched_tokens=8192", "device=cuda", "mode=offline",
         "workload.request_rate=inf"]
CALLS = re.compile(r"Synchronize|cudaMemcpy(?!Async)|aten::item|_local_scalar_dense|cudaMalloc|cudaHostAlloc|cudaFree|"
                   r"cudaHostRegister|cudaLaunchKernel|cuLaunchKernel|cudaGraphLaunch")


def lazy_gemm_loads(events) -> tuple[int, int]:
    """(kernels loaded at their first launch, how many of them inside a GEMM call) among a
    torch.profiler run's events (CPU and CUDA activities). A load is an activity record of its
    own, not a child op: it is placed by time inside an ``aten::mm`` / ``aten::addmm`` call."""
    gemms = [e.time_range for e in events if e.name in ("aten::mm", "aten::addmm")]
    loads = [e.time_range for e in events if e.name == "Lazy Function Loading"]
    return len(loads), sum(any(g.start <= t.start <= g.end for g in gemms) for t in loads)


def _wave(eng, specs, seed: int, tag: str, steps: int, wrap=None) -> None:
    import torch

    from experiments.driver import sampling_params

    first = len(eng.step_records)
    for s in specs:
        eng.add_request(f"{tag}-{s.request_id}", s.prompt_token_ids, sampling_params(s, seed))
    if wrap is not None:
        with wrap:
            for _ in range(steps):
                eng.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    while eng.has_unfinished_requests():
        eng.step()
    recs = eng.step_records[first:first + steps]
    print(f"{tag}: first {steps} steps (ms): duration / host / launch, seqs, prefill tokens")
    for r in recs:
        print(f"  {r.duration * 1e3:7.2f} {r.host_s * 1e3:6.2f} {r.launch_s * 1e3:6.2f}  {r.num_seqs:4d} {r.prefill_tokens:5d}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-warm-gemms", action="store_true",
                    help="the engine as before ModelRunner.warm_gemms (its start-up leaves GEMM shapes cold)")
    a = ap.parse_args(argv)
    import torch
    from omegaconf import OmegaConf

    from experiments.profile_step import device_busy
    from experiments.run import build_engine, compose
    from experiments.workloads import make_workload, tokenize_requests

    cfg = compose([*SETUP, *a.overrides])
    if a.no_warm_gemms:
        from engine.runner import ModelRunner

        ModelRunner.warm_gemms = lambda self: []
    eng = build_engine(cfg)
    workload = OmegaConf.to_container(cfg.workload, resolve=True)
    specs = tokenize_requests(make_workload(workload, eng.model_config.vocab_size, eng.max_model_len),
                              eng.tokenizer.encode, eng.max_model_len)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                  with_stack=True)
    _wave(eng, specs, cfg.seed, "wave1-torch-profiler", a.steps, prof)
    busy, span = device_busy(prof.events())
    print(f"device busy {busy * 1e3:.2f} of {span * 1e3:.2f} ms ({100 * busy / max(span, 1e-9):.1f}%)")
    avg = prof.key_averages()
    for e in sorted(avg, key=lambda e: -e.cpu_time_total):
        if CALLS.search(e.key):
            print(f"  CPU {e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.2f} ms")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=30))
    loads, inside = lazy_gemm_loads(prof.events())
    print(f"kernels loaded at first launch (lazy loading): {loads}, inside a GEMM call: {inside}")
    print("CPU calls of 1 ms or more (the innermost ones), with where they were made:")
    long = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU
            and e.time_range.elapsed_us() >= 1000 and not any(c.time_range.elapsed_us() >= 1000 for c in e.cpu_children)]
    for e in sorted(long, key=lambda e: e.time_range.start)[:40]:
        frames, p = [], e.cpu_parent
        while p is not None and len(frames) < 5:
            if ".py(" in p.name and not p.name.startswith(("torch/", "<built-in")):
                frames.append(p.name)
            p = p.cpu_parent
        print(f"  {e.time_range.elapsed_us() / 1e3:7.2f} ms {e.name}  <- {' <- '.join(frames)}")
    cp = cProfile.Profile()
    _wave(eng, specs, cfg.seed, "wave2-cprofile", a.steps, _Enabled(cp))
    buf = io.StringIO()
    pstats.Stats(cp, stream=buf).sort_stats("tottime").print_stats(35)
    print(buf.getvalue())
    _wave(eng, specs, cfg.seed, "wave3-plain", a.steps)
    eng.close()


class _Enabled:
    """cProfile as a context manager over the profiled steps only."""

    def __init__(self, cp: cProfile.Profile):
        self.cp = cp

    def __enter__(self):
        self.cp.enable()

    def __exit__(self, *exc):
        self.cp.disable()


if __name__ == "__main__":
    main()
