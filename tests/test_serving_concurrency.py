"""limits.max_concurrency: requests in flight beyond it get OpenAI's error body in a 503 with
Retry-After, not uvicorn's plain text; /health and /metrics still answer; every way a request
ends (its last event, an exception, its client leaving, a cancellation) frees its slot.

A real uvicorn server (as ``kvlab serve`` builds it, tiny-llama on CPU) with a limit of 2; a
gate holds streamed responses after each event and whole responses before their outputs, as a
slow engine would, until the test opens it.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from types import SimpleNamespace
from typing import Iterator

import httpx
import pytest

pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev, which has it)")
openai = pytest.importorskip("openai", reason="the real openai client: the dev extra (make setup)")

from engine.serving.limits import (  # noqa: E402
    RETRY_AFTER_S,
    ConcurrencyLimitMiddleware,
    ServerLimits,
)

HOST = "127.0.0.1"
MODEL = "tiny"
LIMIT = 2
LIMITS = ServerLimits(max_concurrency=LIMIT)
RELEASE_S = 10.0  # a slot is freed at once; this only bounds the wait on a loaded machine
ANSWER_S = 10.0  # a refusal is immediate and a released request ends at once: a hang fails soon


def _limiter(app) -> ConcurrencyLimitMiddleware:
    """The app's instance, which counts the requests in flight."""
    node = app.middleware_stack
    while not isinstance(node, ConcurrencyLimitMiddleware):
        node = node.app
    return node


@pytest.fixture(scope="module")
def live():
    from conftest import serve_engine_in_thread

    for url, _, _, server in serve_engine_in_thread(LIMITS, MODEL):
        assert httpx.get(f"{url}/health", timeout=ANSWER_S).status_code == 200  # Starlette builds its middleware now
        yield SimpleNamespace(url=url, limiter=_limiter(server.config.app))


@pytest.fixture
def gate(monkeypatch) -> Iterator[threading.Event]:
    """Closed: streams wait after each event and whole responses before their outputs, as if the
    engine were slow. ``set()`` opens it."""
    from engine.serving import responses

    opened = threading.Event()
    sse_events, final_outputs = responses.sse_events, responses.final_outputs

    async def wait_open() -> None:
        while not opened.is_set():
            await asyncio.sleep(0.01)

    async def held_events(streams, chunker):
        events = sse_events(streams, chunker)
        try:
            async for event in events:
                yield event
                await wait_open()
        finally:
            await events.aclose()

    async def held_outputs(streams):
        await wait_open()
        return await final_outputs(streams)

    monkeypatch.setattr(responses, "sse_events", held_events)
    monkeypatch.setattr(responses, "final_outputs", held_outputs)
    yield opened
    opened.set()


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, "ignore_eos": True, **fields}


@contextlib.contextmanager
def held_streams(url: str, n: int = LIMIT) -> Iterator[list[Iterator[str]]]:
    """``n`` streamed completions, each past its first event (in flight, held by the gate); the
    iterators of their lines, that first event included (on a loaded machine the engine may finish
    before the stream's first event: then it holds every token and the finish reason). Leaving the
    block disconnects any still open."""
    with contextlib.ExitStack() as stack:
        rest = []
        for _ in range(n):
            http = stack.enter_context(httpx.Client(base_url=url, timeout=ANSWER_S))
            r = stack.enter_context(http.stream("POST", "/v1/completions", json=completion(stream=True)))
            assert r.status_code == 200, r.read()
            lines = (line for line in r.iter_lines() if line)
            first = next(lines)
            assert first.startswith("data: {")
            rest.append(itertools.chain([first], lines))
        yield rest


def wait_idle(live) -> None:
    deadline = time.monotonic() + RELEASE_S
    while live.limiter.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.limiter.in_flight == 0, f"{live.limiter.in_flight} slot(s) never released"


def assert_busy(r: httpx.Response) -> dict:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"] == str(RETRY_AFTER_S)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"], err["param"]) == ("server_error", "server_overloaded", None)
    assert "limits.max_concurrency" in err["message"] and f"{LIMIT} concurrent" in err["message"]
    assert "retry" in err["message"]
    return err


