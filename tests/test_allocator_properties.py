"""Property tests: random admit / grow / fork / prefix-hit / swap / free interleavings per strategy.

Invariants after every step:
- no physical slot belongs to two live sequences unless it is a shared block with a
  reference count above one, and a shared block is never written (copy-on-write first);
- every live sequence reads back exactly the KV it (or its prefix) wrote;
- MemoryStats sum to the pool's capacity;
and at the end, once everything is freed, all memory is back in the pool.

The KV value of token t is a running hash of tokens [0, t], so a prefix-cache hit must
return exactly what the sequence would have computed.
"""
from __future__ import annotations


import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from allocators import KVCacheSpec
from allocators.contiguous import ContiguousAllocator
from allocators.paged import PagedAllocator
from allocators.virtual import VirtualAllocator
from conftest import FakeSeq

MAX_LEN = 48
SPEC = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=16, dtype=torch.float32, device="cpu")
WIDE = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=32, dtype=torch.float32, device="cpu")  # 8 tokens / 4 KiB
BASES = [[(b * 37 + i * 11) % 50 + 1 for i in range(MAX_LEN)] for b in range(3)]
SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])




def kv_values(tokens: list[int]) -> list[float]:
    out, h = [], 0
    for t in tokens:
        h = (h * 31 + t) % 1_000_003  # exact in float32
        out.append(float(h))
    return out


