"""A host-memory tier for KV blocks: evicted prefix-cache blocks kept in (pinned) host memory.

What vLLM's CPU offloading connector (``--kv-offloading-size``) and SGLang's HiCache host tier
do, behind kvlab's allocator interface. The paged allocator calls in at two points:

- a free cached block is evicted from the device pool (``BlockPool.take``): ``offload`` keeps
  its content here under its prefix-cache key instead of dropping it;
- ``match_prefix`` misses on the device: ``contains`` / ``load`` bring the following blocks of
  the prompt's hash chain back into device blocks instead of recomputing them.

The tier is *inclusive*: a block loaded back stays here too, so evicting it again costs no copy.

Transfer granularity. Host memory is a pool of *chunks* of ``transfer_blocks`` blocks, each one
contiguous region (block-major ``[T, layers, K/V, block_size, heads, head_dim]``, the layout
vLLM moved to for fast copies). The blocks evicted during one schedule fill chunks; a flush copies
each chunk with one gather on the device and **one** device->host memcpy of ``n x block bytes``.
A flush closes the chunk (its unused slots stay empty until the whole chunk is evicted), and
eviction frees whole chunks, so a large ``transfer_blocks`` buys fewer, larger copies with
host-side waste (``unused_slots``): the kvcached page-pinning trade-off on the host.
A load makes one host->device memcpy per chunk it reads (the span of the slots it needs).

Where copies run. CPU: plain synchronous copies (all transfer time exposed). CUDA: the cache is
only ever written on the compute stream (gathers for stores, scatters for loads); the PCIe
copies between a device staging buffer and pinned host memory run on one side stream, ordered
by events: a store's memcpy waits for its gather and overlaps the following steps; a load's
memcpy starts at once and the compute stream waits for it only right before its scatter (under
asynchronous scheduling that is after the step in flight). Time the compute stream actually
waited is *exposed*, the rest of the copy time *hidden* (CUDA events, read once complete).
Accounting-only pools (simulate) keep the bookkeeping and record the transfers; the simulator
charges them.
"""
from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Iterator

import torch

import kernels

from allocators.base import KVCacheSpec

POLICIES = ("lru", "lfu")
Key = Hashable


@dataclass(frozen=True)
class HostTierConfig:
    num_blocks: int  # host blocks (whole chunks are kept: rounded down to transfer_blocks)
    policy: str = "lru"  # lru | lfu (frequency-aware: least hit first, ties least recent)
    transfer_blocks: int = 1  # blocks per chunk = per host<->device memcpy

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"host_tier_policy='{self.policy}': choose one of {POLICIES}")
        if not isinstance(self.transfer_blocks, int) or self.transfer_blocks < 1:
            raise ValueError(f"host_transfer_blocks={self.transfer_blocks}: give a whole number of blocks >= 1")
        if self.num_blocks < self.transfer_blocks:
            raise ValueError(
                f"host tier of {self.num_blocks} blocks holds no chunk of host_transfer_blocks={self.transfer_blocks}: "
                "raise host_kv_cache_memory (or host_kv_cache_tokens, where set) or lower host_transfer_blocks")


@dataclass(frozen=True)
class Transfer:
    """One host<->device memcpy: ``"d2h"`` (store) or ``"h2d"`` (load)."""

    direction: str
    blocks: int
    nbytes: int


@dataclass
class TierStats:
    lookups: int = 0  # blocks looked up here after a device miss
    hits: int = 0  # of those, found (and loaded)
    stored_blocks: int = 0
    loaded_blocks: int = 0
    stored_bytes: int = 0
    loaded_bytes: int = 0
    store_transfers: int = 0
    load_transfers: int = 0
    evicted_blocks: int = 0  # dropped from the host tier (their chunk evicted)
    dropped_stores: int = 0  # evicted from the device with no host chunk to take them
    store_s: float = 0.0  # copy time (measured on CPU/CUDA, charged in simulate)
    load_s: float = 0.0
    exposed_s: float = 0.0  # of that, time compute waited for a copy
    pending_timings: int = 0  # CUDA copies whose events are not read yet

    @property
    def transfer_s(self) -> float:
        return self.store_s + self.load_s

    @property
    def hidden_s(self) -> float:
        return max(0.0, self.transfer_s - self.exposed_s)


# -- eviction policies over chunks --------------------------------------------------------------
class EvictionPolicy(ABC):
    """Which chunk to evict; ``touch`` on every hit, ``victim`` skips excluded chunks."""

    @abstractmethod
    def insert(self, chunk: int) -> None: ...

    @abstractmethod
    def touch(self, chunk: int) -> None: ...

    @abstractmethod
    def remove(self, chunk: int) -> None: ...

    @abstractmethod
    def victim(self, exclude: set[int]) -> int | None: ...


class LRUPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # least recent first

    def insert(self, chunk: int) -> None:
        self._order[chunk] = None

    def touch(self, chunk: int) -> None:
        self._order.move_to_end(chunk)

    def remove(self, chunk: int) -> None:
        self._order.pop(chunk, None)

    def victim(self, exclude: set[int]) -> int | None:
        return next((c for c in self._order if c not in exclude), None)


class LFUPolicy(EvictionPolicy):
    """Least frequently hit first (a new chunk counts 1), least recent among equals: one-off
    prompts leave before a system prompt every turn reuses. O(1) buckets by frequency."""

    def __init__(self) -> None:
        self._freq: dict[int, int] = {}
        self._buckets: dict[int, OrderedDict[int, None]] = {}

    def insert(self, chunk: int) -> None:
        self._freq[chunk] = 1
        self._buckets.setdefault(1, OrderedDict())[chunk] = None

    def touch(self, chunk: int) -> None:
        f = self._freq[chunk]
        self._drop(chunk, f)
        self._freq[chunk] = f + 1
        self._buckets.setdefault(f + 1, OrderedDict())[chunk] = None

    def _drop(self, chunk: int, f: int) -> None:
        bucket = self._buckets[f]
        del bucket[chunk]
        if not bucket:
            del self._buckets[f]

    def remove(self, chunk: int) -> None:
        f = self._freq.pop(chunk, None)
        if f is not None:
            self._drop(chunk, f)

    def victim(self, exclude: set[int]) -> int | None:
        for f in sorted(self._buckets):
            for c in self._buckets[f]:
                if c not in exclude:
                    return c
        return None

    def frequency(self, chunk: int) -> int:
        return self._freq.get(chunk, 0)


def make_policy(name: str) -> EvictionPolicy:
    return LRUPolicy() if name == "lru" else LFUPolicy()


# -- the tier ---------------------------------------------------------------------------------
@dataclass
class _Chunk:
    keys: list = field(default_factory=list)  # key of each filled slot (None: slot emptied)
    pending: list[int] = field(default_factory=list)  # device block of each slot not copied yet
    open: bool = True  # still filling (this schedule's evictions)


