"""Layer groups: window-aware KV memory for sliding-window and hybrid (local/global) models.

A layer with a sliding window of W tokens never reads a key older than W tokens again, so
it need not hold one. Following vLLM's hybrid allocator, the model's layers are split into
*groups* of equal size (the smallest layer count among window sizes: Gemma-2's alternating
layers give two groups of half the layers), each group with one window. Every sequence
gets a sub-sequence per group in one inner allocator of the chosen strategy, whose cache
tensors hold one group's worth of layers: layer ``i`` of every group reads and writes
tensor ``i``, so all groups draw on one pool with one page size. A strategy's own rules
apply per group:

- paged: a windowed group gives back the blocks wholly behind the window (``release_head``)
  before each step grows it: vLLM's sliding-window manager;
- contiguous and virtual: a windowed group reserves (contiguous) or maps on demand up to
  (virtual) a *ring* of ``min(max_model_len, W + max_num_batched_tokens - 1)`` slots and
  reuses it: token t at ``base + t % ring`` (enough for the keys of a whole prefill chunk
  and the window behind it).

A type whose layer count is not a multiple of the group size leaves its last group short:
the pages of the missing layers are allocated all the same, the *padding* vLLM's approach
costs (``padding_layers``; the held bytes of padded groups scaled by it, ``padding_bytes``).

Grouping ``none`` keeps today's allocation (every layer holds every token; the kernels still
apply the windows). Units: this allocator's tokens are *group tokens* (one token of one
group: ``bytes_per_token`` is a group's); the engine's memory rows are in bytes as always.
Not supported with groups: prefix caching and swapping (refused or recompute).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Sequence as Seq

from allocators.base import AllocationError, KVAllocator, KVCacheSpec, SequenceLike
from allocators.stats import MemoryStats
from kernels.metadata import Addressing

GROUPINGS = ("none", "shared")


@dataclass(frozen=True)
class GroupPlan:
    group_size: int
    layers: tuple[tuple[int, ...], ...]  # model layer indices of each group (a padded group has fewer)
    windows: tuple[int, ...]  # each group's window (0: full attention)
    num_layers: int

    @property
    def num_groups(self) -> int:
        return len(self.layers)

    @property
    def padding_layers(self) -> int:
        return self.num_groups * self.group_size - self.num_layers

    def locate(self, layer: int) -> tuple[int, int]:
        """(group, index inside the group) of a model layer."""
        for g, members in enumerate(self.layers):
            if layer in members:
                return g, members.index(layer)
        raise IndexError(f"layer {layer} is in no group")


def plan_groups(layer_windows: Seq[int]) -> GroupPlan:
    """vLLM's grouping: equal-size groups, the size the smallest layer count among windows;
    full-attention groups first, each window's layers in order."""
    counts = Counter(layer_windows)
    size = min(counts.values())
    layers, windows = [], []
    for w in sorted(counts):
        members = [i for i, x in enumerate(layer_windows) if x == w]
        for k in range(0, len(members), size):
            layers.append(tuple(members[k:k + size]))
            windows.append(w)
    return GroupPlan(size, tuple(layers), tuple(windows), len(layer_windows))


class _Sub:
    """One group's share of a sequence, as the inner allocator sees it."""

    __slots__ = ("seq", "seq_id", "ring", "max_len", "oracle_len")

    def __init__(self, seq: SequenceLike, seq_id: int, ring: int):
        self.seq, self.seq_id, self.ring = seq, seq_id, ring
        self.max_len = min(seq.max_len, ring) if ring else seq.max_len
        self.oracle_len = min(seq.oracle_len, ring) if ring else seq.oracle_len

    @property
    def prompt_len(self) -> int:
        return self.seq.prompt_len

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids


class _Probe:
    """A sequence of ``n`` tokens that never runs (``max_fit_tokens``); real seq ids are >= 0."""

    seq_id = -1

    def __init__(self, n: int):
        self.prompt_len = self.max_len = self.oracle_len = n
        self.token_ids = [0] * n


