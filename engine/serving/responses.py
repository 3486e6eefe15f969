"""Engine outputs to OpenAI responses: whole bodies, or server-sent events chunk by chunk.

A request with several prompts (completions) runs as one engine request per prompt; choice
``i * n + j`` is sample ``j`` of prompt ``i``. Text is streamed as deltas of the cumulative
text, holding back what may still change: a trailing incomplete UTF-8 character, and the
last characters that could be the start of a stop string (the engine cuts those off when
the stop string completes).
"""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from engine.async_engine import AsyncLLMEngine, ChatPrompt, EngineDeadError, PromptTooLongError, RequestStream
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.serving.errors import APIError
from engine.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)

DONE = "data: [DONE]\n\n"


async def start_requests(engine: AsyncLLMEngine, prompts: list[str | list[int] | ChatPrompt],
                         params: SamplingParams, base_id: str, prompt_param: str) -> list[RequestStream]:
    """Queue one engine request per prompt; all or none (a rejected prompt aborts the others)."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            streams.append(await engine.add_request(prompt, params, f"{base_id}-{i}"))
    except BaseException as e:
        for s in streams:
            s.abort()
        if isinstance(e, PromptTooLongError):
            raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from e
        if isinstance(e, EngineDeadError):
            raise APIError(503, str(e)) from e
        if isinstance(e, ValueError):
            raise APIError(400, str(e), param=prompt_param) from e
        raise
    return streams


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                q.put_nowait((i, out))
        except Exception as e:
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    last: list[RequestOutput | None] = [None] * len(streams)
    try:
        async with aclosing(merge(streams)) as outputs:
            async for i, out in outputs:
                last[i] = out
    except EngineDeadError as e:
        raise APIError(503, str(e)) from e
    if any(o is None or not o.finished for o in last):
        raise APIError(503, "the request was aborted before it finished")
    return last  # type: ignore[return-value]


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# -- logprobs -------------------------------------------------------------------------------
def completion_logprobs(engine: AsyncLLMEngine, token_ids: list[int], logprobs: list[float],
                        offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for t, lp in zip(token_ids, logprobs):
        text = engine.token_text(t)
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        out.top_logprobs.append({text: lp})  # the engine reports the sampled token's logprob only
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(engine: AsyncLLMEngine, token_ids: list[int], logprobs: list[float],
                  top: int) -> ChatLogprobs:
    content = []
    for t, lp in zip(token_ids, logprobs):
        text = engine.token_text(t)
        b = list(text.encode("utf-8"))
        tops = [TopLogprob(token=text, logprob=lp, bytes=b)] if top > 0 else []
        content.append(TokenLogprob(token=text, logprob=lp, bytes=b, top_logprobs=tops))
    return ChatLogprobs(content=content)


# -- whole responses ------------------------------------------------------------------------
def completion_response(engine: AsyncLLMEngine, request_id: str, model: str, outputs: list[RequestOutput],
                        n: int, want_logprobs: bool) -> CompletionResponse:
    choices = []
    for i, out in enumerate(outputs):
        for c in out.outputs:
            lp = completion_logprobs(engine, c.token_ids, c.logprobs or [], 0) if want_logprobs else None
            choices.append(CompletionChoice(index=i * n + c.index, text=c.text, logprobs=lp,
                                            finish_reason=c.finish_reason))
    return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of(outputs))


def chat_response(engine: AsyncLLMEngine, request_id: str, model: str, output: RequestOutput,
                  top_logprobs: int | None) -> ChatCompletionResponse:
    choices = []
    for c in output.outputs:
        lp = None if top_logprobs is None else chat_logprobs(engine, c.token_ids, c.logprobs or [], top_logprobs)
        choices.append(ChatChoice(index=c.index, message=AssistantMessage(content=c.text), logprobs=lp,
                                  finish_reason=c.finish_reason))
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of([output]))


# -- streams --------------------------------------------------------------------------------
@dataclass
class _Choice:
    sent_chars: int = 0
    sent_tokens: int = 0
    done: bool = False


def _text_delta(state: _Choice, c: CompletionOutput, holdback: int) -> str:
    """New text of one sample since the last chunk (all of it once the sample is finished)."""
    text = c.text
    if c.finish_reason is None:
        text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its other bytes
        text = text[: max(0, len(text) - holdback)]
    delta = text[state.sent_chars:]
    state.sent_chars = max(state.sent_chars, len(text))
    state.done = c.finish_reason is not None
    return delta


def _new_tokens(state: _Choice, c: CompletionOutput) -> tuple[list[int], list[float]]:
    """Token ids and logprobs of one sample not yet sent."""
    tokens, logprobs = c.token_ids[state.sent_tokens:], (c.logprobs or [])[state.sent_tokens:]
    state.sent_tokens = len(c.token_ids)
    return tokens, logprobs


def _holdback(params: SamplingParams) -> int:
    return max((len(s) for s in params.stop), default=1) - 1


def _sse(chunk, include_usage: bool) -> str:
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


def _sse_error(err: BaseException) -> str:
    if not isinstance(err, APIError):
        err = APIError(503 if isinstance(err, EngineDeadError) else 500, str(err))
    return f"data: {ErrorResponse(error=err.detail).model_dump_json()}\n\n"


class CompletionChunker:
    """Chunks of a streamed text completion: text deltas, the finish reason on the last one."""

    object_type = CompletionChunk

    def __init__(self, engine: AsyncLLMEngine, request_id: str, model: str, params: SamplingParams,
                 num_prompts: int, include_usage: bool):
        self.engine, self.id, self.model, self.params = engine, request_id, model, params
        self.include_usage = include_usage
        self.created = int(time.time())
        self.holdback = _holdback(params)
        self.states = [[_Choice() for _ in range(params.n)] for _ in range(num_prompts)]
        self.offsets = [[0] * params.n for _ in range(num_prompts)]

    def start(self) -> list[str]:
        return []

    def on_output(self, i: int, out: RequestOutput) -> list[str]:
        events = []
        for c in out.outputs:
            st = self.states[i][c.index]
            if st.done:
                continue
            delta = _text_delta(st, c, self.holdback)
            if not delta and not st.done:
                continue
            tokens, lps = _new_tokens(st, c)
            lp = None
            if self.params.logprobs is not None:
                lp = completion_logprobs(self.engine, tokens, lps, self.offsets[i][c.index])
                self.offsets[i][c.index] += sum(len(t) for t in lp.tokens)
            choice = CompletionChoice(index=i * self.params.n + c.index, text=delta, logprobs=lp,
                                      finish_reason=c.finish_reason)
            events.append(self.event([choice]))
        return events

    def event(self, choices: list, usage: UsageInfo | None = None) -> str:
        chunk = self.object_type(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return _sse(chunk, self.include_usage)


class ChatChunker(CompletionChunker):
    """Chunks of a streamed chat completion: the role first, content deltas, then an empty delta
    with the finish reason, as OpenAI sends them."""

    object_type = ChatCompletionChunk

    def __init__(self, engine: AsyncLLMEngine, request_id: str, model: str, params: SamplingParams,
                 top_logprobs: int | None, include_usage: bool):
        super().__init__(engine, request_id, model, params, 1, include_usage)
        self.top_logprobs = top_logprobs

    def start(self) -> list[str]:  # before any token, so that clients see the stream open
        return [self._chunk(j, DeltaMessage(role="assistant", content="")) for j in range(self.params.n)]

    def on_output(self, i: int, out: RequestOutput) -> list[str]:
        events = []
        for c in out.outputs:
            st = self.states[0][c.index]
            if st.done:
                continue
            delta = _text_delta(st, c, self.holdback)
            unsent = st.sent_tokens < len(c.token_ids)
            if delta or (st.done and self.top_logprobs is not None and unsent):
                tokens, lps = _new_tokens(st, c)
                lp = None if self.top_logprobs is None else chat_logprobs(self.engine, tokens, lps,
                                                                          self.top_logprobs)
                events.append(self._chunk(c.index, DeltaMessage(content=delta), lp))
            if st.done:
                events.append(self._chunk(c.index, DeltaMessage(), finish_reason=c.finish_reason))
        return events

    def _chunk(self, index: int, delta: DeltaMessage, logprobs=None, finish_reason=None) -> str:
        return self.event([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                            finish_reason=finish_reason)])


async def sse_events(streams: list[RequestStream], chunker: CompletionChunker) -> AsyncIterator[str]:
    """The SSE body of a streamed response, ending with [DONE]; aborts what is still running when
    it ends early (client gone, error)."""
    last: list[RequestOutput | None] = [None] * len(streams)
    try:
        try:
            for event in chunker.start():
                yield event
            async with aclosing(merge(streams)) as outputs:
                async for i, out in outputs:
                    last[i] = out
                    for event in chunker.on_output(i, out):
                        yield event
            if chunker.include_usage:
                yield chunker.event([], usage_of([o for o in last if o is not None]))
        except Exception as e:  # the status line is gone: report in the stream, as OpenAI does
            yield _sse_error(e)
        yield DONE
    finally:
        for s in streams:
            s.abort()
