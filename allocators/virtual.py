"""Virtual KV cache (vAttention): a contiguous virtual range per request slot, pages mapped on demand.

Every one of ``max_num_seqs`` slots owns ``span`` consecutive token positions of each
virtual range (``span`` = max_model_len rounded up to whole pages), so token t of the
sequence in slot s lives at ``s * span + t``: LINEAR addressing, no block table, the
kernels of the contiguous allocator unchanged. Physical memory comes in *page groups*: the
pages that back one run of ``page_tokens`` tokens in every range.

Layouts:
- ``per_layer``: 2 x num_layers ranges (K and V of each layer), ``[slots*span, H, D]`` each;
  a page group is 2 x num_layers pages of ``page_size`` bytes.
- ``shared``: one range ``[slots*span, layers, 2, H, D]``; one page holds a run of tokens for
  all layers (2 MiB = 16 tokens of Llama-3-8B); ``kv_cache(layer)`` is a strided view.

Pages are created once (the pool); a growing sequence maps the next group at the end of its
slot. A finished slot keeps its pages (deferred reclamation): the next request admitted
there reuses them without touching the driver, and they are unmapped only when another
slot needs memory the free pool cannot give. With ``prefetch`` the group a sequence will
need in the next ``prefetch_tokens`` tokens (default: an eighth of a page) is claimed now
and mapped by a background thread while steps compute; ``allocate`` waits on the driver
only for memory the step itself needs that was not mapped ahead.

Page size: vAttention maps 2 MiB pages (the CUDA driver's granularity). Left unset
(``page_size=None`` or ``"auto"``), it is chosen to fit the model and the pool: the largest
power of two up to 2 MiB (rounded down to whole tokens) that gives each of ``max_num_seqs``
slots a page group of the pool at once and splits a ``max_model_len`` sequence into at least
``MIN_PAGES_PER_SEQ`` pages (``default_page_size``). A page of the tiny CPU model's whole
slot would map a request's ``max_model_len`` at its first token, which is contiguous-max
reservation under another name; smaller pages are mapped as the sequence grows.

Accounting: a live sequence is charged for its mapped groups up to the ones its
``max_len`` can use; groups beyond that are held by no live sequence and count as external
fragmentation. All groups of idle slots (deferred reclamation) are ``idle_mapped``: held by
no live sequence but kept for the next request, reported on their own, never as usage.
"""
from __future__ import annotations

import heapq
import logging
import math
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from allocators.base import AllocationError, KVAllocator, KVCacheSpec, SequenceLike
from allocators.prefix_cache import PrefixMatch
from allocators.registry import register
from allocators.slot_prefix_cache import SlotPrefixCache
from allocators.stats import MemoryStats
from allocators.vmm_backends import VMMBackend, granularity, make_backend
from kernels.metadata import Addressing

log = logging.getLogger("kvlab.allocators")

LAYOUTS = ("per_layer", "shared")
MiB = 1 << 20
MAX_PAGE_SIZE = 2 * MiB  # vAttention's page: the CUDA driver's mapping granularity
MIN_PAGES_PER_SEQ = 4  # a default page splits a max_model_len sequence into at least this many


@dataclass(frozen=True)
class PageChoice:
    page_size: int
    page_tokens: int
    why: str


def range_token_bytes(layout: str, num_layers: int, num_kv_heads: int, head_dim: int,
                      elem_size: int) -> tuple[int, int]:
    """(bytes of one token in one virtual range, number of ranges) of a layout: per_layer has a
    range per layer and K/V, shared one range holding every layer's K and V of a token."""
    if layout == "per_layer":
        return num_kv_heads * head_dim * elem_size, 2 * num_layers
    return 2 * num_layers * num_kv_heads * head_dim * elem_size, 1


def page_sizes(token_bytes: int, grain: int) -> list[int]:
    """Candidate page sizes, largest first: powers of two from 2 MiB down to the backend's
    granularity, each rounded down to whole tokens (and whole granules)."""
    unit = math.lcm(token_bytes, grain)
    sizes, p = [], MAX_PAGE_SIZE
    while p >= grain:
        size = p // unit * unit
        if size and size not in sizes:
            sizes.append(size)
        p //= 2
    return sizes or [unit]


