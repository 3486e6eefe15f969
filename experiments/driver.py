"""Feeds a workload to an engine: all at once (offline) or at their arrival times (online)."""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from experiments.workloads import RequestSpec


def sampling_params(spec: RequestSpec, seed: int) -> SamplingParams:
    # workloads fix output lengths: ignore_eos makes them exact for every strategy
    # beam search (spec.beam_width > 1) returns the best beam
    return SamplingParams(n=spec.n, max_tokens=spec.output_len, ignore_eos=True, temperature=0.0, seed=seed,
                          output_kind="final_only", beam_width=spec.beam_width)


@contextmanager
def cyclic_gc_paused(pause: bool = True) -> Iterator[None]:
    """The cyclic garbage collector rests inside (where it runs and ``pause``). A simulation
    makes millions of long-lived objects (queued and retired requests, their token lists) and
    no reference cycles: the collector's full passes would rescan them all and find nothing (a
    tenth of a 100k-request run). Reference counting frees everything as always;
    tests/test_sim_fastpath.py checks that a simulated run leaves no cycles behind."""
    pause = pause and gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if pause:
            gc.enable()


def _params_key(spec: RequestSpec) -> tuple:
    """What ``sampling_params`` reads of a spec: requests alike share one SamplingParams (the
    engine never changes one; building each checks every field, 100k times in a large run)."""
    return spec.n, spec.output_len, spec.beam_width


def drive(
    engine: LLMEngine,
    specs: list[RequestSpec],
    seed: int = 0,
    advance_idle: Callable[[float], None] | None = None,
    on_finish: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """Run every request to completion; return (t0, t_end) on the engine's clock.

    Requests are added once the clock passes their arrival; with nothing to do the driver
    waits for the next arrival (sleeps on a wall clock, ``advance_idle`` on a virtual one).
    A simulated engine's ``decode_fast_forward`` may advance several steps at once, up to the
    next arrival (experiments/sim_fastpath.py); only finished requests are counted.
    """
    clock = engine.clock
    fast = getattr(engine, "decode_fast_forward", None)
    pending = sorted(specs, key=lambda s: s.arrival_s)
    params: dict[tuple, SamplingParams] = {}  # by _params_key
    t0 = clock()
    i = 0
    done = 0
    with cyclic_gc_paused(fast is not None):
        while i < len(pending) or engine.has_unfinished_requests():
            now = clock() - t0
            while i < len(pending) and pending[i].arrival_s <= now:
                s = pending[i]
                key = _params_key(s)
                p = params.get(key)
                if p is None:
                    p = params[key] = sampling_params(s, seed)
                engine.add_request(s.request_id, s.prompt_token_ids, p,
                                   arrival_time=t0 + s.arrival_s, oracle_len=s.prompt_len + s.output_len)
                i += 1
            if not engine.has_unfinished_requests():
                wait = pending[i].arrival_s - (clock() - t0)
                if advance_idle is not None:
                    advance_idle(wait)
                elif wait > 0:
                    time.sleep(wait)
                continue
            # the bulk path returns how many requests finished (it builds no outputs)
            finished = fast(t0, pending[i].arrival_s if i < len(pending) else math.inf) if fast is not None else None
            if finished is None:
                finished = sum(1 for out in engine.step() if out.finished)
            if finished and on_finish is not None:
                done += finished
                on_finish(finished)
    return t0, clock()
