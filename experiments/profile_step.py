"""Profile engine steps on a GPU: top CUDA kernels of decode steps (torch.profiler).

python -m experiments.profile_step --model qwen3-0.6b --batch 64 [--eager] [--async-scheduling [auto|true|false]]
    [--fused-gemv-max-tokens 16] [--enable-pdl]

Besides the kernels, prints how busy the device was over the profiled steps (the union of its
kernels' and copies' intervals against the wall time) and the CPU calls that waited for it
(event and stream synchronizations, blocking copies): with asynchronous scheduling the device
should never idle for the host, and the only wait should be the one for the previous step's tokens.
"""
from __future__ import annotations

import argparse
import re

import torch

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from experiments.bench import add_async_arg, async_value


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--allocator", default="paged")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fused-gemv-max-tokens", type=int, default=0,
                    help="engine.fused_gemv_max_tokens: steps of up to this many tokens run kernels.small_linear")
    ap.add_argument("--enable-pdl", action="store_true", help="engine.enable_pdl: programmatic dependent launch")
    add_async_arg(ap)
    ap.add_argument("--trace", default="", help="write a Chrome trace of the profiled steps here")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():  # else it builds the model on the CPU and fails at its first CUDA call
        raise SystemExit("profile_step needs a CUDA device")
    eng = LLMEngine(EngineConfig(model=a.model, allocator=a.allocator, max_model_len=2048, max_num_seqs=a.batch,
                                 enforce_eager=a.eager, detokenize=False, record_memory=False,
                                 async_scheduling=async_value(a.async_scheduling),
                                 gpu_memory_utilization=0.5, fused_gemv_max_tokens=a.fused_gemv_max_tokens,
                                 enable_pdl=a.enable_pdl))
    for i in range(a.batch):
        eng.add_request(str(i), [5 + (i + j) % 1000 for j in range(a.prompt_len)],
                        SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0))
    while eng.step_records == [] or eng.step_records[-1].prefill_tokens:
        eng.step()
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            eng.step()
        torch.cuda.synchronize()
    recs = eng.step_records[-a.steps:]
    print(f"{a.model} {a.allocator} batch {a.batch} eager={a.eager} async={eng.config.async_scheduling} "
          f"gemv={a.fused_gemv_max_tokens} pdl={a.enable_pdl}: step "
          f"{1000 * sum(r.duration for r in recs) / len(recs):.2f} ms, host "
          f"{1000 * sum(r.host_s for r in recs) / len(recs):.3f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    busy, span = device_busy(prof.events())
    print(f"device busy {busy * 1e3:.2f} of {span * 1e3:.2f} ms ({100 * busy / max(span, 1e-9):.1f}%), "
          f"{1e3 * (span - busy) / a.steps:.3f} ms idle a step")
    waits = prof.key_averages()
    for e in sorted(waits, key=lambda e: -e.cpu_time_total):
        if WAITS.search(e.key):
            print(f"  CPU wait {e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.2f} ms")
    if a.trace:
        prof.export_chrome_trace(a.trace)


WAITS = re.compile(r"Synchronize|cudaMemcpy(?!Async)|aten::item|aten::_local_scalar_dense")


def device_busy(events) -> tuple[float, float]:
    """(seconds the device ran anything, seconds from its first start to its last end)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return 0.0, 0.0
    busy, (cur_s, cur_e) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy / 1e6, (max(e for _, e in spans) - spans[0][0]) / 1e6  # profiler times are in us


if __name__ == "__main__":
    main()
