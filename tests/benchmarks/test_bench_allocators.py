"""Microbenchmarks of allocator operations at 1k, 10k and 100k blocks of 16 tokens.

Run with ``pytest tests/benchmarks --benchmark-enable``; by default (--benchmark-disable)
each runs once as a test. Accounting-only KV spec (Llama-3-8B shape), so only the
allocator's host work is timed. Pools: paged blocks of 16 tokens; contiguous (policy
oracle, first fit) and virtual (shared layout, 2 MiB pages = 16 tokens, sim backend) over
the same number of tokens. A quarter of each pool is held by background sequences.

- allocate: admit a request and make room for its 512-token prompt
- free: release a 512-token request
- fork: share (paged) or copy (others) a 512-token request into a child
- prefix_lookup: match_prefix of a 513-token prompt whose first 512 tokens are cached
- decode_step: one decode step's allocation for up to 256 running sequences
  (can_allocate + allocate one token + slot_mapping each)
- stats: the MemoryStats the engine records every step, over up to 256 sequences
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch

from allocators import KVCacheSpec, create_allocator

SPEC = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device=None)
BLOCK = 16
PROMPT = 512
MAX_MODEL_LEN = 8192
MAX_NUM_SEQS = 256
SIZES = [1_000, 10_000, 100_000]
STRATEGIES = {
    "paged": ("paged", {"block_size": BLOCK}),
    "contiguous": ("contiguous", {"policy": "oracle"}),
    "virtual": ("virtual", {"page_size": 2 << 20, "layout": "shared", "backend": "sim", "prefetch": True}),
}
_ids = itertools.count()


@dataclass(eq=False)
class FakeSeq:
    token_ids: list[int]
    max_len: int = PROMPT + 64
    seq_id: int = field(default_factory=lambda: next(_ids))
    prompt_len: int = PROMPT
    oracle_len: int = PROMPT + 64


PROMPT_IDS = [(i * 7919) % 32000 for i in range(PROMPT + 1)]


def build(strategy: str, blocks: int):
    name, args = STRATEGIES[strategy]
    alloc = create_allocator(name, spec=SPEC, capacity_tokens=blocks * BLOCK, max_num_seqs=MAX_NUM_SEQS,
                             max_model_len=MAX_MODEL_LEN, **args)
    background = []
    for i in range(min(blocks * BLOCK // 4 // PROMPT, MAX_NUM_SEQS // 2)):
        s = FakeSeq([i % 1000 + 1] * PROMPT)
        alloc.allocate(s, PROMPT)
        background.append(s)
    return alloc, background


PARAMS = [pytest.param(s, b, id=f"{s}-{b // 1000}k") for s in STRATEGIES for b in SIZES]


@pytest.mark.benchmark(group="allocate")
@pytest.mark.parametrize("strategy,blocks", PARAMS)
def test_allocate(benchmark, strategy, blocks):
    alloc, _ = build(strategy, blocks)
    held = []

    def setup():
        while held:
            alloc.free(held.pop())
        s = FakeSeq(list(PROMPT_IDS[:PROMPT]))
        held.append(s)
        return (s, PROMPT), {}

    benchmark.pedantic(alloc.allocate, setup=setup, rounds=200, iterations=1)
    assert alloc.num_tokens(held[0]) == PROMPT


@pytest.mark.benchmark(group="free")
@pytest.mark.parametrize("strategy,blocks", PARAMS)
def test_free(benchmark, strategy, blocks):
    alloc, _ = build(strategy, blocks)

    def setup():
        s = FakeSeq(list(PROMPT_IDS[:PROMPT]))
        alloc.allocate(s, PROMPT)
        return (s,), {}

    benchmark.pedantic(alloc.free, setup=setup, rounds=200, iterations=1)
    alloc.stats().check()


@pytest.mark.benchmark(group="fork")
@pytest.mark.parametrize("strategy,blocks", PARAMS)
def test_fork(benchmark, strategy, blocks):
    alloc, background = build(strategy, blocks)
    parent = FakeSeq(list(PROMPT_IDS[:PROMPT]))
    alloc.allocate(parent, PROMPT - 3)  # a partial last block: the paged fork shares it
    held = []

    def setup():
        while held:
            alloc.free(held.pop())
        child = FakeSeq(list(parent.token_ids))
        held.append(child)
        return (parent, child), {}

    benchmark.pedantic(alloc.fork, setup=setup, rounds=200, iterations=1)
    assert alloc.num_tokens(held[0]) == PROMPT - 3


@pytest.mark.benchmark(group="prefix_lookup")
@pytest.mark.parametrize("strategy,blocks", PARAMS)
def test_prefix_lookup(benchmark, strategy, blocks):
    alloc, _ = build(strategy, blocks)
    warm = FakeSeq(list(PROMPT_IDS[:PROMPT]))
    alloc.allocate(warm, PROMPT)
    alloc.free(warm)  # its blocks stay cached (paged)
    held = []

    def setup():
        while held:
            alloc.free(held.pop())
        s = FakeSeq(list(PROMPT_IDS))
        held.append(s)
        return (s,), {}

    benchmark.pedantic(alloc.match_prefix, setup=setup, rounds=200, iterations=1)
    assert alloc.num_tokens(held[0]) == (PROMPT if getattr(alloc, "enable_prefix_caching", False) else 0)


@pytest.mark.benchmark(group="decode_step")
@pytest.mark.parametrize("strategy,blocks", PARAMS)
def test_decode_step(benchmark, strategy, blocks):
    name, args = STRATEGIES[strategy]
    alloc = create_allocator(name, spec=SPEC, capacity_tokens=blocks * BLOCK, max_num_seqs=MAX_NUM_SEQS,
                             max_model_len=MAX_MODEL_LEN, **args)
    batch = min(MAX_NUM_SEQS, blocks * BLOCK // (2 * PROMPT))
    seqs = [FakeSeq([i + 1] * PROMPT, max_len=2 * PROMPT, oracle_len=2 * PROMPT) for i in range(batch)]
    for s in seqs:
        alloc.allocate(s, PROMPT)

    def step():
        for s in seqs:
            n = alloc.num_tokens(s)
            s.token_ids.append(7)
            if alloc.can_allocate(s, 1):
                alloc.allocate(s, 1)
                alloc.slot_mapping(s, n, n + 1)

    benchmark.extra_info["batch"] = batch
    benchmark.pedantic(step, rounds=100, iterations=1)
    alloc.stats().check()


@pytest.mark.benchmark(group="stats")
@pytest.mark.parametrize("strategy,blocks", PARAMS)
def test_stats(benchmark, strategy, blocks):
    """The per-step MemoryStats the engine records, over up to 256 running sequences."""
    name, args = STRATEGIES[strategy]
    alloc = create_allocator(name, spec=SPEC, capacity_tokens=blocks * BLOCK, max_num_seqs=MAX_NUM_SEQS,
                             max_model_len=MAX_MODEL_LEN, **args)
    for i in range(min(MAX_NUM_SEQS, blocks * BLOCK // (2 * PROMPT))):
        alloc.allocate(FakeSeq([i + 1] * PROMPT), PROMPT - i % 7)
    benchmark(alloc.stats).check()
