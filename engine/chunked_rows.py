"""Rows of numbers appended one step at a time, kept as numpy chunks of ``CHUNK_ROWS`` rows; the
oldest full chunks beyond ``KEEP_CHUNKS`` are spilled to a temporary folder (removed at the latest
at exit), so a run of a million steps holds a few chunks in memory. The engine's step records
(``StepLog``) and memory rows (``MemoryAccountant``) live in them."""
from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CHUNK_ROWS = 16384  # steps per chunk
KEEP_CHUNKS = 4  # full chunks kept in memory before older ones go to disk


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
