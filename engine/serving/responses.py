"""Engine outputs to OpenAI responses: whole bodies, or server-sent events chunk by chunk.

A request with several prompts (completions) runs as one engine request per prompt; choice
``i * n + j`` is sample ``j`` of prompt ``i``. Streams carry the engine's delta outputs, whose
text is already final (the engine holds back incomplete characters and possible starts of a
stop string), so each chunk costs work for its new tokens only.
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from typing import AsyncIterator

from engine.async_engine import (AsyncLLMEngine, ChatPrompt, ContextLengthError, EngineDeadError, PromptTooLongError,
                                 RequestStream)
from engine.outputs import RequestOutput, TopLogprobs
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
from engine.tokenizer import decode_text

DONE = "data: [DONE]\n\n"
ENGINE_FAILED = "The server had an error while processing your request (the engine failed on it); retry it."


def _param_of(message: str, prompt_param: str) -> str:
    """The request field an engine rejection is about."""
    if "stop_token_ids" in message:
        return "stop_token_ids"
    if "KV tokens" in message or "max_tokens" in message:
        return "max_tokens"
    return prompt_param


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
        if isinstance(e, ContextLengthError):
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from e
        if isinstance(e, EngineDeadError):
            raise APIError(503, str(e)) from e
        if isinstance(e, ValueError):
            raise APIError(400, str(e), param=_param_of(str(e), prompt_param)) from e
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


def _check_failed(out: RequestOutput) -> None:
    if out.error is not None:
        raise APIError(500, ENGINE_FAILED, type="server_error")


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    last: list[RequestOutput | None] = [None] * len(streams)
    try:
        async with aclosing(merge(streams)) as outputs:
            async for i, out in outputs:
                _check_failed(out)
                last[i] = out
    except EngineDeadError as e:
        raise APIError(503, str(e)) from e
    if any(o is None or not o.finished for o in last):
        raise APIError(503, "the request was aborted before it finished")
    return last  # type: ignore[return-value]


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    return usage(sum(len(o.prompt_token_ids) for o in outputs),
                 sum(len(c.token_ids) for o in outputs for c in o.outputs))


# -- logprobs -------------------------------------------------------------------------------
def _top_dict(engine: AsyncLLMEngine, token: int, logprob: float, top: TopLogprobs | None,
              skip_special: bool = True) -> dict[str, float]:
    d = {engine.token_text(t, skip_special): lp for t, lp in top} if top else {}
    d.setdefault(engine.token_text(token, skip_special), logprob)  # the sampled token is always listed
    return d


def completion_logprobs(engine: AsyncLLMEngine, token_ids: list[int], logprobs: list[float],
                        tops: list[TopLogprobs] | None, offset: int,
                        out: CompletionLogprobs | None = None, skip_special: bool = True) -> CompletionLogprobs:
    """``skip_special``: the request's ``skip_special_tokens`` (token strings as its text has them)."""
    out = out or CompletionLogprobs()
    for j, (t, lp) in enumerate(zip(token_ids, logprobs)):
        text = engine.token_text(t, skip_special)
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(_top_dict(engine, t, lp, tops[j] if tops else None, skip_special))
        out.text_offset.append(offset)
        offset += len(text)
    return out


def prompt_logprobs(engine: AsyncLLMEngine, out: RequestOutput, skip_special: bool = True) -> CompletionLogprobs:
    """Echoed prompt tokens with their logprobs (None for the first: nothing predicts it)."""
    lp = CompletionLogprobs()
    offset = 0
    lps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    tops = out.prompt_top_logprobs or [None] * len(out.prompt_token_ids)
    for t, p, top in zip(out.prompt_token_ids, lps, tops):
        text = engine.token_text(t, skip_special)
        lp.tokens.append(text)
        lp.token_logprobs.append(p)
        lp.top_logprobs.append(None if p is None else _top_dict(engine, t, p, top, skip_special))
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


