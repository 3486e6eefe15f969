"""Prefix caching for the virtual allocator (allocators/slot_prefix_cache.py): an idle slot's KV
reused in place by a request whose prompt begins with its tokens.

Property tests drive the allocator as the engine does, with conversations coming back for their
next turn, and check (through the invariants of test_allocator_properties) that every live
sequence reads exactly its own KV, a prefix hit included, that memory adds up, and that all of
it is back at the end; the engine keeps greedy outputs identical with prefix caching on."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test

from allocators.virtual import VirtualAllocator
from conftest import FakeSeq
from test_allocator_properties import MAX_LEN, SPEC, WIDE, AllocatorMachine

SETTINGS = settings(max_examples=30, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class VirtualPrefixMachine(AllocatorMachine):
    spec, capacity, page_size, layout = SPEC, 128, 4096, "shared"
    hits = {"tokens": 0}

    def make(self):
        return VirtualAllocator(self.spec, self.capacity, 4, MAX_LEN, page_size=self.page_size, layout=self.layout,
                                backend="host", prefetch=False, enable_prefix_caching=True)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.lists(st.integers(51, 99), min_size=1, max_size=6))
    def next_turn(self, data, extra):
        """A conversation finishes, then comes back with its tokens and more."""
        seq = data.draw(st.sampled_from(self.live))
        self.alloc.free(seq)
        self.live.remove(seq)
        tokens = (seq.token_ids + extra)[:MAX_LEN - 1]
        new = FakeSeq(tokens, MAX_LEN)
        cached = self.alloc.match_prefix(new)
        m = self.alloc.last_match
        assert cached < len(tokens) and cached == self.alloc.num_tokens(new) == m.device
        VirtualPrefixMachine.hits["tokens"] += cached
        new.token_ids = tokens[:cached]
        if self._grow(new, tokens[cached:]):
            self.live.append(new)
        else:
            self.alloc.free(new)
            assert self.alloc.num_tokens(new) == 0


def machine(name, **attrs):
    cls = type(name, (VirtualPrefixMachine,), attrs)
    cls.TestCase.settings = SETTINGS
    return cls


TestVirtualPrefixShared = machine("VirtualPrefixShared").TestCase
TestVirtualPrefixPerLayer = machine("VirtualPrefixPerLayer", spec=WIDE, capacity=80, layout="per_layer").TestCase


def test_the_machine_really_hits():
    VirtualPrefixMachine.hits["tokens"] = 0
    run_state_machine_as_test(machine("VirtualPrefixCoverage"), settings=settings(
        max_examples=20, stateful_step_count=30, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow]))
    assert VirtualPrefixMachine.hits["tokens"] > 100


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
