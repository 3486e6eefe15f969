"""What an AsyncLLMEngine caller holds: a request's stream of outputs, and the errors it may raise.

``_Stream`` is the front end's side of one request (its queue on the caller's event loop);
``RequestStream`` iterates it, merging deltas that piled up while the caller was slow.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.frontend_output import FrontendOutput, merge_deltas
from engine.outputs import RequestOutput

if TYPE_CHECKING:
    from engine.async_engine import AsyncLLMEngine


class EngineDeadError(RuntimeError):
    """The engine has stopped (shut down, or failed): no request can be served."""


class PromptTooLongError(ValueError):
    """The prompt leaves no room for an output token within max_model_len."""


class ContextLengthError(ValueError):
    """Prompt plus max_tokens exceed max_model_len."""


@dataclass(frozen=True)
class ChatPrompt:
    """A chat conversation, turned into a prompt by the tokenizer's template (front end)."""

    messages: list[dict]


class _Stream:
    """One request's outputs, delivered to the caller's event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], prompt: str | None,
                 output: FrontendOutput):
        self.request_id = request_id
        self.output = output  # text, stop strings and the caller's output kind
        self.delta = output.params.output_kind == "delta"  # deltas are merged when several wait; else the newest wins
        self.loop = loop
        self.prompt_ids = prompt_ids
        self.prompt = prompt
        self.queue: asyncio.Queue = asyncio.Queue()
        self.added: asyncio.Future = loop.create_future()  # the core's answer to "add"


class RequestStream:
    """Async iterator over the (delta) outputs of one request; ``abort()`` frees it early."""

    def __init__(self, engine: AsyncLLMEngine, stream: _Stream):
        self._engine = engine
        self._stream = stream
        self.request_id = stream.request_id
        self.prompt_token_ids = stream.prompt_ids
        self.num_prompt_tokens = len(stream.prompt_ids)
        self.finished = False
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        q = self._stream.queue
        items = [await q.get()]
        while not q.empty():  # deltas that piled up go out as one
            items.append(q.get_nowait())
        outs = []
        for item in items:
            if item is None:  # aborted before it finished
                self._done = True
                break
            if isinstance(item, BaseException):
                self._done = True
                raise item
            outs.append(item)
        if not outs:
            raise StopAsyncIteration
        out = merge_deltas(outs) if self._stream.delta else outs[-1]
        if out.finished:
            self._done = self.finished = True
        return out

    def abort(self) -> None:
        """Stop the request and free its KV memory unless it has already finished."""
        if not self.finished:
            self._done = True
            self._engine.abort(self.request_id)