class GroupedAllocator(KVAllocator):
    supports_fork = False  # forks would need every group's copy to succeed together: n > 1 refused
    supports_prefix_caching = False
    supports_swap = False

    def __init__(self, inner_cls: type[KVAllocator], spec: KVCacheSpec, capacity_tokens: int, max_num_seqs: int,
                 max_model_len: int, *, plan: GroupPlan, max_chunk: int, probe: bool = True, **inner_args):
        """``probe``: find ``max_fit_tokens`` on an accounting-only twin (nothing here is touched)."""
        if inner_args.get("enable_prefix_caching"):
            raise ValueError("prefix caching is not supported with layer groups (kv_grouping=shared): "
                             "set enable_prefix_caching=false or kv_grouping=none")
        inner_args.pop("enable_prefix_caching", None)
        if inner_cls.supports_prefix_caching:  # off, not the strategy's default: no block hashing
            inner_args["enable_prefix_caching"] = False
        self.plan, self.max_chunk = plan, max_chunk
        g, G = plan.group_size, plan.num_groups
        inner_spec = replace(spec, num_layers=g)
        # the same bytes, counted in tokens of one group
        inner_cap = capacity_tokens * spec.num_layers // g
        self.inner = inner_cls(inner_spec, inner_cap, max_num_seqs * G, max_model_len, **inner_args)
        super().__init__(inner_spec, self.inner.capacity_tokens, max_num_seqs, max_model_len)
        self.name = self.inner.name
        self.mode = self.inner.mode
        self.paged = self.mode == Addressing.PAGED
        # LINEAR strategies keep a windowed group in a ring: the window and one chunk of new tokens
        self.rings = tuple(0 if self.paged or not w else min(max_model_len, w + max_chunk - 1)
                           for w in plan.windows)
        self._subs: dict[int, list[_Sub]] = {}
        self._tokens: dict[int, int] = {}  # logical tokens of each sequence
        self._held = [[0, 0] for _ in range(G)]  # per group: sum over stats() calls of held bytes, peak
        self._samples = 0
        self._max_fit = 0
        if probe:
            twin_args = dict(inner_args)
            if hasattr(self.inner, "page_size"):  # virtual: the same pages, no driver
                twin_args.update(page_size=self.inner.page_size, backend="sim", prefetch=False)
            twin = GroupedAllocator(inner_cls, replace(spec, device=None), capacity_tokens, max_num_seqs,
                                    max_model_len, plan=plan, max_chunk=max_chunk, probe=False, **twin_args)
            self._max_fit = twin._probe_max_fit()
            twin.close()

    # -- sub-sequences -------------------------------------------------------------------
    def _subs_of(self, seq: SequenceLike) -> list[_Sub]:
        subs = self._subs.get(seq.seq_id)
        if subs is None:
            G = self.plan.num_groups
            subs = [_Sub(seq, seq.seq_id * G + k, self.rings[k]) for k in range(G)]
        return subs

    def _grow(self, sub: _Sub, k: int, total: int) -> int:
        """Tokens the inner allocator must add for group ``k`` to cover ``total`` logical tokens."""
        have = self.inner.num_tokens(sub)
        ring = self.rings[k]
        return (min(total, ring) if ring else total) - have

    def _release(self, sub: _Sub, k: int, start: int) -> None:
        w = self.plan.windows[k]
        if self.paged and w and start > w:
            # keys the step that starts at ``start`` may read begin at start - w + 1; one token of
            # margin for a step still in flight (asynchronous scheduling)
            self.inner.release_head(sub, start - w)

    def can_allocate(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        total = self._tokens.get(seq.seq_id, 0) + num_new_tokens
        subs = self._subs.get(seq.seq_id)
        if subs is None:  # admission: try every group, then give it all back
            subs = self._subs_of(seq)
            done = []
            try:
                for k, sub in enumerate(subs):
                    n = self._grow(sub, k, total)
                    if not self.inner.can_allocate(sub, n):
                        return False
                    self.inner.allocate(sub, n)
                    done.append(sub)
                return True
            finally:
                for sub in done:
                    self.inner.free(sub)
        if self.paged:  # one pool of blocks: the groups' needs together, less what the window frees
            need = 0
            for k, sub in enumerate(subs):
                st = self.inner._seqs.get(sub.seq_id)
                need += self.inner._needs(st, self._grow(sub, k, total))
                w = self.plan.windows[k]
                if w and st is not None:
                    need -= max(0, min((self._tokens[seq.seq_id] - w) // self.inner.block_size,
                                       len(st.table) - 1) - st.released)
            return need <= self.inner.pool.num_free
        # one request's groups grow together (virtual: from one pool of page groups)
        return self.inner.can_grow_together([(sub, self._grow(sub, k, total)) for k, sub in enumerate(subs)])

    def allocate(self, seq: SequenceLike, num_new_tokens: int) -> None:
        start = self._tokens.get(seq.seq_id, 0)
        total = start + num_new_tokens
        subs = self._subs_of(seq)
        fresh = seq.seq_id not in self._subs
        try:
            # every windowed group gives back first: can_allocate counted those blocks as free
            for k, sub in enumerate(subs):
                self._release(sub, k, start)
            for k, sub in enumerate(subs):
                n = self._grow(sub, k, total)
                if n > 0 or fresh:
                    self.inner.allocate(sub, max(n, 0))
        except AllocationError:
            if fresh:  # nothing of it stays behind
                for sub in subs:
                    self.inner.free(sub)
            raise
        self._subs[seq.seq_id] = subs
        self._tokens[seq.seq_id] = total

    def free(self, seq: SequenceLike) -> None:
        subs = self._subs.pop(seq.seq_id, None)
        self._tokens.pop(seq.seq_id, None)
        for sub in subs or ():
            self.inner.free(sub)

    def num_tokens(self, seq: SequenceLike) -> int:
        return self._tokens.get(seq.seq_id, 0)

    def seq_capacity(self, seq: SequenceLike) -> int:
        # held group tokens; the engine's exact reservation correction does not apply to groups
        # (their memory rows are the allocator's provisional split, see the module docstring)
        return 0

    def max_fit_tokens(self) -> int:
        return self._max_fit

    def _probe_max_fit(self) -> int:
        """Longest sequence the empty pool can take to its end: found by growing a probe sequence
        (prompt chunks of ``max_chunk``, the peak a windowed group holds) and giving it back, so
        block, page and region rounding of every strategy counts. Run on an accounting-only twin:
        a virtual allocator keeps freed pages mapped in idle slots."""
        def fits(n: int) -> bool:
            probe = _Probe(n)
            try:
                done = 0
                while done < n:
                    step = min(self.max_chunk, n - done)
                    if not self.can_allocate(probe, step):
                        return False
                    self.allocate(probe, step)
                    done += step
                return True
            finally:
                self.free(probe)

        lo, hi = 0, min(self.inner.max_fit_tokens(), self.max_model_len)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    # -- addressing ------------------------------------------------------------------------
    def group(self, k: int) -> "GroupView":
        return GroupView(self, k)

    def slot_mapping(self, seq: SequenceLike, start: int, end: int) -> list[int]:
        return self.group(0).slot_mapping(seq, start, end)

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    def kv_cache(self, layer: int):
        return self.inner.kv_cache(self.plan.locate(layer)[1])

    def set_fence(self, fence: Callable[[], None] | None) -> None:
        super().set_fence(fence)
        self.inner.set_fence(fence)

    def close(self) -> None:
        self.inner.close()

    # -- accounting -----------------------------------------------------------------------
    def stats(self) -> MemoryStats:
        self._sample_groups()
        return self.inner.stats()

    def _sample_groups(self) -> None:
        held = self.group_held_bytes()
        for k, b in enumerate(held):
            self._held[k][0] += b
            self._held[k][1] = max(self._held[k][1], b)
        self._samples += 1

    def group_held_bytes(self) -> list[int]:
        """Bytes each group holds now (its sequences' blocks, regions or mapped pages)."""
        out = []
        for k in range(self.plan.num_groups):
            subs = [s[k] for s in self._subs.values()]
            out.append(sum(self.inner.seq_capacities(subs)) * self.bytes_per_token if subs else 0)
        return out

    def summary(self) -> dict:
        """Per group: layers, window, mean (over steps) and peak bytes held; padding's share."""
        n = max(1, self._samples)
        g = self.plan.group_size
        groups, padding = [], 0.0
        for k, (members, w) in enumerate(zip(self.plan.layers, self.plan.windows)):
            mean, peak = self._held[k][0] / n, self._held[k][1]
            groups.append(dict(layers=list(members), window=w, ring=self.rings[k], mean_bytes=mean,
                               peak_bytes=peak))
            padding += mean * (g - len(members)) / g
        return dict(kv_grouping="shared", group_size=g, num_groups=self.plan.num_groups,
                    padding_layers=self.plan.padding_layers, padding_mean_bytes=padding, groups=groups)


class GroupView:
    """Group ``k`` of a GroupedAllocator, with the addressing calls the runner makes."""

    def __init__(self, owner: GroupedAllocator, k: int):
        self.owner, self.k = owner, k
        self.mode = owner.mode
        self.ring = owner.rings[k]

    @property
    def block_size(self) -> int:
        return self.owner.inner.block_size

    def _sub(self, seq: SequenceLike) -> _Sub:
        return self.owner._subs[seq.seq_id][self.k]

    def block_ids(self, seq: SequenceLike) -> list[int]:
        return self.owner.inner.block_ids(self._sub(seq))

    def seq_base(self, seq: SequenceLike) -> int:
        return self.owner.inner.seq_base(self._sub(seq))

    def slot_mapping(self, seq: SequenceLike, start: int, end: int) -> list[int]:
        if not self.ring:
            return self.owner.inner.slot_mapping(self._sub(seq), start, end)
        base = self.seq_base(seq)
        return [base + t % self.ring for t in range(start, end)]


def grouped_allocator(inner_cls: type[KVAllocator], layer_windows: Seq[int], grouping: str, max_chunk: int,
                      **kwargs) -> KVAllocator:
    """The allocator for a model's layer windows: ``inner_cls`` itself (grouping none, or no
    window), else a GroupedAllocator over it."""
    if grouping not in GROUPINGS:
        raise ValueError(f"kv_grouping '{grouping}': choose one of {GROUPINGS}")
    if grouping == "none" or not any(layer_windows):
        return inner_cls(**kwargs)
    return GroupedAllocator(inner_cls, plan=plan_groups(layer_windows), max_chunk=max_chunk, **kwargs)
