"""Prefix caching for the virtual allocator (allocators/slot_prefix_cache.py): an idle slot's KV
reused in place by a request whose prompt begins with its tokens, and whole prefix pages of live
or idle slots mapped into a new request's slot (reference-counted page groups).

Property tests drive the allocator as the engine does, with conversations coming back for their
next turn and concurrent requests sharing prefixes, and check (through the invariants of
test_allocator_properties, on the host backend whose memfd pages really alias) that every live
sequence reads exactly its own KV, a shared page included, that a shared page is never written,
that each group's reference count is the number of slots mapping it, that memory adds up (a
shared page counted once), and that all of it is back at the end; the engine keeps greedy
outputs identical with prefix caching on."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule, run_state_machine_as_test

from allocators.virtual import VirtualAllocator
from conftest import FakeSeq, come_back
from test_allocator_properties import MAX_LEN, SPEC, WIDE, AllocatorMachine

SETTINGS = settings(max_examples=30, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class VirtualPrefixMachine(AllocatorMachine):
    spec, capacity, page_size, layout, share, prefetch = SPEC, 128, 4096, "shared", True, False
    hits = {"tokens": 0, "shared_maps": 0}

    def make(self):
        return VirtualAllocator(self.spec, self.capacity, 4, MAX_LEN, page_size=self.page_size, layout=self.layout,
                                backend="host", prefetch=self.prefetch, enable_prefix_caching=True,
                                share_prefix=self.share)

    def _write(self, seq, start, end):
        a, tpp = self.alloc, self.alloc.page_tokens
        groups, refs = a.page_groups(seq), a.group_refs()
        for page in range(start // tpp, -(-end // tpp)):
            assert refs[groups[page]] == 1, f"seq {seq.seq_id} writes page {page}, shared by {refs[groups[page]]} slots"
        super()._write(seq, start, end)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), keep=st.integers(1, MAX_LEN), extra=st.lists(st.integers(51, 99), min_size=1, max_size=8))
    def admit_sharing_a_live_prefix(self, data, keep, extra):
        """A request whose prompt starts with (part of) a live sequence's tokens."""
        other = data.draw(st.sampled_from(self.live))
        tokens = (other.token_ids[:keep] + extra)[:MAX_LEN - 1]
        new = FakeSeq(tokens, MAX_LEN)
        maps = self.alloc.num_shared_maps
        cached = self.alloc.match_prefix(new)
        assert cached < len(tokens) and cached == self.alloc.num_tokens(new) == self.alloc.last_match.device
        if self.alloc.num_shared_maps > maps:  # shared: whole pages, the other's own groups
            tpp = self.alloc.page_tokens
            assert cached % tpp == 0 and cached // tpp >= self.alloc.num_shared_maps - maps  # equal pages stay
        VirtualPrefixMachine.hits["shared_maps"] += self.alloc.num_shared_maps - maps
        VirtualPrefixMachine.hits["tokens"] += cached
        self._continue(new, tokens, cached)

    def _continue(self, new, tokens: list[int], cached: int) -> None:
        """``new`` holds its first ``cached`` tokens: compute the rest, or give it back if it does not fit."""
        new.token_ids = tokens[:cached]
        if self._grow(new, tokens[cached:]):
            self.live.append(new)
        else:
            self.alloc.free(new)
            assert self.alloc.num_tokens(new) == 0

    @invariant()
    def stats_match_a_recount(self):
        """Token states are the distinct physical token positions live sequences hold."""
        a, s = self.alloc, self.alloc.stats()
        tpp, held = a.page_tokens, set()
        for seq in self.live:
            groups = a.page_groups(seq)
            held.update((groups[t // tpp], t % tpp) for t in range(a.num_tokens(seq)))
        filled, reserved, internal = a.live_split([(q, a.num_tokens(q), a.seq_capacity(q)) for q in self.live])
        assert s.token_states == len(held) * a.bytes_per_token
        assert (s.reservation, s.internal_frag) == (reserved, internal)

    @invariant()
    def refcounts_are_the_slots_mapping_each_group(self):
        a = self.alloc
        count = [0] * a.num_groups
        for slot in a.slots:
            assert len(set(slot.groups)) == len(slot.groups), "a group twice in one slot"
            for g in slot.groups:
                count[g] += 1
        assert a.group_refs() == count
        assert all(count[g] == 0 for g in a._free_groups) and len(set(a._free_groups)) == a.num_free_groups
        assert sum(c > 0 for c in count) + a.num_free_groups == a.num_groups
        tpp = a.page_tokens  # a shared group sits at the same page of every slot, below their tokens
        where: dict[int, int] = {}
        for slot in a.slots:
            for page, g in enumerate(slot.groups):
                assert where.setdefault(g, page) == page
                if count[g] > 1 and slot.seq is not None:
                    assert slot.used >= (page + 1) * tpp

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.lists(st.integers(51, 99), min_size=1, max_size=6))
    def next_turn(self, data, extra):
        """A conversation finishes, then comes back with its tokens and more."""
        new, tokens, cached = come_back(self.alloc, self.live, data.draw(st.sampled_from(self.live)), extra, MAX_LEN)
        m = self.alloc.last_match
        assert cached < len(tokens) and cached == self.alloc.num_tokens(new) == m.device
        VirtualPrefixMachine.hits["tokens"] += cached
        self._continue(new, tokens, cached)


def machine(name, **attrs):
    cls = type(name, (VirtualPrefixMachine,), attrs)
    cls.TestCase.settings = SETTINGS
    return cls


TestVirtualPrefixShared = machine("VirtualPrefixShared").TestCase
TestVirtualPrefixPerLayer = machine("VirtualPrefixPerLayer", spec=WIDE, capacity=80, layout="per_layer").TestCase
# 2 tokens a page (4 KiB of 2 KiB tokens, one page for all layers): many pages shared; the
# background mapper on
SMALL_PAGES = dict(spec=WIDE, capacity=80, prefetch=True)
TestVirtualPrefixSmallPages = machine("VirtualPrefixSmallPages", **SMALL_PAGES).TestCase
TestVirtualPrefixInPlaceOnly = machine("VirtualPrefixInPlaceOnly", share=False).TestCase


def _all_back(a, *seqs) -> None:
    """Free ``seqs``, then every page group is free or idle and the stats add up."""
    for seq in seqs:
        a.free(seq)
    a.stats().check()
    assert a.num_free_groups + a.num_idle_groups == a.num_groups
    a.close()


@pytest.mark.parametrize("share", [True, False])
def test_the_machine_really_hits(share):
    VirtualPrefixMachine.hits.update(tokens=0, shared_maps=0)
    run_state_machine_as_test(machine("VirtualPrefixCoverage", share=share, **SMALL_PAGES), settings=settings(
        max_examples=20, stateful_step_count=30, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow]))
    assert VirtualPrefixMachine.hits["tokens"] > 100
    assert (VirtualPrefixMachine.hits["shared_maps"] > 20) == share


def _shared_alloc(capacity=128, slots=4):
    return VirtualAllocator(SPEC, capacity, slots, MAX_LEN, page_size=4096, layout="shared", backend="host",
                            prefetch=False, enable_prefix_caching=True)


def _fill(a, seq):
    """Allocate ``seq``'s tokens after its cached prefix and write K = the token id (layer 0)."""
    start = a.num_tokens(seq)
    a.allocate(seq, len(seq.token_ids) - start)
    k, _ = a.kv_cache(0)
    k[a.slot_mapping(seq, start, len(seq.token_ids))] = torch.tensor(seq.token_ids[start:], dtype=k.dtype)[:, None, None]


def _read(a, seq):
    k, _ = a.kv_cache(0)
    return k[a.slot_mapping(seq, 0, a.num_tokens(seq))][:, 0, 0].long().tolist()


def test_live_requests_share_whole_prefix_pages_through_one_physical_page():
    a = _shared_alloc()  # 16 tokens a page
    system = list(range(1, 41))  # 2 whole pages and 8 tokens of a third
    first = FakeSeq(system + [60, 61], MAX_LEN)
    _fill(a, first)
    second = FakeSeq(system + [70], MAX_LEN)
    assert a.match_prefix(second) == 32  # whole pages only: the third is partly a common prefix
    assert a.num_shared_maps == 2 and a.slot_of(second) != a.slot_of(first)
    assert a.page_groups(second)[:2] == a.page_groups(first)[:2] and a.group_refs()[a.page_groups(first)[0]] == 2
    assert a.last_match.device == 32 and a.prefix_cache_hit_rate == 32 / len(second.token_ids)
    _fill(a, second)
    assert a.page_groups(second)[2] != a.page_groups(first)[2]  # its own page for the partial one
    assert _read(a, second) == second.token_ids and _read(a, first) == first.token_ids  # read through the alias
    s = a.stats()
    s.check()
    assert s.token_states == (len(first.token_ids) + len(second.token_ids) - 32) * a.bytes_per_token
    free_before = a.num_free_groups
    a.free(first)  # the shared pages stay for second; first's slot keeps its own (idle)
    assert _read(a, second) == second.token_ids and a.num_free_groups == free_before
    assert a.num_idle_groups == 1  # first's third page: the two shared ones are live in second's slot
    a.free(second)
    assert a.num_idle_groups == 4 and a.num_free_groups + a.num_idle_groups == a.num_groups
    a.stats().check()
    a.close()


def test_an_idle_slot_never_writes_a_page_it_shares():
    a = _shared_alloc(capacity=96, slots=3)  # 6 page groups
    first = FakeSeq(list(range(1, 35)), MAX_LEN)  # 3 pages
    _fill(a, first)
    second = FakeSeq(list(range(1, 33)) + [90, 91], MAX_LEN)
    assert a.match_prefix(second) == 32
    _fill(a, second)
    shared = a.page_groups(first)[:2]
    a.free(first)
    # a new, unrelated request admitted into first's idle slot (in-place prefix of 0 tokens)
    # writes from page 0: it must drop the shared pages, not overwrite them
    other = FakeSeq([99] * 20, MAX_LEN)
    a.free(second)
    third = FakeSeq(list(range(1, 33)) + [80], MAX_LEN)
    assert a.match_prefix(third) == 32  # in place or shared: the same physical pages
    _fill(a, third)
    assert a.page_groups(third)[:2] == shared
    assert a.can_allocate(other, 20)
    _fill(a, other)
    assert shared[0] not in a.page_groups(other) and shared[1] not in a.page_groups(other)
    assert _read(a, third) == third.token_ids and _read(a, other) == other.token_ids
    _all_back(a, third, other)


def test_reclaim_frees_private_idle_pages_before_shared_ones():
    a = _shared_alloc(capacity=96, slots=3)  # 6 page groups
    first = FakeSeq(list(range(1, 34)), MAX_LEN)  # 3 pages, 2 of them full
    _fill(a, first)
    second = FakeSeq(list(range(1, 33)) + [7], MAX_LEN)
    assert a.match_prefix(second) == 32
    _fill(a, second)  # maps 1 own page: 4 groups in use
    a.free(second)  # idle: its 2 shared pages (live in first) and 1 own page
    assert a.num_idle_groups == 1 and a.num_free_groups == 2
    third = FakeSeq([5] * 47, MAX_LEN)  # 3 pages: the 2 free ones, then second's own tail page
    assert a.can_allocate(third, 47)
    _fill(a, third)
    assert a.num_free_groups == 0
    refs = a.group_refs()
    assert [refs[g] for g in a.page_groups(first)[:2]] == [2, 2]  # second's idle slot still maps them
    assert _read(a, first) == first.token_ids and _read(a, third) == third.token_ids
    fourth = FakeSeq(list(range(1, 33)) + [8], MAX_LEN)
    assert a.match_prefix(fourth) == 32  # second's idle slot, in place (its pages are first's)
    a.free(fourth)
    _all_back(a, first, third)


def test_only_computed_pages_of_a_live_sequence_are_shared():
    """A page whose tokens were allocated for the step being scheduled is not written yet: it is
    shared only once the sequence's computed count covers it."""
    a = _shared_alloc()  # 16 tokens a page
    first = FakeSeq(list(range(1, 41)), MAX_LEN)
    _fill(a, first)
    first.num_computed_tokens = 20  # the engine has computed one page and a bit so far
    second = FakeSeq(list(range(1, 41)) + [5], MAX_LEN)
    assert a.match_prefix(second) == 16 and a.num_shared_maps == 1
    a.free(second)  # back to the queue (scheduler's _unmatch)
    first.num_computed_tokens = 40
    third = FakeSeq(list(range(1, 41)) + [6], MAX_LEN)
    assert a.match_prefix(third) == 32  # now both whole pages
    _all_back(a, first, third)


def test_share_prefix_must_be_a_bool():
    with pytest.raises(ValueError, match="allocator.args.share_prefix"):
        VirtualAllocator(SPEC, 128, 4, MAX_LEN, page_size=4096, backend="host", enable_prefix_caching=True,
                         share_prefix="yes")


def test_next_turn_lands_in_its_slot_with_no_copy():
    a = VirtualAllocator(SPEC, 128, 4, MAX_LEN, page_size=4096, layout="shared", backend="host", prefetch=False,
                         enable_prefix_caching=True)
    first = FakeSeq(list(range(1, 21)), MAX_LEN)
    a.allocate(first, 20)
    slot = a.slot_of(first)
    a.free(first)
    maps = a.num_sync_maps
    turn2 = FakeSeq(list(range(1, 21)) + [70, 71], MAX_LEN)
    assert a.match_prefix(turn2) == 20 and a.slot_of(turn2) == slot
    assert a.num_sync_maps == maps  # nothing mapped, nothing copied
    other = FakeSeq([90, 91, 92], MAX_LEN)
    assert a.match_prefix(other) == 0 and a.last_match.ideal == 0
    a.free(turn2)
    a.stats().check()


def test_reclaimed_pages_shorten_the_cached_prefix_from_its_tail():
    a = VirtualAllocator(SPEC, 64, 2, MAX_LEN, page_size=4096, layout="shared", backend="host", prefetch=False,
                         enable_prefix_caching=True)  # 16 tokens a page, 4 page groups
    assert a.page_tokens == 16 and a.num_groups == 4
    s1 = FakeSeq(list(range(1, 41)), MAX_LEN)
    a.allocate(s1, 40)  # 3 pages in slot A
    slot = a.slot_of(s1)
    a.free(s1)
    s2 = FakeSeq(list(range(100, 132)), MAX_LEN)
    a.allocate(s2, 32)  # the empty slot (A's KV is kept), 2 pages: the free one and A's last
    assert a.slot_of(s2) != slot and a.prefix.cached(slot) == 32
    back = FakeSeq(list(range(1, 41)) + [5], MAX_LEN)
    assert a.match_prefix(back) == 32 and a.slot_of(back) == slot  # the head survived, in place
    assert a.last_match.ideal == 32 and a.last_match.recomputed == 0
    a.free(s2)
    assert a.can_allocate(back, 41 - 32)
    a.allocate(back, 41 - 32)  # its third page reclaimed from the idle slot s2 left
    assert a.prefix.cached(1 - slot) == 16  # s2's slot lost its last page: 16 of its 32 tokens left
    a.free(back)
    a.stats().check()
    assert a.num_free_groups + a.num_idle_groups == a.num_groups


@pytest.mark.parametrize("layout", ["shared", "per_layer"])
def test_greedy_outputs_identical_with_prefix_caching_on_the_virtual_allocator(layout):
    from engine import LLM
    from test_host_tier import _conversations

    def run(**kw):
        llm = LLM("tiny-llama", allocator="virtual", allocator_args={"layout": layout}, device="cpu",
                  max_model_len=256, kv_cache_tokens=1024, max_num_seqs=4, **kw)
        return llm, _conversations(llm)

    _, (off, off_cached) = run()
    llm, (on, cached) = run(enable_prefix_caching=True)
    assert on == off
    assert sum(off_cached) == 0 and sum(cached) > 0 and llm.engine.allocator.prefix_cache_hit_rate > 0
    assert llm.engine.scheduler.prefix_hits == sum(cached) or llm.engine.scheduler.num_preemptions


@pytest.mark.parametrize("layout,page_tokens", [("shared", 8), ("per_layer", 32)])
def test_greedy_outputs_identical_with_live_requests_sharing_prefix_pages(layout, page_tokens):
    """Concurrent requests with a long common prefix: with a small token budget the first one's
    prefill takes several steps, the others are admitted while it runs and map its computed
    prefix pages (live sharing, not in-place reuse); outputs equal those without caching."""
    from engine import LLM, SamplingParams

    prefix = [(i * 13) % 200 + 3 for i in range(150)]
    prompts = [prefix + [(c * 7 + j) % 200 + 3 for j in range(3 + c)] for c in range(4)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    def run(**kw):
        llm = LLM("tiny-llama", allocator="virtual", allocator_args={"layout": layout, "page_size": 4096},
                  device="cpu", max_model_len=256, kv_cache_tokens=1024, max_num_seqs=4,
                  max_num_batched_tokens=64, **kw)
        outs = llm.generate(prompts, params)
        return llm, [o.outputs[0].token_ids for o in outs], [o.metrics.num_cached_tokens for o in outs]

    _, off, off_cached = run()
    llm, on, cached = run(enable_prefix_caching=True)
    a = llm.engine.allocator
    assert a.page_tokens == page_tokens
    assert on == off and sum(off_cached) == 0
    assert a.num_shared_maps > 0 and sum(cached) >= a.num_shared_maps * page_tokens // 3
    assert llm.engine.kv_memory_summary()["kv_shared_page_maps"] == a.num_shared_maps  # in summary.json
    assert all(c % page_tokens == 0 for c in cached) and max(cached) >= 128
    assert llm.engine.allocator.prefix_cache_hit_rate > 0
    s = a.stats()
    s.check()
    assert a.num_free_groups + a.num_idle_groups == a.num_groups  # all back (idle slots keep theirs)
