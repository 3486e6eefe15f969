"""The one interface every KV memory strategy implements; the engine never branches on it.

An allocator tracks, per sequence, how many token slots it has made room for
(``num_tokens``) and how many it holds (``seq_capacity``), owns the per-layer cache
tensors the kernels read, and reports where every byte of its pool is (``stats``).
"""
from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Protocol, Sequence as Seq

import torch

from allocators.prefix_cache import PrefixMatch
from allocators.stats import STAT_FIELDS, MemoryStats
from kernels.metadata import Addressing


class AllocationError(RuntimeError):
    """Raised when an allocator is asked for room it does not have."""


class SequenceLike(Protocol):
    """What an allocator may read from a sequence."""

    seq_id: int
    prompt_len: int
    max_len: int  # prompt + max_tokens, capped to max_model_len: an upper bound of the final length
    oracle_len: int  # the exact final length where known (workloads with ignore_eos), else max_len

    @property
    def token_ids(self) -> list[int]: ...


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the KV cache of one model; ``device=None`` means accounting only (simulate)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: str | None = "cpu"

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def materialized(self) -> bool:
        return self.device is not None


class KVAllocator(ABC):
    """One KV memory strategy.

    Life of a sequence, as the engine drives it::

        match_prefix(seq)                    # admission, prefix caching on: attach cached blocks
        can_allocate(seq, n); allocate(seq, n)   # before every step, for the step's new tokens
        slot_mapping(seq, start, end)         # where the step writes tokens [start, end)
        fork(parent, child)                   # n > 1: the child shares the parent's KV
        swap_out(seq) ... swap_in(seq)        # preemption by swapping (where supported)
        free(seq)                             # finish, abort, recompute preemption

    ``allocate`` is also the copy-on-write point: where the next tokens of ``seq`` would
    land in memory that another sequence shares, the allocator gives ``seq`` a private copy
    first (data copied with ``kernels.copy_blocks``), so shared memory is never written.
    """

    name: ClassVar[str]
    mode: ClassVar[Addressing]
    supports_fork: ClassVar[bool] = False  # fork() works (sharing or copying, see the strategy)
    supports_prefix_caching: ClassVar[bool] = False  # match_prefix() can return > 0
    supports_swap: ClassVar[bool] = False  # swap_out()/swap_in() work (given host space)
    supports_host_tier: ClassVar[bool] = False  # takes host_tier_tokens (allocators/host_tier.py)
    host_tier = None  # the HostKVTier where one is configured
    last_match: PrefixMatch = PrefixMatch()  # the last match_prefix, by tier (recomputed tokens)
    fence: Callable[[], None] | None = None  # see set_fence

    @classmethod
    def check_args(cls, args: dict) -> None:
        """The ranges of ``args`` (``allocator.args``, types already checked) that need neither the
        model nor the pool, so that a run or a sweep is refused before any of it starts; the
        constructor checks them again with the rest (ValueError naming the argument and the fix)."""

    def __init__(self, spec: KVCacheSpec, capacity_tokens: int, max_num_seqs: int, max_model_len: int):
        if capacity_tokens <= 0:
            raise ValueError(f"KV pool of {capacity_tokens} tokens: give the allocator more memory")
        self.spec = spec
        self.capacity_tokens = capacity_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.bytes_per_token = spec.bytes_per_token

    # -- room for tokens ---------------------------------------------------------------
    @abstractmethod
    def can_allocate(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        """Whether ``allocate(seq, num_new_tokens)`` would succeed now."""

    @abstractmethod
    def allocate(self, seq: SequenceLike, num_new_tokens: int) -> None:
        """Make room for the next ``num_new_tokens`` tokens of ``seq`` (copy-on-write included)."""

    def can_grow_together(self, items: Seq[tuple[SequenceLike, int]]) -> bool:
        """Whether ``allocate`` of each ``(seq, num_new_tokens)`` in turn would all succeed: the
        sequences are live and grow together (one request's layer groups, ``layer_groups``).
        Strategies whose growth draws on a shared pool override it; here each grows alone."""
        return all(self.can_allocate(seq, n) for seq, n in items)

    def allocate_batch(self, seqs: Seq[SequenceLike], num_new_tokens: int = 1) -> int:
        """``can_allocate`` then ``allocate`` of ``num_new_tokens`` for each of ``seqs`` in order,
        stopping at the first that does not fit (it and those after it are left as they were);
        returns how many were allocated.

        The scheduler grows a step's decode sequences with one call instead of two per
        sequence. Strategies override it with their decode fast path inlined; an override must
        leave the allocator exactly as this loop does.
        """
        for i, seq in enumerate(seqs):
            if not self.can_allocate(seq, num_new_tokens):
                return i
            self.allocate(seq, num_new_tokens)
        return len(seqs)

    @abstractmethod
    def free(self, seq: SequenceLike) -> None:
        """Release everything ``seq`` holds (finished, aborted or preempted); no-op if unknown."""

    @abstractmethod
    def num_tokens(self, seq: SequenceLike) -> int:
        """Tokens of ``seq`` that have room (0 for a sequence the allocator does not know)."""

    @abstractmethod
    def seq_capacity(self, seq: SequenceLike) -> int:
        """End of the token positions ``[0, cap)`` that ``seq`` holds room for, as charged to it.

        Slots ``[num_tokens, cap)`` are charged to ``seq`` alone; positions below
        ``num_tokens`` may be shared with other sequences (``stats`` counts them once).
        Where ``seq``'s unfilled tail is shared (a fork's last block) one holder is charged
        and the others report ``cap = num_tokens``. The accountant moves ``[final_len, cap)``
        into internal fragmentation when ``seq`` finishes.
        """

    def seq_capacities(self, seqs: Seq[SequenceLike]) -> list[int]:
        """``seq_capacity`` of each of ``seqs``: the accountant asks for every live sequence at
        every step, so strategies override it with one tight pass."""
        return [self.seq_capacity(s) for s in seqs]

    def max_fit_tokens(self) -> int:
        """Largest final length a single sequence could ever be given on an empty pool."""
        return self.capacity_tokens

    def decode_run(self, seqs: Seq[SequenceLike]) -> DecodeRun | None:
        """What steps of one decode token for each of ``seqs`` would do, for simulate mode's
        bulk path (see :class:`DecodeRun`); None where this allocator (or its state now) has no
        such model: every step then goes through ``allocate_batch``."""
        return None

    # -- sharing -------------------------------------------------------------------------
    def can_fork(self, parent: SequenceLike) -> bool:
        """Whether ``fork(parent, child)`` would succeed now."""
        return False

    def fork(self, parent: SequenceLike, child: SequenceLike) -> None:
        """Give ``child`` (unknown to the allocator) the KV of ``parent``'s first ``num_tokens(parent)``
        tokens; afterwards both grow independently with ``allocate``.

        Call it between steps, when everything ``parent`` was allocated is computed. Paged
        shares the blocks (reference counts, copy-on-write of a shared partial last block on
        the next ``allocate``); contiguous and virtual copy the tokens into the child's own
        region. ``child.token_ids`` starts as a copy of ``parent``'s.
        """
        raise NotImplementedError(f"allocator '{self.name}' does not support fork (n > 1)")

    def match_prefix(self, seq: SequenceLike) -> int:
        """At admission (``seq`` holds nothing yet): attach the cached KV of the longest cached
        prefix of ``seq.token_ids`` and return its length in tokens (0 where unsupported).

        Always leaves at least one token to compute (its logits give the next token).
        ``num_tokens(seq)`` is then the returned count, so a following ``allocate(seq, n)``
        adds only the tokens after the cached prefix.
        """
        return 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Tokens found in the prefix cache / tokens looked up (0.0 before any lookup)."""
        return 0.0

    def flush_transfers(self) -> list:
        """End of a schedule: start the host-tier copies still pending (before the step writes
        the blocks they read) and return the memcpys (``host_tier.Transfer``) made since the last
        call; none without a host tier."""
        return []

    # -- swapping (preemption) -----------------------------------------------------------
    def can_swap_out(self, seq: SequenceLike) -> bool:
        """Whether the host pool has room for ``seq``'s KV now."""
        return False

    def swap_out(self, seq: SequenceLike) -> list[tuple[int, int]]:
        """Move ``seq``'s KV to the host pool and release its device memory.

        Returns ``(device_block, host_block)`` pairs; the allocator has copied the data
        already. ``seq`` keeps its ``num_tokens`` and is *swapped* until ``swap_in``; do not
        ``allocate`` for it meanwhile (``free`` drops its host copy).
        """
        raise NotImplementedError(f"allocator '{self.name}' does not support swapping: use recompute")

    def can_swap_in(self, seq: SequenceLike, num_new_tokens: int = 0) -> bool:
        """Whether the device pool has room to bring a swapped ``seq`` back now, and then to
        ``allocate(seq, num_new_tokens)`` (so a scheduler need not swap it in and out again)."""
        return False

    def swap_in(self, seq: SequenceLike) -> list[tuple[int, int]]:
        """Bring a swapped ``seq`` back to device memory; returns ``(host_block, device_block)``
        pairs, data already copied. ``seq`` then continues where it stopped."""
        raise NotImplementedError(f"allocator '{self.name}' does not support swapping: use recompute")

    def is_swapped(self, seq: SequenceLike) -> bool:
        return False

    # -- addressing for kernels --------------------------------------------------------
    @abstractmethod
    def slot_mapping(self, seq: SequenceLike, start: int, end: int) -> list[int]:
        """Flat cache slot of each token ``[start, end)`` of ``seq``."""

    def block_ids(self, seq: SequenceLike) -> list[int]:
        raise NotImplementedError  # PAGED allocators

    def seq_base(self, seq: SequenceLike) -> int:
        raise NotImplementedError  # LINEAR allocators

    @property
    def block_size(self) -> int:
        return 0

    def kv_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k[layer], self._v[layer]

    def _make_cache(self, num_slots: int) -> None:
        """Per-layer ``[num_slots, H, D]`` K and V tensors (nothing in accounting-only mode)."""
        s = self.spec
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        if not s.materialized:
            return
        for _ in range(s.num_layers):
            self._k.append(torch.zeros(num_slots, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=s.device))
            self._v.append(torch.zeros(num_slots, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=s.device))

    def set_fence(self, fence: Callable[[], None] | None) -> None:
        """``fence()`` returns once the device has finished every step launched so far. The
        engine sets it; an allocator calls it before work the device's stream does not order
        after those steps (unmapping memory that a step still in flight may read or write)."""
        self.fence = fence

    def close(self) -> None:
        """Release what outlives the object (mappings, threads); the allocator is unusable after."""

    # -- accounting ----------------------------------------------------------------------
    @abstractmethod
    def stats(self) -> MemoryStats:
        """Provisional breakdown: reservation and internal_frag use each live sequence's
        ``max_len`` bound; the engine's accountant corrects them with final lengths."""

    def live_split(self, seqs: Seq[tuple[SequenceLike, int, int]]) -> tuple[int, int, int]:
        """(token_states, reservation, internal_frag) in bytes from (seq, filled, capacity)."""
        filled = reserved = internal = 0
        for seq, used, cap in seqs:
            bound = max(min(seq.max_len, cap), used)
            filled += used
            reserved += bound - used
            internal += cap - bound
        bpt = self.bytes_per_token
        return filled * bpt, reserved * bpt, internal * bpt


_STAT_ROW = operator.attrgetter(*STAT_FIELDS)
_TS, _RES, _INT, _FREE = (STAT_FIELDS.index(f) for f in ("token_states", "reservation", "internal_frag", "free"))


class DecodeRun:
    """Steps in which ``allocate_batch(seqs[:num])`` grows each of the first ``num`` of ``seqs``
    by one token, for simulate mode's bulk path (experiments/sim_fastpath.py), which steps it
    one step at a time and then makes the change at once (``commit``).

    Made from the allocator's state now (``KVAllocator.decode_run``); the allocator does not
    change until ``commit``. ``used``: tokens the allocator holds for each sequence now;
    ``caps``: their ``seq_capacities``. A strategy says how many steps it can model at most
    (``limit``), makes each step's room (``allocate``: where a sequence does not fit, the
    caller preempts from the back, ``release``), whether a waiting sequence could be admitted
    (``may_admit``), may model its admission at a step (``admit``) and a sequence that finishes
    (``finish``: the run goes on past it) and makes the change (``commit``). The caller may give up a step it has begun (``allocate``, ``release``)
    and commit only the steps before it: ``commit``, ``stats_rows`` and the caller skip every
    entry of a later step. The ``stats`` rows follow here, for every strategy whose live
    sequences split their capacity as ``live_split`` does.
    """

    takes_free = False  # capacity grows out of the free pool, and preempted ones give theirs back (paged)
    admits = False  # ``admit`` can model an admission at the first step

    def __init__(self, allocator: KVAllocator, seqs: Seq[SequenceLike], used: list[int], caps: list[int],
                 room: int | None = None):
        self.allocator, self.seqs, self.used, self.caps = allocator, list(seqs), used, caps
        self.growth: list[tuple[int, int, int]] = []  # (step, index, capacity after it), in step order
        self.released: list[tuple[int, int]] = []  # (step, index) of each sequence preempted
        self.joined: list[tuple[int, int, int]] = []  # (step, index, tokens) of each sequence admitted
        self.finished: list[tuple[int, int, int]] = []  # (step, index, tokens it holds) of each that finishes
        # no sequence outgrows its max_len (stats split at min(max_len, capacity) then); a
        # strategy may pass it, found in its own pass over the sequences
        self.room = min(s.max_len - u for s, u in zip(self.seqs, used)) if room is None else room

    def limit(self) -> int:
        """Steps the strategy can model from now (0: not even the next); ``room`` bounds them
        too, while the sequences it counts are live (the caller sees to it)."""
        return max(0, self._limit())

    def _limit(self) -> int:
        raise NotImplementedError

    def allocate(self, step: int, num: int, start: int = 0, skip: Seq[int] = ()) -> int | None:
        """Room for step ``step``'s token of each of ``seqs[start:num]`` but those in ``skip``,
        in order; the index of the first that finds none (those before it have theirs), or None.
        ``skip``: sequences that compute no token at this step (asynchronous steps, whose last
        tokens are in flight: they finish at it, ``finish``, or it is the run's last, ``commit``'s
        ``skipped``); a strategy that models ``finish`` skips the sequences gone by itself."""
        return None

    def release(self, index: int, step: int) -> bool:
        """``seqs[index]`` is preempted (by recompute) at step ``step``, before its token: its
        room goes back. False where that is not modelled (nothing is changed then)."""
        return False

    def may_admit(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        """Whether ``can_allocate(seq, num_new_tokens)`` of a waiting ``seq`` could be true after
        the steps made so far; False also means at later steps until one preempts (they only
        take room). True when in doubt."""
        raise NotImplementedError

    def admit(self, seq: SequenceLike, num_new_tokens: int, step: int = 1) -> bool:
        """At step ``step``, after its decode tokens: ``seq`` (holding nothing) is admitted with
        its ``num_new_tokens`` tokens, all it has: it joins ``seqs`` (at the end) and decodes
        from the next step on (``used``: its tokens minus ``step``, as if it had decoded since
        the first). False (nothing changed) where that is not modelled."""
        return False

    def finish(self, indices: list[int], step: int, held: list[int]) -> bool:
        """``seqs[j]`` for j in ``indices`` finish after step ``step`` holding ``held`` tokens:
        their room goes back before the next step. False where that is not modelled (nothing is
        changed then: the run ends with that step, and the caller finishes them after ``commit``)."""
        return False

    def stats_rows(self, decoding: list[int]) -> tuple[int, list[tuple]]:
        """(capacity, one STAT_FIELDS row per step): ``stats()`` after each step of the run,
        ``decoding[i]`` sequences decoding a token in step i + 1: the stats now, plus the run's
        tokens, the sequences admitted and the capacities that grew, minus the sequences
        preempted. Every token is below ``min(max_len, capacity)`` (``room`` sees to it), so
        each sequence's reservation ends there."""
        k = len(decoding)
        seqs, caps = self.seqs, list(self.caps)
        d_ts, d_res, d_int, d_cap = ([0] * (k + 1) for _ in range(4))
        for step, j, tokens in self.joined:
            if step > k:
                continue
            m, cap = seqs[j].max_len, caps[j]
            d_ts[step] += tokens
            d_res[step] += min(m, cap) - tokens
            d_int[step] += max(cap - m, 0)
            d_cap[step] += cap
        for step, j, cap in self.growth:
            if step > k:
                break
            m, old = seqs[j].max_len, caps[j]
            caps[j] = cap
            d_res[step] += min(m, cap) - min(m, old)
            d_int[step] += max(cap - m, 0) - max(old - m, 0)
            d_cap[step] += cap - old
        # those preempted (before their token of that step) and those finished (from the next
        # step's row on), at their capacity then: they grow no more
        gone = [(step, j, self.used[j] + step - 1) for step, j in self.released]
        gone += [(step + 1, j, held) for step, j, held in self.finished]
        for step, j, used in gone:
            if step > k:
                continue
            m, cap = seqs[j].max_len, caps[j]
            d_ts[step] -= used
            d_res[step] -= min(m, cap) - used
            d_int[step] -= max(cap - m, 0)
            d_cap[step] -= cap
        now = self._stats()
        row = list(_STAT_ROW(now))
        ts, res, internal, free = row[_TS], row[_RES], row[_INT], row[_FREE]
        bpt = self.allocator.bytes_per_token
        rows = []
        g_ts = g_res = g_int = g_cap = 0
        for step in range(1, k + 1):
            num = decoding[step - 1]  # each grows by a token: its reservation shrinks by one
            g_ts += num + d_ts[step]
            g_res += d_res[step] - num
            g_int += d_int[step]
            g_cap += d_cap[step]
            row[_TS] = ts + g_ts * bpt
            row[_RES] = res + g_res * bpt
            row[_INT] = internal + g_int * bpt
            if self.takes_free:
                row[_FREE] = free - g_cap * bpt
            rows.append(tuple(row))
        return now.capacity, rows

    def _stats(self) -> MemoryStats:
        """The allocator's ``stats()`` now (before the run)."""
        return self.allocator.stats()

    def commit(self, k: int, preempt: Callable[[int], None], admit: Callable[[int], None],
               skipped: Seq[int] = (), finish: Callable[[int, list[int]], None] | None = None) -> None:
        """Leave the allocator as steps 1..k did: each survivor ``k`` tokens longer (those in
        ``skipped``, which step k skipped, ``k - 1``), each preempted one as it was then.
        ``preempt(index)`` is called where a step preempted (the scheduler's own preemption,
        which frees it here), ``admit(step)`` where a step admitted (the scheduler's own
        admission, which allocates here), ``finish(step, indices)`` after a step whose
        sequences finished (``finish`` above; the engine's own code, which frees them here)."""
        raise NotImplementedError


class InPlaceDecodeRun(DecodeRun):
    """A run in which each sequence grows inside room it holds already (a contiguous region, a
    virtual slot's mapped pages): nothing is taken or given back meanwhile, so the change is each
    holder's ``used`` count; a waiting sequence may be admitted where the allocator allows it now.
    ``held``: the allocator's map from seq_id to holder (one holding nothing may be admitted)."""

    def __init__(self, allocator: KVAllocator, seqs: Seq[SequenceLike], holders: list, caps: list[int],
                 held: Mapping[int, object]):
        super().__init__(allocator, seqs, [h.used for h in holders], caps)
        self.holders, self._held = holders, held

    def may_admit(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        return seq.seq_id in self._held or self.allocator.can_allocate(seq, num_new_tokens)

    def commit(self, k: int, preempt: Callable[[int], None], admit: Callable[[int], None],
               skipped: Seq[int] = (), finish: Callable[[int, list[int]], None] | None = None) -> None:
        for h in self.holders:
            h.used += k
        # (the simulator frees the skipped ones right after: their count is for the contract)
        for j in skipped:
            self.holders[j].used -= 1
