"""Unit tests of the three allocators: sizing, sharing, copy-on-write, prefix caching, swap, paging."""
from __future__ import annotations


import pytest
import torch

from allocators import AllocationError, KVCacheSpec, available, create_allocator
from allocators.arena import BuddyArena, FirstFitArena
from allocators.contiguous import ContiguousAllocator
from allocators.paged import PagedAllocator
from allocators.virtual import VirtualAllocator
from kernels.metadata import Addressing
from conftest import FakeSeq





SPEC = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu")
NOSPEC = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, device=None)


def seq(n: int, max_len: int = 64, start: int = 1) -> FakeSeq:
    return FakeSeq(list(range(start, start + n)), max_len)


def write(alloc, s, start: int, end: int) -> None:
    """What the engine does after allocate: K/V of tokens [start, end) into their slots."""
    slots = torch.tensor(alloc.slot_mapping(s, start, end))
    vals = torch.tensor([float(s.token_ids[t] * 1000 + t) for t in range(start, end)])
    for layer in range(alloc.spec.num_layers):
        k, v = alloc.kv_cache(layer)
        k[slots] = (vals + layer)[:, None, None]
        v[slots] = -(vals + layer)[:, None, None]


def expected(s, n: int) -> list[float]:
    return [float(s.token_ids[t] * 1000 + t) for t in range(n)]


def read(alloc, s, n: int, layer: int = 0) -> list[float]:
    slots = torch.tensor(alloc.slot_mapping(s, 0, n))
    k, v = alloc.kv_cache(layer)
    assert torch.equal(v[slots], -k[slots])
    return (k[slots][:, 0, 0] - layer).tolist()


def grow(alloc, s, n: int) -> None:
    start = alloc.num_tokens(s)
    while len(s.token_ids) < start + n:
        s.token_ids.append(len(s.token_ids) % 97 + 1)
    assert alloc.can_allocate(s, n)
    alloc.allocate(s, n)
    write(alloc, s, start, start + n)


def test_registry_lists_the_three_strategies():
    assert {"contiguous", "paged", "virtual"} <= set(available())
    with pytest.raises(ValueError, match="choose one of"):
        create_allocator("nope", spec=SPEC, capacity_tokens=64, max_num_seqs=4, max_model_len=16)


# -- arenas ---------------------------------------------------------------------------------
def test_first_fit_holes_coalesce():
    a = FirstFitArena(100)
    x, y, z = a.alloc(30), a.alloc(30), a.alloc(30)
    assert (x, y, z) == (0, 30, 60)
    a.release(y, 30)
    assert a.holes() == [(30, 30), (90, 10)] and a.largest_hole() == 30 and a.free_total() == 40
    assert a.alloc(35) is None  # 40 free, but in two holes: external fragmentation
    a.release(z, 30)
    assert a.holes() == [(30, 70)]
    a.release(x, 30)
    assert a.holes() == [(0, 100)]


def test_buddy_rounds_splits_and_merges():
    a = BuddyArena(1000)  # tops 512, 256, 128, 64, 32, 8
    assert a.max_region() == 512 and a.largest_hole() == 512
    assert a.size_for(100) == 128
    x = a.alloc(100)
    assert x == 768  # the 128 top block fits exactly: no split of the larger ones
    y = a.alloc(100)
    assert y == 512 and a.free_total() == 1000 - 256  # 256 top block split in two 128s
    a.release(x, 100)
    a.release(y, 100)
    assert a.free_total() == 1000 and a.largest_hole() == 512
    assert sorted(h for _, h in a.holes()) == [8, 32, 64, 128, 256, 512]
    blocks = [a.alloc(64) for _ in range(15)]  # 1000 // 64 = 15, all but the 32 and 8 tops
    assert None not in blocks and a.alloc(64) is None and a.free_total() == 40
    for b in blocks:
        a.release(b, 64)
    assert a.free_total() == 1000 and a.largest_hole() == 512