def assert_full_again(live, gate: threading.Event) -> None:
    """Every slot is free: ``LIMIT`` requests are admitted at once and one more is refused."""
    wait_idle(live)
    gate.clear()
    with held_streams(live.url) as held:
        assert_busy(httpx.post(f"{live.url}/v1/completions", json=completion(), timeout=ANSWER_S))
        gate.set()
        for lines in held:
            assert list(lines)[-1] == "data: [DONE]"
    wait_idle(live)


# -- over the limit -------------------------------------------------------------------------------
def test_over_the_limit_is_a_json_503_naming_the_limit_while_health_answers(live, gate):
    with held_streams(live.url) as held:
        assert live.limiter.in_flight == LIMIT
        assert_busy(httpx.post(f"{live.url}/v1/completions", json=completion(), timeout=ANSWER_S))
        assert_busy(httpx.post(f"{live.url}/v1/chat/completions", timeout=ANSWER_S,
                               json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        assert_busy(httpx.get(f"{live.url}/v1/models", timeout=ANSWER_S))
        # a refused request's connection is reused: its unread body does not break it
        with httpx.Client(base_url=live.url, timeout=ANSWER_S) as http:
            for _ in range(2):
                assert_busy(http.post("/v1/completions", content=b"x" * 100_000,
                                      headers={"Content-Type": "application/json"}))
            # not counted: a supervisor and a scraper see a busy server, not a dead one
            assert http.get("/health").status_code == 200
            m = http.get("/metrics")
            assert m.status_code == 200 and "vllm:num_requests_running" in m.text
        assert live.limiter.in_flight == LIMIT
        gate.set()
        for lines in held:  # the held ones were not harmed
            events = list(lines)
            assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
    assert_full_again(live, gate)


def test_whole_responses_count_until_they_are_sent(live, gate):
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(
        httpx.post(f"{live.url}/v1/completions", json=completion(), timeout=ANSWER_S))) for _ in range(LIMIT)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + RELEASE_S
    while live.limiter.in_flight < LIMIT and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.limiter.in_flight == LIMIT
    assert_busy(httpx.post(f"{live.url}/v1/completions", json=completion(), timeout=ANSWER_S))
    gate.set()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * LIMIT
    assert_full_again(live, gate)


# -- /metrics ------------------------------------------------------------------------------------
def limiter_metrics(url: str) -> tuple[float, float]:
    """(kvlab:http_requests_in_flight, kvlab:http_requests_overloaded_total) as /metrics shows them."""
    from prometheus_client import parser  # a dev dependency: always installed

    text = httpx.get(f"{url}/metrics", timeout=ANSWER_S).text
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
    (in_flight,) = fams["kvlab:http_requests_in_flight"].samples
    (refused,) = fams["kvlab:http_requests_overloaded"].samples
    assert fams["kvlab:http_requests_in_flight"].type == "gauge" and refused.name.endswith("_total")
    (limit,) = fams["kvlab:http_max_concurrency"].samples  # what the in-flight gauge is compared with
    assert limit.value == LIMIT
    return in_flight.value, refused.value


def test_metrics_show_the_requests_in_flight_and_the_refusals(live, gate):
    wait_idle(live)
    in_flight, refused = limiter_metrics(live.url)
    assert in_flight == 0
    with held_streams(live.url):
        assert limiter_metrics(live.url) == (LIMIT, refused)  # the scrape itself is not counted
        for _ in range(3):
            assert_busy(httpx.post(f"{live.url}/v1/completions", json=completion(), timeout=ANSWER_S))
        assert limiter_metrics(live.url) == (LIMIT, refused + 3)
        assert live.limiter.refused_total == refused + 3  # the same counts as the limiter's
        gate.set()
    wait_idle(live)
    assert limiter_metrics(live.url) == (0, refused + 3)


# -- every way out frees the slot -------------------------------------------------------------------
def test_a_client_leaving_mid_stream_frees_its_slot(live, gate):
    with held_streams(live.url):
        assert live.limiter.in_flight == LIMIT
    # both clients left mid-stream, the gate still closed
    assert_full_again(live, gate)


def test_a_client_leaving_before_its_whole_response_frees_its_slot(live, gate):
    async def leave() -> None:
        async with httpx.AsyncClient(base_url=live.url, timeout=ANSWER_S) as http:
            tasks = [asyncio.create_task(http.post("/v1/completions", json=completion())) for _ in range(LIMIT)]
            deadline = time.monotonic() + RELEASE_S
            while live.limiter.in_flight < LIMIT and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert live.limiter.in_flight == LIMIT
            for t in tasks:
                t.cancel()  # closes the connections
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(leave())
    assert_full_again(live, gate)


def test_failed_requests_free_their_slots(live, gate, monkeypatch):
    from engine.serving import responses

    async def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(responses, "start_requests", broken)
        for _ in range(LIMIT + 1):
            assert httpx.post(f"{live.url}/v1/completions", json=completion(), timeout=ANSWER_S).status_code == 500
    for _ in range(LIMIT + 1):  # refused by validation: a 400 is an early return
        assert httpx.post(f"{live.url}/v1/completions", json=completion(n="2"), timeout=ANSWER_S).status_code == 400
    assert_full_again(live, gate)


# -- the openai client ----------------------------------------------------------------------------
def test_openai_client_sees_the_503_and_its_message(live, gate):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=ANSWER_S)
    with held_streams(live.url):
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert isinstance(e.value, openai.APIStatusError) and e.value.status_code == 503
        assert "limits.max_concurrency" in e.value.message and e.value.body["code"] == "server_overloaded"
        assert e.value.response.headers["retry-after"] == str(RETRY_AFTER_S)
        with pytest.raises(openai.InternalServerError, match="max_concurrency"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        gate.set()
    wait_idle(live)


def test_openai_client_retries_after_retry_after_and_gets_through(live, gate):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=2, timeout=ANSWER_S)
    with held_streams(live.url):
        threading.Timer(0.3, gate.set).start()  # the held requests end during the client's wait
        start = time.monotonic()
        out = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert out.choices[0].text is not None
        assert time.monotonic() - start >= RETRY_AFTER_S * 0.9  # it waited as told, then got through
    wait_idle(live)


