"""MemoryStats: where every byte of the KV pool is, summing to its capacity (README, "Results").

``idle_mapped`` is memory held by no live sequence but kept for reuse (the mapped pages of
idle virtual slots, deferred reclamation). It is neither usage nor fragmentation: it turns
into waste only when a request waits for memory, so it is reported on its own.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

STAT_FIELDS = ("token_states", "reservation", "internal_frag", "external_frag", "idle_mapped", "free")


@dataclass
class MemoryStats:
    capacity: int  # bytes of KV pool
    token_states: int = 0  # KV of tokens already in live sequences (shared counted once)
    reservation: int = 0  # held by live sequences for tokens they will still produce
    internal_frag: int = 0  # held by live sequences beyond their final length
    external_frag: int = 0  # free but unusable for the next admission, or held by no one and not reusable
    free: int = 0
    idle_mapped: int = 0  # held by no live sequence, kept for reuse (idle virtual slots' pages)

    def total(self) -> int:
        return sum(getattr(self, f) for f in STAT_FIELDS)

    def check(self) -> None:
        negative = [f for f in STAT_FIELDS if getattr(self, f) < 0]
        if negative or self.total() != self.capacity:
            raise AssertionError(f"MemoryStats do not add up to capacity: {self}")

    def fractions(self) -> dict[str, float]:
        cap = max(self.capacity, 1)
        return {f: getattr(self, f) / cap for f in STAT_FIELDS}

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