# -- contiguous -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy,expect", [("max", 64), ("pow2", 42), ("oracle", 20)])  # pow2: 10 + 32
def test_contiguous_policies_size_regions(policy, expect):
    a = ContiguousAllocator(SPEC, 256, 8, 64, policy=policy)
    s = FakeSeq(list(range(10)), max_len=30, oracle_len=20)
    a.allocate(s, 10)
    assert a.seq_capacity(s) == expect and a.mode == Addressing.LINEAR
    assert a.slot_mapping(s, 2, 5) == [a.seq_base(s) + t for t in (2, 3, 4)]
    st = a.stats()
    st.check()
    assert st.token_states == 10 * a.bytes_per_token


def test_contiguous_external_fragmentation_is_real():
    a = ContiguousAllocator(NOSPEC, 100, 8, 64, policy="oracle")
    s1, s2, s3 = (FakeSeq([1], max_len=30) for _ in range(3))
    for s in (s1, s2, s3):
        a.allocate(s, 1)
    a.free(s2)  # holes of 30 (middle) and 10 (end)
    st = a.stats()
    st.check()
    assert st.free == 30 * a.bytes_per_token and st.external_frag == 10 * a.bytes_per_token
    assert not a.can_allocate(FakeSeq([1], max_len=35), 1)  # 40 free but no hole of 35


def test_contiguous_outgrowing_the_region_says_so():
    a = ContiguousAllocator(NOSPEC, 100, 8, 64, policy="oracle")
    s = FakeSeq([1] * 5, max_len=8)
    a.allocate(s, 5)
    assert not a.can_allocate(s, 4)
    with pytest.raises(AllocationError, match="outgrew"):
        a.allocate(s, 4)


def test_contiguous_buddy_charges_the_rounded_block():
    a = ContiguousAllocator(NOSPEC, 1024, 8, 100, policy="max", arena="buddy")
    s = seq(3)
    a.allocate(s, 3)
    assert a.seq_capacity(s) == 128  # max_model_len 100 rounded to the buddy block
    assert a.max_fit_tokens() == 100
    a.stats().check()


def test_contiguous_fork_copies():
    a = ContiguousAllocator(SPEC, 256, 8, 32, policy="max")
    p = seq(10)
    grow(a, p, 10)
    c = FakeSeq(list(p.token_ids), p.max_len)
    assert a.can_fork(p)
    a.fork(p, c)
    assert a.num_tokens(c) == 10 and read(a, c, 10) == expected(p, 10)
    grow(a, c, 2)
    grow(a, p, 1)
    assert read(a, p, 11) == expected(p, 11) and read(a, c, 12) == expected(c, 12)


