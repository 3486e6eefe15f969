"""Decode batches whose attention launches sequence by sequence go to the kernel longest first
(engine/runner.py ``_decode_order``): the same tokens as in the order scheduled, each sequence's
own, and only the runner sees the order."""
from __future__ import annotations

import pytest

from engine import LLMEngine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize("allocator,args", [("paged", {"block_size": 8}), ("contiguous", {})])
def test_decode_batches_go_longest_first_with_the_same_tokens(allocator, args, monkeypatch):
    import engine.runner as runner

    prompts = [[3 + (5 * i + j) % 300 for j in range(4 + 7 * (i % 9))] for i in range(12)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    def run(threshold: int):
        monkeypatch.setattr(runner, "SEQ_MAJOR_MIN_SEQS", threshold)
        eng = LLMEngine(EngineConfig(model="tiny-llama", allocator=allocator, allocator_args=args, device="cpu",
                                     max_model_len=128, kv_cache_tokens=4096, seed=0))
        seen = []  # the decode inputs' sequence lengths, in the order the kernel gets them
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

    ordered, seen = run(4)
    scheduled, seen_before = run(10**9)
    assert ordered == scheduled and len(ordered) == len(prompts)
    assert all(lens == sorted(lens, reverse=True) for lens in seen if len(lens) >= 4)
    assert any(lens != sorted(lens, reverse=True) for lens in seen_before if len(lens) >= 4)  # it did reorder
    assert all(lens == before for lens, before in zip(seen, seen_before) if len(lens) < 4)
