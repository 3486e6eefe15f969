"""Tensor parallelism on CPU: 2 ranks over gloo (a worker process spawned per engine).

Greedy tokens at TP=2 equal TP=1 on the tiny models under every allocator, on a workload that
makes the allocators do everything the workers must replay: preemption in a small pool, forks
(n=2), prefix caching (paged) and swapping (paged); and every rank's allocator holds the same
block tables / slots as rank 0's while it runs.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.allocator_mirror import ShadowSeq
from engine.config import EngineConfig
from engine.fault_isolation import FatalEngineError
from engine.loader import load_model
from engine.parallel import load_sharded_model, shard_dim
from engine.presets import preset_config
from engine.tp_worker import allocator_view

os.environ.setdefault("KVLAB_TP_TIMEOUT_S", "60")  # a broken test fails in a minute, never hangs CI

ALLOCATOR_ARGS = {"paged": {"block_size": 4}, "contiguous": {"policy": "max"}, "virtual": {"backend": "host"}}


def _engine(model: str, allocator: str, tp: int, **kw) -> LLMEngine:
    cfg = dict(model=model, allocator=allocator, allocator_args=ALLOCATOR_ARGS[allocator], device="cpu",
               dtype="float32", tensor_parallel_size=tp, max_model_len=64, max_num_seqs=6, kv_cache_tokens=160,
               detokenize=False, seed=3)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def _workload(engine: LLMEngine, probe: bool = False) -> dict[str, list[list[int]]]:
    shared = [7, 8, 9, 10, 11, 12, 13, 14]
    prompts = [shared + [20 + i] * (i + 1) for i in range(4)] + [[30, 31, 32], list(range(40, 61))]
    for i, p in enumerate(prompts):
        n = 2 if i == 1 else 1
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, n=n))
    outs, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = [c.token_ids for c in o.outputs]
        steps += 1
        if probe and steps % 5 == 0:
            _check_same_allocator(engine)
    return outs


def _check_same_allocator(engine: LLMEngine) -> None:
    """Each worker's allocator holds what rank 0's holds, sequence by sequence."""
    for worker in engine.tp_group.probe():
        sched = engine.scheduler
        ids = set(worker["seqs"]) | {s.seq_id for s in [*sched.running, *sched.waiting]}
        mine = allocator_view(engine.allocator.inner, [ShadowSeq(i) for i in sorted(ids)])
        assert worker == mine


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("allocator", ["paged", "contiguous", "virtual"])
def test_tp2_greedy_equals_tp1(model: str, allocator: str) -> None:
    # paged: prefix caching, and preemption by swapping in a pool too small for the batch; at TP=2 every
    # rank's steps of whole prompts read their own K/V shard (prompt_attention=qkv), TP=1 the cache
    extra = dict(enable_prefix_caching=True, preemption_mode="swap", kv_cache_tokens=96) if allocator == "paged" else {}
    one = _engine(model, allocator, 1, **extra)
    want = _workload(one)
    one.close()
    two = _engine(model, allocator, 2, **extra, prompt_attention="qkv")
    try:
        got = _workload(two, probe=True)
        assert two.runner.prompt_qkv == (allocator == "paged")
        if allocator == "paged":
            assert sum(r.preempted for r in two.step_records) > 0
            assert two.allocator.prefix_cache_hit_rate > 0
    finally:
        two.close()
    assert got == want
    assert all(not p.is_alive() for p in two.tp_group.procs)


def test_kv_accounting_per_gpu_and_total() -> None:
    one, two = _engine("tiny-llama", "paged", 1), _engine("tiny-llama", "paged", 2)
    try:
        a, b = one.kv_memory_summary(), two.kv_memory_summary()
        assert (a["kv_heads_per_gpu"], b["kv_heads_per_gpu"]) == (2, 1)
        assert two.allocator.spec.num_kv_heads == 1 and two.allocator.capacity_tokens == 160
        # the same tokens: half the bytes on each GPU, the same bytes over both
        assert b["kv_pool_bytes_per_gpu"] * 2 == b["kv_pool_bytes_total"] == a["kv_pool_bytes_total"]
    finally:
        one.close()
        two.close()
    page = {"backend": "host", "page_size": 4096}
    one = _engine("tiny-llama", "virtual", 1, allocator_args=page)
    two = _engine("tiny-llama", "virtual", 2, allocator_args=page)
    try:
        a, b = one.kv_memory_summary(), two.kv_memory_summary()
        # the same page bytes hold twice the tokens when a GPU keeps half of the heads
        assert a["kv_page_bytes"] == b["kv_page_bytes"] == 4096
        assert (a["kv_tokens_per_page"], b["kv_tokens_per_page"]) == (32, 64)
        assert b["kv_pool_bytes_total"] == 2 * b["kv_pool_bytes_per_gpu"]
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("source", ["random", "checkpoint"])
def test_shards_concatenate_to_the_single_device_weights(tmp_path, source: str) -> None:
    from safetensors.torch import save_file

    mc = preset_config("tiny-qwen3")
    full = load_model(mc, "tiny-qwen3", 64, torch.float32, "cpu", seed=5)
    path = "tiny-qwen3"
    if source == "checkpoint":
        with torch.no_grad():  # a checkpoint unlike the seeded weights
            for p in full.parameters():
                p.add_(torch.randn_like(p))
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text("{}")
        path = str(tmp_path)
    shards = [load_sharded_model(mc, path, 64, torch.float32, "cpu", 5, r, 2) for r in range(2)]
    assert shards[0].config.num_attention_heads == 2 and shards[0].config.num_key_value_heads == 1
    for name, p in full.named_parameters():
        parts = [dict(s.named_parameters())[name] for s in shards]
        dim = shard_dim(name)
        whole = parts[0] if dim is None else torch.cat(parts, dim=dim)
        assert torch.equal(whole, p), name
        if dim is None:
            assert torch.equal(parts[1], p), name


def test_refusals_name_the_field() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"does not divide tiny-llama's num_key_value_heads=2.*\[1, 2\]"):
        _engine("tiny-llama", "paged", 4)  # 4 query heads but 2 KV heads: refused before any process starts
    with pytest.raises(ValueError, match="async_scheduling=True is not supported with tensor_parallel_size"):
        _engine("tiny-llama", "paged", 2, async_scheduling=True)


def test_worker_error_reaches_rank0_naming_the_rank() -> None:
    engine = _engine("tiny-llama", "paged", 2)
    try:
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        engine.step()
        engine.tp_group.send(("no-such-message",))  # the worker raises on it, reports and exits
        with pytest.raises(FatalEngineError, match=r"(?s)rank 1 failed.*unknown message"):
            for _ in range(10):
                engine.step()
    finally:
        engine.close()
    assert not engine.tp_group.procs[0].is_alive()


def test_killed_worker_is_reported_not_hung() -> None:
    engine = _engine("tiny-llama", "contiguous", 2)
    try:
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        engine.step()
        proc = engine.tp_group.procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        with pytest.raises(FatalEngineError, match=r"rank 1 exited \(code -9\)"):
            for _ in range(10):
                engine.step()
    finally:
        engine.close()
