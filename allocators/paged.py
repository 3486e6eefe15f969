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
from typing import Sequence as Seq

import torch

import kernels
from allocators.base import AllocationError, DecodeRun, KVAllocator, KVCacheSpec, SequenceLike
from allocators.block_pool import BlockPool
from allocators.host_swap import HostSwapSpace
from allocators.host_tier import HostKVTier, HostTierConfig, Transfer
from allocators.prefix_cache import ROOT_HASH, PrefixCache, PrefixMatch
from allocators.paged_decode_run import _PagedDecodeRun, _split
from allocators.paged_swap import PagedSwapMixin
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
class PagedAllocator(PagedSwapMixin, KVAllocator):
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
