"""What one client may ask of the server, and how long it may take to ask it.

``ServerLimits`` holds every limit (the ``limits:`` block of conf/serve.yaml), checked when the
server starts. They are enforced in four places:

- the HTTP protocol (``uvicorn_settings``): the bytes buffered for an incomplete request head
  (h11's incomplete-event limit: beyond it, 400 and the connection is closed), the time to send
  a request head (``TimedH11Protocol``: a connection that opens and stalls, or sends half a
  head, is closed), idle keep-alive connections, and, as a backstop well above
  ``max_concurrency``, open connections (uvicorn's plain-text 503 beyond);
- the process: the soft open-file limit is raised for the connections above, and where the
  hard limit cannot hold them, ``max_concurrency`` is lowered or refused (``descriptors.py``);
- ASGI middleware: the requests in flight (``ConcurrencyLimitMiddleware``, 503 with OpenAI's
  error body and ``Retry-After``; ``/health`` and ``/metrics`` are not counted), the size of a
  complete request head (``HeaderLimitMiddleware``, 431: h11
  checks only heads that arrive in pieces), the body size, from Content-Length and again while
  the body streams in, before anything parses it (413), and the time to receive the whole body
  (408) (``BodyLimitMiddleware``); these answers close the connection;
- the request models (``protocol.request_models``): prompts per request, ``n``, stop strings
  and their length (400 naming the field), published in the OpenAPI schema.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, fields
from typing import Any, Mapping

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from allocators.checks import is_int, is_real
from engine.sampling_params import MAX_N
from engine.serving.errors import error_json

log = logging.getLogger("kvlab.serving")


DEFAULT_MAX_CONCURRENCY = 2048


class LimitsConfigError(ValueError):
    """A ``limits.*`` setting that no server can run with."""


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 8 * 1024 * 1024  # a request body (JSON) larger than this gets 413
    max_prompts_per_request: int = 128  # completions `prompt` given as a list
    max_n: int = 16  # samples per prompt
    max_stop_strings: int = 16  # entries of `stop`
    max_stop_string_chars: int = 256  # characters of each stop string
    max_header_bytes: int = 16 * 1024  # request line + headers
    header_timeout_s: float = 10.0  # from a connection's first byte (or its opening) to a complete request head
    body_timeout_s: float = 30.0  # from a complete request head to a complete body (else 408)
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    # requests in flight (not /health, /metrics); beyond: 503 (null: no limit); the default is lowered
    # to fit the open-file limit (descriptors.py), a value chosen otherwise that cannot fit is refused
    max_concurrency: int | None = DEFAULT_MAX_CONCURRENCY

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "max_concurrency" and value is None:
                continue
            if f.name.endswith("_s"):
                ok = is_real(value) and math.isfinite(value) and value > 0
                if not ok:
                    raise LimitsConfigError(f"limits.{f.name} must be a positive number of seconds, got {value!r}")
            elif not is_int(value) or value < 1:
                raise LimitsConfigError(f"limits.{f.name} must be a positive integer, got {value!r}")
        if self.max_n > MAX_N:
            raise LimitsConfigError(f"limits.max_n must be at most {MAX_N} (the engine's limit), got {self.max_n}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ServerLimits:
        """From the ``limits:`` block; keys left out keep their defaults, unknown keys are an error."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise LimitsConfigError(f"unknown setting(s) {', '.join('limits.' + k for k in unknown)}; "
                                    f"known: {', '.join(sorted(known))}")
        return cls(**cfg)

    def replace(self, **changes: Any) -> ServerLimits:
        return dataclasses.replace(self, **changes)

    def uvicorn_settings(self) -> dict[str, Any]:
        """Keyword arguments of ``uvicorn.Config`` that enforce the protocol-level limits."""
        return dict(http=timed_h11_protocol(self.header_timeout_s),
                    h11_max_incomplete_event_size=self.max_header_bytes,
                    timeout_keep_alive=self.keep_alive_timeout_s,
                    limit_concurrency=self.connection_backstop())

    def connection_backstop(self) -> int | None:
        """uvicorn's ``limit_concurrency`` (``connection_backstop``); None without a limit."""
        return None if self.max_concurrency is None else connection_backstop(self.max_concurrency)


BACKSTOP_SPARE = 64  # connections above twice the limit: health checks and scrapes under a small limit


def connection_backstop(max_concurrency: int) -> int:
    """uvicorn's ``limit_concurrency``: a bound on everything, far enough above
    ``max_concurrency`` that the app's own JSON 503 answers first. uvicorn counts open
    connections (idle keep-alive ones too, and the one asking) and tasks (refusals and
    /health, /metrics too) and answers a plain-text 503 that OpenAI clients cannot read:
    twice the limit leaves each client in flight an idle connection besides, and
    ``BACKSTOP_SPARE`` more keep room for health checks and scrapes under a small limit."""
    return 2 * max_concurrency + BACKSTOP_SPARE


