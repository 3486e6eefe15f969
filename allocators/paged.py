"""Paged KV cache (PagedAttention, vLLM): fixed-size blocks from a pool, a block table per sequence.

Blocks are reference counted, so sequences share them: ``fork`` (parallel sampling) shares
all of the parent's blocks and the prefix cache shares full blocks between requests with
a common prefix. A shared block is never written: ``allocate`` first gives the writer a
private copy of a shared partial last block (copy-on-write). Swap moves a sequence's blocks
to a host pool and back.

Accounting: token states count each held block's filled slots once (``BlockPool.filled_total``);
the unfilled slots of a sequence's last block are charged to that sequence, or, where the
block is shared after a fork, to its holder with the smallest seq_id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch

import kernels
from allocators.base import AllocationError, DecodeRun, KVAllocator, KVCacheSpec, SequenceLike
from allocators.block_pool import BlockPool
from allocators.host_swap import HostSwapSpace
from allocators.host_tier import HostKVTier, HostTierConfig, Transfer
from allocators.prefix_cache import ROOT_HASH, PrefixCache, PrefixMatch
from allocators.registry import register
from allocators.stats import MemoryStats
from kernels.metadata import Addressing

MAX_BLOCK_SIZE = 1024


@dataclass(slots=True)
class _SeqBlocks:
    seq: SequenceLike
    table: list[int] = field(default_factory=list)
    num_tokens: int = 0
    hashes: list[int] = field(default_factory=list)  # chained hash of each full block so far
    host: list[int] | None = None  # host blocks while swapped out
    released: int = 0  # leading table entries given back (-1): a sliding window's layers passed them


@register("paged")
class PagedAllocator(KVAllocator):
    mode = Addressing.PAGED
    supports_fork = True
    supports_prefix_caching = True
    supports_swap = True
    supports_host_tier = True

    @classmethod
    def check_args(cls, args: dict) -> None:
        block_size = args.get("block_size", 16)
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size={block_size}: choose a block size between 1 and {MAX_BLOCK_SIZE}")

    def __init__(
        self,
        spec: KVCacheSpec,
        capacity_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        swap_space_tokens: int = 0,
        host_tier_tokens: int = 0,  # host tier (allocators/host_tier.py): evicted cached blocks kept on the host
        host_tier_policy: str = "lru",
        host_transfer_blocks: int = 1,
    ):
        self.check_args({"block_size": block_size})
        num_blocks = capacity_tokens // block_size
        if num_blocks == 0:
            raise ValueError(
                f"KV pool of {capacity_tokens} tokens holds no block of {block_size}: "
                "give the allocator more memory or a smaller block_size")
        super().__init__(spec, num_blocks * block_size, max_num_seqs, max_model_len)
        self._block_size = block_size
        self.num_blocks = num_blocks
        self.pool = BlockPool(num_blocks, block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self.cache = PrefixCache()
        self.pool.on_evict = self._on_evict
        self.swap_space = HostSwapSpace(spec, swap_space_tokens // block_size, block_size)
        self._seqs: dict[int, _SeqBlocks] = {}
        self._tail_holders: dict[int, set[int]] = {}  # shared partial last block -> its holders
        self._make_cache(num_blocks * block_size)
        self._caches = list(zip(self._k, self._v))
        self.host_tier: HostKVTier | None = None
        if host_tier_tokens:
            self.host_tier = HostKVTier(spec, block_size, HostTierConfig(
                host_tier_tokens // block_size, host_tier_policy, host_transfer_blocks), self._caches)
        self._seen: set[int] = set()  # chained hash of every block ever indexed (recomputed tokens)
        self.last_match = PrefixMatch()

    @property
    def block_size(self) -> int:
        return self._block_size

    # -- host tier hooks (allocators/host_tier.py) -----------------------------------------
    def _on_evict(self, block: int) -> None:
        """A free cached block is taken for new content: the host tier keeps a copy."""
        if self.host_tier is not None:
            key = self.cache.key_of(block)
            if key is not None:
                self.host_tier.offload(key, block)
        self.cache.evict(block)

    def _before_write(self) -> None:
        """Blocks just evicted must be copied out before anything writes them."""
        if self.host_tier is not None:
            self.host_tier.flush()

    def flush_transfers(self) -> list[Transfer]:
        return self.host_tier.take_transfers() if self.host_tier is not None else []

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cache.hit_rate

    # -- room for tokens -----------------------------------------------------------------
    def _needs(self, st: _SeqBlocks | None, num_new_tokens: int) -> int:
        """Blocks ``allocate`` would take: new blocks, plus one for a copy-on-write."""
        if st is None:
            return -(-num_new_tokens // self._block_size)
        total = st.num_tokens + num_new_tokens
        need = max(0, -(-total // self._block_size) - len(st.table))
        if num_new_tokens and st.num_tokens % self._block_size and self.pool.ref[st.table[-1]] > 1:
            need += 1
        return need

    def _room_in_tail(self, st: _SeqBlocks | None, num_new_tokens: int) -> bool:
        """The decode fast path: the tokens fit in a private last block with room."""
        if st is None or not st.table:
            return False
        used = st.num_tokens % self._block_size
        return used != 0 and used + num_new_tokens <= self._block_size and self.pool.ref[st.table[-1]] == 1

    def can_allocate(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        st = self._seqs.get(seq.seq_id)
        if self._room_in_tail(st, num_new_tokens):
            return True
        if st is not None and st.host is not None:
            return False
        return self._needs(st, num_new_tokens) <= self.pool.num_free

    def allocate(self, seq: SequenceLike, num_new_tokens: int) -> None:
        st = self._seqs.get(seq.seq_id)
        if self._room_in_tail(st, num_new_tokens):
            pool, b = self.pool, st.table[-1]
            pool.fill[b] += num_new_tokens
            pool.filled_total += num_new_tokens
            st.num_tokens += num_new_tokens
            if self.enable_prefix_caching and st.num_tokens % self._block_size == 0:
                self._register_full_blocks(st)
            return
        if st is not None and st.host is not None:
            raise AllocationError(f"seq {seq.seq_id} is swapped out: swap_in before allocating for it")
        need = self._needs(st, num_new_tokens)
        if need > self.pool.num_free:
            raise AllocationError(
                f"seq {seq.seq_id} needs {need} blocks, {self.pool.num_free} free: check can_allocate first")
        if st is None:
            st = self._seqs[seq.seq_id] = _SeqBlocks(seq)
        if num_new_tokens <= 0:
            return
        bs, pool, table = self._block_size, self.pool, st.table
        if st.num_tokens % bs and pool.ref[table[-1]] > 1:
            self._copy_on_write(st)
        total = st.num_tokens + num_new_tokens
        for i in range(st.num_tokens // bs, -(-total // bs)):
            if i == len(table):
                table.append(pool.take())
            pool.set_fill(table[i], min(bs, total - i * bs))
        st.num_tokens = total
        if self.enable_prefix_caching and total // bs > len(st.hashes):
            self._register_full_blocks(st)

    def allocate_batch(self, seqs: Seq[SequenceLike], num_new_tokens: int = 1) -> int:
        # allocate's two decode cases inlined: room in a private last block, or a full last
        # block followed by a free one; anything else goes through can_allocate / allocate
        bs, n, get, pool = self._block_size, num_new_tokens, self._seqs.get, self.pool
        ref, fill, caching = pool.ref, pool.fill, self.enable_prefix_caching
        for i, seq in enumerate(seqs):
            st = get(seq.seq_id)
            if st is not None and st.table:
                table, used = st.table, st.num_tokens % bs
                if used:
                    b = table[-1]
                    if used + n <= bs and ref[b] == 1:
                        fill[b] += n
                        pool.filled_total += n
                        st.num_tokens += n
                        if caching and used + n == bs:
                            self._register_full_blocks(st)
                        continue
                elif 0 < n <= bs and len(table) * bs == st.num_tokens and pool.num_free:
                    b = pool.take()
                    table.append(b)
                    pool.set_fill(b, n)
                    st.num_tokens += n
                    if caching and st.num_tokens // bs > len(st.hashes):
                        self._register_full_blocks(st)
                    continue
            if not self.can_allocate(seq, n):
                return i
            self.allocate(seq, n)
        return len(seqs)

    def decode_run(self, seqs: Seq[SequenceLike]) -> DecodeRun | None:
        # new blocks come off the plain free stack, one per sequence every block_size steps,
        # preempted sequences put theirs back; a prefix cache (registering full blocks, evicting
        # cached ones), a host tier or a shared partial tail (copy-on-write, charged to one
        # holder) has no bulk model
        if self.enable_prefix_caching or self.host_tier is not None or self._tail_holders or self.pool.num_cached_free:
            return None
        bs, get, ref = self._block_size, self._seqs.get, self.pool.ref
        sts, used = [], []
        for seq in seqs:
            st = get(seq.seq_id)
            if st is None or st.host is not None or st.released or not st.table:
                return None
            n, table = st.num_tokens, st.table
            if len(table) != -(-n // bs) or (n % bs and ref[table[-1]] != 1):
                return None
            sts.append(st)
            used.append(n)
        return _PagedDecodeRun(self, seqs, sts, used)

    def _copy_on_write(self, st: _SeqBlocks) -> None:
        """``st``'s last block is shared and about to be written: write a private copy instead."""
        old = st.table[-1]
        new = self.pool.take()
        self._before_write()
        if self._caches:
            dev = self._caches[0][0].device
            src = torch.tensor([old], dtype=torch.int64, device=dev)
            dst = torch.tensor([new], dtype=torch.int64, device=dev)
            for k, v in self._caches:
                kernels.copy_blocks(k, src, dst, self._block_size)
                kernels.copy_blocks(v, src, dst, self._block_size)
        self.pool.set_fill(new, self.pool.fill[old])
        self.pool.release(old, cached=False)  # partial blocks are never cached
        self._leave_tail(old, st.seq.seq_id)
        st.table[-1] = new

    def _leave_tail(self, block: int, seq_id: int) -> None:
        holders = self._tail_holders.get(block)
        if holders is not None:
            holders.discard(seq_id)
            if len(holders) <= 1:
                del self._tail_holders[block]

    def _register_full_blocks(self, st: _SeqBlocks) -> None:
        """Index the blocks that became full, chaining each block's hash to its prefix.

        A block holding a token not known yet (a negative id: sampled, not read back, under
        asynchronous scheduling) stops the indexing; the next block to fill picks it up."""
        bs, tokens = self._block_size, st.seq.token_ids
        full = min(st.num_tokens, len(tokens)) // bs
        parent = st.hashes[-1] if st.hashes else ROOT_HASH
        for i in range(len(st.hashes), full):
            block = tuple(tokens[i * bs:(i + 1) * bs])
            if min(block) < 0:
                break
            key = (parent, block)
            parent = hash(key)
            st.hashes.append(parent)
            self._seen.add(parent)
            self.cache.insert(key, st.table[i])

    def free(self, seq: SequenceLike) -> None:
        st = self._seqs.pop(seq.seq_id, None)
        if st is None:
            return
        if st.host is not None:
            self.swap_space.release(st.host)
        self._release_blocks(st)

    def _release_blocks(self, st: _SeqBlocks) -> None:
        if st.table and st.num_tokens % self._block_size:
            self._leave_tail(st.table[-1], st.seq.seq_id)
        # last blocks first: the LRU evicts a prefix's tail before its head; without prefix
        # caching no block is ever indexed, so none is looked up
        release, cache, caching = self.pool.release, self.cache, self.enable_prefix_caching
        for b in reversed(st.table[st.released:]):
            release(b, cached=caching and cache.is_cached(b))
        st.table = []

    def release_head(self, seq: SequenceLike, first_kept: int) -> int:
        """Give back the blocks wholly before token ``first_kept`` (layers with a sliding window
        never read them again); their table entries become -1 and the table keeps its length,
        so positions still index it. The last block always stays. Returns blocks given back."""
        st = self._seqs.get(seq.seq_id)
        if st is None or st.host is not None:
            return 0
        upto = min(first_kept // self._block_size, len(st.table) - 1)
        done = 0
        for i in range(st.released, upto):
            self.pool.release(st.table[i], cached=False)
            st.table[i] = -1
            done += 1
        st.released = max(st.released, upto)
        return done

    def num_tokens(self, seq: SequenceLike) -> int:
        st = self._seqs.get(seq.seq_id)
        return st.num_tokens if st else 0

    def seq_capacity(self, seq: SequenceLike) -> int:
        st = self._seqs.get(seq.seq_id)
        if st is None or not st.table:
            return 0
        if st.num_tokens % self._block_size:
            holders = self._tail_holders.get(st.table[-1])
            if holders is not None and min(holders) != seq.seq_id:
                return st.num_tokens  # the shared tail is charged to another holder
        return (len(st.table) - st.released) * self._block_size

    def seq_capacities(self, seqs: Seq[SequenceLike]) -> list[int]:
        if self._tail_holders:  # a shared partial last block is charged to one holder
            return [self.seq_capacity(s) for s in seqs]
        bs, get = self._block_size, self._seqs.get
        return [(len(st.table) - st.released) * bs if (st := get(s.seq_id)) is not None else 0 for s in seqs]

    # -- sharing -------------------------------------------------------------------------
    def can_fork(self, parent: SequenceLike) -> bool:
        st = self._seqs.get(parent.seq_id)
        return st is not None and st.host is None

    def fork(self, parent: SequenceLike, child: SequenceLike) -> None:
        p = self._seqs.get(parent.seq_id)
        if p is None or p.host is not None:
            raise AllocationError(f"fork: parent seq {parent.seq_id} holds no device blocks")
        if child.seq_id in self._seqs:
            raise AllocationError(f"fork: child seq {child.seq_id} already holds blocks")
        for b in p.table[p.released:]:
            self.pool.share(b)
        self._seqs[child.seq_id] = _SeqBlocks(child, list(p.table), p.num_tokens, list(p.hashes),
                                              released=p.released)
        if p.num_tokens % self._block_size:
            self._tail_holders.setdefault(p.table[-1], {parent.seq_id}).add(child.seq_id)

    def match_prefix(self, seq: SequenceLike) -> int:
        st = self._seqs.get(seq.seq_id)
        if st is not None:
            self.last_match = PrefixMatch(st.num_tokens, 0, st.num_tokens)
            return st.num_tokens
        self.last_match = PrefixMatch()
        if not self.enable_prefix_caching:
            return 0
        bs, tokens = self._block_size, seq.token_ids
        n_full = (len(tokens) - 1) // bs  # leave at least one token to compute
        keys: list = []  # the chain's keys, made only as far as the walk goes (long prompts, many retries)
        hashes: list[int] = []

        def key(i: int):
            while len(keys) <= i:
                j = len(keys)
                k = (hashes[-1] if hashes else ROOT_HASH, tuple(tokens[j * bs:(j + 1) * bs]))
                keys.append(k)
                hashes.append(hash(k))
            return keys[i]

        st = _SeqBlocks(seq)
        pool, i = self.pool, 0
        # (a block with a pending, negative id is never indexed)
        while i < n_full and (b := self.cache.lookup(key(i))) is not None:
            pool.share(b)
            st.table.append(b)
            i += 1
        on_device = i
        tier = self.host_tier
        if tier is not None and i < n_full:
            # the next blocks of the chain from the host tier, into free device blocks
            j = i
            while j < n_full and key(j) in tier:
                j += 1
            tier.stats.lookups += min(j + 1, n_full) - i  # the first miss was looked up too
            j = min(j, i + pool.num_free)
            if j > i:
                host_keys = keys[i:j]
                with tier.protect(host_keys):  # evictions below store to the host: keep these
                    dev = [pool.take() for _ in host_keys]
                tier.load(host_keys, dev)
                for k, b in zip(host_keys, dev):
                    pool.set_fill(b, bs)
                    self.cache.insert(k, b)
                    st.table.append(b)
                i = j
        ideal = i  # how far an unbounded cache would have reached: every block hash ever indexed
        while ideal < n_full:
            key(ideal)
            if hashes[ideal] not in self._seen:
                break
            ideal += 1
        st.hashes = hashes[:i]
        st.num_tokens = i * bs
        self.last_match = PrefixMatch(on_device * bs, (i - on_device) * bs, ideal * bs)
        self.cache.record(len(tokens), st.num_tokens)
        if st.table:
            self._seqs[seq.seq_id] = st
        return st.num_tokens

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

    # -- addressing -------------------------------------------------------------------------
    def slot_mapping(self, seq: SequenceLike, start: int, end: int) -> list[int]:
        table, bs = self._seqs[seq.seq_id].table, self._block_size
        if end - start == 1:  # decode
            return [table[start // bs] * bs + start % bs]
        out: list[int] = []
        for i in range(start // bs, (end - 1) // bs + 1):
            base = table[i] * bs - i * bs  # slot of token t in block i is base + t
            out.extend(range(base + max(start, i * bs), base + min(end, (i + 1) * bs)))
        return out

    def block_ids(self, seq: SequenceLike) -> list[int]:
        st = self._seqs.get(seq.seq_id)
        return st.table if st else []

    # -- accounting -------------------------------------------------------------------------
    def stats(self) -> MemoryStats:
        # one tight pass over the sequences (the engine calls this every step): the same
        # split as seq_capacity + live_split, inlined
        bs, holders = self._block_size, self._tail_holders
        reserved = internal = 0
        for st in self._seqs.values():
            table = st.table
            if not table:
                continue
            gone = st.released * bs  # positions whose blocks went back (sliding window)
            used = st.num_tokens - gone
            cap = len(table) * bs - gone
            if holders and used % bs:
                h = holders.get(table[-1])
                if h is not None and min(h) != st.seq.seq_id:
                    cap = used
            r, i = _split(st.seq.max_len - gone, used, cap)
            reserved += r
            internal += i
        return self._stats_of(reserved, internal)

    def _stats_of(self, reserved: int, internal: int) -> MemoryStats:
        """``stats()`` of the sequences' reservation and internal fragmentation (in tokens)."""
        bs, bpt = self._block_size, self.bytes_per_token
        return MemoryStats(
            capacity=self.capacity_tokens * bpt,
            token_states=self.pool.filled_total * bpt,
            reservation=reserved * bpt,
            internal_frag=internal * bpt,
            external_frag=0,  # any free block serves any sequence
            free=self.pool.num_free * bs * bpt,  # free cached blocks included: any allocation may evict them
        )


def _split(max_len: int, used: int, cap: int) -> tuple[int, int]:
    """A sequence's (reservation, internal fragmentation) in tokens: its capacity beyond its
    tokens up to its max_len (the bound, within what it holds) is reserved, the rest internal."""
    bound = min(max_len, cap)
    if bound < used:
        bound = used
    return bound - used, cap - bound


_TAKE, _FREE, _ADMIT, _FINISH = range(4)  # the events of a paged decode run


class _PagedDecodeRun(DecodeRun):
    """Each sequence takes a free block at the step its last block is full, then every
    ``block_size`` steps; a preempted or finished one gives back all its blocks (only private
    ones are modelled); one admitted takes the blocks of its tokens."""

    takes_free = True
    admits = True

    def __init__(self, allocator: PagedAllocator, seqs: Seq[SequenceLike], sts: list[_SeqBlocks], used: list[int]):
        bs = self.bs = allocator.block_size
        # one pass: capacities, the room to max_len, and the sequences that take a block at a
        # step, by the step's residue (one whose last block is full takes one at step 1, one
        # holding r tokens of it at step bs - r + 1: residue (1 - used) % bs)
        caps, room = [], 1 << 62
        takers: list[list[int]] = [[] for _ in range(bs)]
        for j, (seq, st, u) in enumerate(zip(seqs, sts, used)):
            caps.append(len(st.table) * bs)
            takers[(1 - u) % bs].append(j)
            if seq.max_len - u < room:
                room = seq.max_len - u
        super().__init__(allocator, seqs, used, caps, room)
        self._takers = takers
        self.sts: list[_SeqBlocks | None] = sts  # None: admitted in the run (known at commit)
        self.plain = len(sts)  # the sequences running before the run
        self.base = list(used)  # tokens the pool's fill count has for each
        self.free = allocator.pool.num_free
        self._caps = list(caps)  # as the steps so far leave them
        self._gone: set[int] = set()  # seq ids preempted so far
        self._out: set[int] = set()  # indices preempted or finished so far
        self._events: list[tuple] = []  # (step, index or indices, _TAKE | _FREE | _ADMIT | _FINISH), in order

    def _limit(self) -> int:
        return 1 << 62  # the free pool is stepped (allocate)

    def allocate(self, step: int, num: int, start: int = 0, skip: Seq[int] = ()) -> int | None:
        # a sequence holding u tokens before a step takes a block there if u is a multiple of
        # bs: one that held ``used`` before the first, at the steps of residue (1 - used) % bs
        caps, bs, out = self._caps, self.bs, self._out
        for j in self._takers[step % bs]:
            if j < start or j in skip or j in out:
                continue
            if j >= num:
                break
            if not self.free:
                return j
            self.free -= 1
            caps[j] += bs
            self.growth.append((step, j, caps[j]))
            self._events.append((step, j, _TAKE))
        return None

    def release(self, index: int, step: int) -> bool:
        st = self.sts[index]
        if st is not None and any(self.allocator.pool.ref[b] != 1 for b in st.table):
            return False  # blocks shared with another sequence stay held: not modelled
        self.free += self._caps[index] // self.bs
        self.released.append((step, index))
        self._events.append((step, index, _FREE))
        self._gone.add(self.seqs[index].seq_id)
        self._out.add(index)
        return True

    def finish(self, indices: list[int], step: int, held: list[int]) -> bool:
        ref, sts = self.allocator.pool.ref, self.sts
        if any(sts[j] is not None and any(ref[b] != 1 for b in sts[j].table) for j in indices):
            return False  # as release
        for j, n in zip(indices, held):
            self.free += self._caps[j] // self.bs
            self.finished.append((step, j, n))
            self._out.add(j)
        self._events.append((step, tuple(indices), _FINISH))
        return True

    def _holds(self, seq: SequenceLike) -> bool:
        return seq.seq_id in self.allocator._seqs and seq.seq_id not in self._gone

    def may_admit(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        if self._holds(seq):
            return True  # it holds blocks: not the plain case
        return -(-num_new_tokens // self.bs) <= self.free

    def admit(self, seq: SequenceLike, num_new_tokens: int, step: int = 1) -> bool:
        bs, n = self.bs, num_new_tokens
        blocks = -(-n // bs)
        if self._holds(seq) or blocks > self.free or n < 1:
            return False
        if not self.joined or self.joined[-1][0] != step:
            self._events.append((step, -1, _ADMIT))  # the scheduler admits a step's all at once
        self.free -= blocks
        j = len(self.seqs)
        # from the next step on it decodes as one that held n - step tokens before the first
        used = n - step
        self.seqs.append(seq)
        self.used.append(used)
        self.base.append(n)
        self.caps.append(blocks * bs)
        self._caps.append(blocks * bs)
        self.sts.append(None)
        self.joined.append((step, j, n))
        self._takers[(1 - used) % bs].append(j)
        self.room = min(self.room, seq.max_len - used)
        return True

    def _stats(self) -> MemoryStats:
        # where the allocator holds only the run's sequences (``decode_run``: no window, no
        # shared tail), ``stats()``'s split from the plan's figures, without its own pass
        alloc, plain = self.allocator, self.plain
        if len(alloc._seqs) != plain:
            return alloc.stats()
        reserved = internal = 0
        for st, used, cap in zip(self.sts[:plain], self.used, self.caps):
            r, i = _split(st.seq.max_len, used, cap)
            reserved += r
            internal += i
        return alloc._stats_of(reserved, internal)

    def commit(self, k: int, preempt: Callable[[int], None], admit: Callable[[int], None],
               skipped: Seq[int] = (), finish: Callable[[int, list[int]], None] | None = None) -> None:
        bs, alloc = self.bs, self.allocator
        pool = alloc.pool
        fill, sts, used, base = pool.fill, self.sts, self.used, self.base
        added = 0  # tokens the run adds to the pool's fill count (a freed block takes its fill away)

        def catch_up(j: int, steps: int) -> int:  # seqs[j]'s tokens and fills after ``steps`` steps
            st = sts[j]
            total = st.num_tokens = used[j] + steps
            table = st.table
            for i in range(base[j] // bs, len(table)):  # blocks below the first it grew into are full
                fill[table[i]] = min(bs, total - i * bs)
            return total - base[j]

        held = {j: n for _, j, n in self.finished}
        # the new blocks, admissions, preemptions and finishes in the order the steps make them
        for step, j, kind in self._events:
            if step > k:
                break
            if kind == _TAKE:
                sts[j].table.append(pool.take())  # ref 1, fill 0
            elif kind == _FREE:
                added += catch_up(j, step - 1)
                preempt(j)
            elif kind == _ADMIT:
                admit(step)
                for s, i, _ in self.joined:
                    if s == step:
                        sts[i] = alloc._seqs[self.seqs[i].seq_id]
            else:  # j: the step's finished ones
                for i in j:
                    added += catch_up(i, held[i] - used[i])
                finish(step, list(j))
        gone = {j for step, j in self.released if step <= k} | {j for step, j, _ in self.finished if step <= k}
        plain = self.plain  # the ones running before the run
        joined = {j: step for step, j, _ in self.joined}
        for j in range(len(self.seqs)):
            if j in gone or joined.get(j, 1) > k:
                continue
            st, u = sts[j], used[j]
            table = st.table
            last = len(table) - 1
            n = k - 1 if skipped and j in skipped else k
            if j < plain and last * bs < u:  # no new block: the last one takes the n tokens
                st.num_tokens = u + n
                fill[table[last]] += n
                added += n
            else:
                added += catch_up(j, n)
        pool.filled_total += added
