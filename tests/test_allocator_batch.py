"""Property tests: the batched allocator calls equal their per-sequence loops.

``allocate_batch(seqs, n)`` must leave an allocator exactly as ``can_allocate`` + ``allocate``
of each sequence in order (stopping at the first that does not fit) leaves a twin of it, and
``seq_capacities(seqs)`` must be ``[seq_capacity(s) for s in seqs]``. Two allocators of a
strategy go through the same random history (admissions with prefix hits, growth, forks,
swaps, frees) in which every batch of growth is made with one call on the first and with the
loop on the second; their whole state is compared after each batch.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocators import KVCacheSpec
from allocators.base import KVAllocator
from allocators.contiguous import ContiguousAllocator
from allocators.paged import PagedAllocator
from allocators.virtual import VirtualAllocator
from conftest import FakeSeq

MAX_LEN = 40
SPEC = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=16, dtype=torch.float32, device="cpu")
SIM = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=16, dtype=torch.float32, device=None)  # accounting only
BASES = [[(b * 37 + i * 11) % 50 + 1 for i in range(MAX_LEN)] for b in range(2)]

FACTORIES = {
    "paged-b4": lambda: PagedAllocator(SPEC, 64, 8, MAX_LEN, block_size=4, swap_space_tokens=32),
    "paged-b1-nocache": lambda: PagedAllocator(SIM, 40, 8, MAX_LEN, block_size=1, enable_prefix_caching=False,
                                               swap_space_tokens=16),
    "contiguous-max": lambda: ContiguousAllocator(SIM, 160, 8, MAX_LEN),
    "contiguous-pow2-buddy": lambda: ContiguousAllocator(SIM, 160, 8, MAX_LEN, policy="pow2", arena="buddy"),
    "contiguous-oracle": lambda: ContiguousAllocator(SIM, 120, 8, MAX_LEN, policy="oracle"),
    "virtual-prefetch": lambda: VirtualAllocator(SIM, 96, 4, MAX_LEN, page_size=4 * 128, prefetch=True),
    "virtual": lambda: VirtualAllocator(SIM, 96, 4, MAX_LEN, page_size=2 * 128, prefetch=False),
}


def loop_allocate(a: KVAllocator, seqs: list, n: int) -> int:
    """The definition: KVAllocator.allocate_batch's own loop, whatever the strategy overrides."""
    return KVAllocator.allocate_batch(a, seqs, n)


def state(a: KVAllocator, seqs: list) -> tuple:
    """Everything that decides what the allocator does next, and what it reports."""
    per_seq = [(a.num_tokens(s), a.seq_capacity(s), a.is_swapped(s),
                a.slot_mapping(s, 0, a.num_tokens(s)) if a.num_tokens(s) and not a.is_swapped(s) else None)
               for s in seqs]
    if isinstance(a, PagedAllocator):
        p = a.pool
        inner = (list(p.ref), list(p.fill), p.filled_total, list(p._plain), list(p._cached),
                 {b: sorted(h) for b, h in a._tail_holders.items()}, dict(a.cache._block_of),
                 a.swap_space.num_free)
    elif isinstance(a, ContiguousAllocator):
        inner = (a.regions(), a.arena.holes())
    else:
        inner = ([(s.index, list(s.groups), s.used, s.want, s.seq.seq_id if s.seq else None) for s in a.slots],
                 list(a._free_groups), dict(a._idle), list(a._empty), a._idle_pages, a._surplus_pages)
    return per_seq, inner, a.stats()