# -- request heads ------------------------------------------------------------------------------
class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request heads, which uvicorn lacks.

    uvicorn closes idle keep-alive connections, but a connection that sends nothing after
    opening, or stops halfway through its request line or headers, is held forever. Here, when
    no request is being served on a connection, its next request head must be complete within
    ``header_timeout`` of the connection opening or of the first byte after the last response;
    otherwise the connection is closed. The same bound drops a client that keeps dripping a body
    after the server has already answered it (e.g. with 401 or 413).
    """

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._serving():
            self._cancel_head_timer()
        elif self._head_timer is None:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _serving(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._serving() or self.transport.is_closing():
            return
        self.logger.debug("closing a connection that did not send a request head within %.1f s",
                          self.header_timeout)
        if self.conn.our_state is not h11.ERROR:
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
        self.transport.close()


def timed_h11_protocol(header_timeout: float) -> type[TimedH11Protocol]:
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": float(header_timeout)})


# -- request heads and bodies -----------------------------------------------------------------------------
_CLOSE = {"Connection": "close"}  # the rest of the body is not read: the connection cannot be reused


def head_bytes(scope: Scope) -> int:
    """The size of a request head as sent: request line and header lines."""
    line = len(scope["method"]) + len(scope.get("raw_path") or scope["path"].encode()) \
        + len(scope.get("query_string") or b"") + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class HeaderLimitMiddleware:
    """431 for a request head over ``max_header_bytes``. h11's own limit applies only while a head
    is incomplete, so a large head that arrives in one read would pass it."""

    def __init__(self, app: ASGIApp, max_header_bytes: int):
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and head_bytes(scope) > self.max_header_bytes:
            await error_json(431, f"The request line and headers are too large: this server accepts at most "
                                  f"{self.max_header_bytes} bytes.", code="request_header_fields_too_large",
                             headers=_CLOSE)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Receives the whole request body before the app sees it, within ``max_body_bytes`` (413) and
    ``body_timeout`` seconds (408), then replays it to the app.

    A declared Content-Length over the limit is refused before one byte of the body is read; a
    body without one (chunked) is counted as it arrives and refused as soon as it passes the
    limit. A client that sends part of a body and stalls is answered 408 and disconnected when
    the deadline passes; the wait costs nothing to other requests.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout: float):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def _too_large(self) -> Any:
        return error_json(413, f"The request body is too large: this server accepts at most "
                               f"{self.max_body_bytes} bytes.", code="request_too_large", headers=_CLOSE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_body_bytes:
                    await self._too_large()(scope, receive, send)
                    return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                await error_json(408, f"The request body was not received within {self.body_timeout:g} s.",
                                 code="request_timeout", headers=_CLOSE)(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole request: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await self._too_large()(scope, receive, send)
                return
            if body:
                chunks.append(body)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the app expects

        await self.app(scope, replay, send)


# -- requests in flight -------------------------------------------------------------------------
RETRY_AFTER_S = 1  # a slot frees as soon as any request in flight ends: a short wait, then try again
# a supervisor's health check and a Prometheus scrape must answer on a busy server: a saturated
# server is not a dead one, and its metrics matter most then (both are cheap and touch no engine work)
UNCOUNTED_PATHS = frozenset({"/health", "/metrics"})
REFUSAL_LOG_INTERVAL_S = 60.0  # refusals come in floods: one log line per interval, with their count


class InFlight:
    """The limiter's counts, read by /metrics. Shared through this object because Starlette
    builds the middleware itself, on the first request, after the app and its metrics exist."""

    __slots__ = ("count", "refused_total", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.count = 0  # requests in flight now
        self.refused_total = 0  # requests answered 503 server_overloaded since the start
        self.limit = limit  # limits.max_concurrency as served (after fitting the open-file limit)


class ConcurrencyLimitMiddleware:
    """503 for an HTTP request that arrives while ``max_concurrency`` requests are in flight, with
    OpenAI's error body (``type: server_error``, naming the limit) and ``Retry-After``, before
    anything of it is read.

    A request is in flight from its arrival until the app returns: a stream until its last event
    is sent or its client disconnects. The slot is released in a ``finally``, so an exception or a
    cancellation (server shutdown) releases it too. Requests to ``UNCOUNTED_PATHS`` are neither
    counted nor refused. The connection of a refused request stays open: uvicorn discards the
    unread body (bounded by the head timeout), and closing a socket with unread bytes can reset it
    before the client has read the 503. The counts live in ``counts`` (``InFlight``), which
    /metrics reads.
    """

    def __init__(self, app: ASGIApp, max_concurrency: int, counts: InFlight | None = None):
        self.app = app
        self.max_concurrency = max_concurrency
        self.counts = counts if counts is not None else InFlight()
        self._unlogged = 0
        self._logged_at = -math.inf

    @property
    def in_flight(self) -> int:
        return self.counts.count

    @property
    def refused_total(self) -> int:
        return self.counts.refused_total

    def _busy(self) -> Any:
        return error_json(503, f"The server is at its limit of {self.max_concurrency} concurrent requests "
                               f"(limits.max_concurrency); retry after {RETRY_AFTER_S} s. The server's operator "
                               "can raise it (kvlab serve limits.max_concurrency=N, or the limits: block of "
                               "conf/serve.yaml).", code="server_overloaded",
                          headers={"Retry-After": str(RETRY_AFTER_S)})

    def _note_refusal(self) -> None:
        self.counts.refused_total += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_INTERVAL_S:
            log.warning("refused %d request(s) with 503: %d in flight, the limit limits.max_concurrency=%d "
                        "(at most one such line a minute)", self._unlogged, self.counts.count, self.max_concurrency)
            self._logged_at, self._unlogged = now, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        counts = self.counts
        if counts.count >= self.max_concurrency:
            self._note_refusal()
            await self._busy()(scope, receive, send)
            return
        counts.count += 1  # no await between the check and here: no other request passes in between
        try:
            await self.app(scope, receive, send)
        finally:
            counts.count -= 1