def default_page_size(token_bytes: int, grain: int, capacity_tokens: int, max_num_seqs: int,
                      max_model_len: int) -> PageChoice:
    """The largest candidate whose page group fits each slot's share of the pool and splits a
    max_model_len sequence into MIN_PAGES_PER_SEQ pages; else the smallest that fits the pool."""
    share = capacity_tokens // max(1, max_num_seqs)
    sizes = page_sizes(token_bytes, grain)
    for size in sizes:
        tpp = size // token_bytes
        if tpp <= share and tpp * MIN_PAGES_PER_SEQ <= max_model_len:
            return PageChoice(size, tpp, (
                f"the largest page up to {MAX_PAGE_SIZE >> 20} MiB that gives each of the {max_num_seqs} slots "
                f"a page of the {capacity_tokens}-token pool and at least {MIN_PAGES_PER_SEQ} pages to a "
                f"{max_model_len}-token sequence"))
    size = sizes[-1]
    return PageChoice(size, size // token_bytes, (
        f"no page up to {MAX_PAGE_SIZE >> 20} MiB gives each of the {max_num_seqs} slots a page of the "
        f"{capacity_tokens}-token pool and {MIN_PAGES_PER_SEQ} pages to a {max_model_len}-token sequence; "
        f"this is the smallest the backend maps (granularity {grain} bytes)"))


@dataclass(slots=True, eq=False)
class _Slot:
    index: int
    groups: list[int] = field(default_factory=list)  # page group mapped at page j of this slot
    seq: SequenceLike | None = None
    used: int = 0
    want: int = 0  # groups the live sequence can ever use (its max_len)


def _shutdown(executor: ThreadPoolExecutor | None, backend: VMMBackend) -> None:
    """Finalizer of an allocator nobody closed. The garbage collector may run it inside any
    thread, even one that holds threading's own locks while it starts: joining the mapping thread
    (or starting one) there deadlocks. So never wait: the mapping thread, if it exists, closes the
    backend after its last queued mapping."""
    if executor is None or not executor._threads:
        backend.close()
        if executor is not None:
            executor.shutdown(wait=False)
        return
    try:
        executor.submit(backend.close)
    except RuntimeError:  # interpreter exit: concurrent.futures has joined its threads already
        backend.close()
    executor.shutdown(wait=False)


