"""Contiguous reservation (static caches, Orca): one region per request from one arena."""
from __future__ import annotations

from allocators.arena import FirstFitArena
from allocators.base import AllocationError, KVAllocator, KVCacheSpec, SequenceLike
from allocators.registry import register
from allocators.stats import MemoryStats
from kernels.metadata import Addressing

POLICIES = ("max", "pow2", "oracle")


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@register("contiguous")
class ContiguousAllocator(KVAllocator):
    mode = Addressing.LINEAR

    def __init__(
        self,
        spec: KVCacheSpec,
        capacity_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        policy: str = "max",
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown contiguous policy '{policy}': choose one of {POLICIES}")
        super().__init__(spec, capacity_tokens, max_num_seqs, max_model_len)
        self.policy = policy
        self.arena = FirstFitArena(capacity_tokens)
        self._regions: dict[int, tuple[int, int]] = {}  # seq_id -> (start, length)
        self._used: dict[int, int] = {}
        self._seqs: dict[int, SequenceLike] = {}
        self._make_cache(capacity_tokens)

    def region_size(self, seq: SequenceLike) -> int:
        if self.policy == "max":
            return self.max_model_len
        if self.policy == "pow2":
            return min(_next_pow2(seq.max_len), self.max_model_len)
        return seq.oracle_len

    def max_fit_tokens(self) -> int:
        return self.capacity_tokens if self.policy != "max" else (
            self.max_model_len if self.max_model_len <= self.capacity_tokens else 0
        )

    def can_allocate(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        region = self._regions.get(seq.seq_id)
        if region is not None:
            return self._used[seq.seq_id] + num_new_tokens <= region[1]
        need = max(self.region_size(seq), num_new_tokens)
        return self.arena.largest_hole() >= need

    def allocate(self, seq: SequenceLike, num_new_tokens: int) -> None:
        region = self._regions.get(seq.seq_id)
        if region is None:
            length = max(self.region_size(seq), num_new_tokens)
            start = self.arena.alloc(length)
            if start is None:
                raise AllocationError(f"no hole of {length} tokens for seq {seq.seq_id}")
            self._regions[seq.seq_id] = region = (start, length)
            self._used[seq.seq_id] = 0
            self._seqs[seq.seq_id] = seq
        if self._used[seq.seq_id] + num_new_tokens > region[1]:
            raise AllocationError(
                f"seq {seq.seq_id} outgrew its {region[1]}-token region (policy '{self.policy}')"
            )
        self._used[seq.seq_id] += num_new_tokens

    def free(self, seq: SequenceLike) -> None:
        region = self._regions.pop(seq.seq_id, None)
        if region is not None:
            self.arena.release(*region)
        self._used.pop(seq.seq_id, None)
        self._seqs.pop(seq.seq_id, None)

    def num_tokens(self, seq: SequenceLike) -> int:
        return self._used.get(seq.seq_id, 0)

    def seq_capacity(self, seq: SequenceLike) -> int:
        region = self._regions.get(seq.seq_id)
        return region[1] if region else 0

    def slot_mapping(self, seq: SequenceLike, start: int, end: int) -> list[int]:
        base = self._regions[seq.seq_id][0]
        return list(range(base + start, base + end))

    def seq_base(self, seq: SequenceLike) -> int:
        return self._regions[seq.seq_id][0]

    def stats(self) -> MemoryStats:
        bpt = self.bytes_per_token
        live = [(s, self._used[i], self._regions[i][1]) for i, s in self._seqs.items()]
        token_states, reservation, internal = self.live_split(live)
        free = self.arena.free_total()
        largest = self.arena.largest_hole()
        return MemoryStats(
            capacity=self.capacity_tokens * bpt,
            token_states=token_states,
            reservation=reservation,
            internal_frag=internal,
            external_frag=(free - largest) * bpt,
            free=largest * bpt,
        )
