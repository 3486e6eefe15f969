"""Prefix caching and fork of the virtual allocator (allocators/virtual.py), a mixin of
``VirtualAllocator``: ``match_prefix`` takes the longer of two hits, an idle slot's KV reused in place
(``SlotPrefixCache``) and whole pages of computed tokens of any slot, live or idle, mapped at the new
request's first pages (``PageIndex``, ``_share``: a group sits at the same page index in every slot
mapping it and is never written there); ``_index_pages`` and ``_index_live`` index those pages by a
hash chained over the pages before them. ``fork`` copies the parent's tokens into the child's own
slot. See allocators/slot_prefix_cache.py and the "Prefix caching" paragraph of virtual.py."""
from __future__ import annotations

from allocators.base import AllocationError, SequenceLike
from allocators.prefix_cache import PrefixMatch
from allocators.slot_prefix_cache import ROOT_HASH, page_key
from allocators.virtual_pool import _Slot


class VirtualSharingMixin:
    """Prefix caching and fork of ``VirtualAllocator``: see the module docstring."""

    # -- prefix caching: an idle slot's KV reused in place, whole pages shared ----------------
    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix.hit_rate if self.prefix is not None else 0.0

    def _index_pages(self, slot: _Slot, n: int) -> None:
        """Index the whole pages among the first ``n`` tokens of ``slot``'s sequence that are not
        indexed yet (a page holding a not-yet-known, negative id stops it: the next call goes on)."""
        tpp, tokens = self.page_tokens, slot.seq.token_ids
        full = min(n, len(tokens), len(slot.groups) * tpp) // tpp
        hashes = slot.hashes
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), full):
            page = tokens[i * tpp:(i + 1) * tpp]
            if min(page) < 0:
                break
            key = page_key(parent, page)
            parent = hash(key)
            hashes.append(parent)
            self.pages.add(key, slot.groups[i])

    def _index_live(self) -> None:
        """Live slots' pages computed since the last look: only computed tokens (a step's own
        tokens are written by that step; the sequence's count moves once it was launched)."""
        for slot in self._by_seq.values():
            n = min(slot.used, getattr(slot.seq, "num_computed_tokens", slot.used))
            if n >= (len(slot.hashes) + 1) * self.page_tokens:
                self._index_pages(slot, n)

    def match_prefix(self, seq: SequenceLike) -> int:
        slot = self._by_seq.get(seq.seq_id)
        if slot is not None:
            self.last_match = PrefixMatch(slot.used, 0, slot.used)
            return slot.used
        self.last_match = PrefixMatch()
        if self.prefix is None:
            return 0
        tokens, tpp = seq.token_ids, self.page_tokens
        index, n = self.prefix.best(tokens)
        if index is not None and n:  # the slot's shared pages from the one it writes on are dropped
            n = min(n, self._cut(self.slots[index], n // tpp) * tpp)
        groups, hashes = [], []
        if self.pages is not None and (len(tokens) - 1) // tpp * tpp > n:
            self._index_live()
            groups, hashes = self.pages.match(tokens, tpp, min((len(tokens) - 1) // tpp, self.pages_per_slot))
        target = self._pick_slot(seq) if len(groups) * tpp > n else None
        hit = len(groups) * tpp if target is not None else n
        self.prefix.record(len(tokens), hit)
        ideal = self.prefix.ideal(tokens)
        self.last_match = PrefixMatch(hit, 0, max(ideal, hit))
        if target is not None:
            self._share(seq, target, groups, hashes)
        elif n:
            slot = self.slots[index]
            self._admit(seq, slot, keep=n)  # the slot and its mapped pages, content included
            slot.used = n
            self._surplus_pages -= self._pages_for(n)
        return hit

    def _share(self, seq: SequenceLike, slot: _Slot, groups: list[int], hashes: list[int]) -> None:
        """Admit ``seq`` into ``slot`` with ``groups`` (other slots' whole prefix pages) mapped at
        its first pages; the slot's own pages after them stay (deferred reclamation)."""
        # first pages: the groups wanted (a group sits at one page index in every slot, so the
        # page replaced is never one of them), while the slot is not live yet; then _admit drops
        # the slot's shared pages after them
        for j, g in enumerate(groups):
            if j < len(slot.groups):
                if slot.groups[j] == g:
                    continue
                old = self._unmap_at(slot, j)
                if old is not None:
                    self._free_groups.append(old)
                slot.groups[j] = g
            else:
                slot.groups.append(g)
            self._count(g, 1, 0)
            self._map_now(g, slot.index, j)
            self.num_shared_maps += 1
        k = len(groups)
        self._admit(seq, slot, keep=k * self.page_tokens)
        slot.hashes[:] = hashes
        slot.used = k * self.page_tokens
        self._surplus_pages -= k

    # -- fork: copy into the child's slot ------------------------------------------------------
    def can_fork(self, parent: SequenceLike) -> bool:
        p = self._by_seq.get(parent.seq_id)
        if p is None:
            return False
        slot = self._pick_slot(parent)
        return slot is not None and self._pages_for(p.used) - self._cut(slot, 0) <= self._available(slot)

    def fork(self, parent: SequenceLike, child: SequenceLike) -> None:
        p = self._by_seq.get(parent.seq_id)
        if p is None:
            raise AllocationError(f"fork: parent seq {parent.seq_id} holds no slot")
        if child.seq_id in self._by_seq:
            raise AllocationError(f"fork: child seq {child.seq_id} already holds a slot")
        self.allocate(child, p.used)
        c = self._by_seq[child.seq_id]
        src, dst, n = self.anchor + p.index * self.span, self.anchor + c.index * self.span, p.used
        if self.layout == "shared" and self._k:
            self._buffer[dst:dst + n] = self._buffer[src:src + n]
        else:
            for k, v in zip(self._k, self._v):
                k[dst:dst + n] = k[src:src + n]
                v[dst:dst + n] = v[src:src + n]
