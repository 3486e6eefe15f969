"""Arenas over token slots ``[0, size)`` for contiguous regions: holes are real, so is fragmentation.

Both keep at most one hole per live region (plus one), so linear scans stay short.
"""
from __future__ import annotations

import bisect


class FirstFitArena:
    """Lowest-address hole that fits; freed regions coalesce with their neighbours."""

    def __init__(self, size: int):
        self.size = size
        self._holes: list[tuple[int, int]] = [(0, size)]  # (start, length), sorted, coalesced
        self._free = size

    def size_for(self, length: int) -> int:
        """Slots granted for a request of ``length`` (first fit grants exactly)."""
        return length

    def alloc(self, length: int) -> int | None:
        for i, (start, hole) in enumerate(self._holes):
            if hole >= length:
                if hole == length:
                    del self._holes[i]
                else:
                    self._holes[i] = (start + length, hole - length)
                self._free -= length
                return start
        return None

    def release(self, start: int, length: int) -> None:
        i = bisect.bisect_left(self._holes, (start, 0))
        self._holes.insert(i, (start, length))
        self._free += length
        # coalesce with the next hole, then the previous one
        if i + 1 < len(self._holes) and start + length == self._holes[i + 1][0]:
            self._holes[i] = (start, length + self._holes[i + 1][1])
            del self._holes[i + 1]
        if i > 0 and self._holes[i - 1][0] + self._holes[i - 1][1] == start:
            self._holes[i - 1] = (self._holes[i - 1][0], self._holes[i - 1][1] + self._holes[i][1])
            del self._holes[i]

    def largest_hole(self) -> int:
        return max((h for _, h in self._holes), default=0)

    def free_total(self) -> int:
        return self._free

    def holes(self) -> list[tuple[int, int]]:
        return list(self._holes)

    def max_region(self) -> int:
        """Largest region the empty arena could grant."""
        return self.size


def _ceil_log2(n: int) -> int:
    return max(0, n - 1).bit_length()


class BuddyArena:
    """Binary buddy allocator: regions are powers of two, split on demand and merged on release.

    A size that is not a power of two is covered by the powers of two of its binary
    expansion, largest first, so each top block is aligned to its own size and buddies never
    cross top blocks. Rounding requests up to a power of two is this arena's internal waste:
    ``size_for`` tells the caller, who charges the whole block to the region.
    """

    def __init__(self, size: int):
        self.size = size
        self._free: dict[int, set[int]] = {}  # order -> starts of free blocks of 2**order slots
        self._top_starts: list[int] = []
        self._top_orders: list[int] = []
        start = 0
        for order in range(size.bit_length() - 1, -1, -1):
            if size >> order & 1:
                self._top_starts.append(start)
                self._top_orders.append(order)
                self._free.setdefault(order, set()).add(start)
                start += 1 << order
        self._free_total = size

    def size_for(self, length: int) -> int:
        return 1 << _ceil_log2(length)

    def alloc(self, length: int) -> int | None:
        want = _ceil_log2(length)
        order = next((o for o in sorted(self._free) if o >= want and self._free[o]), None)
        if order is None:
            return None
        start = min(self._free[order])  # lowest address: deterministic layouts
        self._free[order].discard(start)
        while order > want:  # split, keeping the lower half
            order -= 1
            self._free.setdefault(order, set()).add(start + (1 << order))
        self._free_total -= 1 << want
        return start

    def _top_order(self, start: int) -> int:
        return self._top_orders[bisect.bisect_right(self._top_starts, start) - 1]

    def release(self, start: int, length: int) -> None:
        order = _ceil_log2(length)
        self._free_total += 1 << order
        top = self._top_order(start)
        while order < top:
            buddy = start ^ (1 << order)
            peers = self._free.get(order)
            if not peers or buddy not in peers:
                break
            peers.discard(buddy)
            start = min(start, buddy)
            order += 1
        self._free.setdefault(order, set()).add(start)

    def largest_hole(self) -> int:
        return max((1 << o for o, s in self._free.items() if s), default=0)

    def free_total(self) -> int:
        return self._free_total

    def holes(self) -> list[tuple[int, int]]:
        return sorted((s, 1 << o) for o, starts in self._free.items() for s in starts)

    def max_region(self) -> int:
        return 1 << self._top_orders[0] if self._top_orders else 0


ARENAS = {"first_fit": FirstFitArena, "buddy": BuddyArena}


def check_arena(kind: str) -> None:
    if kind not in ARENAS:
        raise ValueError(f"unknown arena '{kind}': choose one of {sorted(ARENAS)} (allocator_args.arena)")


def make_arena(kind: str, size: int) -> FirstFitArena | BuddyArena:
    check_arena(kind)
    return ARENAS[kind](size)
