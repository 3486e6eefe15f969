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

import dataclasses
import operator
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from allocators.stats import STAT_FIELDS, MemoryStats

CHUNK_ROWS = 16384  # steps per chunk
KEEP_CHUNKS = 4  # full chunks kept in memory before older ones go to disk

_RES, _INT = STAT_FIELDS.index("reservation"), STAT_FIELDS.index("internal_frag")
_FREE, _IDLE = STAT_FIELDS.index("free"), STAT_FIELDS.index("idle_mapped")
_stat_row = operator.attrgetter(*STAT_FIELDS)


class ChunkedRows:
    """Numeric rows of a fixed width, appended one at a time.

    The open chunk is a list of tuples (a cheap append); a full chunk becomes one
    ``[chunk_rows, width]`` array; ``spill_before`` moves old full chunks to ``.npy`` files in
    a temporary folder (removed with the store) once more than ``keep_chunks`` are in memory.
    """

    def __init__(self, width: int, dtype=np.int64, chunk_rows: int | None = None, keep_chunks: int | None = None):
        chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows  # read at call time: tests shrink them
        keep_chunks = KEEP_CHUNKS if keep_chunks is None else keep_chunks
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.width, self.dtype = width, np.dtype(dtype)
        self.chunk_rows, self.keep_chunks = chunk_rows, keep_chunks
        self.rows: list[tuple] = []  # the open chunk
        self.chunks: list[np.ndarray | Path] = []  # full chunks, oldest first (Path: spilled)
        self._first_in_memory = 0  # chunks before it are on disk
        self._dir: str | None = None
        self._cleanup: weakref.finalize | None = None  # removes the folder, at the latest at exit

    def __len__(self) -> int:
        return len(self.chunks) * self.chunk_rows + len(self.rows)

    def append(self, row: tuple) -> bool:
        """Add one row; True when it filled the open chunk (now a full chunk)."""
        rows = self.rows
        rows.append(row)
        if len(rows) < self.chunk_rows:
            return False
        self.chunks.append(self._array(rows))
        self.rows = []
        return True

    def extend(self, rows: list[tuple]) -> int:
        """``append`` each of ``rows`` in order; returns how many chunks they filled."""
        filled, i = 0, 0
        while i < len(rows):
            open_rows = self.rows
            take = min(self.chunk_rows - len(open_rows), len(rows) - i)
            open_rows += rows[i:i + take]
            i += take
            if len(open_rows) == self.chunk_rows:
                self.chunks.append(self._array(open_rows))
                self.rows = []
                filled += 1
        return filled

    def _array(self, rows: list[tuple]) -> np.ndarray:
        return np.array(rows, dtype=self.dtype).reshape(len(rows), self.width)

    @property
    def in_memory_rows(self) -> int:
        return (len(self.chunks) - self._first_in_memory) * self.chunk_rows + len(self.rows)

    @property
    def num_spilled(self) -> int:
        return self._first_in_memory

    def spill_before(self, k: int) -> None:
        """Write full chunks older than chunk ``k`` to disk while more than ``keep_chunks`` are in memory."""
        while self._first_in_memory < k and len(self.chunks) - self._first_in_memory > self.keep_chunks:
            i = self._first_in_memory
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="kvlab_steps_")
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
            path = Path(self._dir) / f"{i:06d}.npy"
            np.save(path, self.chunks[i])
            self.chunks[i] = path
            self._first_in_memory += 1

    def chunk(self, i: int) -> np.ndarray:
        """Full chunk ``i`` (read back from disk if spilled; the caller may not keep it writable)."""
        c = self.chunks[i]
        return np.load(c) if isinstance(c, Path) else c

    def iter_chunks(self) -> Iterator[np.ndarray]:
        """Every row, one array per chunk, oldest first (the open chunk last, if not empty)."""
        for i in range(len(self.chunks)):
            yield self.chunk(i)
        if self.rows:
            yield self._array(self.rows)

    def row(self, i: int) -> tuple:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of {n}")
        k, j = divmod(i, self.chunk_rows)
        if k == len(self.chunks):
            return self.rows[j]
        return tuple(self.chunk(k)[j].tolist())

    def clear(self) -> None:
        self.rows = []
        self.chunks = []
        self._first_in_memory = 0
        self.close()

    def close(self) -> None:
        """Remove the spilled chunks' folder (spilled chunks are gone with it)."""
        if self._cleanup is not None:
            self._cleanup()
            self._dir = self._cleanup = None


