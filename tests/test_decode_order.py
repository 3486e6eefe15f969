"""Decode batches of ``orders_decode`` size go to the kernel longest first (engine/runner.py
``_decode_order``; on with KVLAB_SEQ_MAJOR_MIN_SEQS): greedy tokens as in the order scheduled,
each sequence its own; off by default."""
from __future__ import annotations

import os

import pytest

from engine import LLMEngine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams


def _run(allocator: str, args: dict) -> tuple[dict, list[list[int]]]:
    """Each request's tokens, and the decode inputs' sequence lengths in the order the kernel got them."""
    prompts = [[3 + (5 * i + j) % 300 for j in range(4 + 7 * (i % 9))] for i in range(12)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    eng = LLMEngine(EngineConfig(model="tiny-llama", allocator=allocator, allocator_args=args, device="cpu",
                                 max_model_len=128, kv_cache_tokens=4096, seed=0))
    seen = []
    forward = eng.runner.forward

    def spy(inputs, feed=None):
        if inputs.num_prefill_tokens == 0:
            seen.append(inputs.seq_lens.tolist())
        return forward(inputs, feed)

    eng.runner.forward = spy
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    return outs, seen


@pytest.mark.parametrize("allocator,args", [("paged", {"block_size": 8}), ("contiguous", {})])
def test_decode_batches_go_longest_first_with_the_same_tokens(allocator, args, monkeypatch):
    import kernels.metadata as metadata

    monkeypatch.setattr(metadata, "SEQ_MAJOR_MIN_SEQS", 10**9)
    scheduled, seen_before = _run(allocator, args)
    monkeypatch.setattr(metadata, "SEQ_MAJOR_MIN_SEQS", 4)  # from 4 sequences, so that a CPU test reaches it
    ordered, seen = _run(allocator, args)
    assert ordered == scheduled and len(ordered) == 12
    assert all(lens == sorted(lens, reverse=True) for lens in seen if len(lens) >= 4)
    assert any(lens != sorted(lens, reverse=True) for lens in seen_before if len(lens) >= 4)  # it did reorder
    assert all(lens == before for lens, before in zip(seen, seen_before) if len(lens) < 4)


@pytest.mark.skipif("KVLAB_SEQ_MAJOR_MIN_SEQS" in os.environ, reason="the switch is set in this environment")
def test_the_runner_keeps_the_scheduled_order_by_default():
    from kernels.metadata import SEQ_MAJOR_FROM, SEQ_MAJOR_MIN_SEQS, decode_seq_major, orders_decode

    assert SEQ_MAJOR_MIN_SEQS > 10**6 and not orders_decode(256) and not decode_seq_major(256, 1)
    assert SEQ_MAJOR_FROM == 128
    _, seen = _run("paged", {"block_size": 8})
    assert any(lens != sorted(lens, reverse=True) for lens in seen)


def test_steps_record_their_launch_time_apart_from_host_work():
    """``StepRecord.launch_s``: the CPU time of a step's launch call beyond its input preparation
    (on a CPU device, the forward itself), within the step; simulate records none."""
    eng = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=128, kv_cache_tokens=2048, seed=0))
    eng.add_request("a", list(range(3, 40)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    steps = [r for r in eng.step_records if r.num_seqs]
    assert steps and all(0 < r.launch_s and r.launch_s + r.host_s <= r.duration * 1.001 for r in steps)
