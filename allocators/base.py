"""The one interface every KV memory strategy implements; the engine never branches on it.

An allocator tracks, per sequence, how many token slots it has made room for
(``num_tokens``) and how many it holds (``seq_capacity``), owns the per-layer cache
tensors the kernels read, and reports where every byte of its pool is (``stats``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence as Seq

import torch

from allocators.stats import MemoryStats
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
    name: ClassVar[str]
    mode: ClassVar[Addressing]

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
        """Make room for the next ``num_new_tokens`` tokens of ``seq``."""

    @abstractmethod
    def free(self, seq: SequenceLike) -> None:
        """Release everything ``seq`` holds (finished, aborted or preempted)."""

    @abstractmethod
    def num_tokens(self, seq: SequenceLike) -> int:
        """Tokens of ``seq`` that have room (0 for a sequence the allocator does not know)."""

    @abstractmethod
    def seq_capacity(self, seq: SequenceLike) -> int:
        """Token slots charged to ``seq`` (blocks, region or pages it holds)."""

    def max_fit_tokens(self) -> int:
        """Largest final length a single sequence could ever be given on an empty pool."""
        return self.capacity_tokens

    def fork(self, parent: SequenceLike, child: SequenceLike) -> None:
        raise NotImplementedError(f"allocator '{self.name}' does not support fork (n > 1)")

    def match_prefix(self, seq: SequenceLike) -> int:
        """Tokens of ``seq``'s prompt already cached (0 where prefix caching is unsupported)."""
        return 0

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