class HostKVTier:
    def __init__(self, spec: KVCacheSpec, block_size: int, config: HostTierConfig,
                 device_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.config = config
        self.block_size = block_size
        self.T = T = config.transfer_blocks
        self.num_chunks = config.num_blocks // T
        self.num_blocks = self.num_chunks * T
        self.block_bytes = block_size * spec.bytes_per_token
        self.caches = device_caches
        self.policy = make_policy(config.policy)
        self.stats = TierStats()
        self._where: dict[Key, tuple[int, int]] = {}  # key -> (chunk, slot)
        self._chunks: dict[int, _Chunk] = {}  # chunks in use
        self._free: list[int] = list(range(self.num_chunks - 1, -1, -1))
        self._open: int | None = None  # the chunk this schedule's evictions fill
        self._protected: set[int] = set()
        self.transfers: list[Transfer] = []  # since the last take_transfers()
        self._host: torch.Tensor | None = None
        self._cuda = False
        self._ptrs: torch.Tensor | None = None
        if spec.materialized and device_caches:
            self._cuda = str(spec.device).startswith("cuda")
            shape = (self.num_chunks, T, spec.num_layers, 2, block_size, spec.num_kv_heads, spec.head_dim)
            # pinned on CUDA (asynchronous copies); never read before written, so not zeroed there
            make = torch.empty if self._cuda else torch.zeros
            self._host = make(shape, dtype=spec.dtype, pin_memory=self._cuda)
            if self._cuda:
                self._stream = torch.cuda.Stream(device=device_caches[0][0].device)
                self._timings: list[tuple[str, torch.cuda.Event, torch.cuda.Event, torch.cuda.Event | None]] = []

    # -- queries -------------------------------------------------------------------------
    def __contains__(self, key: Key) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    @property
    def used_blocks(self) -> int:
        return len(self._where)

    @property
    def used_chunks(self) -> int:
        return len(self._chunks)

    @property
    def unused_slots(self) -> int:
        """Slots of chunks in use that hold nothing (closed early, or emptied): host-side waste."""
        return self.used_chunks * self.T - self.used_blocks

    @contextlib.contextmanager
    def protect(self, keys: Iterable[Key]) -> Iterator[None]:
        """Keep the chunks of ``keys`` from eviction meanwhile (a match about to load them)."""
        saved = self._protected
        self._protected = saved | {self._where[k][0] for k in keys if k in self._where}
        try:
            yield
        finally:
            self._protected = saved

    # -- device -> host ------------------------------------------------------------------
    def offload(self, key: Key, device_block: int) -> None:
        """``device_block`` (content ``key``) is evicted from the device: keep a copy here. The
        copy is made at the next ``flush`` (before anything writes that device block)."""
        where = self._where.get(key)
        if where is not None:  # inclusive: already here (loaded back earlier, or stored before)
            return
        c = self._open
        if c is None or len(self._chunks[c].keys) == self.T:
            c = self._new_chunk()
            if c is None:
                self.stats.dropped_stores += 1
                return
        ch = self._chunks[c]
        self._where[key] = (c, len(ch.keys))
        ch.keys.append(key)
        ch.pending.append(device_block)

    def _new_chunk(self) -> int | None:
        if self._open is not None:
            self._close(self._open)
        if not self._free:
            victim = self.policy.victim(self._protected)
            if victim is None:
                return None
            self._evict(victim)
        c = self._free.pop()
        self._chunks[c] = _Chunk()
        self.policy.insert(c)
        self._open = c
        return c

    def _evict(self, c: int) -> None:
        ch = self._chunks.pop(c)
        if ch.pending:  # never copied: nothing to lose but the bookkeeping
            raise AssertionError("evicting a chunk with copies pending")
        for k in ch.keys:
            if k is not None:
                del self._where[k]
                self.stats.evicted_blocks += 1
        self.policy.remove(c)
        self._free.append(c)

    def _close(self, c: int) -> None:
        """Copy the open chunk's pending blocks (one gather, one memcpy) and close it."""
        ch = self._chunks[c]
        ch.open = False
        if self._open == c:
            self._open = None
        if not ch.pending:
            return
        n, blocks = len(ch.pending), ch.pending
        ch.pending = []
        self.transfers.append(Transfer("d2h", n, n * self.block_bytes))
        self.stats.stored_blocks += n
        self.stats.stored_bytes += n * self.block_bytes
        self.stats.store_transfers += 1
        if self._host is None:
            return
        t0 = time.perf_counter()
        dst = self._host[c, :n]
        if not self._cuda:
            kernels.gather_layers(self.caches, self._slots(blocks, self.caches[0][0].device), self.block_size, dst)
            dt = time.perf_counter() - t0
            self.stats.store_s += dt
            self.stats.exposed_s += dt
            return
        staging = self._gather(blocks)  # on the compute stream: ordered after every write so far
        gathered = torch.cuda.Event()
        gathered.record()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(gathered)
            start.record(self._stream)
            dst.copy_(staging, non_blocking=True)
            end.record(self._stream)
        staging.record_stream(self._stream)  # the allocator keeps it until the copy is done
        self._timings.append(("d2h", start, end, None))

    def flush(self) -> None:
        """Copy every pending store now (the blocks they came from are about to be written)."""
        if self._open is not None:
            self._close(self._open)

    def take_transfers(self) -> list[Transfer]:
        """The memcpys made since the last call (the scheduler hands them to the step)."""
        self.flush()
        out, self.transfers = self.transfers, []
        return out

    # -- host -> device ------------------------------------------------------------------
    def load(self, keys: list[Key], device_blocks: list[int]) -> None:
        """Copy the blocks of ``keys`` into ``device_blocks`` (taken, not yet written)."""
        self.flush()  # a device block just evicted must be copied out before it is overwritten
        by_chunk: dict[int, list[tuple[int, int]]] = {}
        for key, b in zip(keys, device_blocks):
            c, slot = self._where[key]
            by_chunk.setdefault(c, []).append((slot, b))
            self.policy.touch(c)
        self.stats.hits += len(keys)
        for c, items in by_chunk.items():
            lo, hi = min(s for s, _ in items), max(s for s, _ in items) + 1
            self.transfers.append(Transfer("h2d", hi - lo, (hi - lo) * self.block_bytes))
            self.stats.loaded_blocks += len(items)
            self.stats.loaded_bytes += (hi - lo) * self.block_bytes
            self.stats.load_transfers += 1
            if self._host is not None:
                self._load_chunk(c, lo, hi, items)

    def _load_chunk(self, c: int, lo: int, hi: int, items: list[tuple[int, int]]) -> None:
        src = self._host[c, lo:hi]
        rows = [s - lo for s, _ in items]
        blocks = [b for _, b in items]
        if not self._cuda:
            t0 = time.perf_counter()
            self._scatter(src[rows], blocks)
            dt = time.perf_counter() - t0
            self.stats.load_s += dt
            self.stats.exposed_s += dt
            return
        dev = self.caches[0][0].device
        compute = torch.cuda.current_stream(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):  # staging from the side stream's pool: no wait on compute
            staging = torch.empty(src.shape, dtype=src.dtype, device=dev)
            start.record(self._stream)
            staging.copy_(src, non_blocking=True)
            end.record(self._stream)
        staging.record_stream(compute)  # the scatter below reads it on the compute stream
        wait = torch.cuda.Event(enable_timing=True)
        wait.record(compute)  # where the compute stream stands when it needs the data
        compute.wait_event(end)
        self._scatter(staging[self._index(rows, dev)], blocks)
        self._timings.append(("h2d", start, end, wait))

    def _index(self, values: list[int], device: torch.device) -> torch.Tensor:
        """Indices on ``device``; on CUDA through pinned memory, so the host never waits for the stream."""
        t = torch.tensor(values, dtype=torch.int64)
        if device.type != "cuda":
            return t
        return t.pin_memory().to(device, non_blocking=True)

    def _slots(self, blocks: list[int], device: torch.device) -> torch.Tensor:
        ids = self._index(blocks, device)[:, None] * self.block_size
        return (ids + torch.arange(self.block_size, device=device)).reshape(-1)

    def _layer_ptrs(self) -> torch.Tensor | None:
        """Every layer's K/V base address, once (CUDA: one kernel moves all layers' rows; a loop
        of per-layer copies cost ~130 launches a transfer, seconds of host time a run)."""
        if self._cuda and self._ptrs is None:
            from kernels.triton_cache import layer_pointers

            self._ptrs = layer_pointers(self.caches)
        return self._ptrs

    def _gather(self, blocks: list[int]) -> torch.Tensor:
        k0 = self.caches[0][0]
        out = torch.empty((len(blocks), len(self.caches), 2, self.block_size, *k0.shape[1:]), dtype=k0.dtype,
                          device=k0.device)
        kernels.gather_layers(self.caches, self._slots(blocks, k0.device), self.block_size, out, self._layer_ptrs())
        return out

    def _scatter(self, data: torch.Tensor, blocks: list[int]) -> None:
        """``data [n, layers, 2, bs, H, D]`` (on the cache's device, or host on CPU) into ``blocks``."""
        k0 = self.caches[0][0]
        kernels.scatter_layers(self.caches, self._slots(blocks, k0.device), self.block_size, data.contiguous(),
                               self._layer_ptrs())

    # -- timings, tests ------------------------------------------------------------------
    def poll(self, wait: bool = False) -> None:
        """Fold the CUDA copies that completed into the stats (``wait``: all of them)."""
        if not self._cuda:
            return
        if wait:
            self._stream.synchronize()
            torch.cuda.current_stream(self.caches[0][0].device).synchronize()
        left = []
        for way, start, end, waited in self._timings:
            if not end.query() or (waited is not None and not waited.query()):
                left.append((way, start, end, waited))
                continue
            dt = start.elapsed_time(end) / 1e3
            if way == "d2h":
                self.stats.store_s += dt
            else:
                self.stats.load_s += dt
                self.stats.exposed_s += max(0.0, waited.elapsed_time(end) / 1e3)
        self._timings = left
        self.stats.pending_timings = len(left)

    def read(self, key: Key) -> torch.Tensor:
        """The stored content of ``key``: ``[layers, 2, block_size, H, D]`` (tests)."""
        self.flush()
        self.poll(wait=True)
        c, slot = self._where[key]
        return self._host[c, slot].clone()

    def keys(self) -> list[Key]:
        return list(self._where)

    def clear(self) -> None:
        """Drop every block (the pool is a cache: this only forgets content)."""
        self.flush()
        for c in list(self._chunks):
            self._evict(c)
        self.stats.evicted_blocks = 0

    def check(self) -> None:
        """Invariants: every key in one slot of a chunk in use, chunks free xor in use."""
        for key, (c, slot) in self._where.items():
            assert self._chunks[c].keys[slot] == key, (key, c, slot)
        filled = sum(1 for ch in self._chunks.values() for k in ch.keys if k is not None)
        assert filled == len(self._where)
        assert len(self._free) + len(self._chunks) == self.num_chunks
        assert not set(self._free) & set(self._chunks)
        for ch in self._chunks.values():
            assert len(ch.keys) <= self.T
