"""The records of a simulate-mode bulk run (``experiments.sim_fastpath``): the steps as
``DecodeFastForward`` plans them (``_Steps``), the waiting queue as they change it (``_Queue``),
and the clock after each step (``_clock``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.sequence import Sequence


@dataclass
class _Steps:
    """The steps of a run, as planned. ``members``: the running sequences, then those admitted,
    in the order they joined (one preempted and admitted again joins twice); ``computed``: the
    tokens each holds after step i is ``computed[j] + i`` (at the steps it computes in: one
    admitted at step a with n tokens has n - a)."""
    members: list
    computed: list[int]
    left: list[int]  # the step at which each samples its last token
    times: list[float]  # the clock at each step's start, and after the last
    first: list[int] = field(default_factory=list)  # the first step each computes in
    count: list[int] = field(default_factory=list)  # steps each computed in, once it left (-1: live at the end)
    base: list[tuple[int, int]] = field(default_factory=list)  # its (tokens, output tokens) when it joined
    nums: list[int] = field(default_factory=list)  # sequences each step computes
    decoding: list[int] = field(default_factory=list)  # ... of them decoding (the others are admitted)
    preempted: list[int] = field(default_factory=list)
    contexts: list[int] = field(default_factory=list)  # tokens the batch's sequences hold after the step
    held: list[int] = field(default_factory=list)  # ... the live sequences hold (skipped ones too)
    running: list[int] = field(default_factory=list)  # sequences running after each step
    waiting: list[int] = field(default_factory=list)  # ... waiting after it
    admitted: dict[int, list[tuple]] = field(default_factory=dict)  # step -> (seq, tokens) it admits
    finished: dict[int, list[int]] = field(default_factory=dict)  # step -> members that finish in it
    lives: dict[int, list[int]] = field(default_factory=dict)  # step -> the live members, where they changed
    modelled: set[int] = field(default_factory=set)  # steps whose finishes the plan made (``DecodeRun.finish``)
    busy: list[float] = field(default_factory=list)  # what each step adds to the runner's busy time
    # asynchronous steps: the device's end of the last step launched, the ready time of the step
    # the next one reads back, and the wait for it, as the engine's last read-back measured it
    device_free: float = 0.0
    ready: float = 0.0
    last_wait: float = 0.0

    def join(self, seq: Sequence, computed: int, left: int, first: int, tokens: int, out: int) -> int:
        self.members.append(seq)
        self.computed.append(computed)
        self.left.append(left)
        self.first.append(first)
        self.count.append(-1)
        self.base.append((tokens, out))
        return len(self.members) - 1


class _Queue:
    """The waiting queue as a run's steps change it: victims put back at its head, the admitted
    taken from it. An entry: (seq, tokens, computed tokens, output tokens)."""

    def __init__(self, waiting):
        self.waiting, self.taken, self.front = waiting, 0, []  # front: victims, the head last

    def entries(self):
        yield from reversed(self.front)
        waiting = self.waiting
        for i in range(self.taken, len(waiting)):
            seq = waiting[i]
            yield seq, len(seq.token_ids), seq.num_computed_tokens, len(seq.output_token_ids)

    def head(self) -> tuple:
        return next(self.entries(), (None, 0, 0, 0))

    def take(self, n: int) -> None:
        front = min(n, len(self.front))
        del self.front[len(self.front) - front:]
        self.taken += n - front


def _clock(steps: _Steps, host: float, device: float, overlap: bool) -> None:
    """The clock after a step of ``host`` and ``device`` seconds: synchronous, the runner's
    ``execute`` (the cost model's step time); asynchronous, ``AsyncSimRunner.launch`` (the host's
    part moves the clock, the device's starts when the device is free), then the read-back of the
    step before (``SimStepHandle.wait``: the clock waits for its device end)."""
    t = steps.times[-1]
    if overlap:
        if host > 0:  # VirtualClock.advance
            t += host
        launched = t
        free = steps.device_free = max(t, steps.device_free) + device
        wait = steps.ready - t
        if wait > 0:  # t + wait, as VirtualClock.advance adds it (not always steps.ready)
            t += wait
        steps.last_wait = t - launched
        steps.ready = free
        steps.busy.append(host + device)
    else:
        dt = device + host
        if dt > 0:
            t += dt
        steps.busy.append(dt)
    steps.times.append(t)
