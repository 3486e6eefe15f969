"""The page groups of the virtual allocator (allocators/virtual.py), a mixin of ``VirtualAllocator``:
mapping a group at a page of a slot (on the step's path or on the background thread) and unmapping
it, the per-group counters of slots mapping it (``_ref``, ``_live``; idle-only, duplicate and shared
groups counted once), where a slot's next groups come from (``_acquire``: the free pool, then idle
slots' tails, page-aware and least recently used first, ``_reclaim``, then other live slots' pages
mapped ahead of their tokens) and mapping ahead of need (``_map_ahead`` for a growing sequence,
``_premap_empty`` for empty slots). It reads and writes the allocator's slots, pool and counters,
all set up by ``VirtualAllocator.__init__``."""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from allocators.base import AllocationError, SequenceLike


@dataclass(slots=True, eq=False)
class _Slot:
    index: int
    groups: list[int] = field(default_factory=list)  # page group mapped at page j of this slot
    seq: SequenceLike | None = None
    used: int = 0
    want: int = 0  # groups the live sequence can ever use (its max_len)
    hashes: list[int] = field(default_factory=list)  # chained hash of each page indexed for sharing


class VirtualPoolMixin:
    """Page groups of ``VirtualAllocator``: see the module docstring."""

    # -- pages ---------------------------------------------------------------------------
    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)

    def _want(self, seq: SequenceLike) -> int:
        """Groups ``seq`` can ever use."""
        return self._pages_for(min(seq.max_len, self.span))

    def _map_now(self, group: int, slot: int, page: int, background: bool = False) -> None:
        t0 = time.perf_counter()
        R, at = self.num_ranges, slot * self.pages_per_slot + page
        for r in range(R):
            self.backend.map(group * R + r, r, at)
        if background:  # one worker thread: the only writer of this counter
            self.vmm_background_s += time.perf_counter() - t0
        else:
            self.vmm_critical_s += time.perf_counter() - t0

    def _wait_mapped(self, slot: int, page: int) -> None:
        """The step needs page ``page`` of ``slot``: wait if it is still being mapped ahead."""
        fut = self._inflight.pop((slot, page), None)
        if fut is not None:
            t0 = time.perf_counter()
            fut.result()
            self.vmm_critical_s += time.perf_counter() - t0

    def _count(self, g: int, dref: int, dlive: int) -> None:
        """Group ``g`` gains (loses) ``dref`` slot mappings, ``dlive`` of them live: keeps the
        once-per-group counters (idle-only, duplicate live mappings, shared) exact."""
        ref, live = self._ref, self._live
        r0, l0 = ref[g], live[g]
        r1, l1 = r0 + dref, l0 + dlive
        ref[g], live[g] = r1, l1
        self._idle_pages += (r1 > 0 and l1 == 0) - (r0 > 0 and l0 == 0)
        self._dup_pages += (l1 - 1 if l1 > 1 else 0) - (l0 - 1 if l0 > 1 else 0)
        self._num_shared += (r1 > 1) - (r0 > 1)

    def _map(self, group: int, slot: _Slot, page: int, ahead: bool) -> None:
        self._count(group, 1, slot.seq is not None)
        if ahead and self._executor is not None:
            self._inflight[(slot.index, page)] = self._executor.submit(self._map_now, group, slot.index, page, True)
            self.num_async_maps += 1
        else:
            self._map_now(group, slot.index, page)
            self.num_sync_maps += not ahead

    def _unmap_at(self, slot: _Slot, page: int) -> int | None:
        """Unmap page ``page`` of ``slot``; returns its group if no slot maps it any more (free
        now, its index entry gone), else None (another slot still maps it)."""
        self._wait_mapped(slot.index, page)
        if self.fence is not None:  # with asynchronous scheduling a launched step may still use the page
            self.fence()
        t0 = time.perf_counter()
        at = slot.index * self.pages_per_slot + page
        for r in range(self.num_ranges):
            self.backend.unmap(r, at)
        self.vmm_critical_s += time.perf_counter() - t0
        g = slot.groups[page]
        del slot.hashes[page:]  # the chain of indexed pages stops before it
        self._count(g, -1, -(slot.seq is not None))
        if self._ref[g]:
            return None
        if self.pages is not None:
            self.pages.drop(g)
        return g

    def _unmap_tail(self, slot: _Slot) -> int | None:
        g = self._unmap_at(slot, len(slot.groups) - 1)
        slot.groups.pop()
        return g

    def _cut(self, slot: _Slot, first: int) -> int:
        """The first page from ``first`` on that ``slot`` shares with another slot (else its
        page count): a slot about to write from page ``first`` keeps only pages before it."""
        groups = slot.groups
        if not self._num_shared:
            return len(groups)
        ref = self._ref
        for j in range(first, len(groups)):
            if ref[groups[j]] > 1:
                return j
        return len(groups)

    def _surplus(self, slot: _Slot) -> int:
        return len(slot.groups) - self._pages_for(slot.used)

    def _available(self, exclude: _Slot) -> int:
        """Groups ``exclude`` could be given: free, mapped by idle slots only, or surplus of other
        live slots. A slot not yet admitted keeps its private pages before its first shared one
        (``_cut``): those are not available to it, its shared pages stay where else they are."""
        if exclude.seq is None:
            own_idle, own_surplus = self._cut(exclude, 0), 0
        else:
            own_idle, own_surplus = 0, self._surplus(exclude)
        return len(self._free_groups) + self._idle_pages - own_idle + self._surplus_pages - own_surplus

    def _acquire(self, k: int, exclude: _Slot, surplus_too: bool = True) -> list[int]:
        """``k`` groups: free ones first, then reclaimed from idle slots (LRU), then stolen from
        pages other live slots mapped ahead of their tokens."""
        out = [self._free_groups.pop() for _ in range(min(k, len(self._free_groups)))]
        if len(out) < k and self._idle:
            self._reclaim(k, out, exclude)
        if len(out) < k and surplus_too:
            for victim in self._by_seq.values():
                if victim is exclude:
                    continue
                take = min(k - len(out), self._surplus(victim))
                for _ in range(take):  # pages beyond a live slot's tokens are never shared
                    g = self._unmap_tail(victim)
                    assert g is not None, "surplus page of a live slot mapped elsewhere"
                    out.append(g)
                self._surplus_pages -= take
                if len(out) == k:
                    break
        if len(out) < k:
            raise AllocationError(f"virtual allocator: {k} page groups wanted, {len(out)} found")
        return out

    def _reclaim(self, k: int, out: list[int], exclude: _Slot) -> None:
        """Unmap idle slots' tail pages (least recently used slot first) into ``out`` until it
        holds ``k`` groups, page-aware: first only tail pages mapped nowhere else (each frees a
        group); then, if short, idle slots drop their tails down to their first group mapped by
        idle slots only, which frees every group no live slot maps (a page a live slot maps
        frees nothing anywhere: it stays)."""
        for whole in (False, True):
            for i in list(self._idle):
                if len(out) >= k:
                    return
                if i == exclude.index:
                    continue
                victim = self.slots[i]
                groups, ref = victim.groups, self._ref
                if not whole:
                    stop = len(groups)
                    while stop and ref[groups[stop - 1]] == 1:
                        stop -= 1
                else:  # pages before the first idle-only group free nothing
                    stop = next((j for j, g in enumerate(groups) if not self._live[g]), len(groups))
                while len(groups) > stop and len(out) < k:
                    g = self._unmap_tail(victim)
                    if g is not None:
                        out.append(g)
                if self.prefix is not None:  # whole pages leave the tail: the cached prefix keeps its head
                    self.prefix.truncate(victim.index, len(groups) * self.page_tokens)
                if not groups:
                    del self._idle[victim.index]
                    self._premapped.discard(victim.index)
                    heapq.heappush(self._empty, victim.index)

    def _map_ahead(self, slot: _Slot) -> None:
        """Claim the group the next ``prefetch_tokens`` tokens need and map it off the critical
        path, while every live sequence could still get a group without stealing."""
        if slot.used + self.prefetch_tokens <= len(slot.groups) * self.page_tokens:
            return
        if len(slot.groups) >= slot.want:
            return
        if len(self._free_groups) + self._idle_pages <= len(self._by_seq):
            return
        g = self._acquire(1, slot, surplus_too=False)[0]
        slot.groups.append(g)
        self._surplus_pages += 1
        self._map(g, slot, len(slot.groups) - 1, ahead=True)

    def _premap_empty(self) -> None:
        """Admission off the critical path: up to ``premap`` empty slots get a group mapped in the
        background and wait idle, while the free pool holds more groups than there are live
        sequences (each could still be given one without reclaiming); a request admitted there
        finds its first page mapped. Only free groups, never reclaimed or stolen ones; a bounded
        reserve, as mapping the whole pool ahead competes with the steps for the driver."""
        free, ready = self._free_groups, self._premapped
        while len(ready) < self.premap and self._empty and len(free) > len(self._by_seq) + 1:
            slot = self.slots[heapq.heappop(self._empty)]
            g = free.pop()
            slot.groups.append(g)
            self._idle[slot.index] = None
            ready.add(slot.index)
            self._map(g, slot, 0, ahead=True)
            self.num_premaps += 1

    def wait_prefetch(self) -> None:
        """Block until every background mapping is done (start-up, tests, benchmarks)."""
        while self._inflight:
            self._inflight.pop(next(iter(self._inflight))).result()