def chat_logprobs(engine: AsyncLLMEngine, token_ids: list[int], logprobs: list[float],
                  tops: list[TopLogprobs] | None, top: int, skip_special: bool = True) -> ChatLogprobs:
    content = []
    for j, (t, lp) in enumerate(zip(token_ids, logprobs)):
        alts = [TopLogprob(token=engine.token_text(a, skip_special), logprob=alp, bytes=engine.token_bytes(a))
                for a, alp in (tops[j] if tops else [])[:top]]
        content.append(TokenLogprob(token=engine.token_text(t, skip_special), logprob=lp, bytes=engine.token_bytes(t),
                                    top_logprobs=alts))
    return ChatLogprobs(content=content)


def _echo_text(engine: AsyncLLMEngine, out: RequestOutput, skip_special: bool = True) -> str:
    if out.prompt is not None:
        return out.prompt
    return decode_text(engine.tokenizer, out.prompt_token_ids, skip_special)


# -- whole responses ------------------------------------------------------------------------
def completion_response(engine: AsyncLLMEngine, request_id: str, model: str, outputs: list[RequestOutput],
                        n: int, want_logprobs: bool, echo: bool = False,
                        skip_special: bool = True) -> CompletionResponse:
    choices = []
    for i, out in enumerate(outputs):
        prefix = _echo_text(engine, out, skip_special) if echo else ""
        for c in out.outputs:
            lp = None
            if want_logprobs:
                lp = prompt_logprobs(engine, out, skip_special) if echo else None
                offset = sum(len(t) for t in lp.tokens) if lp else 0
                lp = completion_logprobs(engine, c.token_ids, c.logprobs or [], c.top_logprobs, offset, lp,
                                         skip_special)
            choices.append(CompletionChoice(index=i * n + c.index, text=prefix + c.text, logprobs=lp,
                                            finish_reason=c.finish_reason))
    return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of(outputs))


def chat_response(engine: AsyncLLMEngine, request_id: str, model: str, output: RequestOutput,
                  top_logprobs: int | None, skip_special: bool = True) -> ChatCompletionResponse:
    choices = []
    for c in output.outputs:
        lp = None if top_logprobs is None else chat_logprobs(engine, c.token_ids, c.logprobs or [],
                                                             c.top_logprobs, top_logprobs, skip_special)
        choices.append(ChatChoice(index=c.index, message=AssistantMessage(content=c.text), logprobs=lp,
                                  finish_reason=c.finish_reason))
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of([output]))


# -- streams --------------------------------------------------------------------------------
_TAIL = ',"system_fingerprint":null}\n\n'
_TAIL_USAGE = ',"system_fingerprint":null,"usage":null}\n\n'