class Twins:
    """The same history on two allocators of one strategy; sequences shared (allocators key them by id)."""

    def __init__(self, make):
        self.a, self.b = make(), make()
        self.live: list[FakeSeq] = []
        self.swapped: list[FakeSeq] = []
        self.gone: list[FakeSeq] = []

    def both(self, name: str, *args):
        ra, rb = getattr(self.a, name)(*args), getattr(self.b, name)(*args)
        assert ra == rb, name
        return ra

    def admit(self, base: int, shared: int, extra: list[int], prefix: bool, oracle: int, bound: int) -> None:
        tokens = BASES[base][:shared] + extra
        # lengths a sequence may outgrow (only max_model_len is a hard limit): a contiguous region
        # can fill up, and capacities depend on more than max_len
        max_len = min(len(tokens) + bound, MAX_LEN)
        seq = FakeSeq(tokens, max_len, oracle_len=min(len(tokens) + oracle, max_len))
        cached = self.both("match_prefix", seq) if prefix else 0
        tokens, seq.token_ids = seq.token_ids, seq.token_ids[:cached]
        n = len(tokens) - cached
        if self.both("can_allocate", seq, n):
            seq.token_ids = tokens
            self.both("allocate", seq, n)
            self.live.append(seq)
        else:
            self.both("free", seq)

    def grow(self, picks: list[int], n: int) -> None:
        """One batch: the picked live sequences (and maybe a swapped or a new one) grow by ``n``."""
        seqs = list(dict.fromkeys(self.pool()[i % len(self.pool())] for i in picks)) if self.pool() else []
        seqs = [s for s in seqs if len(s.token_ids) + n <= MAX_LEN]
        for s in seqs:  # the tokens exist before their KV does (the engine's order)
            s.token_ids = s.token_ids + [(len(s.token_ids) * 7 + s.seq_id) % 50 + 1 for _ in range(n)]
        ka, kb = self.a.allocate_batch(seqs, n), loop_allocate(self.b, seqs, n)
        assert ka == kb
        for s in seqs[ka:]:  # not grown: the tokens were never there
            del s.token_ids[len(s.token_ids) - n:]
        for s in seqs[:ka]:
            if s not in self.live:
                self.live.append(s)
        everyone = self.live + self.swapped + self.gone
        assert state(self.a, everyone) == state(self.b, everyone)

    def pool(self) -> list[FakeSeq]:
        return self.live + self.swapped[:1] + self.gone[:1]

    def fork(self, i: int) -> None:
        parent = self.live[i % len(self.live)]
        if self.a.supports_fork and self.both("can_fork", parent):
            # samples of one request: the same prompt and lengths (a region is sized from them)
            child = FakeSeq(list(parent.token_ids), parent.max_len, prompt_len=parent.prompt_len,
                            oracle_len=parent.oracle_len)
            self.both("fork", parent, child)
            self.live.append(child)

    def swap_out(self, i: int) -> None:
        seq = self.live[i % len(self.live)]
        if self.a.supports_swap and self.both("can_swap_out", seq):
            self.both("swap_out", seq)
            self.live.remove(seq)
            self.swapped.append(seq)

    def swap_in(self, i: int) -> None:
        seq = self.swapped[i % len(self.swapped)]
        if self.both("can_swap_in", seq):
            self.both("swap_in", seq)
            self.swapped.remove(seq)
            self.live.append(seq)

    def free(self, i: int) -> None:
        seqs = self.live + self.swapped
        seq = seqs[i % len(seqs)]
        self.both("free", seq)
        (self.live if seq in self.live else self.swapped).remove(seq)
        self.gone.append(seq)


OPS = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 1), st.integers(0, 12), st.lists(st.integers(51, 99), min_size=1,
                                                                               max_size=9), st.booleans(),
              st.integers(0, 12), st.integers(0, 16)),
    st.tuples(st.just("grow"), st.lists(st.integers(0, 20), max_size=8), st.integers(0, 5)),
    st.tuples(st.just("grow"), st.lists(st.integers(0, 20), max_size=8), st.just(1)),
    st.tuples(st.just("fork"), st.integers(0, 20)),
    st.tuples(st.just("swap_out"), st.integers(0, 20)),
    st.tuples(st.just("swap_in"), st.integers(0, 20)),
    st.tuples(st.just("free"), st.integers(0, 20)),
)


@pytest.mark.parametrize("strategy", list(FACTORIES))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=60))
def test_batched_calls_equal_the_per_sequence_loop(strategy, ops):
    t = Twins(FACTORIES[strategy])
    try:
        for name, *args in ops:
            if name in ("fork", "swap_out") and not t.live or name == "swap_in" and not t.swapped:
                continue
            if name == "free" and not (t.live or t.swapped):
                continue
            getattr(t, name)(*args)
            everyone = t.live + t.swapped + t.gone
            assert t.a.seq_capacities(everyone) == [t.a.seq_capacity(s) for s in everyone]
        t.grow(list(range(len(t.live) + 2)), 1)  # everyone decodes once more
    finally:
        t.a.close()
        t.b.close()


def test_allocate_batch_stops_at_the_first_that_does_not_fit():
    a = PagedAllocator(SIM, 16, 4, MAX_LEN, block_size=4)
    seqs = [FakeSeq([1, 2, 3, 4], MAX_LEN) for _ in range(4)]
    for s in seqs:
        a.allocate(s, 4)  # every block full: the next token of each needs a new block
    assert a.num_free_blocks == 0
    a.free(seqs[2])  # one block free: the first sequence gets it, the second does not fit
    rest = [seqs[0], seqs[1], seqs[3]]
    assert a.allocate_batch(rest, 1) == 1
    assert [a.num_tokens(s) for s in rest] == [5, 4, 4]
    assert a.seq_capacities([*rest, seqs[2]]) == [8, 4, 4, 0]
