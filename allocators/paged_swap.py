"""Swap for the paged allocator (preemption_mode=swap): a sequence's blocks, or a group's, moved
to the host swap space and back, with the prefix cache's entries restored on the way in. A mixin
of PagedAllocator; the engine copies the (source, destination) block pairs each call returns."""
from __future__ import annotations

from typing import TYPE_CHECKING

from allocators.base import AllocationError, SequenceLike
from allocators.prefix_cache import ROOT_HASH

if TYPE_CHECKING:
    from allocators.paged import _SeqBlocks


class PagedSwapMixin:
    # -- swapping ------------------------------------------------------------------------
    def is_swapped(self, seq: SequenceLike) -> bool:
        st = self._seqs.get(seq.seq_id)
        return st is not None and st.host is not None

    def can_swap_out(self, seq: SequenceLike) -> bool:
        st = self._seqs.get(seq.seq_id)
        return st is not None and st.host is None and len(st.table) <= self.swap_space.num_free

    def swap_out(self, seq: SequenceLike) -> list[tuple[int, int]]:
        st = self._seqs.get(seq.seq_id)
        if st is None or st.host is not None:
            raise AllocationError(f"swap_out: seq {seq.seq_id} holds no device blocks")
        if len(st.table) > self.swap_space.num_free:
            raise AllocationError(
                f"swap_out: seq {seq.seq_id} needs {len(st.table)} host blocks, {self.swap_space.num_free} free: "
                "raise swap_space (GiB; allocator argument swap_space_tokens) or preempt by recompute")
        host = self.swap_space.swap_out(self._caches, st.table)
        pairs = list(zip(st.table, host))
        self._release_blocks(st)
        st.host = host
        return pairs

    def can_swap_in(self, seq: SequenceLike, num_new_tokens: int = 0) -> bool:
        st = self._seqs.get(seq.seq_id)
        if st is None or st.host is None:
            return False
        # swapped-in blocks are all private: no copy-on-write, only the blocks themselves
        return -(-(st.num_tokens + num_new_tokens) // self._block_size) <= self.pool.num_free

    def swap_in(self, seq: SequenceLike) -> list[tuple[int, int]]:
        st = self._seqs.get(seq.seq_id)
        if st is None or st.host is None:
            raise AllocationError(f"swap_in: seq {seq.seq_id} is not swapped out")
        if len(st.host) > self.pool.num_free:
            raise AllocationError(f"swap_in: seq {seq.seq_id} needs {len(st.host)} blocks, "
                                  f"{self.pool.num_free} free: check can_swap_in first")
        bs = self._block_size
        dev = [self.pool.take() for _ in st.host]
        self._before_write()
        for i, b in enumerate(dev):
            self.pool.set_fill(b, min(bs, st.num_tokens - i * bs))
        self.swap_space.swap_in(self._caches, st.host, dev)
        pairs = list(zip(st.host, dev))
        st.table, st.host = dev, None
        if self.enable_prefix_caching:  # the content is back: make it findable again
            self._reindex(st)
        return pairs

    # -- swapping a group (the samples of one request) -------------------------------------
    def _swapped_group(self, seqs: list[SequenceLike], on_host: bool) -> list[_SeqBlocks]:
        sts = [self._seqs.get(s.seq_id) for s in seqs]
        if any(st is None or (st.host is not None) != on_host for st in sts):
            where = "swapped out" if on_host else "on the device"
            raise AllocationError(f"group of seqs {[s.seq_id for s in seqs]}: not all {where}")
        return sts

    def can_swap_out_group(self, seqs: list[SequenceLike]) -> bool:
        sts = [self._seqs.get(s.seq_id) for s in seqs]
        if any(st is None or st.host is not None for st in sts):
            return False
        return len({b for st in sts for b in st.table}) <= self.swap_space.num_free

    def swap_out_group(self, seqs: list[SequenceLike]) -> list[tuple[int, int]]:
        """``swap_out`` for sequences that share blocks: each distinct block is copied once and
        its host copy is shared by the same holders."""
        sts = self._swapped_group(seqs, on_host=False)
        distinct = list(dict.fromkeys(b for st in sts for b in st.table))
        if len(distinct) > self.swap_space.num_free:
            raise AllocationError(
                f"swap_out_group: {len(distinct)} host blocks needed, {self.swap_space.num_free} free: "
                "check can_swap_out_group first")
        host = self.swap_space.swap_out(self._caches, distinct)
        to_host = dict(zip(distinct, host))
        for st in sts:
            st.host = [to_host[b] for b in st.table]
            self.swap_space.share(st.host)
            self._release_blocks(st)
        self.swap_space.release(host)  # the copy's own reference: the holders keep theirs
        return list(zip(distinct, host))

    def can_swap_in_group(self, seqs: list[SequenceLike], num_new_tokens: list[int]) -> bool:
        """Room for the group's distinct blocks and then for ``allocate(seq, n)`` of each member
        (counted as if each wrote alone: a shared last block costs each writer a copy)."""
        sts = [self._seqs.get(s.seq_id) for s in seqs]
        if any(st is None or st.host is None for st in sts):
            return False
        bs = self._block_size
        holders: dict[int, int] = {}
        for st in sts:
            for h in st.host:
                holders[h] = holders.get(h, 0) + 1
        need = len(holders)
        for st, n in zip(sts, num_new_tokens):
            need += max(0, -(-(st.num_tokens + n) // bs) - len(st.host))
            if n and st.num_tokens % bs and holders[st.host[-1]] > 1:
                need += 1  # copy-on-write of the shared last block
        return need <= self.pool.num_free

    def swap_in_group(self, seqs: list[SequenceLike]) -> list[tuple[int, int]]:
        """``swap_in`` of sequences swapped out together: each distinct host block comes back
        once, shared by the members that held it."""
        sts = self._swapped_group(seqs, on_host=True)
        distinct = list(dict.fromkeys(h for st in sts for h in st.host))
        if len(distinct) > self.pool.num_free:
            raise AllocationError(f"swap_in_group: {len(distinct)} blocks needed, {self.pool.num_free} free: "
                                  "check can_swap_in_group first")
        bs, pool = self._block_size, self.pool
        dev = [pool.take() for _ in distinct]
        self._before_write()
        self.swap_space.copy_in(self._caches, distinct, dev)
        to_dev = dict(zip(distinct, dev))
        filled: set[int] = set()
        for st in sts:
            table = [to_dev[h] for h in st.host]
            for i, b in enumerate(table):
                if b in filled:
                    pool.share(b)
                else:
                    filled.add(b)
                    pool.set_fill(b, min(bs, st.num_tokens - i * bs))
            self.swap_space.release(st.host)
            st.table, st.host = table, None
            if self.enable_prefix_caching:
                self._reindex(st)
        for st in sts:  # a partial last block shared again: charged to one holder, copied on write
            if st.num_tokens % bs and pool.ref[st.table[-1]] > 1:
                self._tail_holders.setdefault(st.table[-1], set()).add(st.seq.seq_id)
        return list(zip(distinct, dev))

    def _reindex(self, st: _SeqBlocks) -> None:
        """Make a swapped-in sequence's full blocks findable in the prefix cache again."""
        tokens, parent, bs = st.seq.token_ids, ROOT_HASH, self._block_size
        for i, h in enumerate(st.hashes):
            self.cache.insert((parent, tuple(tokens[i * bs:(i + 1) * bs])), st.table[i])
            parent = h
