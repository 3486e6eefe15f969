"""The engine core loop: an LLMEngine driven by commands, emitting compact per-step messages.

The same loop runs on a background thread (tests, embedding) or in a process of its own
(``kvlab serve``: the HTTP server's Python work then never competes with the engine for
the GIL, as in vLLM V1). Commands and messages are plain tuples, cheap to pickle:

  commands:  ("add", request_id, token_ids, params, arrival) | ("abort", request_id)
             | ("stop_sample", request_id, index, stop string, tokens kept) | ("stop",)
  messages:  ("ready", EngineInfo) | ("added", request_id, error or None)
             | ("outputs", [packed outputs], EngineStats or None[, fast columns]) | ("dead", message[, "setting" | "fault"])

Outputs are packed as tuples (``OutputProcessor(packed=True)``, read back by ``unpack_output``);
only a finished output carries its metrics.
The core emits token ids only: text and stop strings are the front end's (``frontend_output``),
so that decoding never lengthens a step.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from allocators.stats import MemoryStats
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.output_processor import OutputProcessor
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

log = logging.getLogger("kvlab.engine_core")

STATS_INTERVAL_S = 0.05  # stats snapshots while busy; always one when a request finishes or all is idle


@dataclass(frozen=True)
class EngineInfo:
    """What the front end needs to know of the engine it talks to."""

    model: str
    max_model_len: int
    kv_capacity_tokens: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    detokenize: bool = True


def engine_info(engine: LLMEngine) -> EngineInfo:
    mc = engine.model_config
    return EngineInfo(engine.config.model, engine.max_model_len, engine.kv_capacity_tokens, mc.vocab_size,
                      mc.bos_token_id, list(engine.eos_token_ids), engine.config.detokenize)


@dataclass(frozen=True)
class HostTierSnapshot:
    hits_total: int  # prompt tokens loaded from the host tier instead of recomputed
    stored_bytes_total: int
    loaded_bytes_total: int
    transfers_total: int
    exposed_seconds_total: float
    hidden_seconds_total: float
    used_blocks: int
    capacity_blocks: int

    @classmethod
    def of(cls, scheduler, tier) -> HostTierSnapshot | None:
        if tier is None:
            return None
        tier.poll()
        st = tier.stats
        return cls(scheduler.prefix_host_hits, st.stored_bytes, st.loaded_bytes, st.store_transfers + st.load_transfers,
                   st.exposed_s, st.hidden_s, tier.used_blocks, tier.num_blocks)


@dataclass(frozen=True)
class EngineStats:
    """What /metrics reports; published after every step, read from anywhere."""

    num_requests_running: int  # requests with a sample in the running batch (n=8 counts once)
    num_requests_waiting: int  # requests queued with no sample running (waiting or swapped)
    num_seqs_running: int  # samples (sequences) in the running batch
    num_seqs_waiting: int
    num_seqs_swapped: int
    memory: MemoryStats
    kv_capacity_tokens: int
    prefix_cache_queries_total: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int  # of those, found there
    prompt_tokens_total: int  # prompt tokens of accepted requests
    generation_tokens_total: int  # tokens sampled (all samples)
    num_preemptions_total: int
    finished_total: dict[str, int]  # requests ended, by the first sample's finish reason (stop, length, abort, error)
    steps_total: int
    # the host KV tier (None: off): prompt tokens loaded from it, its traffic and capacity
    host_tier: HostTierSnapshot | None = None
    recomputed_tokens_total: int = 0  # prompt tokens computed again because their cached KV was evicted

    @property
    def kv_usage(self) -> float:
        """Share of the KV pool held by live sequences (0 to 1). Free memory and pages kept idle
        for reuse (``idle_mapped``) do not count: an idle server reports 0."""
        m = self.memory
        if not m.capacity:
            return 0.0
        return 1.0 - (m.free + getattr(m, "idle_mapped", 0)) / m.capacity

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queries_total
        return self.prefix_cache_hits_total / q if q else 0.0


# -- packing -----------------------------------------------------------------------------------
def message_outputs(msg: tuple) -> list[tuple]:
    """Every packed output of an ("outputs", ...) message, its fast columns (one new token of a
    single-sample stream) expanded into the packed form."""
    packed = msg[1]
    fast = msg[3] if len(msg) > 3 else None
    if fast:
        packed = packed + [(rid, False, [(0, [tok], "", None, None, None, [t], None)], None, None, None, None)
                           for rid, tok, t in zip(*fast)]
    return packed


def unpack_output(t: tuple, prompt_token_ids: list[int], prompt: str | None) -> RequestOutput:
    """A RequestOutput from the core's packed form (``OutputProcessor(packed=True)``):
    (request_id, finished, [sample fields in CompletionOutput's order], metric fields in
    RequestMetrics' order or None until finished, prompt logprobs, prompt top logprobs, error)."""
    rid, finished, samples, metrics, plp, ptop, error = t
    m = RequestMetrics(*metrics) if metrics else RequestMetrics(0.0, None, None, None)
    outs = [CompletionOutput(*s) for s in samples]
    return RequestOutput(rid, prompt_token_ids, outs, finished, m, prompt, plp, ptop, error)


# -- the loop ----------------------------------------------------------------------------------
class EngineCore:
    def __init__(self, engine: LLMEngine, emit: Callable[[tuple], None], keep_history: bool = False):
        """``keep_history=False`` drops the engine's per-request and per-step records after each
        step, so that a long-running server does not grow without bound."""
        self.engine = engine
        # token ids only (the front end makes the text), packed for the pipe as they are made
        engine.output_processor = OutputProcessor(None, packed=True)
        self.emit = emit
        self.keep_history = keep_history
        self._finished: dict[str, int] = {}
        self._prompt_tokens = 0
        self._steps = 0
        self._last_stats = 0.0

    def run(self, get: Callable[[float | None], tuple | None]) -> None:
        """Serve commands until ("stop",). ``get(timeout)``: the next command, None if none came
        within ``timeout`` seconds (0: don't wait; None: wait for one)."""
        engine = self.engine
        stalled = False
        self.emit(("outputs", [], self.stats()))
        while True:
            commands = []
            if not engine.has_unfinished_requests():
                commands.append(get(None))  # idle: sleep until there is work
            elif stalled:  # requests wait for memory that nothing running will free: don't spin
                commands.append(get(0.05))
            while commands[-1:] != [("stop",)] and (c := get(0)) is not None:  # the front end gone: stop, always
                commands.append(c)
            for c in commands:
                if c is None:
                    continue
                if c[0] == "stop":  # unfinished requests are aborted: their memory is freed
                    for rid in list(engine.requests):
                        self._command(("abort", rid))
                    self.emit(("outputs", [], self.stats()))
                    return
                self._command(c)
            if engine.has_unfinished_requests():
                stalled = not self._step()
            else:
                self.emit(("outputs", [], self.stats()))

    def _command(self, c: tuple) -> None:
        if c[0] == "add":
            _, rid, ids, params, arrival = c
            try:
                self.engine.add_request(rid, ids, params, arrival_time=arrival)
            except ValueError as e:
                self.emit(("added", rid, str(e)))
                return
            self._prompt_tokens += len(ids)
            self.emit(("added", rid, None))
        elif c[0] == "abort":
            if c[1] in self.engine.requests:
                self.engine.abort_request(c[1])
                self._finished["abort"] = self._finished.get("abort", 0) + 1
        elif c[0] == "stop_sample":
            out = self.engine.stop_sample(*c[1:])
            if out is not None:  # that was its last sample
                self._count_finished([out])
                self.emit(("outputs", [out], self.stats()))
        else:
            raise ValueError(f"unknown engine command {c[0]!r}")

    def _step(self) -> bool:
        """One engine step; False if it scheduled nothing."""
        engine = self.engine
        outputs = engine.step()
        self._steps += 1
        scheduled = engine.step_records[-1].num_seqs > 0 if engine.step_records else True
        finished = self._count_finished(outputs)
        if not self.keep_history:
            engine.finished_requests.clear()
            engine.step_records.clear()
        now = time.monotonic()
        stats = None
        if finished or now - self._last_stats >= STATS_INTERVAL_S:
            stats = self.stats()
        self.emit(("outputs", outputs, stats, engine.output_processor.take_fast()))
        return scheduled

    def _count_finished(self, outputs: list[tuple]) -> bool:
        """Count finished requests by the first sample's reason; whether any finished."""
        finished = False
        for rid, done, samples, _, _, _, error in outputs:
            if done:
                finished = True
                reason = "error" if error or not samples else samples[0][3]
                self._finished[reason] = self._finished.get(reason, 0) + 1
        return finished

    def stats(self):
        self._last_stats = time.monotonic()
        e = self.engine
        sched = e.scheduler
        running = {s.request_id for s in sched.running}
        return EngineStats(
            num_requests_running=len(running),
            num_requests_waiting=len(e.requests) - len(running),
            num_seqs_running=len(sched.running),
            num_seqs_waiting=len(sched.waiting),
            num_seqs_swapped=len(sched.swapped),
            memory=e.allocator.stats(),
            kv_capacity_tokens=e.kv_capacity_tokens,
            prefix_cache_queries_total=sched.prefix_queries,
            prefix_cache_hits_total=sched.prefix_hits,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=e.num_generation_tokens,
            num_preemptions_total=sched.num_preemptions,
            finished_total=dict(self._finished),
            steps_total=self._steps,
            host_tier=HostTierSnapshot.of(sched, e.allocator.host_tier),
            recomputed_tokens_total=sched.recomputed_tokens,
        )


def run_process(config: EngineConfig, commands, messages) -> None:
    """Entry point of the engine process (``multiprocessing`` spawn): build the engine, say
    ready, serve; a fatal error is reported and ends the process non-zero."""
    logging.basicConfig(level=os.environ.get("KVLAB_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config)
    except Exception as e:
        # a ValueError is a setting the engine refused (the front end answers it as a user error)
        messages.send(("dead", f"the engine could not start: {e}", "setting" if isinstance(e, ValueError) else "fault"))
        sys.exit(1)

    def get(timeout: float | None):
        if timeout is None or commands.poll(timeout):
            try:
                return commands.recv()
            except EOFError:  # the front end is gone
                return ("stop",)
        return None

    # a sender thread writes the messages: a front end that falls behind never stalls a step; it
    # reads the backlog at once and hands each stream the merged deltas (fewer, larger events)
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def send_all() -> None:
        while (msg := outbox.get()) is not None:
            try:
                messages.send(msg)
            except OSError:  # the front end is gone; the command pipe's EOF stops the loop
                return

    sender = threading.Thread(target=send_all, name="kvlab-core-sender", daemon=True)
    sender.start()
    core = EngineCore(engine, outbox.put)
    outbox.put(("ready", engine_info(engine)))
    try:
        core.run(get)
    except BaseException as e:
        log.exception("engine core failed")
        outbox.put(("dead", f"the engine failed: {type(e).__name__}: {e}"))
        outbox.put(None)
        sender.join(10)
        os._exit(1)  # a supervisor restarts the server; no cleanup that could hang
    outbox.put(None)
    sender.join(30)
