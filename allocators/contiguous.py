"""Contiguous reservation (static caches, Orca): one region per request from one arena.

Policies size the region when the request is admitted: ``max`` reserves max_model_len
(Orca-Max, static caches), ``pow2`` prompt + next_pow2(max_tokens): only the output is rounded
(Orca-Pow2 as the PagedAttention paper defines it: prompt 100, output 50 -> 100 + 64 = 164),
``oracle`` the exact final length (Orca-Oracle: an upper bound no real system has). Every
region is capped at max_model_len. Regions never grow, so a request is admitted only where
a hole fits its whole region.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

from allocators.arena import check_arena, make_arena
from allocators.base import AllocationError, DecodeRun, InPlaceDecodeRun, KVAllocator, KVCacheSpec, SequenceLike
from allocators.registry import register
from allocators.stats import MemoryStats
from kernels.metadata import Addressing

POLICIES = ("max", "pow2", "oracle")


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def pow2_reservation(prompt_len: int, max_len: int, max_model_len: int) -> int:
    """Orca-Pow2: the prompt plus its output budget (``max_len - prompt_len``) rounded up to a
    power of two, capped at max_model_len (the prompt itself is known, only the output is guessed)."""
    return min(prompt_len + _next_pow2(max_len - prompt_len), max_model_len)


@dataclass(slots=True)
class _Region:
    seq: SequenceLike
    start: int
    length: int  # slots charged (what the arena granted)
    used: int = 0
    bound: int = 0  # min(max_len, length): where reservation ends and internal fragmentation starts


@register("contiguous")
class ContiguousAllocator(KVAllocator):
    mode = Addressing.LINEAR
    supports_fork = True  # by copy: regions cannot be shared

    @classmethod
    def check_args(cls, args: dict) -> None:
        if args.get("policy", "max") not in POLICIES:
            raise ValueError(f"unknown contiguous policy '{args['policy']}': choose one of {POLICIES}")
        check_arena(args.get("arena", "first_fit"))

    def __init__(
        self,
        spec: KVCacheSpec,
        capacity_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        policy: str = "max",
        arena: str = "first_fit",
    ):
        self.check_args({"policy": policy, "arena": arena})
        super().__init__(spec, capacity_tokens, max_num_seqs, max_model_len)
        self.policy = policy
        self.arena_kind = arena
        self.arena = make_arena(arena, capacity_tokens)
        self._regions: dict[int, _Region] = {}
        self._make_cache(capacity_tokens)

    # -- sizing ------------------------------------------------------------------------
    def region_size(self, seq: SequenceLike) -> int:
        """Tokens the policy asks for (the arena may round up: ``arena.size_for``)."""
        if self.policy == "max":
            size = self.max_model_len
        elif self.policy == "pow2":
            size = pow2_reservation(seq.prompt_len, seq.max_len, self.max_model_len)
        else:
            size = seq.oracle_len
        ring = getattr(seq, "ring", 0)  # a sliding window's layers (layer groups) reuse a ring of slots
        return min(size, ring) if ring else size

    def _grant(self, seq: SequenceLike, num_tokens: int) -> int:
        return self.arena.size_for(max(self.region_size(seq), num_tokens))

    def max_fit_tokens(self) -> int:
        largest = self.arena.max_region()
        if self.policy == "max":
            return self.max_model_len if self.arena.size_for(self.max_model_len) <= largest else 0
        return largest

    # -- room for tokens -----------------------------------------------------------------
    def can_allocate(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        r = self._regions.get(seq.seq_id)
        if r is not None:
            return r.used + num_new_tokens <= r.length
        return self.arena.largest_hole() >= self._grant(seq, num_new_tokens)

    def _new_region(self, seq: SequenceLike, num_tokens: int) -> _Region:
        length = self._grant(seq, num_tokens)
        start = self.arena.alloc(length)
        if start is None:
            raise AllocationError(
                f"no hole of {length} tokens for seq {seq.seq_id} (largest {self.arena.largest_hole()}, "
                f"policy '{self.policy}'): check can_allocate first")
        r = self._regions[seq.seq_id] = _Region(seq, start, length, bound=min(seq.max_len, length))
        return r

    def allocate(self, seq: SequenceLike, num_new_tokens: int) -> None:
        r = self._regions.get(seq.seq_id) or self._new_region(seq, num_new_tokens)
        if r.used + num_new_tokens > r.length:
            raise AllocationError(
                f"seq {seq.seq_id} outgrew its {r.length}-token region (policy '{self.policy}'): "
                "a region is sized at admission; with policy 'oracle' give the exact final length")
        r.used += num_new_tokens

    def allocate_batch(self, seqs: Seq[SequenceLike], num_new_tokens: int = 1) -> int:
        # growing inside its region is the decode path; a new region goes the long way
        get, n = self._regions.get, num_new_tokens
        for i, seq in enumerate(seqs):
            r = get(seq.seq_id)
            if r is None:
                if not self.can_allocate(seq, n):
                    return i
                self.allocate(seq, n)
            elif r.used + n <= r.length:
                r.used += n
            else:
                return i
        return len(seqs)

    def decode_run(self, seqs: Seq[SequenceLike]) -> DecodeRun | None:
        get = self._regions.get
        regions = [get(s.seq_id) for s in seqs]
        return None if None in regions else _ContiguousDecodeRun(self, seqs, regions)

    def free(self, seq: SequenceLike) -> None:
        r = self._regions.pop(seq.seq_id, None)
        if r is not None:
            self.arena.release(r.start, r.length)

    def num_tokens(self, seq: SequenceLike) -> int:
        r = self._regions.get(seq.seq_id)
        return r.used if r else 0

    def seq_capacity(self, seq: SequenceLike) -> int:
        r = self._regions.get(seq.seq_id)
        return r.length if r else 0

    def seq_capacities(self, seqs: Seq[SequenceLike]) -> list[int]:
        get = self._regions.get
        return [r.length if (r := get(s.seq_id)) is not None else 0 for s in seqs]

    # -- fork: a copy into the child's own region ------------------------------------------
    def can_fork(self, parent: SequenceLike) -> bool:
        r = self._regions.get(parent.seq_id)
        return r is not None and self.arena.largest_hole() >= self._grant(parent, r.used)

    def fork(self, parent: SequenceLike, child: SequenceLike) -> None:
        src = self._regions[parent.seq_id]
        if child.seq_id in self._regions:
            raise AllocationError(f"fork: child seq {child.seq_id} already holds a region")
        dst = self._new_region(child, src.used)
        dst.used = src.used
        for k, v in zip(self._k, self._v):
            k[dst.start:dst.start + src.used] = k[src.start:src.start + src.used]
            v[dst.start:dst.start + src.used] = v[src.start:src.start + src.used]

    # -- addressing -------------------------------------------------------------------------
    def slot_mapping(self, seq: SequenceLike, start: int, end: int) -> list[int]:
        base = self._regions[seq.seq_id].start
        return list(range(base + start, base + end))

    def seq_base(self, seq: SequenceLike) -> int:
        return self._regions[seq.seq_id].start

    # -- accounting -------------------------------------------------------------------------
    def stats(self) -> MemoryStats:
        used = reserved = internal = 0
        for r in self._regions.values():  # live_split, inlined: the engine calls this every step
            bound = r.bound if r.bound >= r.used else r.used
            used += r.used
            reserved += bound - r.used
            internal += r.length - bound
        bpt = self.bytes_per_token
        token_states, reservation, internal = used * bpt, reserved * bpt, internal * bpt
        free = self.arena.free_total()
        largest = self.arena.largest_hole()
        # the largest hole is usable only if some request's region fits in it: under policy
        # max every region is max_model_len, so a smaller hole is fragmentation, not room
        usable = largest if largest >= self.min_region() else 0
        return MemoryStats(
            capacity=self.capacity_tokens * bpt,
            token_states=token_states,
            reservation=reservation,
            internal_frag=internal,
            external_frag=(free - usable) * bpt,
            free=usable * bpt,
        )

    def min_region(self) -> int:
        """The smallest region this policy can give a request."""
        return min(self.max_model_len, self.capacity_tokens) if self.policy == "max" else 1

    def regions(self) -> dict[int, tuple[int, int]]:
        """seq_id -> (start, length): for tests and plots of the arena."""
        return {i: (r.start, r.length) for i, r in self._regions.items()}


class _ContiguousDecodeRun(InPlaceDecodeRun):
    """Decode grows inside each region, which never changes: the run lasts while every
    sequence has room left in its region; the arena does not change meanwhile."""

    def __init__(self, allocator: ContiguousAllocator, seqs: Seq[SequenceLike], regions: list[_Region]):
        super().__init__(allocator, seqs, regions, [r.length for r in regions], allocator._regions)

    def _limit(self) -> int:
        return min(r.length - r.used for r in self.holders)
