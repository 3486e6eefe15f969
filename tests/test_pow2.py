"""Orca-Pow2 as the PagedAttention paper defines it: the prompt plus the output budget rounded
up to a power of two (prompt 100, output 50: 100 + 64 = 164 slots), capped at max_model_len."""
from __future__ import annotations

import pytest
import torch

from allocators import KVCacheSpec
from allocators.contiguous import ContiguousAllocator, pow2_reservation
from conftest import FakeSeq
from engine import SamplingParams
from engine.sequence import Sequence

NOSPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32, device=None)


def closed_form(prompt: int, output: int, max_model_len: int) -> int:
    """prompt + 2^ceil(log2(output)), at most max_model_len."""
    rounded = 1
    while rounded < output:
        rounded *= 2
    return min(prompt + rounded, max_model_len)


# (prompt, output, max_model_len, slots): the paper's example, exact powers, one past a power,
# a single output token, and caps where prompt + rounded output passes the context
CASES = [
    (100, 50, 2048, 164),
    (100, 64, 2048, 164),
    (100, 65, 2048, 228),
    (7, 1, 2048, 8),
    (161, 338, 2048, 673),
    (1100, 600, 2048, 2048),
    (1500, 300, 1800, 1800),
]


@pytest.mark.parametrize("prompt,output,max_model_len,slots", CASES)
def test_reservation_is_prompt_plus_pow2_output(prompt, output, max_model_len, slots):
    assert closed_form(prompt, output, max_model_len) == slots
    assert pow2_reservation(prompt, prompt + output, max_model_len) == slots


@pytest.mark.parametrize("prompt,output,max_model_len,slots", CASES)
def test_allocator_region_is_the_closed_form(prompt, output, max_model_len, slots):
    a = ContiguousAllocator(NOSPEC, 4096, 8, max_model_len, policy="pow2")
    seq = FakeSeq(list(range(prompt)), max_len=min(prompt + output, max_model_len))
    assert a.can_allocate(seq, prompt)
    a.allocate(seq, prompt)
    assert a.seq_capacity(seq) == slots
    assert a.regions()[seq.seq_id][1] == slots  # what the arena granted, not only what was asked


def test_engine_sequence_reserves_the_paper_size():
    """Through the engine's Sequence (max_len = prompt + max_tokens): 100 + 64, not 256."""
    seq = Sequence("r", list(range(100)), SamplingParams(max_tokens=50), max_model_len=2048)
    a = ContiguousAllocator(NOSPEC, 4096, 8, 2048, policy="pow2")
    a.allocate(seq, 100)
    assert a.seq_capacity(seq) == 164


def test_max_tokens_none_reserves_the_context():
    """No output budget: the output may run to max_model_len, so the region is the whole context."""
    seq = Sequence("r", list(range(100)), SamplingParams(max_tokens=None), max_model_len=2048)
    a = ContiguousAllocator(NOSPEC, 4096, 8, 2048, policy="pow2")
    a.allocate(seq, 100)
    assert a.seq_capacity(seq) == 2048


def test_region_size_is_stable_across_recompute():
    """A preempted sequence readmitted with its outputs as part of its tokens gets the same
    region: the rounding is of the output budget, not of the tokens it holds now."""
    seq = Sequence("r", list(range(100)), SamplingParams(max_tokens=50), max_model_len=2048)
    a = ContiguousAllocator(NOSPEC, 4096, 8, 2048, policy="pow2")
    a.allocate(seq, 100)
    a.free(seq)
    seq.token_ids += [1] * 30
    seq.output_token_ids += [1] * 30
    a.allocate(seq, seq.num_tokens)
    assert a.seq_capacity(seq) == 164
