"""Exact memory accounting over engine steps (README, "Results").

At each step the allocator gives a provisional breakdown in which reservation and
internal fragmentation are split at each live sequence's ``max_len`` bound. When a
sequence finishes its final length is known; its internal fragmentation over every
interval of constant capacity is then corrected:
``exact - provisional = max(0, cap - final) - max(0, cap - max_len)``, moved from
reservation to internal_frag for the steps of that interval.

Per-step rows never pile up as Python objects: they are kept in :class:`ChunkedRows`
(numpy chunks, old ones spilled to disk), so a run of a million steps holds a few chunks.
A chunk is made exact (and may be spilled) once no sequence that still can be corrected has
an interval in it; corrections are kept as a difference array (``step -> delta``) until then.
"""
from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence

import numpy as np

from allocators.stats import STAT_FIELDS, MemoryStats
from engine.chunked_rows import CHUNK_ROWS, KEEP_CHUNKS, ChunkedRows
from engine.step_log import STEP_DEFAULTS, STEP_FIELDS, STEP_INT_FIELDS, StepLog, StepRecord

__all__ = ["CHUNK_ROWS", "KEEP_CHUNKS", "ChunkedRows", "MemoryAccountant", "STEP_DEFAULTS", "STEP_FIELDS",
           "STEP_INT_FIELDS", "StepLog", "StepRecord"]

_RES, _INT = STAT_FIELDS.index("reservation"), STAT_FIELDS.index("internal_frag")
_FREE, _IDLE = STAT_FIELDS.index("free"), STAT_FIELDS.index("idle_mapped")
_stat_row = operator.attrgetter(*STAT_FIELDS)


