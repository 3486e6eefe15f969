"""The OpenAI-compatible HTTP API over an AsyncLLMEngine (FastAPI).

The published OpenAPI schema is the server's behaviour: request models carry this server's
limits, model name and context length (``protocol.request_models``); every error status a
route can answer is declared with OpenAI's error body (and no 422, which is never sent);
``/health`` answers an empty 200 and ``/metrics`` Prometheus text. Beyond ``limits.max_concurrency``
requests in flight, every route but ``/health`` and ``/metrics`` answers 503 with ``Retry-After``.
"""
# no ``from __future__ import annotations``: the routes' request types are built per app, and
# FastAPI must see them as objects, not as names to look up in this module

import asyncio
import hmac
import logging
import re
import time
import uuid
from typing import Any, Awaitable, TypeVar

from fastapi import FastAPI, Path, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.async_engine import AsyncLLMEngine, ChatPrompt
from engine.sampling_params import MAX_SEED, MAX_TOP_K, SamplingParams
from engine.serving import responses
from engine.serving.errors import APIError, error_json, install_error_handlers
from engine.serving.limits import (
    RETRY_AFTER_S,
    UNCOUNTED_PATHS,
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    HeaderLimitMiddleware,
    InFlight,
    ServerLimits,
)
from engine.serving.metrics import CONTENT_TYPE, ServingMetrics
from engine.serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    MAX_TOKENS,
    ErrorResponse,
    ModelCard,
    ModelList,
    request_models,
    unknown_fields,
)

T = TypeVar("T")
log = logging.getLogger("kvlab.serving")
IGNORED_FIELDS_HEADER = "X-Kvlab-Ignored-Fields"  # the request's fields this server did not read
MAX_WARNED_FIELDS = 256  # names of ignored fields logged once each; beyond, no more log lines

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: the body is not valid JSON, a field has the wrong type or value, a field is not "
         "supported, or a limit is exceeded (`param` names the field)",
    401: "Missing or wrong API key",
    404: "Unknown model (`param` is `model`)",
    408: "The request body was not received in time (the connection is closed)",
    413: "The request body is too large (the connection is closed)",
    431: "The request line and headers are too large (the connection is closed)",
    503: "The engine is not running",
}
_BUSY = "The server is at its limit of requests in flight (`limits.max_concurrency`; retry after `Retry-After` s)"
# one event of a streamed response: `data: <chunk as JSON>`, the last one `data: [DONE]`
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                               "id": {"type": "string"}}}
_SAMPLING_PROBLEM = re.compile(r"^(?:invalid SamplingParams: )?([a-z_]+) ")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[c]} for c in codes}


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


