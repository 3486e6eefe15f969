"""Prefix cache: full blocks indexed by a chained hash of every token up to their end.

The key of block i is ``(h[i-1], tokens of block i)`` and ``h[i] = hash(key)``, so a block
is found only where the whole prefix before it matches too. Keys keep the block's tokens,
so a lookup compares them exactly; only the 64-bit parent hash could collide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ROOT_HASH = 0x6B766C6162  # parent "hash" of the first block


@dataclass(frozen=True)
class PrefixMatch:
    """Where the prefix ``match_prefix`` found came from, in tokens: the device cache, the host
    tier; and ``ideal``: the prefix an unbounded cache would have held (every block ever indexed),
    so ``ideal - device - host`` tokens are recomputed only because they were evicted."""

    device: int = 0
    host: int = 0
    ideal: int = 0

    @property
    def recomputed(self) -> int:
        return max(0, self.ideal - self.device - self.host)


def block_keys(token_ids: Sequence[int], block_size: int, num_blocks: int,
               parent: int = ROOT_HASH) -> tuple[list[tuple[int, tuple[int, ...]]], list[int]]:
    """Keys and chained hashes of the first ``num_blocks`` full blocks of ``token_ids``."""
    keys, hashes = [], []
    for i in range(num_blocks):
        key = (parent, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        parent = hash(key)
        keys.append(key)
        hashes.append(parent)
    return keys, hashes


class PrefixCache:
    def __init__(self) -> None:
        self._block_of: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.query_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._block_of)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def lookup(self, key: tuple[int, tuple[int, ...]]) -> int | None:
        return self._block_of.get(key)

    def insert(self, key: tuple[int, tuple[int, ...]], block: int) -> bool:
        """Index ``block`` under ``key``; False where another block already holds that content."""
        if key in self._block_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def key_of(self, block: int) -> tuple[int, tuple[int, ...]] | None:
        return self._key_of.get(block)

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def evict(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]

    def record(self, queried: int, hit: int) -> None:
        self.query_tokens += queried
        self.hit_tokens += hit
