"""Profile engine steps on a GPU: top CUDA kernels of decode steps (torch.profiler).

python -m experiments.profile_step --model qwen3-0.6b --batch 64 [--eager]
"""
from __future__ import annotations

import argparse

import torch

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--allocator", default="paged")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args(argv)
    eng = LLMEngine(EngineConfig(model=a.model, allocator=a.allocator, max_model_len=2048, max_num_seqs=a.batch,
                                 enforce_eager=a.eager, detokenize=False, record_memory=False,
                                 gpu_memory_utilization=0.5))
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
    print(f"{a.model} {a.allocator} batch {a.batch} eager={a.eager}: step "
          f"{1000 * sum(r.duration for r in recs) / len(recs):.2f} ms, host "
          f"{1000 * sum(r.host_s for r in recs) / len(recs):.3f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
