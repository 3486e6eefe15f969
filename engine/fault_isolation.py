"""Fault isolation: a step that raises fails only the request(s) that make it fail.

The failed step is undone (every running sequence goes back to the queue with its KV
dropped, as a recompute preemption; tokens sampled but not read are forgotten), then the
step's requests are retried in groups, halving a group each time it fails again (adaptive
group testing: a single bad request among 256 is found in about 16 small steps). A group
passes once each of its sequences has sampled a new token; a group of one that fails is
that request's fault: it ends with finish reason "error" and the engine goes on. A failure
no group reproduces is counted; three in a row with no good step between is taken as the
engine's own fault (``FatalEngineError``), as is any error that leaves the device unusable.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine.outputs import RequestOutput
from engine.sequence import SeqStatus

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

log = logging.getLogger("kvlab.engine")

MAX_UNATTRIBUTED = 3


class FatalEngineError(RuntimeError):
    """The engine cannot go on (device error, or failures no request explains)."""


class FaultIsolator:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.groups: list[list[str]] = []  # request-id groups still to test, next first
        self.testing: list[str] | None = None
        self._progress: dict[int, int] = {}  # seq_id -> tokens resolved when the group test began
        self._found = False  # a culprit was found in the current round
        self._unattributed = 0

    @staticmethod
    def is_fatal(err: BaseException) -> bool:
        text = str(err)
        return (isinstance(err, (MemoryError, SystemError)) or type(err).__name__ == "AcceleratorError"
                or "CUDA error" in text or "device-side assert" in text or "illegal memory access" in text)

    @property
    def active(self) -> bool:
        return self.testing is not None or bool(self.groups)

    def begin_step(self) -> set[str] | None:
        """The requests the next step may schedule (None: all)."""
        while self.testing is None and self.groups:
            self._start(self.groups.pop(0))
        return set(self.testing) if self.testing is not None else None

    def _start(self, group: list[str]) -> None:
        e = self.engine
        group = [r for r in group if r in e.requests]  # some finished or were aborted meanwhile
        if not group:
            self._maybe_end_round()
            return
        self.testing = group
        members = set(group)
        # room for the group whatever it needs: everything else running goes back to the queue
        e.undo([s for s in e.scheduler.running if s.request_id not in members])
        self._progress = {s.seq_id: s.num_resolved for r in group for s in e.requests[r].seqs}

    def step_failed(self, err: Exception) -> list[RequestOutput]:
        e = self.engine
        log.warning("engine step failed (%s: %s); isolating the request that causes it", type(err).__name__, err,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        if self.testing is not None:
            suspects = self.testing
        else:
            self._found = False  # a new round
            batch = getattr(e, "_batch", None)
            seqs = list(batch.seqs) if batch is not None else []
            if e._inflight is not None:
                seqs += e._inflight.seqs
            suspects = list(dict.fromkeys(s.request_id for s in seqs if s.request_id in e.requests))
        e.undo(list(e.scheduler.running))
        self.testing = None
        outputs: list[RequestOutput] = []
        if len(suspects) == 1:
            self._found = True
            out = e.fail_request(suspects[0], f"the engine failed while running this request ({type(err).__name__})")
            if out is not None:
                outputs.append(out)
        elif suspects:
            half = len(suspects) // 2
            self.groups[:0] = [suspects[:half], suspects[half:]]
        self._maybe_end_round()
        return outputs

    def step_succeeded(self) -> None:
        if self.testing is None:
            if not self.groups:
                self._unattributed = 0  # a normal step went through
            return
        e = self.engine
        batch = getattr(e, "_batch", None)
        done = True
        for rid in self.testing:
            req = e.requests.get(rid)
            if req is None:
                continue
            for s in req.seqs:
                if s.status in (SeqStatus.RUNNING, SeqStatus.WAITING) and s.num_resolved <= self._progress.get(s.seq_id, 0):
                    done = False
        if done or batch is None or not batch.seqs:  # passed (or cannot run now: do not wait on it)
            self.testing = None
            self._maybe_end_round()

    def _maybe_end_round(self) -> None:
        if self.testing is not None or self.groups:
            return
        if self._found:
            self._found = False
            return
        self._unattributed += 1
        log.warning("a failed step was not reproduced by any of its requests (%d in a row)", self._unattributed)
        if self._unattributed >= MAX_UNATTRIBUTED:
            raise FatalEngineError(f"{MAX_UNATTRIBUTED} engine steps failed without any request to blame")