def _js(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _sse(chunk, include_usage: bool) -> str:
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


def _sse_error(err: BaseException) -> str:
    if not isinstance(err, APIError):
        err = (APIError(503, str(err)) if isinstance(err, EngineDeadError)
               else APIError(500, "The server had an error while processing your request.", type="server_error"))
    return f"data: {ErrorResponse(error=err.detail).model_dump_json()}\n\n"


class CompletionChunker:
    """Chunks of a streamed text completion: text deltas, the finish reason on the last one."""

    object_type = CompletionChunk

    def __init__(self, engine: AsyncLLMEngine, request_id: str, model: str, params: SamplingParams,
                 num_prompts: int, include_usage: bool, echo: bool = False):
        self.engine, self.id, self.model, self.params = engine, request_id, model, params
        self.include_usage = include_usage
        self.echo = echo
        self.created = int(time.time())
        self.offsets = [[0] * params.n for _ in range(num_prompts)]
        self.echoed = [[False] * params.n for _ in range(num_prompts)]
        self.prompt_tokens = [0] * num_prompts
        self.completion_tokens = 0
        # the hot path (a text delta, no logprobs) formats its JSON directly: ~10x cheaper than pydantic
        self._head = (f'data: {{"id":{_js(request_id)},"object":"{self.object_type.model_fields["object"].default}",'
                      f'"created":{self.created},"model":{_js(model)},"choices":[{{"index":')
        # with include_usage every chunk but the last carries "usage": null (OpenAI), as pydantic's do
        self._tail = _TAIL_USAGE if include_usage else _TAIL

    def start(self) -> list[str]:
        return []

    def on_output(self, i: int, out: RequestOutput) -> list[str]:
        _check_failed(out)
        self.prompt_tokens[i] = len(out.prompt_token_ids)
        events = []
        for c in out.outputs:
            self.completion_tokens += len(c.token_ids)
            text, lp = c.text, None
            want_lp = self.params.logprobs is not None
            if self.echo and not self.echoed[i][c.index]:
                self.echoed[i][c.index] = True
                text = _echo_text(self.engine, out, self.params.skip_special_tokens) + text
                if want_lp:
                    lp = prompt_logprobs(self.engine, out, self.params.skip_special_tokens)
                    self.offsets[i][c.index] = sum(len(t) for t in lp.tokens)
            if want_lp:
                lp = completion_logprobs(self.engine, c.token_ids, c.logprobs or [], c.top_logprobs,
                                         self.offsets[i][c.index], lp, self.params.skip_special_tokens)
                self.offsets[i][c.index] = (lp.text_offset[-1] + len(lp.tokens[-1])) if lp.tokens else 0
            if not text and c.finish_reason is None and not (lp and lp.tokens):
                continue
            if lp is None:
                events.append(f'{self._head}{i * self.params.n + c.index},"text":{_js(text)},"logprobs":null,'
                              f'"finish_reason":{_js(c.finish_reason)}}}]{self._tail}')
                continue
            choice = CompletionChoice(index=i * self.params.n + c.index, text=text, logprobs=lp,
                                      finish_reason=c.finish_reason)
            events.append(self.event([choice]))
        return events

    def usage(self) -> UsageInfo:
        return usage(sum(self.prompt_tokens), self.completion_tokens)

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
        _check_failed(out)
        self.prompt_tokens[0] = len(out.prompt_token_ids)
        events = []
        for c in out.outputs:
            self.completion_tokens += len(c.token_ids)
            lp = None
            if self.top_logprobs is not None and c.token_ids:
                lp = chat_logprobs(self.engine, c.token_ids, c.logprobs or [], c.top_logprobs, self.top_logprobs,
                                   self.params.skip_special_tokens)
            if lp is not None:
                events.append(self._chunk(c.index, DeltaMessage(content=c.text), lp))
            elif c.text:
                events.append(f'{self._head}{c.index},"delta":{{"content":{_js(c.text)}}},"logprobs":null,'
                              f'"finish_reason":null}}]{self._tail}')
            if c.finish_reason is not None:
                events.append(f'{self._head}{c.index},"delta":{{}},"logprobs":null,'
                              f'"finish_reason":{_js(c.finish_reason)}}}]{self._tail}')
        return events

    def _chunk(self, index: int, delta: DeltaMessage, logprobs=None, finish_reason=None) -> str:
        return self.event([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                            finish_reason=finish_reason)])


async def sse_events(streams: list[RequestStream], chunker: CompletionChunker) -> AsyncIterator[str]:
    """The SSE body of a streamed response, ending with [DONE]; aborts what is still running when
    it ends early (client gone, error)."""
    try:
        try:
            for event in chunker.start():
                yield event
            async with aclosing(merge(streams)) as outputs:
                async for i, out in outputs:
                    for event in chunker.on_output(i, out):
                        yield event
            if chunker.include_usage:
                yield chunker.event([], chunker.usage())
        except Exception as e:  # the status line is gone: report in the stream, as OpenAI does
            yield _sse_error(e)
        yield DONE
    finally:
        for s in streams:
            s.abort()