# -- paged ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [1, 3, 16, 256])
def test_paged_slot_mapping_matches_the_block_table(bs):
    a = PagedAllocator(SPEC, 4096, 8, 1024, block_size=bs)
    s1, s2 = seq(300, 1024), seq(200, 1024, start=500)
    grow(a, s1, 100)
    grow(a, s2, 200)  # interleave blocks of two sequences
    grow(a, s1, 200)
    for s, n in ((s1, 300), (s2, 200)):
        table = a.block_ids(s)
        assert len(table) == -(-n // bs)
        assert a.slot_mapping(s, 0, n) == [table[t // bs] * bs + t % bs for t in range(n)]
        assert a.slot_mapping(s, n - 1, n) == [table[(n - 1) // bs] * bs + (n - 1) % bs]
        assert read(a, s, n) == expected(s, n)
    assert not set(a.block_ids(s1)) & set(a.block_ids(s2))
    a.stats().check()


def test_paged_block_size_bounds():
    with pytest.raises(ValueError, match="block size between"):
        PagedAllocator(NOSPEC, 4096, 8, 64, block_size=0)
    with pytest.raises(ValueError, match="holds no block"):
        PagedAllocator(NOSPEC, 8, 8, 64, block_size=16)


def test_paged_fork_shares_and_copies_on_write():
    a = PagedAllocator(SPEC, 64, 8, 64, block_size=4)
    p = seq(6)
    grow(a, p, 6)  # blocks: [full, 2/4]
    c = FakeSeq(list(p.token_ids), p.max_len)
    free_before = a.num_free_blocks
    a.fork(p, c)
    assert a.block_ids(c) == a.block_ids(p) and a.num_free_blocks == free_before
    assert all(a.pool.ref[b] == 2 for b in a.block_ids(p))
    # the shared partial block is charged once: to the parent (lower seq_id)
    assert a.seq_capacity(p) == 8 and a.seq_capacity(c) == 6
    st = a.stats()
    st.check()
    assert st.token_states == 6 * a.bytes_per_token and st.reservation + st.internal_frag == 2 * a.bytes_per_token
    shared_tail = a.block_ids(p)[-1]
    c.token_ids.append(77)  # the child diverges: its write must not touch the shared block
    assert a._needs(a._seqs[c.seq_id], 1) == 1 and a.can_allocate(c, 1)
    grow(a, c, 1)
    assert a.block_ids(c)[-1] != shared_tail and a.block_ids(c)[0] == a.block_ids(p)[0]
    assert a.pool.ref[shared_tail] == 1 and a.seq_capacity(p) == 8 and a.seq_capacity(c) == 8
    grow(a, p, 1)  # now private: written in place
    assert a.block_ids(p)[-1] == shared_tail
    assert read(a, p, 7) == expected(p, 7) and read(a, c, 7) == expected(c, 7)
    a.stats().check()
    a.free(p)
    a.free(c)
    assert a.num_free_blocks == a.num_blocks and a.pool.filled_total == 0


def test_paged_fork_of_a_full_tail_needs_no_copy():
    a = PagedAllocator(SPEC, 64, 8, 64, block_size=4)
    p = seq(8)
    grow(a, p, 8)
    c = FakeSeq(list(p.token_ids), p.max_len)
    a.fork(p, c)
    assert a.seq_capacity(c) == 8 and a._needs(a._seqs[c.seq_id], 1) == 1  # a new block, no copy
    grow(a, c, 1)
    assert a.block_ids(c)[:2] == a.block_ids(p)
    a.stats().check()


def test_paged_prefix_cache_hits_evicts_and_counts():
    a = PagedAllocator(SPEC, 32, 8, 64, block_size=4)  # 8 blocks
    s1 = seq(10)
    grow(a, s1, 10)
    s1_blocks = list(a.block_ids(s1))
    a.free(s1)  # its two full blocks stay cached while free
    assert a.num_free_blocks == 8 and a.pool.num_cached_free == 2
    s2 = FakeSeq(list(s1.token_ids[:9]) + [55, 56], 64)
    assert a.match_prefix(s2) == 8 and a.num_tokens(s2) == 8
    assert a.prefix_cache_hit_rate == pytest.approx(8 / 11)
    assert read(a, s2, 8) == expected(s1, 8)  # the cached KV, never recomputed
    assert a.can_allocate(s2, 3)
    a.allocate(s2, 3)
    write(a, s2, 8, 11)
    assert a.block_ids(s2)[:2] == s1_blocks[:2] and a.num_tokens(s2) == 11
    # a block whose own tokens match but whose prefix differs is no hit (chained hash)
    s3 = FakeSeq([99, 98, 97, 96] + s1.token_ids[4:8] + [1], 64)
    assert a.match_prefix(s3) == 0
    # a prompt that is exactly whole blocks leaves its last token to compute
    s4 = FakeSeq(list(s1.token_ids[:8]), 64)
    assert a.match_prefix(s4) == 4
    a.free(s2)
    a.free(s4)
    # fill the pool: the LRU cached blocks are evicted and forgotten
    hog = seq(32, start=200)
    grow(a, hog, 32)
    assert a.pool.num_cached_free == 0 and len(a.cache) == 8  # only the hog's own blocks
    a.free(hog)
    s5 = FakeSeq(list(s1.token_ids), 64)
    assert a.match_prefix(s5) == 0


def test_paged_prefix_cache_can_be_disabled():
    a = PagedAllocator(SPEC, 64, 8, 64, block_size=4, enable_prefix_caching=False)
    s1 = seq(10)
    grow(a, s1, 10)
    a.free(s1)
    assert a.match_prefix(seq(10)) == 0 and len(a.cache) == 0


def test_paged_swap_out_and_in_preserves_kv():
    a = PagedAllocator(SPEC, 32, 8, 64, block_size=4, swap_space_tokens=16)
    s1, s2 = seq(10), seq(6, start=40)
    grow(a, s1, 10)
    grow(a, s2, 6)
    assert a.can_swap_out(s1)
    pairs = a.swap_out(s1)
    assert len(pairs) == 3 and a.is_swapped(s1) and a.seq_capacity(s1) == 0
    assert a.num_free_blocks == 8 - 2 and not a.can_allocate(s1, 1)
    with pytest.raises(AllocationError, match="swap_in"):
        a.allocate(s1, 1)
    hog = seq(24, start=300)  # reuse s1's old blocks: overwrite them
    grow(a, hog, 24)
    assert not a.can_swap_in(s1)
    a.free(hog)
    assert a.num_free_blocks == 6 and a.can_swap_in(s1) and a.can_swap_in(s1, 14) and not a.can_swap_in(s1, 15)
    back = a.swap_in(s1)
    assert [h for h, _ in back] == [h for _, h in pairs] and not a.is_swapped(s1)
    assert read(a, s1, 10) == expected(s1, 10) and read(a, s2, 6) == expected(s2, 6)
    assert read(a, s1, 10, layer=1) == expected(s1, 10)
    grow(a, s1, 3)
    assert read(a, s1, 13) == expected(s1, 13)
    assert not a.can_swap_out(seq(50, start=900))  # unknown
    a.swap_out(s2)
    assert not a.can_swap_out(s1)  # 4 blocks, 2 host blocks left
    a.stats().check()
    for s in (s1, s2):
        a.free(s)
    assert a.num_free_blocks == a.num_blocks and a.swap_space.num_free == 4


def test_paged_free_of_swapped_sequence_returns_host_blocks():
    a = PagedAllocator(NOSPEC, 64, 8, 64, block_size=4, swap_space_tokens=64)
    s = seq(9)
    a.allocate(s, 9)
    a.swap_out(s)
    a.free(s)
    assert a.swap_space.num_free == 16 and a.num_free_blocks == 16


# -- virtual --------------------------------------------------------------------------------
def test_virtual_geometry_and_views():
    a = VirtualAllocator(SPEC, 256, 4, 30, page_size=4096, layout="per_layer", backend="host")
    assert a.page_tokens == 4096 // (1 * 4 * 4) and a.span == 256 and a.mode == Addressing.LINEAR
    b = VirtualAllocator(SPEC, 256, 4, 30, page_size=4096, layout="shared", backend="host")
    assert b.page_tokens == 4096 // SPEC.bytes_per_token == 64 and b.span == 64
    k0, v0 = b.kv_cache(0)
    k1, _ = b.kv_cache(1)
    assert k0.shape == (4 * 64, 1, 4) and k0.stride(0) == 2 * 2 * 4  # one token of all layers per row
    s = seq(5)
    b.allocate(s, 5)
    assert b.seq_base(s) == b.slot_of(s) * 64 and b.slot_mapping(s, 0, 2) == [b.seq_base(s), b.seq_base(s) + 1]
    k0[b.seq_base(s)] = 1.0
    v0[b.seq_base(s)] = 2.0
    assert k1[b.seq_base(s)].abs().sum() == 0  # layers do not alias
    a.close()
    b.close()


def test_virtual_configuration_errors_name_the_fix():
    with pytest.raises(ValueError, match="whole number of tokens"):
        VirtualAllocator(SPEC, 256, 4, 30, page_size=4100, backend="host")
    with pytest.raises(ValueError, match="granularity"):
        VirtualAllocator(SPEC, 256, 4, 30, page_size=1024, layout="shared", backend="host")
    with pytest.raises(ValueError, match="no page group"):
        VirtualAllocator(NOSPEC, 10, 4, 30, page_size=4096, layout="shared", backend="sim")
    with pytest.raises(ValueError, match="simulate mode"):
        VirtualAllocator(SPEC, 256, 4, 30, page_size=4096, backend="sim")
    with pytest.raises(ValueError, match="layout"):
        VirtualAllocator(NOSPEC, 256, 4, 30, page_size=4096, layout="nope")


def _sim(capacity=64, slots=4, max_len=32, **kw) -> VirtualAllocator:
    kw.setdefault("prefetch", False)
    return VirtualAllocator(NOSPEC, capacity * NOSPEC.bytes_per_token // NOSPEC.bytes_per_token, slots, max_len,
                            page_size=4 * NOSPEC.bytes_per_token, layout="shared", backend="sim", **kw)


def test_virtual_premaps_empty_slots_ahead_of_admission():
    """With prefetch, empty slots get a first group at start-up and then from the free pool while
    it holds more than one per live sequence: admissions map nothing on their path. The groups are
    idle mapped (reclaimable), never taken from idle or live slots, and admission decisions are
    those without pre-mapping."""
    a, b = _sim(slots=4, prefetch=True), _sim(slots=4, prefetch=True, premap=0)
    assert a.num_premaps == 4 and b.num_premaps == 0  # every slot (the default), before any request
    assert a.stats().idle_mapped == 4 * 4 * a.bytes_per_token
    s1 = seq(3, max_len=8)
    for x in (a, b):
        x.allocate(s1, 3)
    # 16 groups: s1 took a pre-mapped slot (+1 group ahead); the other three stay ready
    assert a.num_premaps == 4 and a.num_sync_maps == 0 and b.num_sync_maps == 1
    st = a.stats()
    st.check()
    assert st.idle_mapped == 3 * 4 * a.bytes_per_token and a.num_idle_groups == 3
    for k in range(3):
        s = seq(2, max_len=8)
        assert a.can_allocate(s, 2) == b.can_allocate(s, 2)
        a.allocate(s, 2)
        b.allocate(s, 2)
    assert a.num_sync_maps == 0  # every admission found its first page mapped
    assert b.num_sync_maps == 4  # without: one map on each admission's path
    a.stats().check()
    # a small pool premaps only while the free groups outnumber the live sequences
    c = _sim(capacity=12, slots=4, prefetch=True)  # 3 groups
    assert c.num_premaps == 2
    # a bounded reserve: two slots ready at most, refilled as admissions take them
    d = _sim(slots=4, prefetch=True, premap=2)
    assert d.num_premaps == 2 and len(d._premapped) == 2
    d.allocate(seq(3, max_len=8), 3)  # takes a ready slot; an empty one refills the reserve
    assert d.num_premaps == 3 and len(d._premapped) == 2
    d.allocate(seq(2, max_len=8), 2)
    assert d.num_premaps == 4 and len(d._premapped) == 2
    d.allocate(seq(2, max_len=8), 2)  # no empty slot left to refill with
    assert d.num_premaps == 4 and len(d._premapped) == 1
    with pytest.raises(ValueError, match="premap"):
        _sim(premap=True)


def test_virtual_deferred_reclamation():
    a = _sim()  # pages of 4 tokens, 16 groups, slots of 32 tokens
    s1 = seq(10, max_len=32)
    a.allocate(s1, 10)
    assert a.seq_capacity(s1) == 12 and a.num_free_groups == 13
    a.free(s1)
    st = a.stats()
    st.check()
    # held by no live sequence but kept for the next one: idle mapped, not fragmentation nor free
    assert a.num_idle_groups == 3 and st.idle_mapped == 12 * a.bytes_per_token and st.external_frag == 0
    assert st.free == 13 * 4 * a.bytes_per_token and st.token_states == st.reservation == 0
    maps = a.num_sync_maps
    s2 = seq(6, max_len=32)
    a.allocate(s2, 6)  # lands in the idle slot: its pages need no mapping
    assert a.num_sync_maps == maps and a.num_idle_groups == 0 and a.seq_capacity(s2) == 12
    assert a.stats().idle_mapped == 0  # in use again
    a.allocate(s2, 6)  # 12 tokens: still inside the three inherited groups
    assert a.num_sync_maps == maps
    # pages beyond what a sequence can ever use are external fragmentation, and stealable
    small = seq(2, max_len=4)
    a.free(s2)
    a.allocate(small, 2)
    assert a.seq_capacity(small) == 4
    st = a.stats()
    st.check()
    assert st.external_frag == 8 * a.bytes_per_token and st.idle_mapped == 0  # a live slot: not idle
    hogs = [seq(1, max_len=32) for _ in range(3)]
    for h in hogs:
        a.allocate(h, 1)
    assert a.num_free_groups == 10
    a.allocate(hogs[0], 27)  # 28 tokens: 7 groups, 6 new
    a.allocate(hogs[1], 11)  # 12 tokens: 3 groups, 2 new
    assert a.num_free_groups == 2
    assert not a.can_allocate(hogs[2], 23)  # 5 new groups: 2 free + 2 of small's surplus is too few
    assert a.can_allocate(hogs[2], 19)  # 4 new groups: 2 free + 2 stolen from small
    a.allocate(hogs[2], 19)
    assert a.num_free_groups == 0 and a.seq_capacity(small) == 4 and a.stats().external_frag == 0
    a.stats().check()


def test_virtual_slots_run_out():
    a = _sim(slots=2)
    s1, s2, s3 = seq(1), seq(1), seq(1)
    a.allocate(s1, 1)
    a.allocate(s2, 1)
    assert not a.can_allocate(s3, 1)
    with pytest.raises(AllocationError, match="max_num_seqs"):
        a.allocate(s3, 1)
    a.free(s1)
    assert a.can_allocate(s3, 1)


def test_virtual_prefetch_claims_the_next_group_ahead():
    a = _sim(prefetch=True, premap=0)
    s = seq(4, max_len=32)
    a.allocate(s, 4)  # fills group 0 exactly: the next token needs group 1, claimed now
    assert a.seq_capacity(s) == 8 and a.num_free_groups == 14
    st = a.stats()
    st.check()
    assert st.reservation == 4 * a.bytes_per_token
    a.allocate(s, 1)
    assert a.seq_capacity(s) == 8  # no new group: it was there
    tiny = seq(2, max_len=2)
    a.allocate(tiny, 2)
    assert a.seq_capacity(tiny) == 4  # never ahead past max_len


def test_virtual_fork_copies_into_a_new_slot():
    a = VirtualAllocator(SPEC, 512, 4, 64, page_size=4096, layout="shared", backend="host", prefetch=False)
    p = seq(20)
    grow(a, p, 20)
    c = FakeSeq(list(p.token_ids), p.max_len)
    assert a.can_fork(p)
    a.fork(p, c)
    assert a.slot_of(c) != a.slot_of(p) and read(a, c, 20) == expected(p, 20)
    grow(a, c, 5)
    grow(a, p, 5)
    assert read(a, p, 25) == expected(p, 25) and read(a, c, 25, layer=1) == expected(c, 25)
    a.close()
