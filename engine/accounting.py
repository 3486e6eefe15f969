"""Exact memory accounting over engine steps (DESIGN.md, "Metric definitions").

At each step the allocator gives a provisional breakdown in which reservation and
internal fragmentation are split at each live sequence's ``max_len`` bound. When a
sequence finishes its final length is known; its internal fragmentation over every
interval of constant capacity is then corrected:
``exact - provisional = max(0, cap - final) - max(0, cap - max_len)``, moved from
reservation to internal_frag for the steps of that interval.
"""
from __future__ import annotations

import numpy as np

from allocators.stats import STAT_FIELDS, MemoryStats


class MemoryAccountant:
    def __init__(self, bytes_per_token: int):
        self.bpt = bytes_per_token
        self.capacity = 0
        self._rows: list[tuple[int, ...]] = []  # per step: the MemoryStats fields
        self._open: dict[int, tuple[int, int, int]] = {}  # seq_id -> (start step, capacity, max_len)
        self._closed: dict[int, list[tuple[int, int, int, int]]] = {}  # seq_id -> intervals
        self._delta: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        return len(self._rows)

    def record(self, stats: MemoryStats, live: list[tuple[int, int, int]]) -> None:
        """One step: the allocator's stats and (seq_id, capacity_tokens, max_len) of live sequences."""
        step = len(self._rows)
        self.capacity = stats.capacity
        self._rows.append(tuple(getattr(stats, f) for f in STAT_FIELDS))
        seen = set()
        for seq_id, cap, max_len in live:
            seen.add(seq_id)
            cur = self._open.get(seq_id)
            if cur is not None and cur[1] == cap:
                continue
            if cur is not None:
                self._close(seq_id, step)
            if cap > 0:
                self._open[seq_id] = (step, cap, max_len)
        for seq_id in [s for s in self._open if s not in seen]:
            self._close(seq_id, step)

    def _close(self, seq_id: int, end: int) -> None:
        start, cap, max_len = self._open.pop(seq_id)
        if end > start:
            self._closed.setdefault(seq_id, []).append((start, end, cap, max_len))

    def finish(self, seq_id: int, final_len: int) -> None:
        """The sequence is done with ``final_len`` tokens: make its intervals exact."""
        if seq_id in self._open:
            self._close(seq_id, len(self._rows))
        for start, end, cap, max_len in self._closed.pop(seq_id, ()):
            delta = (max(0, cap - final_len) - max(0, cap - max_len)) * self.bpt
            if delta:
                if self._delta is None or len(self._delta) < end:
                    grown = np.zeros(max(end, 2 * len(self._rows)), dtype=np.int64)
                    if self._delta is not None:
                        grown[: len(self._delta)] = self._delta
                    self._delta = grown
                self._delta[start:end] += delta

    def table(self) -> np.ndarray:
        """``[steps, len(STAT_FIELDS)]`` bytes per field (STAT_FIELDS order), corrected where final
        lengths are known."""
        rows = np.array(self._rows, dtype=np.int64).reshape(-1, len(STAT_FIELDS))
        if self._delta is not None and len(rows):
            d = self._delta[: len(rows)]
            rows[:, STAT_FIELDS.index("reservation")] -= d
            rows[:, STAT_FIELDS.index("internal_frag")] += d
        return rows

    def summary(self) -> dict[str, float]:
        """Mean fraction of capacity per field over steps, and the fractions at peak use.

        Peak use is the step with the least memory free or idle: ``idle_mapped`` is kept for
        reuse, not used, so it never makes a step the peak."""
        rows = self.table()
        out: dict[str, float] = {}
        if not len(rows) or not self.capacity:
            return {f: float("nan") for f in STAT_FIELDS} | {f"{f}_peak": float("nan") for f in STAT_FIELDS}
        frac = rows / self.capacity
        used = self.capacity - rows[:, STAT_FIELDS.index("free")] - rows[:, STAT_FIELDS.index("idle_mapped")]
        peak = int(np.argmax(used))
        for j, f in enumerate(STAT_FIELDS):
            out[f] = float(frac[:, j].mean())
            out[f"{f}_peak"] = float(frac[peak, j])
        return out