# -- the middleware on its own ------------------------------------------------------------------------
def _scope(path: str = "/v1/completions") -> dict:
    return {"type": "http", "method": "POST", "path": path, "headers": []}


def test_middleware_frees_the_slot_on_return_exception_and_cancellation():
    async def run() -> None:
        entered, release = asyncio.Event(), asyncio.Event()
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def app(scope, receive, send):
            if scope["path"] == "/health":
                return
            entered.set()
            await release.wait()
            if scope["path"] == "/fail":
                raise RuntimeError("boom")

        mw = ConcurrencyLimitMiddleware(app, max_concurrency=1)
        for path, end in (("/ok", "return"), ("/fail", "raise"), ("/slow", "cancel")):
            entered.clear()
            release.clear()
            task = asyncio.create_task(mw(_scope(path), receive, send))
            await entered.wait()
            assert mw.in_flight == 1
            sent.clear()
            await asyncio.wait_for(mw(_scope(), receive, send), ANSWER_S)  # at the limit: refused, not counted
            assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
            await asyncio.wait_for(mw(_scope("/health"), receive, send), ANSWER_S)  # not counted: reaches the app
            assert mw.in_flight == 1
            if end == "cancel":
                task.cancel()
            else:
                release.set()
            results = await asyncio.gather(task, return_exceptions=True)
            assert mw.in_flight == 0, end
            assert (type(results[0]).__name__, end) in {("NoneType", "return"), ("RuntimeError", "raise"),
                                                        ("CancelledError", "cancel")}
        assert mw.refused_total == 3

    asyncio.run(run())


def test_uvicorn_limit_is_a_backstop_above_the_servers():
    for n in (1, 2, 2048):
        backstop = ServerLimits(max_concurrency=n).uvicorn_settings()["limit_concurrency"]
        assert backstop >= 2 * n + 2  # uvicorn counts the asking connection too
    assert ServerLimits(max_concurrency=None).uvicorn_settings()["limit_concurrency"] is None


def test_no_limit_no_middleware():
    from engine.serving.app import create_app

    engine = SimpleNamespace(max_model_len=64, info=SimpleNamespace(vocab_size=100), stats=lambda: None,
                             add_finish_listener=lambda fn: None, model_name="m", is_running=True)
    app = create_app(engine, MODEL, limits=ServerLimits(max_concurrency=None))
    assert all(m.cls is not ConcurrencyLimitMiddleware for m in app.user_middleware)
    assert any(m.cls is ConcurrencyLimitMiddleware for m in create_app(engine, MODEL, limits=LIMITS).user_middleware)
