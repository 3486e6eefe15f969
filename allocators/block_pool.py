"""A pool of fixed-size KV blocks: reference counts, fill levels and O(1) free lists.

Free blocks live in two places. Blocks with no cached content sit on a stack; blocks whose
content the prefix cache still indexes sit in an LRU queue and are only taken (evicted)
once the stack is empty, so a free cached block stays reusable as long as possible.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks  # holders (sequences) of each block
        self.fill = [0] * num_blocks  # token slots in use of each held block
        self._plain: list[int] = list(range(num_blocks - 1, -1, -1))  # stack; block 0 on top
        self._cached: OrderedDict[int, None] = OrderedDict()  # free with cached content, LRU first
        self.filled_total = 0  # sum of fill over held blocks: token states, shared ones once
        self.on_evict: Callable[[int], None] = lambda block: None  # the prefix cache forgets it

    # -- counts --------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take (cached free blocks included: they get evicted)."""
        return len(self._plain) + len(self._cached)

    @property
    def num_cached_free(self) -> int:
        return len(self._cached)

    # -- taking and giving back ------------------------------------------------------------
    def take(self) -> int:
        """A free block with ref 1 and fill 0 (raises IndexError when none is free)."""
        if self._plain:
            b = self._plain.pop()
        else:
            b, _ = self._cached.popitem(last=False)  # evict the least recently used
            self.on_evict(b)
        self.ref[b] = 1
        self.fill[b] = 0
        return b

    def share(self, b: int) -> None:
        """One more holder of ``b``; a free cached block comes back to life (prefix hit)."""
        if self.ref[b] == 0:
            del self._cached[b]
            self.filled_total += self.fill[b]
        self.ref[b] += 1

    def release(self, b: int, cached: bool) -> None:
        """One holder less; at zero the block is free (LRU-queued if its content is cached)."""
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.filled_total -= self.fill[b]
            if cached:
                self._cached[b] = None
            else:
                self._plain.append(b)

    def set_fill(self, b: int, fill: int) -> None:
        self.filled_total += fill - self.fill[b]
        self.fill[b] = fill

    def uncache(self, b: int) -> None:
        """A free block whose content is no longer indexed moves to the plain stack."""
        if b in self._cached:
            del self._cached[b]
            self._plain.append(b)

    def free_blocks(self) -> set[int]:
        return set(self._plain) | set(self._cached)