def _vocab_size(engine: AsyncLLMEngine) -> int | None:
    size = getattr(getattr(engine, "info", None), "vocab_size", None)  # the engine's published facts
    if size is None:  # an engine in this process
        size = getattr(getattr(getattr(engine, "engine", None), "model_config", None), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def create_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The API over ``engine``. ``limits`` (default: ``ServerLimits()``) bound what one request may
    ask (body size and time, prompts, ``n``, stop strings) and the requests in flight; the
    protocol-level limits (headers, connections) are uvicorn's, set by ``server.build_server``."""
    limits = limits or ServerLimits()
    completion_request, chat_request = request_models(limits, served_model_name, engine.max_model_len,
                                                      _vocab_size(engine))
    app = FastAPI(title="kvlab", version="1", description="OpenAI-compatible server on the kvlab engine")
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limits.max_body_bytes,
                       body_timeout=limits.body_timeout_s)
    if api_key:  # a bad key is a 401 before any of the body is read
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(HeaderLimitMiddleware, max_header_bytes=limits.max_header_bytes)
    in_flight = InFlight(limits.max_concurrency) if limits.max_concurrency is not None else None
    if in_flight is not None:  # outermost: a refusal costs nothing, not even reading the body
        app.add_middleware(ConcurrencyLimitMiddleware, max_concurrency=limits.max_concurrency, counts=in_flight)
    metrics = ServingMetrics(engine, served_model_name, in_flight=in_flight)
    created = int(time.time())
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits
    auth = (401,) if api_key else ()

    def model_card() -> ModelCard:
        return ModelCard(id=served_model_name, created=created, root=engine.model_name,
                         max_model_len=engine.max_model_len)

    def unknown_model(model: str) -> APIError:
        return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def check_model(model: str | None) -> str:
        if model is not None and model != served_model_name:
            raise unknown_model(model)
        return served_model_name

    def sampling_params(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        try:
            return req.sampling_params()
        except ValueError as e:  # "invalid SamplingParams: <field> must be ...; ..."
            m = _SAMPLING_PROBLEM.match(str(e))
            field = m.group(1) if m else None
            param = req.sampling_field_names.get(field, field) if field else None
            raise APIError(400, str(e), param=param, code="invalid_value") from e

    warned: set[str] = set()

    def ignored(req: CompletionRequest | ChatCompletionRequest, path: str, response: Response) -> Response:
        """Name the request's ignored fields in a response header (the client sees what was not
        read), and log each name once (the operator learns of it; a client repeating it at a
        benchmark's rate adds no lines)."""
        names = unknown_fields(req)
        if names:
            # escaped to printable ASCII: a name is the client's text (control characters, non-Latin-1)
            response.headers[IGNORED_FIELDS_HEADER] = ", ".join(n.encode("unicode_escape").decode("ascii")
                                                                for n in names)[:1024]
            new = [n for n in names if n not in warned]
            if new and len(warned) < MAX_WARNED_FIELDS:
                warned.update(new)
                log.warning("%s: ignored request field(s) %s: this server does not read them (named in the %s "
                            "response header; logged once per name)", path, ", ".join(repr(n)[:80] for n in new),
                            IGNORED_FIELDS_HEADER)
        return response

    def post_responses(body_model: type) -> dict[int | str, dict[str, Any]]:
        ok = {"model": body_model, "description": "The whole response (JSON), or with `stream: true` server-sent "
                                                  "events, one chunk per event, ending with `data: [DONE]`",
              "content": {"text/event-stream": {"itemSchema": _SSE_EVENT}},
              "headers": {IGNORED_FIELDS_HEADER: {
                  "description": "The request's top-level fields this server ignored (fields it does not model; "
                                 "a near miss of a field it does is a 400), comma-separated",
                  "schema": {"type": "string"}}}}
        return {200: ok, **_errors(400, *auth, 404, 503)}

    @app.get("/health", response_class=Response,
             responses={200: {"description": "The engine is running (empty body)", "content": {}},
                        **_errors(503)})
    async def health() -> Response:
        if not engine.is_running:
            return error_json(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=_errors(*auth))
    async def models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_errors(*auth, 404))
    async def get_model(model_id: str = Path(description="The served model's name",
                                             json_schema_extra={"enum": [served_model_name]})) -> ModelCard:
        if model_id != served_model_name:
            raise unknown_model(model_id)
        return model_card()

    @app.post("/v1/completions", responses=post_responses(CompletionResponse))
    async def completions(req: completion_request, raw: Request) -> Response:
        model = check_model(req.model)
        params = sampling_params(req)
        echo = bool(req.echo)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await responses.start_requests(engine, req.prompts(), params, request_id, "prompt")
        if req.stream:
            chunker = responses.CompletionChunker(engine, request_id, model, params, len(streams),
                                                  req.include_usage, echo=echo)
            return ignored(req, raw.url.path, EventStreamResponse(responses.sse_events(streams, chunker)))
        try:
            outputs = await until_disconnect(raw, responses.final_outputs(streams))
        finally:
            for s in streams:
                s.abort()
        if outputs is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        body = responses.completion_response(engine, request_id, model, outputs, params.n,
                                             req.logprobs is not None, echo, params.skip_special_tokens)
        return ignored(req, raw.url.path, JSONResponse(body.model_dump()))

    @app.post("/v1/chat/completions", responses=post_responses(ChatCompletionResponse))
    async def chat_completions(req: chat_request, raw: Request) -> Response:
        model = check_model(req.model)
        params = sampling_params(req)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt = ChatPrompt([m.as_template_dict() for m in req.messages])
        (stream,) = await responses.start_requests(engine, [prompt], params, request_id, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream:
            chunker = responses.ChatChunker(engine, request_id, model, params, top, req.include_usage)
            return ignored(req, raw.url.path, EventStreamResponse(responses.sse_events([stream], chunker)))
        try:
            outputs = await until_disconnect(raw, responses.final_outputs([stream]))
        finally:
            stream.abort()
        if outputs is None:
            return Response(status_code=499)
        return ignored(req, raw.url.path,
                       JSONResponse(responses.chat_response(engine, request_id, model, outputs[0], top,
                                                            params.skip_special_tokens).model_dump()))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _published_schema(app, bool(api_key), limits.max_concurrency is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_EXACT = {float(v): v for v in (MAX_SEED, -MAX_SEED - 1, MAX_TOKENS, MAX_TOP_K)}


def _exact_bounds(node: Any) -> None:
    """FastAPI's OpenAPI model stores numeric bounds as floats (``4.0``, and 2**63 - 1 rounded up to
    2**63): write integral ones back as exact integers."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, float) and value.is_integer():
                node[key] = _EXACT.get(value, int(value))
            else:
                _exact_bounds(value)
    elif isinstance(node, list):
        for item in node:
            _exact_bounds(item)


def _published_schema(app: FastAPI, bearer: bool, busy: bool = False) -> dict[str, Any]:
    """FastAPI's schema, less what this server never does: no 422 (bad input is a 400 with
    OpenAI's error body); plus what the limits answer on any route (408, 413, 431) and, with
    ``busy`` (a concurrency limit), on the counted ones (503 with ``Retry-After``); with an API
    key, bearer auth on /v1."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
            for status in (408, 413, 431):
                op["responses"].setdefault(str(status), {"description": _ERROR_DESCRIPTIONS[status],
                                                         "content": error_body})
            if busy and path not in UNCOUNTED_PATHS:
                engine_down = op["responses"].get("503", {}).get("description")  # the routes that start requests
                retry_after = {"description": f"Seconds to wait before retrying ({RETRY_AFTER_S})",
                               "schema": {"type": "integer"}}
                op["responses"]["503"] = {"description": f"{_BUSY}; or {engine_down.lower()}" if engine_down else _BUSY,
                                          "content": error_body, "headers": {"Retry-After": retry_after}}
            if bearer and path.startswith("/v1"):
                op["security"] = [{"bearer": []}]
    _exact_bounds(schema)
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if bearer:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return schema