class AllocatorMachine(RuleBasedStateMachine):
    """Drives one allocator like the engine does, checking it against a model of the KV."""

    def make(self):
        raise NotImplementedError

    def __init__(self):
        super().__init__()
        self.alloc = self.make()
        self.live: list[FakeSeq] = []
        self.swapped: list[FakeSeq] = []

    # -- the engine's side: allocate, then write the new tokens' KV --------------------------
    def _write(self, seq: FakeSeq, start: int, end: int) -> None:
        if isinstance(self.alloc, PagedAllocator):  # a shared block is never written
            bs = self.alloc.block_size
            for b in {self.alloc.block_ids(seq)[t // bs] for t in range(start, end)}:
                assert self.alloc.pool.ref[b] == 1, f"write into shared block {b}"
        slots = torch.tensor(self.alloc.slot_mapping(seq, start, end), dtype=torch.int64)
        vals = torch.tensor(kv_values(seq.token_ids)[start:end])
        for layer in range(SPEC.num_layers):
            k, v = self.alloc.kv_cache(layer)
            k[slots] = (vals + layer)[:, None, None]
            v[slots] = -(vals + layer)[:, None, None]

    def _grow(self, seq: FakeSeq, new_tokens: list[int]) -> bool:
        n = len(new_tokens)
        if self.alloc.num_tokens(seq) + n > seq.max_len or not self.alloc.can_allocate(seq, n):
            return False
        start = self.alloc.num_tokens(seq)
        seq.token_ids.extend(new_tokens)
        self.alloc.allocate(seq, n)
        self._write(seq, start, start + n)
        return True

    # -- rules ---------------------------------------------------------------------------------
    @rule(base=st.integers(0, len(BASES) - 1), shared=st.integers(0, 24),
          extra=st.lists(st.integers(51, 99), min_size=1, max_size=10), prefix=st.booleans())
    def admit(self, base, shared, extra, prefix):
        seq = FakeSeq(BASES[base][:shared] + extra, MAX_LEN)
        cached = self.alloc.match_prefix(seq) if prefix else 0
        assert cached < len(seq.token_ids) and cached == self.alloc.num_tokens(seq)
        tokens, seq.token_ids = seq.token_ids, seq.token_ids[:cached]
        if self._grow(seq, tokens[cached:]):
            self.live.append(seq)
        else:
            self.alloc.free(seq)  # not admitted: give back the cached blocks it picked up
            assert self.alloc.num_tokens(seq) == 0

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 9))
    def grow(self, data, n):
        seq = data.draw(st.sampled_from(self.live))
        self._grow(seq, data.draw(st.lists(st.integers(1, 99), min_size=n, max_size=n)))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        if not self.alloc.supports_fork or not self.alloc.can_fork(parent):
            return
        child = FakeSeq(list(parent.token_ids), parent.max_len)
        self.alloc.fork(parent, child)
        assert self.alloc.num_tokens(child) == self.alloc.num_tokens(parent)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def swap_out(self, data):
        seq = data.draw(st.sampled_from(self.live))
        if not self.alloc.supports_swap or not self.alloc.can_swap_out(seq):
            return
        pairs = self.alloc.swap_out(seq)
        assert len(pairs) == -(-self.alloc.num_tokens(seq) // self.alloc.block_size)
        self.live.remove(seq)
        self.swapped.append(seq)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        seq = data.draw(st.sampled_from(self.swapped))
        if self.alloc.can_swap_in(seq):
            self.alloc.swap_in(seq)
            self.swapped.remove(seq)
            self.live.append(seq)

    @precondition(lambda self: self.live or self.swapped)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live + self.swapped))
        self.alloc.free(seq)
        (self.live if seq in self.live else self.swapped).remove(seq)
        assert self.alloc.num_tokens(seq) == 0

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def stats_sum_to_capacity(self):
        s = self.alloc.stats()
        s.check()
        assert s.capacity == self.alloc.capacity_tokens * self.alloc.bytes_per_token
        a = self.alloc  # idle_mapped: exactly the pages of idle virtual slots, 0 for other strategies
        idle = a.num_idle_groups * a.page_tokens * a.bytes_per_token if isinstance(a, VirtualAllocator) else 0
        assert s.idle_mapped == idle

    @invariant()
    def stats_match_a_recount(self):
        """The allocator's running split equals one recounted from its public API."""
        a, s = self.alloc, self.alloc.stats()
        slots = set()
        for seq in self.live:
            slots.update(a.slot_mapping(seq, 0, a.num_tokens(seq)))
        filled, reserved, internal = a.live_split([(q, a.num_tokens(q), a.seq_capacity(q)) for q in self.live])
        assert s.token_states == len(slots) * a.bytes_per_token  # shared slots once
        assert (s.reservation, s.internal_frag) == (reserved, internal)

    @invariant()
    def every_sequence_reads_its_own_kv(self):
        for seq in self.live:
            n = self.alloc.num_tokens(seq)
            assert n == len(seq.token_ids)
            slots = torch.tensor(self.alloc.slot_mapping(seq, 0, n), dtype=torch.int64)
            want = torch.tensor(kv_values(seq.token_ids))
            for layer in range(SPEC.num_layers):
                k, v = self.alloc.kv_cache(layer)
                assert torch.equal(k[slots][:, 0, 0], want + layer), f"seq {seq.seq_id} layer {layer}"
                assert torch.equal(v[slots][:, 0, 0], -(want + layer))

    @invariant()
    def no_slot_has_two_owners_unless_shared(self):
        owners: dict[int, int] = {}
        for seq in self.live:
            for slot in self.alloc.slot_mapping(seq, 0, self.alloc.num_tokens(seq)):
                owners[slot] = owners.get(slot, 0) + 1
        if isinstance(self.alloc, PagedAllocator):
            bs, ref = self.alloc.block_size, self.alloc.pool.ref
            holders: dict[int, int] = {}
            for st_ in self.alloc._seqs.values():
                for b in st_.table:
                    holders[b] = holders.get(b, 0) + 1
            for b, n in holders.items():
                assert ref[b] == n, f"block {b}: ref {ref[b]}, held by {n}"
            for slot, n in owners.items():
                assert n == 1 or ref[slot // bs] == n
            assert not set(holders) & self.alloc.pool.free_blocks()
            assert len(holders) + self.alloc.num_free_blocks == self.alloc.num_blocks
        else:
            assert all(n == 1 for n in owners.values())

    def teardown(self):
        for seq in self.live + self.swapped:
            self.alloc.free(seq)
        s = self.alloc.stats()
        s.check()
        assert s.token_states == s.reservation == s.internal_frag == 0
        a = self.alloc
        if isinstance(a, PagedAllocator):
            assert a.num_free_blocks == a.num_blocks and a.pool.filled_total == 0
            assert a.swap_space.num_free == a.swap_space.num_blocks and not a._tail_holders
        elif isinstance(a, ContiguousAllocator):
            assert a.arena.free_total() == a.capacity_tokens and s.free + s.external_frag == s.capacity
            assert s.idle_mapped == 0
            assert a.arena.holes() == ContiguousAllocator(SPEC, a.capacity_tokens, 1, 1, arena=a.arena_kind).arena.holes()
        else:  # deferred reclamation: idle pages are held by no one, kept for reuse: idle_mapped
            assert a.num_free_groups + a.num_idle_groups == a.num_groups
            bpg = a.page_tokens * a.bytes_per_token
            assert s.idle_mapped == a.num_idle_groups * bpg and s.free == a.num_free_groups * bpg
            assert s.external_frag == 0
            a.close()


def machine(name: str, factory) -> type:
    cls = type(name, (AllocatorMachine,), {"make": lambda self: factory()})
    cls.TestCase.settings = SETTINGS
    return cls


PagedB4 = machine("PagedB4", lambda: PagedAllocator(SPEC, 64, 8, MAX_LEN, block_size=4, swap_space_tokens=32))
PagedB1 = machine("PagedB1", lambda: PagedAllocator(SPEC, 48, 8, MAX_LEN, block_size=1, swap_space_tokens=16))
PagedB16 = machine("PagedB16", lambda: PagedAllocator(SPEC, 128, 8, MAX_LEN, block_size=16, swap_space_tokens=32))
ContiguousMaxFirstFit = machine("ContiguousMaxFirstFit", lambda: ContiguousAllocator(SPEC, 160, 8, MAX_LEN))
ContiguousPow2Buddy = machine(
    "ContiguousPow2Buddy", lambda: ContiguousAllocator(SPEC, 160, 8, MAX_LEN, policy="pow2", arena="buddy"))
VirtualSharedHost = machine("VirtualSharedHost", lambda: VirtualAllocator(
    SPEC, 128, 4, MAX_LEN, page_size=4096, layout="shared", backend="host", prefetch=True))
VirtualPerLayerHost = machine("VirtualPerLayerHost", lambda: VirtualAllocator(
    WIDE, 80, 4, MAX_LEN, page_size=4096, layout="per_layer", backend="host", prefetch=False))

TestPagedB4 = PagedB4.TestCase
TestPagedB1 = PagedB1.TestCase
TestPagedB16 = PagedB16.TestCase
TestContiguousMaxFirstFit = ContiguousMaxFirstFit.TestCase
TestContiguousPow2Buddy = ContiguousPow2Buddy.TestCase
TestVirtualSharedHost = VirtualSharedHost.TestCase
TestVirtualPerLayerHost = VirtualPerLayerHost.TestCase
