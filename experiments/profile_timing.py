"""How ``kvlab profile`` times and reports: the progress lines on stderr (``say_progress``,
``Progress``, the tick helpers the table builders call), the profile's file name (``slug``) and
``Timer`` (seconds per call: in a CUDA graph on a GPU, wall time on a CPU)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

PROGRESS_EVERY_S = 10.0  # a progress line at least this often inside a part (a GPU profile's parts take minutes)


def say_progress(t0: float, text: str) -> None:
    """One progress line on stderr, timed from ``t0`` (``time.time()`` at the profile's start; the
    host-time subprocesses get it too): stdout keeps the result line."""
    print(f"[{time.time() - t0:6.1f} s] {text}", file=sys.stderr, flush=True)


def _no_tick() -> None:
    pass


def _ticked(items, tick: Callable[[], None]):
    """``items``, ``tick()`` after the loop's body is done with each (a ``continue`` included)."""
    for x in items:
        yield x
        tick()


class Progress:
    """The progress lines of a ``kvlab profile`` run: a part's start (which of the run's parts, how
    many figures it times, how to leave it out), a line every ``PROGRESS_EVERY_S`` inside it (done
    of total, elapsed, time left) and its end (elapsed, rows). ``enabled`` False (``--no-progress``):
    the end lines alone, as before there were others."""

    def __init__(self, t0: float, parts: int, enabled: bool = True):
        self.t0, self.parts, self.enabled = t0, parts, enabled
        self.index, self.label, self.unit, self.total, self.done = 0, "", "", 0, 0
        self.started = self.last = t0

    def line(self, text: str) -> None:
        if self.enabled:
            say_progress(self.t0, text)

    def start(self, part: str, label: str, total: int, unit: str = "measurements") -> None:
        self.index += 1
        self.label, self.unit, self.total, self.done = label, unit, total, 0
        self.started = self.last = time.time()
        self.line(f"{label} (part {self.index} of {self.parts}): {total} {unit} (--skip {part} leaves them out)")

    def tick(self, what: str = "", force: bool = False) -> None:
        """One measurement done; a line if ``PROGRESS_EVERY_S`` passed since the last (``force``: now)."""
        self.done += 1
        now = time.time()
        if force or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            took = now - self.started
            left = took / self.done * (self.total - self.done)
            eta = f", about {left:.0f} s left" if self.done < self.total else ""
            self.line(f"{self.label}: {self.done} of {self.total} in {took:.1f} s{eta}{what}")

    def end(self, rows: int, total_rows: int, partial: Path) -> None:
        """The part's end: always said (with --no-progress too: these lines predate the others)."""
        done = f"{self.done}" if self.done == self.total else f"{self.done} of {self.total}"
        say_progress(self.t0, f"{self.label}: done, {done} {self.unit} in {time.time() - self.started:.1f} s, "
                              f"{rows} rows ({total_rows} so far in {partial})")


def slug(device_name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in device_name.lower()).split())


class Timer:
    """Seconds per call: inside a CUDA graph on a GPU (device time only), wall time on a CPU."""

    def __init__(self, device, reps: int = 10):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.reps = reps

    def graph(self, fns: list) -> float:
        """Mean device time of one call of ``fns`` (called round-robin: operand copies)."""
        torch = self.torch
        if not self.cuda:
            for f in fns:
                f()
            t = time.perf_counter()
            for i in range(self.reps):
                fns[i % len(fns)]()
            return (time.perf_counter() - t) / self.reps
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside capture: Triton compiles, cuBLAS picks
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        return self.replay(g.replay, len(fns))

    def replay(self, run, calls_per_run: int = 1) -> float:
        torch = self.torch
        run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.reps):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / (self.reps * calls_per_run)

    def wall(self, fn) -> float:
        """Median wall time of ``fn`` from an idle device to its end (launch costs included)."""
        sync = self.torch.cuda.synchronize if self.cuda else (lambda: None)
        fn()
        sync()
        times = []
        for _ in range(max(3, self.reps // 2)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))
