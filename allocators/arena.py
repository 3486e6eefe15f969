"""First-fit arena over token slots ``[0, size)``: holes are real, so fragmentation is too."""
from __future__ import annotations

import bisect


class FirstFitArena:
    def __init__(self, size: int):
        self.size = size
        self._holes: list[tuple[int, int]] = [(0, size)]  # (start, length), sorted, coalesced

    def alloc(self, length: int) -> int | None:
        for i, (start, hole) in enumerate(self._holes):
            if hole >= length:
                if hole == length:
                    del self._holes[i]
                else:
                    self._holes[i] = (start + length, hole - length)
                return start
        return None

    def release(self, start: int, length: int) -> None:
        i = bisect.bisect_left(self._holes, (start, 0))
        self._holes.insert(i, (start, length))
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
        return sum(h for _, h in self._holes)

    def holes(self) -> list[tuple[int, int]]:
        return list(self._holes)
