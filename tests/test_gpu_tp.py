"""Tensor parallelism on 2 GPUs (NCCL): parity with one GPU, and a 34B-class model that needs both.

Run on a machine with 2 GPUs (nvidia-h200-x2):
    python -m pytest -q -p no:cacheprovider tests/test_gpu_tp.py
The throughput comparison writes results/tp/ (see docs/ARCHITECTURE.md, "Tensor parallelism"):
    kvlab bench throughput --models llama3-8b --tensor-parallel-size 1,2 --no-hf --out results/tp/llama3-8b
    kvlab bench throughput --models yi-34b --tensor-parallel-size 1,2 --allocators paged,virtual \\
        --max-num-seqs 128 --max-model-len 4096 --input-len 1000:3000 --output-len 512 --no-hf --out results/tp/yi-34b
"""
from __future__ import annotations

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def _greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 24) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    return [outs[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("allocator,args", [("paged", {}), ("contiguous", {"policy": "max"}),
                                            ("virtual", {"layout": "shared"})])
def test_tp2_float32_greedy_equals_tp1_on_gpus(allocator: str, args: dict) -> None:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 512, (n,), generator=g).tolist() for n in (1, 7, 33, 100, 250)]
    outs = []
    for tp in (1, 2):
        e = LLMEngine(EngineConfig(model="tiny-llama", allocator=allocator, allocator_args=args, device="cuda",
                                   dtype="float32", tensor_parallel_size=tp, max_model_len=512, max_num_seqs=8,
                                   kv_cache_tokens=8192, detokenize=False))
        try:
            outs.append(_greedy(e, prompts))
        finally:
            e.close()
    assert outs[0] == outs[1]


def test_34b_class_model_needs_two_gpus_for_a_full_pool() -> None:
    """Yi-34B's shape in bf16 with a pool for every slot at full length (128 x 4096 tokens): one
    H200 cannot hold it beside the weights; two can, each with half the heads."""
    common = dict(model="yi-34b", allocator="paged", device="cuda", max_model_len=4096, max_num_seqs=128,
                  max_num_batched_tokens=8192, detokenize=False, gpu_memory_utilization=0.9)
    full_pool = 128 * 4096
    one = LLMEngine(EngineConfig(**common, tensor_parallel_size=1))
    try:
        assert one.kv_capacity_tokens < full_pool
    finally:
        one.close()
        del one
        torch.cuda.empty_cache()
    two = LLMEngine(EngineConfig(**common, tensor_parallel_size=2))
    try:
        assert two.kv_capacity_tokens >= full_pool
        assert two.kv_memory_summary()["kv_heads_per_gpu"] == 4
        out = _greedy(two, [[1, 2, 3, 4]] * 4, max_tokens=16)
        assert all(len(o) == 16 for o in out)
    finally:
        two.close()
