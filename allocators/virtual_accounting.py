"""Accounting of the virtual allocator (allocators/virtual.py), a mixin of ``VirtualAllocator``: a
live sequence's tokens and charged capacity (its mapped groups up to those its ``max_len`` can use),
the pool's ``MemoryStats`` (a group shared by several live slots counted once in token states;
groups mapped by idle slots only reported as ``idle_mapped``, never as usage; live slots' groups
beyond what they can use as external fragmentation), and the introspection tests and experiments
read (free and idle groups, a sequence's slot and page groups, every group's slot count)."""
from __future__ import annotations

from typing import Sequence as Seq

from allocators.base import SequenceLike
from allocators.stats import MemoryStats
from allocators.virtual_pool import _Slot


class VirtualAccountingMixin:
    """Capacities, ``stats`` and introspection of ``VirtualAllocator``: see the module docstring."""

    # -- accounting ----------------------------------------------------------------------------
    def num_tokens(self, seq: SequenceLike) -> int:
        slot = self._by_seq.get(seq.seq_id)
        return slot.used if slot else 0

    def _charged_pages(self, slot: _Slot) -> int:
        return min(len(slot.groups), max(slot.want, self._pages_for(slot.used)))

    def seq_capacity(self, seq: SequenceLike) -> int:
        slot = self._by_seq.get(seq.seq_id)
        return self._charged_pages(slot) * self.page_tokens if slot else 0

    def seq_capacities(self, seqs: Seq[SequenceLike]) -> list[int]:
        get, tpp = self._by_seq.get, self.page_tokens
        out = []
        for s in seqs:  # seq_capacity, inlined
            slot = get(s.seq_id)
            if slot is None:
                out.append(0)
                continue
            charged = -(-slot.used // tpp)
            if charged < slot.want:
                charged = slot.want
            out.append(min(charged, len(slot.groups)) * tpp)
        return out

    def max_fit_tokens(self) -> int:
        return min(self.capacity_tokens, self.span)

    def stats(self) -> MemoryStats:
        tpp = self.page_tokens
        used = reserved = internal = 0
        unused_live = 0  # groups of live slots their sequence can never use
        for slot in self._by_seq.values():  # _charged_pages + live_split, inlined: called every step
            u, mapped = slot.used, len(slot.groups)
            charged = -(-u // tpp)
            if charged < slot.want:
                charged = slot.want
            if charged > mapped:
                charged = mapped
            unused_live += mapped - charged
            cap = charged * tpp
            bound = slot.seq.max_len
            if bound > cap:
                bound = cap
            if bound < u:
                bound = u
            used += u
            reserved += bound - u
            internal += cap - bound
        used -= self._dup_pages * tpp  # a page shared by live slots: full in each, counted once
        bpt, tpp = self.bytes_per_token, self.page_tokens
        return MemoryStats(
            capacity=self.capacity_tokens * bpt,
            token_states=used * bpt,
            reservation=reserved * bpt,
            internal_frag=internal * bpt,
            external_frag=unused_live * tpp * bpt,  # mapped to live slots beyond what they can use
            idle_mapped=self._idle_pages * tpp * bpt,  # mapped by idle slots only, kept for the next request
            free=len(self._free_groups) * tpp * bpt,
        )

    # -- introspection (tests, experiments) ---------------------------------------------------
    @property
    def num_free_groups(self) -> int:
        return len(self._free_groups)

    @property
    def num_idle_groups(self) -> int:
        return self._idle_pages

    def slot_of(self, seq: SequenceLike) -> int:
        return self._by_seq[seq.seq_id].index

    def page_groups(self, seq: SequenceLike) -> list[int]:
        """The page group mapped at each page of ``seq``'s slot."""
        return list(self._by_seq[seq.seq_id].groups)

    def group_refs(self) -> list[int]:
        """Slots mapping each page group (0: free)."""
        return list(self._ref)
