"""AsyncLLMEngine: the (not thread-safe) LLMEngine driven by one background thread for asyncio callers.

Every engine and tokenizer call happens on that thread, in order: callers hand it commands
through a queue and get outputs back on their own event loop. When the engine has no work
the thread blocks on the command queue (no polling); otherwise it runs ``step()`` back to
back, taking new commands between steps. After each step it publishes an immutable
``EngineStats`` snapshot, so ``/metrics`` never touches the engine.

``RequestOutput``s are cumulative (all tokens so far), so a slow consumer can skip to the
newest one: a stream yields the latest output available, never a stale backlog.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from allocators.stats import MemoryStats
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger("kvlab.async_engine")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or a step failed): no request can be served."""


class PromptTooLongError(ValueError):
    """The prompt leaves no room for an output token within max_model_len."""


@dataclass(frozen=True)
class ChatPrompt:
    """A chat conversation, turned into a prompt by the tokenizer's template on the engine thread."""

    messages: list[dict]


@dataclass(frozen=True)
class EngineStats:
    """What /metrics reports; published by the engine thread, read from anywhere."""

    num_running: int
    num_waiting: int
    memory: MemoryStats
    kv_capacity_tokens: int
    prefix_cache_hit_rate: float
    prompt_tokens_total: int
    generation_tokens_total: int
    finished_total: dict[str, int]  # finish reason of the request's first sample ("stop", "length", "abort")
    steps_total: int

    @property
    def kv_usage(self) -> float:
        """Share of the KV pool not free (0 when the pool is empty)."""
        return 1.0 - self.memory.free / self.memory.capacity if self.memory.capacity else 0.0


_STOP = object()  # command: leave the loop