@register("virtual")
class VirtualAllocator(KVAllocator):
    mode = Addressing.LINEAR
    supports_fork = True  # by copy into the child's slot
    supports_prefix_caching = True  # idle slots' KV reused in place (allocators/slot_prefix_cache.py)

    def __init__(
        self,
        spec: KVCacheSpec,
        capacity_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        page_size: int | str | None = None,  # bytes; None or "auto": chosen to fit (default_page_size)
        layout: str = "per_layer",
        backend: str = "auto",
        prefetch: bool = True,
        prefetch_tokens: int | None = None,
        enable_prefix_caching: bool = False,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown virtual layout '{layout}': choose one of {LAYOUTS}")
        elem = torch.empty((), dtype=spec.dtype).element_size()
        token_bytes, num_ranges = range_token_bytes(layout, spec.num_layers, spec.num_kv_heads, spec.head_dim, elem)
        if backend == "auto":
            backend = "sim" if spec.device is None else ("cuda" if str(spec.device).startswith("cuda") else "host")
        grain = granularity(backend) if backend in ("sim", "host", "cuda") else 1  # make_backend names a bad one
        fit = default_page_size(token_bytes, grain, capacity_tokens, max_num_seqs, max_model_len)
        if page_size is None or page_size == "auto":
            page_size = fit.page_size
            log.info("virtual allocator: page_size=%d bytes (%d tokens a page, layout %s): %s; "
                     "set allocator.args.page_size to choose another", page_size, fit.page_tokens, layout, fit.why)
        elif not isinstance(page_size, int) or page_size <= 0 or page_size % token_bytes:
            raise ValueError(
                f"allocator.args.page_size={page_size} does not hold a whole number of tokens of {token_bytes} "
                f"bytes (layout '{layout}'): choose a multiple of {token_bytes}, e.g. {fit.page_size}, "
                "or allocator.args.page_size=auto for one chosen to fit")
        self.page_tokens = tpp = page_size // token_bytes
        num_groups = capacity_tokens // tpp
        if num_groups == 0:
            raise ValueError(
                f"allocator.args.page_size={page_size}: the KV pool of {capacity_tokens} tokens holds no page "
                f"group of {tpp} tokens (layout '{layout}'): choose a smaller page, e.g. "
                f"allocator.args.page_size={fit.page_size} (auto picks one that fits), or give the "
                "pool more memory (engine.kv_cache_tokens / kv_cache_memory)")
        super().__init__(spec, num_groups * tpp, max_num_seqs, max_model_len)
        self.layout, self.page_size, self.num_groups = layout, page_size, num_groups
        self.span = -(-max_model_len // tpp) * tpp
        self.pages_per_slot = self.span // tpp
        self.num_ranges = num_ranges
        self.backend = make_backend(backend, page_size, max_num_seqs * self.span * token_bytes, num_ranges,
                                    num_groups * num_ranges, spec.device)
        # token positions before slot 0 that the backend keeps mapped (the tensors start there)
        self.anchor = self.backend.anchor_bytes // token_bytes
        # lead: a group is claimed and mapped this many tokens (decode steps) before it is needed;
        # by default an eighth of a page, so that the background thread keeps up with every
        # sequence crossing at once (per_layer: 2 x num_layers driver mappings per group)
        self.prefetch = prefetch
        self.prefetch_tokens = max(1, prefetch_tokens if prefetch_tokens is not None else max(2, tpp // 8))
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="kvlab-vmm", initializer=self.backend.bind_thread)
                          if prefetch and backend != "sim" else None)
        self._finalizer = weakref.finalize(self, _shutdown, self._executor, self.backend)
        self._inflight: dict[tuple[int, int], Future] = {}  # (slot, page) mapped in the background
        self._build_tensors()
        self.slots = [_Slot(i) for i in range(max_num_seqs)]
        self._by_seq: dict[int, _Slot] = {}
        self._free_groups: list[int] = list(range(num_groups - 1, -1, -1))
        self._idle: OrderedDict[int, None] = OrderedDict()  # slots with pages and no sequence, LRU first
        self._empty: list[int] = list(range(max_num_seqs))  # heap of slots with neither
        self._idle_pages = 0  # groups mapped in idle slots
        self._surplus_pages = 0  # groups of live slots beyond their current tokens (stealable)
        self.num_sync_maps = 0  # groups mapped on the critical path
        self.num_async_maps = 0  # groups mapped ahead in the background
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix = SlotPrefixCache() if enable_prefix_caching else None

    def _build_tensors(self) -> None:
        s = self.spec
        self._k, self._v = [], []
        if not s.materialized:
            return
        n = self.anchor + self.max_num_seqs * self.span
        views = [self.backend.tensor(r).view(s.dtype) for r in range(self.num_ranges)]
        if self.layout == "per_layer":
            for layer in range(s.num_layers):
                self._k.append(views[2 * layer].view(n, s.num_kv_heads, s.head_dim))
                self._v.append(views[2 * layer + 1].view(n, s.num_kv_heads, s.head_dim))
        else:
            self._buffer = views[0].view(n, s.num_layers, 2, s.num_kv_heads, s.head_dim)
            for layer in range(s.num_layers):
                self._k.append(self._buffer[:, layer, 0])
                self._v.append(self._buffer[:, layer, 1])

    def close(self) -> None:
        if self._finalizer.detach() is not None:  # not closed yet: wait for mappings in flight here
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self.backend.close()

    # -- pages ---------------------------------------------------------------------------
    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)

    def _want(self, seq: SequenceLike) -> int:
        """Groups ``seq`` can ever use."""
        return self._pages_for(min(seq.max_len, self.span))

    def _map_now(self, group: int, slot: int, page: int) -> None:
        R, at = self.num_ranges, slot * self.pages_per_slot + page
        for r in range(R):
            self.backend.map(group * R + r, r, at)

    def _map(self, group: int, slot: _Slot, page: int, ahead: bool) -> None:
        if ahead and self._executor is not None:
            self._inflight[(slot.index, page)] = self._executor.submit(self._map_now, group, slot.index, page)
            self.num_async_maps += 1
        else:
            self._map_now(group, slot.index, page)
            self.num_sync_maps += not ahead

    def _unmap_tail(self, slot: _Slot) -> int:
        page = len(slot.groups) - 1
        fut = self._inflight.pop((slot.index, page), None)
        if fut is not None:
            fut.result()
        at = slot.index * self.pages_per_slot + page
        for r in range(self.num_ranges):
            self.backend.unmap(r, at)
        return slot.groups.pop()

    def _surplus(self, slot: _Slot) -> int:
        return len(slot.groups) - self._pages_for(slot.used)

    def _available(self, exclude: _Slot) -> int:
        """Groups ``exclude`` could be given: free, in idle slots, or surplus of other live slots."""
        own = len(exclude.groups) if exclude.seq is None else self._surplus(exclude)
        own_idle = own if exclude.seq is None else 0
        own_surplus = own if exclude.seq is not None else 0
        return len(self._free_groups) + self._idle_pages - own_idle + self._surplus_pages - own_surplus

    def _acquire(self, k: int, exclude: _Slot, surplus_too: bool = True) -> list[int]:
        """``k`` groups: free ones first, then reclaimed from idle slots (LRU), then stolen from
        pages other live slots mapped ahead of their tokens."""
        out = [self._free_groups.pop() for _ in range(min(k, len(self._free_groups)))]
        while len(out) < k and self._idle:
            victim = next((self.slots[i] for i in self._idle if i != exclude.index), None)
            if victim is None:
                break
            take = min(k - len(out), len(victim.groups))
            out += [self._unmap_tail(victim) for _ in range(take)]
            self._idle_pages -= take
            if self.prefix is not None:  # whole pages leave the tail: the cached prefix keeps its head
                self.prefix.truncate(victim.index, len(victim.groups) * self.page_tokens)
            if not victim.groups:
                del self._idle[victim.index]
                heapq.heappush(self._empty, victim.index)
        if len(out) < k and surplus_too:
            for victim in self._by_seq.values():
                if victim is exclude:
                    continue
                take = min(k - len(out), self._surplus(victim))
                out += [self._unmap_tail(victim) for _ in range(take)]
                self._surplus_pages -= take
                if len(out) == k:
                    break
        if len(out) < k:
            raise AllocationError(f"virtual allocator: {k} page groups wanted, {len(out)} found")
        return out

    # -- slots ---------------------------------------------------------------------------
    def _pick_slot(self, seq: SequenceLike) -> _Slot | None:
        """An idle slot whose pages best fit ``seq`` (deferred reclamation), else an empty one."""
        want, best, best_key = self._want(seq), None, None
        if self.prefix is not None and self._empty:  # keep idle slots' cached KV for their next turn
            return self.slots[self._empty[0]]
        for i in self._idle:
            n = len(self.slots[i].groups)
            key = (n > want, abs(n - want))
            if best_key is None or key < best_key:
                best, best_key = self.slots[i], key
        if best is None and self._empty:
            best = self.slots[self._empty[0]]
        return best

    def _admit(self, seq: SequenceLike, slot: _Slot) -> None:
        if slot.index in self._idle:
            del self._idle[slot.index]
            self._idle_pages -= len(slot.groups)
        else:
            heapq.heappop(self._empty)  # _pick_slot took the heap's top
        slot.seq, slot.used, slot.want = seq, 0, self._want(seq)
        self._surplus_pages += len(slot.groups)
        self._by_seq[seq.seq_id] = slot
        if self.prefix is not None:
            self.prefix.forget(slot.index)  # its content is the new sequence's now

    # -- room for tokens -----------------------------------------------------------------
    def can_allocate(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        slot = self._by_seq.get(seq.seq_id)
        if slot is not None and slot.used + num_new_tokens <= len(slot.groups) * self.page_tokens:
            return True  # decode fast path: inside mapped pages
        slot = slot or self._pick_slot(seq)
        if slot is None:
            return False  # every slot holds a live sequence
        need = self._pages_for(slot.used + num_new_tokens) - len(slot.groups)
        return need <= 0 or need <= self._available(slot)

    def allocate(self, seq: SequenceLike, num_new_tokens: int) -> None:
        slot = self._by_seq.get(seq.seq_id)
        if slot is not None and slot.used + num_new_tokens <= len(slot.groups) * self.page_tokens:
            self._grow_mapped(slot, slot.used + num_new_tokens)  # the decode path
            return
        if slot is None:
            slot = self._pick_slot(seq)
            if slot is None:
                raise AllocationError(f"all {self.max_num_seqs} slots hold live sequences: raise max_num_seqs")
            if not self.can_allocate(seq, num_new_tokens):
                raise AllocationError(f"seq {seq.seq_id}: not enough page groups free: check can_allocate first")
            self._admit(seq, slot)
        total = slot.used + num_new_tokens
        if total > self.span:
            raise AllocationError(f"seq {seq.seq_id} grows to {total} tokens, past its slot of {self.span} "
                                  f"(max_model_len={self.max_model_len})")
        need = self._pages_for(total) - len(slot.groups)
        if need > self._available(slot):
            raise AllocationError(f"seq {seq.seq_id} needs {need} page groups, {self._available(slot)} available: "
                                  "check can_allocate first")
        before = self._surplus(slot)
        if need > 0:
            for g in self._acquire(need, slot):
                slot.groups.append(g)
                self._map(g, slot, len(slot.groups) - 1, ahead=False)
        for page in range(self._pages_for(slot.used), self._pages_for(total)):  # mapped ahead: done yet?
            fut = self._inflight.pop((slot.index, page), None)
            if fut is not None:
                fut.result()
        slot.used = total
        self._surplus_pages += self._surplus(slot) - before
        if self.prefetch:
            self._map_ahead(slot)

    def allocate_batch(self, seqs: Seq[SequenceLike], num_new_tokens: int = 1) -> int:
        # growing inside the slot's current page, with no page to map ahead, is the decode
        # path; the rest goes through can_allocate / allocate
        get, n, tpp = self._by_seq.get, num_new_tokens, self.page_tokens
        ahead = self.prefetch_tokens if self.prefetch else None
        for i, seq in enumerate(seqs):
            slot = get(seq.seq_id)
            if slot is not None:
                used, total = slot.used, slot.used + n
                if (-(-used // tpp) == -(-total // tpp) and total <= len(slot.groups) * tpp
                        and (ahead is None or total + ahead <= len(slot.groups) * tpp)):
                    slot.used = total
                    continue
            if not self.can_allocate(seq, n):
                return i
            self.allocate(seq, n)
        return len(seqs)

    def _grow_mapped(self, slot: _Slot, total: int) -> None:
        """Grow inside pages the slot has: wait only for a page still being mapped ahead."""
        tpp = self.page_tokens
        old, new = -(-slot.used // tpp), -(-total // tpp)
        if new != old:
            for page in range(old, new):
                fut = self._inflight.pop((slot.index, page), None)
                if fut is not None:
                    fut.result()
            self._surplus_pages -= new - old
        slot.used = total
        if self.prefetch and total + self.prefetch_tokens > len(slot.groups) * tpp:
            self._map_ahead(slot)

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

    def free(self, seq: SequenceLike) -> None:
        slot = self._by_seq.pop(seq.seq_id, None)
        if slot is None:
            return
        self._surplus_pages -= self._surplus(slot)
        if self.prefix is not None and slot.groups:  # its KV stays mapped: findable by the next turn
            # only computed tokens (a sequence preempted or undone mid-schedule has room for more)
            n = min(slot.used, len(slot.groups) * self.page_tokens, getattr(seq, "num_computed_tokens", slot.used))
            self.prefix.remember(slot.index, seq.token_ids[:n])
        slot.seq, slot.used = None, 0
        if slot.groups:  # deferred reclamation: the pages stay mapped for the next request
            self._idle[slot.index] = None
            self._idle_pages += len(slot.groups)
        else:
            heapq.heappush(self._empty, slot.index)

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

    # -- prefix caching: an idle slot's KV reused in place ---------------------------------
    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix.hit_rate if self.prefix is not None else 0.0

    def match_prefix(self, seq: SequenceLike) -> int:
        slot = self._by_seq.get(seq.seq_id)
        if slot is not None:
            self.last_match = PrefixMatch(slot.used, 0, slot.used)
            return slot.used
        self.last_match = PrefixMatch()
        if self.prefix is None:
            return 0
        tokens = seq.token_ids
        index, n = self.prefix.best(tokens)
        self.prefix.record(len(tokens), n)
        ideal = self.prefix.ideal(tokens)
        if index is None or n == 0:
            self.last_match = PrefixMatch(0, 0, ideal)
            return 0
        slot = self.slots[index]
        self._admit(seq, slot)  # the slot and its mapped pages, content included
        slot.used = n
        self._surplus_pages -= self._pages_for(n)
        self.last_match = PrefixMatch(n, 0, max(ideal, n))
        return n

    # -- fork: copy into the child's slot ------------------------------------------------------
    def can_fork(self, parent: SequenceLike) -> bool:
        p = self._by_seq.get(parent.seq_id)
        if p is None:
            return False
        slot = self._pick_slot(parent)
        return slot is not None and self._pages_for(p.used) - len(slot.groups) <= self._available(slot)

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

    # -- addressing ----------------------------------------------------------------------------
    def slot_mapping(self, seq: SequenceLike, start: int, end: int) -> list[int]:
        base = self.anchor + self._by_seq[seq.seq_id].index * self.span
        return list(range(base + start, base + end))

    def seq_base(self, seq: SequenceLike) -> int:
        return self.anchor + self._by_seq[seq.seq_id].index * self.span

    # -- accounting ----------------------------------------------------------------------------
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
        bpt, tpp = self.bytes_per_token, self.page_tokens
        return MemoryStats(
            capacity=self.capacity_tokens * bpt,
            token_states=used * bpt,
            reservation=reserved * bpt,
            internal_frag=internal * bpt,
            external_frag=unused_live * tpp * bpt,  # mapped to live slots beyond what they can use
            idle_mapped=self._idle_pages * tpp * bpt,  # idle slots' pages, kept for the next request
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

    def wait_prefetch(self) -> None:
        """Block until every background mapping is done (tests, benchmarks)."""
        for fut in list(self._inflight.values()):
            fut.result()
