"""The OpenAI-compatible HTTP API over an AsyncLLMEngine (FastAPI)."""
from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from typing import Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.async_engine import AsyncLLMEngine, ChatPrompt
from engine.sampling_params import SamplingParams
from engine.serving import responses
from engine.serving.errors import APIError, error_json, install_error_handlers
from engine.serving.metrics import CONTENT_TYPE, ServingMetrics
from engine.serving.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

T = TypeVar("T")


class APIKeyMiddleware:
    """Bearer-token check on /v1/*, before the body is read (so a bad key is a 401, whatever the body)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
            if not token:
                await error_json(401, "You didn't provide an API key. You need to provide your API key in an "
                                      "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                                      "YOUR_KEY).")(scope, receive, send)
                return
            if not hmac.compare_digest(token, self.key):
                await error_json(401, "Incorrect API key provided.", code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStreamResponse(StreamingResponse):
    """SSE whose generator is always closed when the response ends, even if the client left
    while the generator was parked: its ``finally`` aborts the engine requests right away."""

    def __init__(self, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first (then cancel it, which aborts its requests)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # disconnected (or we were cancelled): stop the work and wait for it
            task.cancel()
            await asyncio.wait({task})
    return None if task.cancelled() else task.result()


def create_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kvlab", description="OpenAI-compatible server on the kvlab engine")
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    metrics = ServingMetrics(engine, served_model_name)
    created = int(time.time())
    app.state.engine, app.state.metrics = engine, metrics

    def check_model(model: str | None) -> str:
        if model is not None and model != served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return served_model_name

    def sampling_params(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        try:
            return req.sampling_params()
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from e

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return error_json(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_model_name, created=created, root=engine.model_name,
                                         max_model_len=engine.max_model_len)])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        model = check_model(req.model)
        params = sampling_params(req)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await responses.start_requests(engine, req.prompts(), params, request_id, "prompt")
        if req.stream:
            chunker = responses.CompletionChunker(engine, request_id, model, params, len(streams),
                                                  req.include_usage)
            return EventStreamResponse(responses.sse_events(streams, chunker))
        try:
            outputs = await until_disconnect(raw, responses.final_outputs(streams))
        finally:
            for s in streams:
                s.abort()
        if outputs is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        body = responses.completion_response(engine, request_id, model, outputs, params.n,
                                             req.logprobs is not None)
        return JSONResponse(body.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        model = check_model(req.model)
        params = sampling_params(req)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt = ChatPrompt([m.as_template_dict() for m in req.messages])
        (stream,) = await responses.start_requests(engine, [prompt], params, request_id, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream:
            chunker = responses.ChatChunker(engine, request_id, model, params, top, req.include_usage)
            return EventStreamResponse(responses.sse_events([stream], chunker))
        try:
            outputs = await until_disconnect(raw, responses.final_outputs([stream]))
        finally:
            stream.abort()
        if outputs is None:
            return Response(status_code=499)
        return JSONResponse(responses.chat_response(engine, request_id, model, outputs[0], top).model_dump())

    return app