class _Stream:
    """One request's outputs, delivered from the engine thread to the caller's event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.num_tokens: dict[int, int] = {}  # sample index -> output tokens seen (engine thread only)


class RequestStream:
    """Async iterator over the outputs of one request; ``abort()`` frees it early."""

    def __init__(self, engine: AsyncLLMEngine, stream: _Stream, num_prompt_tokens: int):
        self._engine = engine
        self._stream = stream
        self.request_id = stream.request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.finished = False
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        q = self._stream.queue
        item = await q.get()
        while not q.empty():  # outputs are cumulative: jump to the newest
            item = q.get_nowait()
        if item is None:  # aborted before it finished
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = self.finished = True
        return item

    def abort(self) -> None:
        """Stop the request and free its KV memory unless it has already finished."""
        if not self.finished:
            self._done = True
            self._engine.abort(self.request_id)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, keep_history: bool = False):
        """``keep_history=False`` drops the engine's per-request and per-step records after each
        step, so that a long-running server does not grow without bound."""
        self.engine = engine
        self.keep_history = keep_history
        self.max_model_len = engine.max_model_len
        self.model_name = engine.config.model
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._listeners: list[Callable[[RequestOutput], None]] = []
        self._token_texts: dict[int, str] = {}  # memo of single-token decodes (for logprobs)
        self._prompt_tokens = self._generation_tokens = self._steps = 0
        self._finished: dict[str, int] = {}
        self._error: BaseException | None = None
        self._dead = False  # set once by the engine thread on its way out, under _lock
        self._lock = threading.Lock()
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._loop, name="kvlab-engine", daemon=True)
        self._thread.start()

    # -- caller side (any thread / event loop) -----------------------------------------------
    @property
    def is_running(self) -> bool:
        return not self._dead

    def stats(self) -> EngineStats:
        return self._stats

    def add_finish_listener(self, fn: Callable[[RequestOutput], None]) -> None:
        """``fn(output)`` runs on the engine thread for each request that finishes (not aborts)."""
        self._listeners.append(fn)

    async def add_request(self, prompt: str | list[int] | ChatPrompt, params: SamplingParams,
                          request_id: str) -> RequestStream:
        """Queue a request; raises ValueError (PromptTooLongError, ...) if the engine rejects it."""
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop)
        arrival = self.engine.clock()  # the HTTP arrival, so TTFT includes the wait for the thread
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(lambda: self._add(stream, prompt, params, arrival, fut))
        try:
            num_prompt_tokens = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self.abort(request_id)  # the caller left while the request was being queued
            raise
        return RequestStream(self, stream, num_prompt_tokens)

    async def generate(self, prompt: str | list[int] | ChatPrompt, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs; leaving the loop early aborts the request."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        try:
            self._submit(lambda: self._abort(request_id))
        except EngineDeadError:  # every request was ended on the way out
            pass

    async def call(self, fn: Callable[[LLMEngine], object]) -> object:
        """Run ``fn(engine)`` on the engine thread (for tokenizer use, which is not thread-safe)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                self._check_alive()
                fut.set_result(fn(self.engine))
            except Exception as e:  # handed to the caller
                fut.set_exception(e)

        self._submit(run)
        return await asyncio.wrap_future(fut)

    def token_text(self, token_id: int) -> str:
        """Text of one token; filled on the engine thread for requests that asked for logprobs."""
        text = self._token_texts.get(token_id)
        return text if text is not None else f"<{token_id}>"

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop after the current step; unfinished requests are aborted."""
        try:
            self._submit(_STOP)
        except EngineDeadError:
            return
        self._thread.join(timeout)

    def _submit(self, command) -> None:
        with self._lock:
            self._check_alive()
            self._commands.put(command)

    def _check_alive(self) -> None:
        if self._dead:
            raise EngineDeadError(f"the engine is not running{f': {self._error}' if self._error else ''}")

    # -- engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as e:  # a bug in a step: fail every request rather than hang them
            log.exception("engine loop failed")
            self._error = e
        with self._lock:  # from here on no command gets in; run those already queued
            self._dead = True
        self._fail_all(EngineDeadError(f"the engine failed: {self._error!r}" if self._error
                                       else "the engine was shut down"))
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command is not _STOP:
                command()  # each answers EngineDeadError now that _dead is set
        try:
            self._stats = self._snapshot()
        except Exception:  # a broken engine keeps its last snapshot
            log.exception("final stats snapshot failed")

    def _serve(self) -> None:
        stalled = False
        while True:
            commands = []
            if not self.engine.has_unfinished_requests():
                commands.append(self._commands.get())  # idle: sleep until there is work
            elif stalled:  # requests wait for memory that nothing running will free: don't spin
                try:
                    commands.append(self._commands.get(timeout=0.05))
                except queue.Empty:
                    pass
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is _STOP:
                    return
                command()
            if self.engine.has_unfinished_requests():
                stalled = not self._step()
            else:
                self._stats = self._snapshot()

    def _add(self, stream: _Stream, prompt, params: SamplingParams, arrival: float,
             fut: concurrent.futures.Future) -> None:
        try:
            self._check_alive()
            if isinstance(prompt, ChatPrompt):
                prompt = self.engine.tokenizer.apply_chat_template(prompt.messages)
            _, ids = self.engine.encode(prompt)
            if len(ids) >= self.max_model_len:
                raise PromptTooLongError(
                    f"This model's maximum context length is {self.max_model_len} tokens, but the prompt "
                    f"has {len(ids)} tokens (at least one output token is needed): shorten the prompt")
            self.engine.add_request(stream.request_id, ids, params, arrival_time=arrival)
        except Exception as e:
            fut.set_exception(e)
            return
        self._streams[stream.request_id] = stream
        self._prompt_tokens += len(ids)
        fut.set_result(len(ids))

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:  # finished already, or never added
            return
        self.engine.abort_request(request_id)
        self._finished["abort"] = self._finished.get("abort", 0) + 1
        self._stats = self._snapshot()
        _deliver(stream.loop, [(stream, None)])

    def _step(self) -> bool:
        """One engine step; False if it scheduled nothing."""
        outputs = self.engine.step()
        scheduled = self.engine.step_records[-1].num_seqs > 0 if self.engine.step_records else True
        self._steps += 1
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            want_texts = out.outputs[0].logprobs is not None
            for c in out.outputs:
                seen = stream.num_tokens.get(c.index, 0)
                self._generation_tokens += len(c.token_ids) - seen
                if want_texts:
                    self._memo_token_texts(c.token_ids[seen:])
                stream.num_tokens[c.index] = len(c.token_ids)
            if out.finished:
                del self._streams[out.request_id]
                reason = out.outputs[0].finish_reason
                self._finished[reason] = self._finished.get(reason, 0) + 1
                for fn in self._listeners:
                    fn(out)
            by_loop.setdefault(stream.loop, []).append((stream, out))
        if not self.keep_history:
            self.engine.finished_requests.clear()
            self.engine.step_records.clear()
        # publish stats first: whoever sees a request finish also sees its memory freed
        self._stats = self._snapshot()
        for loop, items in by_loop.items():
            _deliver(loop, items)
        return scheduled

    def _memo_token_texts(self, token_ids: list[int]) -> None:
        for t in token_ids:
            if t not in self._token_texts:
                self._token_texts[t] = self.engine.tokenizer.decode([t])

    def _fail_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # the engine may be broken; the callers still need their answer
                log.exception("abort of %s failed", rid)
            _deliver(stream.loop, [(stream, error)])
        self._streams.clear()

    def _snapshot(self) -> EngineStats:
        e = self.engine
        hit = getattr(e.allocator, "prefix_cache_hit_rate", 0.0)
        return EngineStats(
            num_running=e.num_running,
            num_waiting=e.num_waiting,
            memory=e.allocator.stats(),
            kv_capacity_tokens=e.kv_capacity_tokens,
            prefix_cache_hit_rate=float(hit() if callable(hit) else hit),
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            finished_total=dict(self._finished),
            steps_total=self._steps,
        )


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, object]]) -> None:
    """Hand items to their streams on ``loop``: one wake-up per loop per step."""

    def put() -> None:
        for stream, item in items:
            stream.queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
