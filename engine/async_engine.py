"""AsyncLLMEngine: the front end asyncio callers use, over an engine core on a thread or in a process.

The core (``engine.engine_core``) owns the LLMEngine and runs its step loop; this front end
tokenizes prompts (on a worker thread, with its own tokenizer, so a huge prompt never stalls
the event loop or the engine), checks lengths against the context, hands requests over as
commands and turns the core's per-step messages into per-request streams on the callers'
event loops. ``AsyncLLMEngine(engine)`` runs the core on a background thread;
``AsyncLLMEngine.start_process(config)`` runs it in a process of its own (what ``kvlab
serve`` uses: HTTP work and engine steps then never wait on one GIL).

A slow consumer never works through a backlog: delta outputs (only what is new) that piled up
are merged into one, and of whole outputs only the newest is handed out.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing as mp
import queue
import threading
import time
from typing import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.engine_core import (EngineCore, EngineInfo, EngineStats, engine_info, message_outputs, run_process,
                                unpack_output)
from engine.frontend_output import FrontendOutput, core_params
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.request_stream import (ChatPrompt, ContextLengthError, EngineDeadError,  # noqa: F401  (re-exported)
                                   PromptTooLongError, RequestStream, _Stream)
from engine.tokenizer import Tokenizer, decode_text, load_tokenizer

log = logging.getLogger("kvlab.async_engine")


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | None = None, keep_history: bool = False, *,
                 _process: tuple | None = None):
        """Run ``engine``'s core on a background thread. (``start_process`` runs it in a process.)"""
        self._streams: dict[str, _Stream] = {}  # guarded by _lock
        self._listeners: list[Callable[[RequestOutput], None]] = []
        self._dead_listeners: list[Callable[[str], None]] = []
        self._token_texts: dict[tuple[int, bool], str] = {}
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._stats: EngineStats | None = None
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvlab-tokenize")
        if _process is not None:
            self._proc, self._commands, messages, info, self._stats = _process
            # a writer thread feeds the pipe: a full pipe (the core busy stepping) must block
            # neither the event loop nor anyone holding the lock the reader thread needs
            self._outbox: queue.SimpleQueue = queue.SimpleQueue()
            self._send = self._outbox.put
            threading.Thread(target=self._write_process, name="kvlab-engine-writer", daemon=True).start()
            self._reader = threading.Thread(target=self._read_process, args=(messages,), name="kvlab-engine-reader",
                                            daemon=True)
        else:
            assert engine is not None
            self._proc = None
            info = engine_info(engine)
            self._queue: queue.SimpleQueue = queue.SimpleQueue()
            self._send = self._queue.put
            core = EngineCore(engine, self._on_message, keep_history)
            self._stats = core.stats()
            self._reader = threading.Thread(target=self._run_thread, args=(core,), name="kvlab-engine", daemon=True)
            self.engine = engine
        self.info: EngineInfo = info
        self.max_model_len = info.max_model_len
        self.model_name = info.model
        # the front end's own tokenizers: one decodes (reader thread, event loop), one encodes (the
        # tokenize worker), as a HF fast tokenizer may refuse a decode while an encode holds it
        self.tokenizer: Tokenizer = load_tokenizer(info.model, info.vocab_size, info.bos_token_id,
                                                   info.eos_token_ids)
        self._encoder: Tokenizer = load_tokenizer(info.model, info.vocab_size, info.bos_token_id,
                                                  info.eos_token_ids)
        self._reader.start()

    @classmethod
    def start_process(cls, config: EngineConfig, timeout: float = 3600.0) -> AsyncLLMEngine:
        """Start the engine in a process of its own and wait until it is ready (weights loaded,
        KV pool sized); raises the engine's reason if it cannot start: ValueError for a setting it
        refused, else RuntimeError."""
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA state
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)
        msg_recv, msg_send = ctx.Pipe(duplex=False)
        # a daemonic process may not start processes: with tensor parallelism it starts a worker per
        # GPU, so it is not daemonic (shutdown() stops it; it exits when its command pipe closes)
        proc = ctx.Process(target=run_process, args=(config, cmd_recv, msg_send), name="kvlab-engine-core",
                           daemon=config.tensor_parallel_size == 1)
        proc.start()
        cmd_recv.close()
        msg_send.close()
        if not msg_recv.poll(timeout):
            proc.kill()
            raise RuntimeError(f"the engine process did not start within {timeout:.0f} s")
        try:
            first = msg_recv.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"the engine process exited with code {proc.exitcode} before it was ready") from None
        if first[0] != "ready":
            proc.join(5)
            raise (ValueError if first[2:3] == ("setting",) else RuntimeError)(first[1])
        _, _, stats = msg_recv.recv()  # the core's first snapshot, sent before it serves
        return cls(_process=(proc, cmd_send, msg_recv, first[1], stats))

    # -- caller side ----------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._dead is None

    def stats(self) -> EngineStats:
        return self._stats

    def add_finish_listener(self, fn: Callable[[RequestOutput], None]) -> None:
        """``fn(output)`` runs (on a background thread) for each request that finishes, not aborts."""
        self._listeners.append(fn)

    def add_dead_listener(self, fn: Callable[[str], None]) -> None:
        """``fn(reason)`` runs once if the engine dies (not on shutdown)."""
        self._dead_listeners.append(fn)

    async def tokenize(self, prompt: str | list[int] | ChatPrompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids), computed off the event loop."""
        if isinstance(prompt, list):
            return None, prompt
        loop = asyncio.get_running_loop()

        def work() -> tuple[str, list[int]]:
            if isinstance(prompt, ChatPrompt):  # the template's special tokens are not added twice
                return self._encoder.encode_chat(prompt.messages)
            return prompt, self._encoder.encode(prompt)

        return await loop.run_in_executor(self._tokenize_pool, work)

    def check_lengths(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens, but the prompt has {num_prompt_tokens} "
                "tokens (at least one output token is needed): shorten the prompt")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} in the "
                f"completion): lower max_tokens to at most {limit - num_prompt_tokens}, or shorten the prompt")

    async def add_request(self, prompt: str | list[int] | ChatPrompt, params: SamplingParams,
                          request_id: str) -> RequestStream:
        """Queue a request; raises ValueError (PromptTooLongError, ContextLengthError, ...) if it
        cannot run, EngineDeadError if the engine is not running."""
        self._check_alive()
        text, ids = await self.tokenize(prompt)
        self.check_lengths(len(ids), params.max_tokens)
        arrival = time.perf_counter()  # TTFT counts from here: it includes the wait for the core
        output = FrontendOutput(self.tokenizer if self.info.detokenize else None, ids, params)
        stream = _Stream(request_id, asyncio.get_running_loop(), ids, text, output)
        with self._lock:
            self._check_alive()
            self._streams[request_id] = stream
            self._send(("add", request_id, ids, core_params(params), arrival))
        try:
            await stream.added
        except asyncio.CancelledError:
            self.abort(request_id)  # the caller left while the request was being queued
            raise
        return RequestStream(self, stream)

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
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is None or self._dead is not None:
                return
            self._send(("abort", request_id))
        _deliver(stream.loop, [(stream, None)])

    def token_text(self, token_id: int, skip_special_tokens: bool = True) -> str:
        """Text of one token (for logprobs): a special token's is empty unless not ``skip_special_tokens``,
        as in the request's text."""
        key = (token_id, skip_special_tokens)
        text = self._token_texts.get(key)
        if text is None:
            text = self._token_texts[key] = decode_text(self.tokenizer, [token_id], skip_special_tokens)
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (a token may hold part of a UTF-8 character)."""
        fn = getattr(self.tokenizer, "token_bytes", None)
        return list(fn(token_id)) if fn is not None else list(self.token_text(token_id).encode("utf-8"))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the core after the current step; unfinished requests are aborted."""
        with self._lock:
            if self._dead is None:
                try:
                    self._send(("stop",))
                except (OSError, ValueError):
                    pass
        self._reader.join(timeout)
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
        self._tokenize_pool.shutdown(wait=False)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")

    # -- core side ------------------------------------------------------------------------------
    def _run_thread(self, core: EngineCore) -> None:
        def get(timeout: float | None):
            try:
                return self._queue.get(timeout=timeout) if timeout != 0 else self._queue.get_nowait()
            except queue.Empty:
                return None

        try:
            core.run(get)
        except BaseException as e:  # a fatal engine error: every request fails, /health says so
            log.exception("engine loop failed")
            self._die(f"the engine failed: {type(e).__name__}: {e}")
            return
        self._die("the engine was shut down", shutdown=True)

    def _write_process(self) -> None:
        while True:
            command = self._outbox.get()
            try:
                self._commands.send(command)
            except (OSError, ValueError):  # the engine process is gone; the reader reports it
                return
            if command[0] == "stop":
                return

    def _read_process(self, messages) -> None:
        reason, shutdown, told = "the engine process exited", False, False
        while True:
            try:
                msg = messages.recv()
            except (EOFError, OSError):
                self._proc.join(10)
                code = self._proc.exitcode
                shutdown = code == 0
                if not shutdown and not told:
                    reason = f"the engine process exited with code {code}"
                break
            batch = [msg]
            while messages.poll(0):  # a backlog: take it whole, so each stream gets one merged delta
                try:
                    batch.append(messages.recv())
                except (EOFError, OSError):
                    break
            outputs, stats = [], None
            for msg in batch:
                if msg[0] == "dead":
                    reason, told = msg[1], True
                elif msg[0] == "outputs":
                    outputs += message_outputs(msg)
                    stats = msg[2] if msg[2] is not None else stats
                else:
                    if outputs or stats is not None:  # keep the order: outputs before an answer
                        self._on_message(("outputs", outputs, stats))
                        outputs, stats = [], None
                    self._on_message(msg)
            if outputs or stats is not None:
                self._on_message(("outputs", outputs, stats))
        self._die(reason if not shutdown else "the engine was shut down", shutdown=shutdown)

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "outputs":
            packed, stats = message_outputs(msg), msg[2]
            if stats is not None:
                self._stats = stats  # first: whoever sees a request finish also sees its memory freed
            if packed:
                self._dispatch(packed)
        elif kind == "added":
            _, rid, error = msg
            with self._lock:
                stream = self._streams.get(rid)
                if error is not None:
                    self._streams.pop(rid, None)
            if stream is not None:
                result = ValueError(error) if error is not None else True
                stream.loop.call_soon_threadsafe(_resolve_future, stream.added, result)

    def _dispatch(self, packed: list[tuple]) -> None:
        with self._lock:
            streams = [(self._streams.get(t[0]), t) for t in packed]
            for stream, t in streams:
                if stream is not None and t[1]:  # finished
                    del self._streams[t[0]]
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        finished = []
        for stream, t in streams:
            if stream is None:  # aborted meanwhile
                continue
            out = stream.output.process(unpack_output(t, stream.prompt_ids, stream.prompt))
            for index, stop, num_tokens in stream.output.stop_commands:  # the core ends the sample there
                self._send(("stop_sample", stream.request_id, index, stop, num_tokens))
            stream.output.stop_commands.clear()
            if out is None:
                continue
            if out.finished:
                finished.append(out)
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for out in finished:
            if out.error is None and not any(c.finish_reason == "abort" for c in out.outputs):
                for fn in self._listeners:
                    try:
                        fn(out)
                    except Exception:
                        log.exception("finish listener failed")
        for loop, items in by_loop.items():
            _deliver(loop, items)

    def _die(self, reason: str, shutdown: bool = False) -> None:
        with self._lock:
            if self._dead is not None:
                return
            self._dead = reason
            streams, self._streams = list(self._streams.values()), {}
        if not shutdown:  # first: whoever sees a request fail knows the server was told
            for fn in self._dead_listeners:
                try:
                    fn(reason)
                except Exception:
                    log.exception("dead listener failed")
        err = EngineDeadError(reason)
        for s in streams:
            if not s.added.done():
                s.loop.call_soon_threadsafe(_resolve_future, s.added, err)
            _deliver(s.loop, [(s, err)])


def _resolve_future(fut: asyncio.Future, result) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, object]]) -> None:
    """Hand items to their streams on ``loop``: one wake-up per loop per step."""

    def put() -> None:
        for stream, item in items:
            stream.queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
