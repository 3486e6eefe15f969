"""Paged KV cache (PagedAttention): fixed-size blocks from a pool, a block table per sequence."""
from __future__ import annotations

from collections import deque

from allocators.base import AllocationError, KVAllocator, KVCacheSpec, SequenceLike
from allocators.registry import register
from allocators.stats import MemoryStats
from kernels.metadata import Addressing


@register("paged")
class PagedAllocator(KVAllocator):
    mode = Addressing.PAGED

    def __init__(
        self,
        spec: KVCacheSpec,
        capacity_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int = 16,
    ):
        if not 1 <= block_size <= 1024:
            raise ValueError(f"block_size={block_size}: choose a block size between 1 and 1024")
        num_blocks = capacity_tokens // block_size
        if num_blocks == 0:
            raise ValueError(
                f"KV pool of {capacity_tokens} tokens holds no block of {block_size}: "
                "give the allocator more memory or a smaller block_size"
            )
        super().__init__(spec, num_blocks * block_size, max_num_seqs, max_model_len)
        self._block_size = block_size
        self.num_blocks = num_blocks
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._used: dict[int, int] = {}
        self._seqs: dict[int, SequenceLike] = {}
        self._make_cache(num_blocks * block_size)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def _blocks_needed(self, seq: SequenceLike, num_new_tokens: int) -> int:
        total = self._used.get(seq.seq_id, 0) + num_new_tokens
        held = len(self._tables.get(seq.seq_id, ()))
        return max(0, -(-total // self._block_size) - held)

    def can_allocate(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        return self._blocks_needed(seq, num_new_tokens) <= len(self._free_blocks)

    def allocate(self, seq: SequenceLike, num_new_tokens: int) -> None:
        need = self._blocks_needed(seq, num_new_tokens)
        if need > len(self._free_blocks):
            raise AllocationError(
                f"seq {seq.seq_id} needs {need} blocks, {len(self._free_blocks)} free"
            )
        table = self._tables.setdefault(seq.seq_id, [])
        for _ in range(need):
            b = self._free_blocks.popleft()
            self._ref[b] = 1
            table.append(b)
        self._used[seq.seq_id] = self._used.get(seq.seq_id, 0) + num_new_tokens
        self._seqs[seq.seq_id] = seq

    def free(self, seq: SequenceLike) -> None:
        for b in self._tables.pop(seq.seq_id, ()):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free_blocks.append(b)
        self._used.pop(seq.seq_id, None)
        self._seqs.pop(seq.seq_id, None)

    def num_tokens(self, seq: SequenceLike) -> int:
        return self._used.get(seq.seq_id, 0)

    def seq_capacity(self, seq: SequenceLike) -> int:
        return len(self._tables.get(seq.seq_id, ())) * self._block_size

    def slot_mapping(self, seq: SequenceLike, start: int, end: int) -> list[int]:
        table, bs = self._tables[seq.seq_id], self._block_size
        return [table[t // bs] * bs + t % bs for t in range(start, end)]

    def block_ids(self, seq: SequenceLike) -> list[int]:
        return self._tables.get(seq.seq_id, [])

    def stats(self) -> MemoryStats:
        bpt = self.bytes_per_token
        live = [(s, self._used[i], self.seq_capacity(s)) for i, s in self._seqs.items()]
        token_states, reservation, internal = self.live_split(live)
        return MemoryStats(
            capacity=self.capacity_tokens * bpt,
            token_states=token_states,
            reservation=reservation,
            internal_frag=internal,
            external_frag=0,  # any free block serves any sequence
            free=len(self._free_blocks) * self._block_size * bpt,
        )