class MemoryAccountant:
    def __init__(self, bytes_per_token: int, chunk_rows: int | None = None, keep_chunks: int | None = None):
        self.bpt = bytes_per_token
        self.capacity = 0
        self._rows = ChunkedRows(len(STAT_FIELDS), np.int64, chunk_rows, keep_chunks)
        self._exact = 0  # full chunks already corrected (no correction can reach them any more)
        self._carry = 0  # sum of the correction events before chunk ``_exact``
        self._events: dict[int, int] = {}  # step -> change of the correction from that step on
        self._open: dict[int, list[int]] = {}  # seq_id -> [start step, capacity, max_len]
        self._ids: list[int] = []  # the live sequences of the last step recorded, and their capacities
        self._caps: list[int] = []
        self._closed: dict[int, list[tuple[int, int, int, int]]] = {}  # seq_id -> intervals, until it finishes

    @property
    def num_steps(self) -> int:
        return len(self._rows)

    @property
    def store(self) -> ChunkedRows:
        """The provisional rows (chunks before ``num_exact_chunks`` are corrected)."""
        return self._rows

    def record(self, stats: MemoryStats, live: Sequence[tuple[int, int, int]]) -> None:
        """One step: the allocator's stats and (seq_id, capacity_tokens, max_len) of live sequences."""
        step = self._begin(stats)
        self._relive(step, [x[0] for x in live], [x[1] for x in live], [x[2] for x in live])

    def record_seqs(self, stats: MemoryStats, seqs: Sequence, capacities: Sequence[int]) -> None:
        """``record`` for the engine: the live sequences themselves and their capacities (the
        allocator's ``seq_capacities``), no tuples."""
        self._live(self._begin(stats), seqs, capacities)

    def record_row(self, capacity: int, row: tuple, seqs: Sequence, capacities: Sequence[int]) -> None:
        """``record_seqs`` of stats given as their capacity and a row in STAT_FIELDS order."""
        step = len(self._rows)
        self.capacity = capacity
        if self._rows.append(row):
            self._settle()
        self._live(step, seqs, capacities)

    def _live(self, step: int, seqs: Sequence, capacities: Sequence[int]) -> None:
        ids = [s.seq_id for s in seqs]
        if ids == self._ids:
            # the live sequences of the step before (most steps): only a capacity that changed
            # ends an interval, and whole lists compare at C speed
            if capacities != self._caps:
                for s, cap, before in zip(seqs, capacities, self._caps):
                    if cap != before:
                        self._reopen(step, s.seq_id, cap, s.max_len)
                self._caps = list(capacities)
            return
        n = len(ids)
        if n < len(self._ids) and ids == self._ids[:n]:
            # the last ones left (preempted from the back): only their intervals end
            opened = self._open
            for seq_id in self._ids[n:]:
                if seq_id in opened:
                    self._close(seq_id, step)
            for s, cap, before in zip(seqs, capacities, self._caps):
                if cap != before:
                    self._reopen(step, s.seq_id, cap, s.max_len)
            self._ids, self._caps = ids, list(capacities)
            return
        # _relive, without a list of max_lens (most sequences keep their interval)
        opened = self._open
        for seq_id in opened.keys() - set(ids):
            self._close(seq_id, step)
        for seq_id, cap, s in zip(ids, capacities, seqs):
            cur = opened.get(seq_id)
            if cur is None or cur[1] != cap:
                self._reopen(step, seq_id, cap, s.max_len)
        self._ids, self._caps = ids, list(capacities)

    def record_run(self, rows: Sequence[tuple], seqs: Sequence,
                   changes: Sequence[Sequence[tuple[int, int]]]) -> None:
        """Steps that follow a ``record_seqs`` of the same live ``seqs`` (simulate's runs of
        decode steps): ``rows[i]`` is a step's stats (STAT_FIELDS order, the same capacity),
        ``changes[i]`` the (index in ``seqs``, capacity) of each capacity that changed at that
        step. The same as ``record_seqs`` step by step."""
        caps = list(self._caps)
        store, opened, closed = self._rows, self._open, self._closed
        for row, changed in zip(rows, changes):
            step = len(store)
            if store.append(row):
                self._settle()
            for j, cap in changed:  # _reopen, inlined (a block's worth of steps per sequence)
                s = seqs[j]
                seq_id = s.seq_id
                cur = opened.pop(seq_id, None)
                if cur is not None and step > cur[0]:
                    closed.setdefault(seq_id, []).append((cur[0], step, cur[1], cur[2]))
                if cap > 0:
                    opened[seq_id] = [step, cap, s.max_len]
                caps[j] = cap
        self._caps = caps

    def _begin(self, stats: MemoryStats) -> int:
        step = len(self._rows)
        self.capacity = stats.capacity
        if self._rows.append(_stat_row(stats)):
            self._settle()
        return step

    def _relive(self, step: int, ids: list[int], caps: Sequence[int], max_lens: Sequence[int]) -> None:
        """The sequences live at ``step``: intervals of the others end, changed capacities start new ones."""
        live = set(ids)
        for seq_id in [s for s in self._open if s not in live]:
            self._close(seq_id, step)
        opened = self._open
        for seq_id, cap, max_len in zip(ids, caps, max_lens):
            cur = opened.get(seq_id)
            if cur is None or cur[1] != cap:
                self._reopen(step, seq_id, cap, max_len)
        self._ids, self._caps = ids, list(caps)

    def _reopen(self, step: int, seq_id: int, cap: int, max_len: int) -> None:
        """``seq_id`` holds ``cap`` tokens from ``step`` on: an interval of another capacity ends."""
        if seq_id in self._open:
            self._close(seq_id, step)
        if cap > 0:
            self._open[seq_id] = [step, cap, max_len]

    def _close(self, seq_id: int, end: int) -> None:
        start, cap, max_len = self._open.pop(seq_id)
        if end > start:
            self._closed.setdefault(seq_id, []).append((start, end, cap, max_len))

    def finish(self, seq_id: int, final_len: int) -> None:
        """The sequence is done with ``final_len`` tokens: make its intervals exact."""
        if seq_id in self._open:
            self._close(seq_id, len(self._rows))
        events = self._events
        for start, end, cap, max_len in self._closed.pop(seq_id, ()):
            if max_len == final_len:
                continue  # it ended at its max_len bound: the provisional split was exact
            delta = (max(0, cap - final_len) - max(0, cap - max_len)) * self.bpt
            if delta:
                events[start] = events.get(start, 0) + delta
                events[end] = events.get(end, 0) - delta

    # -- chunks made exact -----------------------------------------------------------------
    def _pinned(self) -> int:
        """The first step a correction may still reach: the earliest interval of a sequence
        that has not finished (every later interval starts later)."""
        first = len(self._rows)
        for v in self._open.values():
            first = min(first, v[0])
        for intervals in self._closed.values():
            first = min(first, intervals[0][0])
        return first

    def _settle(self) -> None:
        """Correct the full chunks no correction can reach any more; spill old ones."""
        rows, c = self._rows, self._rows.chunk_rows
        pinned = self._pinned()
        while self._exact < len(rows.chunks) and (self._exact + 1) * c <= pinned:
            k0 = self._exact * c
            arr = rows.chunks[self._exact]
            self._carry = _apply(arr, k0, self._carry, self._events, pop=True)
            self._exact += 1
        rows.spill_before(self._exact)

    @property
    def num_exact_chunks(self) -> int:
        return self._exact

    def iter_table(self) -> Iterator[np.ndarray]:
        """The exact table chunk by chunk (``[rows, len(STAT_FIELDS)]`` bytes, STAT_FIELDS order):
        corrections known so far applied; nothing is kept."""
        rows, c = self._rows, self._rows.chunk_rows
        for i in range(self._exact):
            yield rows.chunk(i)
        carry = self._carry
        for i in range(self._exact, len(rows.chunks)):
            arr = rows.chunk(i).copy()
            carry = _apply(arr, i * c, carry, self._events)
            yield arr
        if rows.rows:
            arr = rows._array(rows.rows)
            _apply(arr, len(rows.chunks) * c, carry, self._events)
            yield arr

    def table(self) -> np.ndarray:
        """``[steps, len(STAT_FIELDS)]`` bytes per field (STAT_FIELDS order), corrected where final
        lengths are known."""
        parts = list(self.iter_table())
        if not parts:
            return np.zeros((0, len(STAT_FIELDS)), dtype=np.int64)
        return np.concatenate(parts)

    def summary(self) -> dict[str, float]:
        """Mean fraction of capacity per field over steps, and the fractions at peak use.

        Peak use is the step with the least memory free or idle: ``idle_mapped`` is kept for
        reuse, not used, so it never makes a step the peak. One pass over the chunks; means
        from exact integer sums."""
        n = 0
        totals = [0] * len(STAT_FIELDS)
        peak_row, peak_used = None, None
        for arr in self.iter_table():
            if not len(arr):
                continue
            n += len(arr)
            for j, s in enumerate(arr.sum(axis=0).tolist()):
                totals[j] += s
            used = self.capacity - arr[:, _FREE] - arr[:, _IDLE]
            i = int(np.argmax(used))
            if peak_used is None or used[i] > peak_used:  # the first step of the largest use
                peak_used, peak_row = int(used[i]), arr[i].tolist()
        if not n or not self.capacity:
            return {f: float("nan") for f in STAT_FIELDS} | {f"{f}_peak": float("nan") for f in STAT_FIELDS}
        out: dict[str, float] = {}
        for j, f in enumerate(STAT_FIELDS):
            out[f] = totals[j] / (n * self.capacity)
            out[f"{f}_peak"] = peak_row[j] / self.capacity
        return out

    def close(self) -> None:
        """Remove spilled chunks (the store is unusable afterwards)."""
        self._rows.close()


def _apply(arr: np.ndarray, k0: int, carry: int, events: dict[int, int], pop: bool = False) -> int:
    """Move the correction of steps ``k0 ..`` (``carry`` + events from ``k0`` on) from
    reservation to internal_frag in ``arr`` in place; returns the carry after it."""
    k1 = k0 + len(arr)
    inside = [(s, d) for s, d in events.items() if k0 <= s < k1] if events else []
    if not carry and not inside:
        return carry
    diff = np.zeros(len(arr), dtype=np.int64)
    diff[0] = carry
    for s, d in inside:
        diff[s - k0] += d
        if pop:
            del events[s]
    corr = np.cumsum(diff)
    arr[:, _RES] -= corr
    arr[:, _INT] += corr
    return int(corr[-1])
