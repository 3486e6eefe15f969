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
only for memory the step itself needs that was not mapped ahead. With ``premap`` (default: every
slot), empty slots get a first group at start-up, before any request, and the reserve is refilled
in the background as slots empty: an admission then maps nothing on its step's path. Those groups
are idle mapped (reported as such, reclaimable like any idle slot's).

Page size: vAttention maps 2 MiB pages (the CUDA driver's granularity). Left unset
(``page_size=None`` or ``"auto"``), it is chosen to fit the model and the pool: the largest
power of two up to 2 MiB (rounded down to whole tokens) that gives each of ``max_num_seqs``
slots a page group of the pool at once and splits a ``max_model_len`` sequence into at least
``MIN_PAGES_PER_SEQ`` pages (``default_page_size``). A page of the tiny CPU model's whole
slot would map a request's ``max_model_len`` at its first token, which is contiguous-max
reservation under another name; smaller pages are mapped as the sequence grows.

Prefix caching (``enable_prefix_caching``, allocators/slot_prefix_cache.py): an idle slot's KV
is reused in place by a request whose prompt starts with it, and (``share_prefix``, on by
default) whole pages of computed tokens of any slot, live or idle, are mapped into a new
request's slot when its prompt starts with them. A page group may then be mapped in several
slots, always at the same page index (it holds the same token positions everywhere):
``_ref[g]`` counts the slots mapping it and it returns to the free pool only when none does.
A shared group is full, below the tokens of every live slot mapping it, and never written: a
slot that is about to write pages (a new request admitted into an idle slot) first drops the
shared groups from the first page it writes on. Reclaiming memory is page-aware: pages are
taken from idle slots' tails where that frees a group now (mapped nowhere else); only if that is
not enough, idle slots drop shared pages too, and never pages that a live slot maps as well.

Accounting: a live sequence is charged for its mapped groups up to the ones its
``max_len`` can use; groups beyond that are held by no live sequence and count as external
fragmentation. A group shared by several live slots is counted once (in token states). Groups
mapped only by idle slots (deferred reclamation) are ``idle_mapped``, each counted once: held by
no live sequence but kept for the next request, reported on their own, never as usage.

Modules: this one holds ``VirtualAllocator`` (its arguments, the virtual ranges and tensors,
slots and admission, growth, free, addressing) and its decode run; the page size is chosen in
``virtual_pages.py``; the page groups (mapping, unmapping, reclaiming, mapping ahead) are
``VirtualPoolMixin`` (``virtual_pool.py``), prefix caching and fork ``VirtualSharingMixin``
(``virtual_sharing.py``), capacities and ``stats`` ``VirtualAccountingMixin``
(``virtual_accounting.py``), all three inherited by ``VirtualAllocator``.
"""
from __future__ import annotations

import atexit
import heapq
import logging
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence as Seq

import torch

from allocators.base import AllocationError, DecodeRun, InPlaceDecodeRun, KVAllocator, KVCacheSpec, SequenceLike
from allocators.checks import is_int
from allocators.registry import register
from allocators.slot_prefix_cache import PageIndex, SlotPrefixCache
from allocators.virtual_accounting import VirtualAccountingMixin
from allocators.virtual_pages import (MAX_PAGE_SIZE, MIN_PAGES_PER_SEQ, MiB, PageChoice, default_page_size,
                                      page_sizes, range_token_bytes)
from allocators.virtual_pool import VirtualPoolMixin, _Slot
from allocators.virtual_sharing import VirtualSharingMixin
from allocators.vmm_backends import VMMBackend, granularity, make_backend
from kernels.metadata import Addressing

log = logging.getLogger("kvlab.allocators")
# the names moved to virtual_pages, virtual_pool, virtual_sharing and virtual_accounting stay importable here
__all__ = ["LAYOUTS", "MAX_PAGE_SIZE", "MIN_PAGES_PER_SEQ", "MiB", "PageChoice", "VirtualAccountingMixin",
           "VirtualAllocator", "VirtualPoolMixin", "VirtualSharingMixin", "_Slot", "_UNCLOSED", "_VirtualDecodeRun",
           "_shutdown", "default_page_size", "page_sizes", "range_token_bytes", "reap_unclosed"]

LAYOUTS = ("per_layer", "shared")


# allocators nobody closed, collected: their mapping threads and backends, closed at a safe point
_UNCLOSED: deque = deque()


def _shutdown(executor: ThreadPoolExecutor | None, backend: VMMBackend) -> None:
    """Finalizer of an allocator nobody closed. The garbage collector may run it inside any
    thread, even one that holds threading's or concurrent.futures' own locks (a collection inside
    another executor's ``submit`` holds its global lock): joining, starting or submitting to a
    thread there deadlocks. So it takes no lock at all: the pair waits in ``_UNCLOSED`` for the
    next allocator to be built or closed, or for the interpreter's exit (``reap_unclosed``)."""
    _UNCLOSED.append((executor, backend))


def reap_unclosed() -> None:
    """Close what collected allocators left: wait for their queued mappings, then release."""
    while True:
        try:
            executor, backend = _UNCLOSED.popleft()
        except IndexError:
            return
        if executor is not None:
            executor.shutdown(wait=True)
        backend.close()


atexit.register(reap_unclosed)


@register("virtual")
class VirtualAllocator(VirtualPoolMixin, VirtualSharingMixin, VirtualAccountingMixin, KVAllocator):
    mode = Addressing.LINEAR
    supports_fork = True  # by copy into the child's slot
    supports_prefix_caching = True  # in place and by sharing pages (allocators/slot_prefix_cache.py)

    @classmethod
    def check_args(cls, args: dict) -> None:
        share_prefix, layout = args.get("share_prefix", True), args.get("layout", "per_layer")
        if not isinstance(share_prefix, bool):
            raise ValueError(f"allocator.args.share_prefix={share_prefix!r}: set true (map other slots' prefix "
                             "pages into a new request's slot) or false (reuse idle slots in place only)")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown virtual layout '{layout}': choose one of {LAYOUTS}")
        page_size = args.get("page_size")  # its multiple of a token's bytes needs the model: the constructor's
        if page_size not in (None, "auto") and (not is_int(page_size) or page_size <= 0):
            raise ValueError(f"allocator.args.page_size={page_size!r}: give a positive number of bytes, a multiple "
                             "of one token's K/V bytes in the layout, or auto for one chosen to fit")
        prefetch_tokens = args.get("prefetch_tokens")
        if prefetch_tokens is not None and (not is_int(prefetch_tokens) or prefetch_tokens < 1):
            raise ValueError(f"allocator.args.prefetch_tokens={prefetch_tokens!r}: how many tokens ahead a group is "
                             "claimed and mapped off the critical path: give a whole number >= 1 (default: an "
                             "eighth of a page), or prefetch=false to map on demand")
        premap = args.get("premap")
        if premap is not None and (not is_int(premap) or premap < 0):
            raise ValueError(f"allocator.args.premap={premap!r}: the number of empty slots kept with their first "
                             "page mapped ahead of admission, an integer >= 0 (0: map it when a request is admitted)")

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
        share_prefix: bool = True,  # with prefix caching: map other slots' whole prefix pages
        premap: int | None = None,  # with prefetch: empty slots kept with a first page group mapped ahead of
        # admission (None: every slot), mapped at start-up and refilled in the background
    ):
        reap_unclosed()  # a safe point: what collected allocators left is released first
        self.check_args(dict(page_size=page_size, layout=layout, share_prefix=share_prefix,
                             prefetch_tokens=prefetch_tokens, premap=premap))
        elem = torch.empty((), dtype=spec.dtype).element_size()
        token_bytes, num_ranges = range_token_bytes(layout, spec.num_layers, spec.num_kv_heads, spec.head_dim, elem)
        if backend == "auto":
            backend = "sim" if spec.device is None else ("cuda" if str(spec.device).startswith("cuda") else "host")
        elif backend == "cuda" and spec.device is not None and not str(spec.device).startswith("cuda"):
            raise ValueError(f"allocator.args.backend=cuda maps GPU memory but the KV cache is on {spec.device}: "
                             "use backend=auto (host on a CPU), or device=cuda")
        grain = granularity(backend) if backend in ("sim", "host", "cuda") else 1  # make_backend names a bad one
        fit = default_page_size(token_bytes, grain, capacity_tokens, max_num_seqs, max_model_len)
        if page_size is None or page_size == "auto":
            page_size = fit.page_size
            log.info("virtual allocator: page_size=%d bytes (%d tokens a page, layout %s): %s; "
                     "set allocator.args.page_size to choose another", page_size, fit.page_tokens, layout, fit.why)
        elif page_size % token_bytes:  # a positive whole number: check_args
            raise ValueError(
                f"allocator.args.page_size={page_size} does not hold a whole number of tokens of {token_bytes} "
                f"bytes (layout '{layout}'): choose a multiple of {token_bytes}, e.g. {fit.page_size}, "
                "or allocator.args.page_size=auto for one chosen to fit")
        page_size = int(page_size)
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
        sharing = enable_prefix_caching and share_prefix
        self.backend = make_backend(backend, page_size, max_num_seqs * self.span * token_bytes, num_ranges,
                                    num_groups * num_ranges, spec.device, alias=sharing)
        # token positions before slot 0 that the backend keeps mapped (the tensors start there)
        self.anchor = self.backend.anchor_bytes // token_bytes
        # lead: a group is claimed and mapped this many tokens (decode steps) before it is needed;
        # by default an eighth of a page, so that the background thread keeps up with every
        # sequence crossing at once (per_layer: 2 x num_layers driver mappings per group)
        self.prefetch = prefetch
        lead = max(2, tpp // 8)
        self.prefetch_tokens = lead if prefetch_tokens is None else prefetch_tokens
        if premap is None:
            premap = max_num_seqs
        # no prefix caching: it prefers empty slots, to keep idle slots' KV for their next turn
        self.premap = premap if prefetch and not enable_prefix_caching else 0
        self._premapped: set[int] = set()  # idle slots holding only a group mapped ahead of admission
        self.num_premaps = 0  # groups mapped ahead into empty slots
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
        self._ref = [0] * num_groups  # slots mapping each group (several: a shared prefix page)
        self._live = [0] * num_groups  # live slots mapping each group
        self._idle_pages = 0  # groups mapped by idle slots only, each counted once
        self._dup_pages = 0  # sum over groups of (live slots mapping it - 1): counted once in stats
        self._num_shared = 0  # groups mapped in more than one slot (0: no scan for shared pages)
        self._surplus_pages = 0  # groups of live slots beyond their current tokens (stealable)
        self.num_sync_maps = 0  # groups mapped on the critical path
        self.num_async_maps = 0  # groups mapped ahead in the background
        self.num_shared_maps = 0  # groups mapped into a slot from another slot's prefix
        # seconds in driver map/unmap calls: on the scheduling thread (the step waits for them,
        # waits for a page still being mapped ahead included) and on the background thread
        self.vmm_critical_s = 0.0
        self.vmm_background_s = 0.0
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix = SlotPrefixCache() if enable_prefix_caching else None
        self.pages = PageIndex() if sharing else None
        if self.premap:  # at start-up, before any step: nothing to compete with for the driver
            self._premap_empty()
            self.wait_prefetch()

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
        reap_unclosed()

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

    def _admit(self, seq: SequenceLike, slot: _Slot, keep: int = 0) -> None:
        """``seq`` takes ``slot``; it keeps the slot's first ``keep`` tokens (in-place reuse) and
        writes from there on: shared groups from the page of token ``keep`` on are dropped from
        the slot (with every page after them), the content of the pages it writes is forgotten."""
        self._premapped.discard(slot.index)
        if slot.index in self._idle:
            del self._idle[slot.index]
        elif self._empty and self._empty[0] == slot.index:
            heapq.heappop(self._empty)  # _pick_slot took the heap's top
        else:
            raise AssertionError(f"slot {slot.index} is neither idle nor the first empty one")
        slot.seq, slot.used, slot.want = seq, 0, self._want(seq)
        for g in slot.groups:
            self._count(g, 0, 1)
        first = keep // self.page_tokens
        cut = self._cut(slot, first)
        while len(slot.groups) > cut:
            g = self._unmap_tail(slot)
            if g is not None:
                self._free_groups.append(g)
        if self.pages is not None:
            for g in slot.groups[first:]:
                self.pages.drop(g)
            del slot.hashes[first:]
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
        # a slot not admitted yet keeps its pages before the first shared one (_admit)
        have = len(slot.groups) if slot.seq is not None else self._cut(slot, 0)
        need = self._pages_for(slot.used + num_new_tokens) - have
        return need <= 0 or need <= self._available(slot)

    def can_grow_together(self, items: Seq[tuple[SequenceLike, int]]) -> bool:
        """Live slots growing together draw on one pool (free, idle and other slots' surplus
        pages, ``_available``): their page needs count together, less what each keeps spare
        (``can_allocate`` of each alone would count the same free pages for all)."""
        slots = [(self._by_seq.get(seq.seq_id), n) for seq, n in items]
        if any(slot is None for slot, _ in slots):
            return super().can_grow_together(items)
        need = own = 0
        for slot, n in slots:
            if slot.used + n > self.span:
                return False
            need += self._pages_for(slot.used + n) - len(slot.groups)  # negative: spare after growing
            own += self._surplus(slot)
        return need <= len(self._free_groups) + self._idle_pages + self._surplus_pages - own

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
            self._wait_mapped(slot.index, page)
        slot.used = total
        self._surplus_pages += self._surplus(slot) - before
        if self.prefetch:
            self._map_ahead(slot)
        if self.premap:
            self._premap_empty()

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

    def decode_run(self, seqs: Seq[SequenceLike]) -> DecodeRun | None:
        if self._inflight:
            return None
        get = self._by_seq.get
        slots = [get(s.seq_id) for s in seqs]
        return None if None in slots else _VirtualDecodeRun(self, seqs, slots)

    def _grow_mapped(self, slot: _Slot, total: int) -> None:
        """Grow inside pages the slot has: wait only for a page still being mapped ahead."""
        tpp = self.page_tokens
        old, new = -(-slot.used // tpp), -(-total // tpp)
        if new != old:
            for page in range(old, new):
                self._wait_mapped(slot.index, page)
            self._surplus_pages -= new - old
        slot.used = total
        if self.prefetch and total + self.prefetch_tokens > len(slot.groups) * tpp:
            self._map_ahead(slot)

    def free(self, seq: SequenceLike) -> None:
        slot = self._by_seq.pop(seq.seq_id, None)
        if slot is None:
            return
        self._surplus_pages -= self._surplus(slot)
        if self.prefix is not None and slot.groups:  # its KV stays mapped: findable by the next turn
            # only computed tokens (a sequence preempted or undone mid-schedule has room for more)
            n = min(slot.used, len(slot.groups) * self.page_tokens, getattr(seq, "num_computed_tokens", slot.used))
            self.prefix.remember(slot.index, seq.token_ids[:n])
            if self.pages is not None:
                self._index_pages(slot, n)
        slot.seq, slot.used = None, 0
        for g in slot.groups:
            self._count(g, 0, -1)
        if slot.groups:  # deferred reclamation: the pages stay mapped for the next request
            self._idle[slot.index] = None
        else:
            heapq.heappush(self._empty, slot.index)
        if self.premap:
            self._premap_empty()

    # -- addressing ----------------------------------------------------------------------------
    def slot_mapping(self, seq: SequenceLike, start: int, end: int) -> list[int]:
        base = self.anchor + self._by_seq[seq.seq_id].index * self.span
        return list(range(base + start, base + end))

    def seq_base(self, seq: SequenceLike) -> int:
        return self.anchor + self._by_seq[seq.seq_id].index * self.span


class _VirtualDecodeRun(InPlaceDecodeRun):
    """Decode inside each slot's current page. The run stops before a sequence's first token
    on a new page (pages change hands there), and, with prefetch, before the step that would
    map its next page ahead, unless no page can be mapped ahead now (the sequence has all it
    can use, or the free pool is short: ``_map_ahead`` then does nothing, as nothing frees
    pages during the run). Charged pages, so capacities, stay the same."""

    def __init__(self, allocator: VirtualAllocator, seqs: Seq[SequenceLike], slots: list[_Slot]):
        tpp = allocator.page_tokens
        caps, self.limits = [], []
        ahead = allocator.prefetch_tokens if allocator.prefetch else None
        pool_short = len(allocator._free_groups) + allocator._idle_pages <= len(allocator._by_seq)
        for slot in slots:
            u, mapped = slot.used, len(slot.groups)
            charged = max(-(-u // tpp), slot.want)
            caps.append(min(charged, mapped) * tpp)
            limit = tpp - u % tpp if u % tpp else 0  # tokens u+1 .. on the page of token u
            if ahead is not None and mapped < slot.want and not pool_short:
                limit = min(limit, mapped * tpp - ahead - u)
            self.limits.append(limit)
        super().__init__(allocator, seqs, slots, caps, allocator._by_seq)

    def _limit(self) -> int:
        return min(self.limits)
