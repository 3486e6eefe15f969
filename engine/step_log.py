"""What each engine step did (``StepRecord``), and ``StepLog``, the list-like log of them that
``LLMEngine.step_records`` is: float64 rows in :class:`ChunkedRows`, read back as records."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from engine.chunked_rows import ChunkedRows


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