@dataclasses.dataclass
class StepRecord:
    time: float
    duration: float
    running: int
    waiting: int
    num_seqs: int
    prefill_tokens: int
    decode_tokens: int
    preempted: int
    host_s: float = 0.0  # scheduler, allocator, accounting, input preparation, output handling
    context_tokens: int = 0  # tokens of KV the step's attention reads (sum of context lengths)
    tier_loaded_blocks: int = 0  # host KV tier: blocks loaded back to the device for this step
    tier_stored_blocks: int = 0  # ... blocks copied to host memory (evicted from the device)
    tier_transfers: int = 0  # ... host<->device memcpys
    tier_exposed_s: float = 0.0  # ... copy time compute waited for (see LLMEngine._tier_exposed)
    # CPU seconds of the step's launch call beyond its input preparation (graph replay or kernel
    # launches, copies, sampling's launches; on a CPU device the forward itself); 0 in simulate
    launch_s: float = 0.0


STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepRecord))
STEP_INT_FIELDS = tuple(f.name for f in dataclasses.fields(StepRecord) if f.type in ("int", int))
# the defaults of the trailing fields, for rows written by callers that predate them
STEP_DEFAULTS = tuple(f.default for f in dataclasses.fields(StepRecord))


class StepLog:
    """``LLMEngine.step_records``: what each step did, as float64 rows in :class:`ChunkedRows`
    (a tuple appended per step; old chunks spill to disk). Reads like the list of
    :class:`StepRecord` it replaces: ``len``, ``[i]``, ``[-1]``, slices, iteration, ``clear()``."""

    def __init__(self, chunk_rows: int | None = None, keep_chunks: int | None = None):
        self.rows = ChunkedRows(len(STEP_FIELDS), np.float64, chunk_rows, keep_chunks)
        self._int = [f in STEP_INT_FIELDS for f in STEP_FIELDS]

    def append(self, row: tuple | StepRecord) -> None:
        """One step, as a tuple in STEP_FIELDS order (or a StepRecord)."""
        if isinstance(row, StepRecord):
            row = dataclasses.astuple(row)
        elif len(row) < len(STEP_DEFAULTS):
            row = (*row, *STEP_DEFAULTS[len(row):])
        if self.rows.append(row):
            self.rows.spill_before(len(self.rows.chunks))

    def extend(self, rows: list[tuple]) -> None:
        """Steps in order, each a whole row in STEP_FIELDS order."""
        if self.rows.extend(rows):
            self.rows.spill_before(len(self.rows.chunks))

    def _record(self, row) -> StepRecord:
        return StepRecord(*(int(v) if is_int else float(v) for v, is_int in zip(row, self._int)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._record(self.rows.row(j)) for j in range(*i.indices(len(self)))]
        return self._record(self.rows.row(i))

    def __iter__(self) -> Iterator[StepRecord]:
        for arr in self.rows.iter_chunks():
            for row in arr.tolist():
                yield self._record(row)

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, StepLog)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def iter_columns(self) -> Iterator[dict[str, np.ndarray]]:
        """Chunk by chunk: one array per field (int64 for counts, float64 for times)."""
        for arr in self.rows.iter_chunks():
            yield {f: (arr[:, j].astype(np.int64) if is_int else arr[:, j].copy())
                   for j, (f, is_int) in enumerate(zip(STEP_FIELDS, self._int))}

    def clear(self) -> None:
        self.rows.clear()


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
