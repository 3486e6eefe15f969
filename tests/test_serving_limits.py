"""Server limits, strict request types, unsupported fields and /v1/models/{id}: tiny-llama on CPU.

Most checks run in-process (httpx over the ASGI app); what lives in the HTTP protocol (header
size, head and body read timeouts) runs against a real uvicorn server on loopback, built as
``kvlab serve`` builds it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import time
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev, which has it)")

from engine.serving.limits import LimitsConfigError, ServerLimits  # noqa: E402

HOST = "127.0.0.1"
MODEL = "tiny"
MAX_MODEL_LEN = 64
LIMITS = ServerLimits(max_body_bytes=64 * 1024, max_prompts_per_request=4, max_n=4, max_stop_strings=4,
                      max_stop_string_chars=16, max_header_bytes=4096, header_timeout_s=1.0, body_timeout_s=2.0,
                      keep_alive_timeout_s=1.0, max_concurrency=64)
SLACK_S = 3.0  # scheduling slack on a loaded machine


@pytest.fixture(scope="module")
def live():
    """A real uvicorn server (as ``kvlab serve`` builds it) and an in-process app over the same engine."""
    from conftest import serve_engine_in_thread
    from engine.serving.app import create_app

    for url, port, async_engine, _ in serve_engine_in_thread(LIMITS, MODEL, MAX_MODEL_LEN):
        yield SimpleNamespace(url=url, port=port, engine=async_engine, app=create_app(async_engine, MODEL, limits=LIMITS))


def call(app, method: str, path: str, raise_app_exceptions: bool = True, **kw) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            return await http.request(method, path, **kw)

    return asyncio.run(run())


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def assert_error(r: httpx.Response, status: int, param: str | None, code: str | None = "invalid_value") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert (err["param"], err["code"]) == (param, code), err
    return err


# -- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("settings,key", [
    ({"max_n": -1}, "limits.max_n"),
    ({"max_body_bytes": 0}, "limits.max_body_bytes"),
    ({"body_timeout_s": -5}, "limits.body_timeout_s"),
    ({"header_timeout_s": "10"}, "limits.header_timeout_s"),
    ({"max_stop_strings": True}, "limits.max_stop_strings"),
    ({"max_concurrency": 0}, "limits.max_concurrency"),
    ({"max_n": 10**6}, "limits.max_n"),
    ({"max_prompts": 4}, "limits.max_prompts"),  # unknown key
])
def test_bad_limit_is_a_config_error_naming_the_key(settings, key):
    with pytest.raises(LimitsConfigError, match=key.replace(".", r"\.")):
        ServerLimits.from_config(settings)


def test_bad_limit_fails_startup_before_the_model_loads():
    from engine.serving import server

    cfg = {"model": {"name": "tiny-llama", "path": "no/such/model/dir"}, "allocator": {"name": "paged"},
           "engine": {}, "limits": {"max_stop_strings": -1}}
    with pytest.raises(LimitsConfigError, match=r"limits\.max_stop_strings"):
        server.main(cfg)


def test_defaults_and_uvicorn_settings():
    d = ServerLimits.from_config(None)
    assert d == ServerLimits() and d.max_body_bytes == 8 * 1024 * 1024 and d.max_n == 16
    u = ServerLimits(max_header_bytes=1234, keep_alive_timeout_s=7, max_concurrency=None).uvicorn_settings()
    assert u["h11_max_incomplete_event_size"] == 1234 and u["timeout_keep_alive"] == 7
    assert u["limit_concurrency"] is None and u["http"].header_timeout == 10.0


def test_serve_yaml_limits_are_the_defaults():
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "conf" / "serve.yaml").read_text())
    assert ServerLimits.from_config(cfg["limits"]) == ServerLimits()


# -- body size --------------------------------------------------------------------------------
def test_body_over_the_limit_by_content_length_is_413_before_reading_it(live):
    read = []

    async def body():
        read.append(1)
        yield b"{" * 1024

    r = call(live.app, "POST", "/v1/completions", content=body(),
             headers={"Content-Type": "application/json", "Content-Length": str(LIMITS.max_body_bytes + 1)})
    assert_error(r, 413, None, "request_too_large")
    assert r.headers["connection"] == "close"
    assert read == []  # refused on the declared length alone


def test_streamed_body_over_the_limit_is_413_as_soon_as_it_passes(live):
    chunk = b" " * 4096
    sent = []

    async def endless():  # no Content-Length (chunked), never ends, never valid JSON
        while True:
            sent.append(len(chunk))
            yield chunk

    r = call(live.app, "POST", "/v1/completions", content=endless(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, None, "request_too_large")
    assert LIMITS.max_body_bytes < sum(sent) <= LIMITS.max_body_bytes + len(chunk)


def test_body_just_under_the_limit_is_parsed(live):
    body = json.dumps(completion(user="u" * (LIMITS.max_body_bytes - 200))).encode()
    assert len(body) <= LIMITS.max_body_bytes
    r = call(live.app, "POST", "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


# -- per-request limits -------------------------------------------------------------------------
LIMIT_CASES = [
    ("prompts", "/v1/completions", completion(prompt=["a"] * 5), "prompt"),
    ("token prompts", "/v1/completions", completion(prompt=[[5, 6]] * 5), "prompt"),
    ("n", "/v1/completions", completion(n=5), "n"),
    ("chat n", "/v1/chat/completions", chat(n=5), "n"),
    ("stop strings", "/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("chat stop strings", "/v1/chat/completions", chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("stop string length", "/v1/completions", completion(stop="x" * 17), "stop"),
    ("stop string length in a list", "/v1/chat/completions", chat(stop=["ok", "x" * 17]), "stop"),
]


@pytest.mark.parametrize("name,path,body,param", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_request_over_a_limit_is_400_naming_the_field(live, name, path, body, param):
    assert_error(call(live.app, "POST", path, json=body), 400, param)


def test_requests_at_the_limits_are_served(live):
    r = call(live.app, "POST", "/v1/completions",
             json=completion(prompt=["a", "b", "c", "d"], n=4, stop=["w", "x", "y", "z" * 16], ignore_eos=True))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 16


# -- the HTTP protocol: headers and read timeouts (real server) ---------------------------------
def _recv_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except ConnectionResetError:
        pass
    return data, time.monotonic()


def test_oversized_header_is_rejected(live):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n"
    with socket.create_connection((HOST, live.port), timeout=10) as s:
        s.sendall(head % (b"a" * (LIMITS.max_header_bytes - 200)))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    # whole (one read): refused once parsed, with OpenAI's error body
    with socket.create_connection((HOST, live.port), timeout=10) as s:
        s.sendall(head % (b"a" * (LIMITS.max_header_bytes + 100)))
        data, _ = _recv_until_closed(s, 10)
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_header_fields_too_large"
    # in pieces, far larger: refused by the protocol before it is buffered whole
    with socket.create_connection((HOST, live.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        for _ in range(100):  # stop sending once the server answers, so that no reset loses the answer
            s.sendall(b"a" * 1024)
            if select.select([s], [], [], 0.02)[0]:
                break
        data, _ = _recv_until_closed(s, 10)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]


@pytest.mark.parametrize("first_bytes", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"],
                         ids=["silent", "half head"])
def test_connection_that_stalls_before_its_head_is_complete_is_closed(live, first_bytes):
    with socket.create_connection((HOST, live.port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(first_bytes)
        data, closed = _recv_until_closed(s, LIMITS.header_timeout_s + SLACK_S + 5)
    assert data == b""
    assert LIMITS.header_timeout_s * 0.8 <= closed - start <= LIMITS.header_timeout_s + SLACK_S


def test_idle_keep_alive_connection_is_closed(live):
    with socket.create_connection((HOST, live.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        data, closed = _recv_until_closed(s, LIMITS.keep_alive_timeout_s + SLACK_S + 5)
    assert data == b"" and closed - start <= LIMITS.keep_alive_timeout_s + SLACK_S


def test_half_sent_body_gets_408_and_is_dropped_while_others_are_served(live):
    with socket.create_connection((HOST, live.port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": \"")
        # meanwhile: other clients are served, and the stalled one has had no answer yet
        r = httpx.post(f"{live.url}/v1/completions", json=completion(ignore_eos=True), timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200
        assert time.monotonic() - start < LIMITS.body_timeout_s, "too slow to show concurrency"
        assert not select.select([s], [], [], 0)[0]
        data, closed = _recv_until_closed(s, LIMITS.body_timeout_s + SLACK_S + 5)
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert LIMITS.body_timeout_s * 0.8 <= closed - start <= LIMITS.body_timeout_s + SLACK_S


# -- strict types -------------------------------------------------------------------------------
STRICT_CASES = [
    ("int as string", "/v1/completions", completion(n="2"), "n"),
    ("max_tokens as string", "/v1/completions", completion(max_tokens="10"), "max_tokens"),
    ("max_tokens as float", "/v1/completions", completion(max_tokens=1.5), "max_tokens"),
    ("bool as string", "/v1/completions", completion(stream="yes"), "stream"),
    ("bool as int", "/v1/completions", completion(ignore_eos=1), "ignore_eos"),
    ("echo as string", "/v1/completions", completion(echo="true"), "echo"),
    ("float as string", "/v1/completions", completion(temperature="0.5"), "temperature"),
    ("bool for int", "/v1/completions", completion(logprobs=True), "logprobs"),
    ("string token id", "/v1/completions", completion(prompt=[1, "2"]), "prompt"),
    ("bool token id", "/v1/completions", completion(prompt=[1, True]), "prompt"),
    ("stop as number", "/v1/completions", completion(stop=5), "stop"),
    ("seed as string", "/v1/completions", completion(seed="1"), "seed"),
    ("model as number", "/v1/completions", completion(model=7), "model"),
    ("chat logprobs as string", "/v1/chat/completions", chat(logprobs="yes"), "logprobs"),
    ("content as number", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), "messages"),
    ("nested bool", "/v1/chat/completions", chat(stream=True, stream_options={"include_usage": "yes"}),
     "stream_options"),
]


@pytest.mark.parametrize("name,path,body,param", STRICT_CASES, ids=[c[0] for c in STRICT_CASES])
def test_wrong_types_are_400_naming_the_field(live, name, path, body, param):
    assert_error(call(live.app, "POST", path, json=body), 400, param)


def test_json_integers_are_numbers_and_integral_numbers_are_integers(live):
    r = call(live.app, "POST", "/v1/completions", json=completion(temperature=1, top_p=1, presence_penalty=0))
    assert r.status_code == 200, r.text
    # JSON Schema's `integer` includes 2.0, and generated clients send it so
    r = call(live.app, "POST", "/v1/completions", json=completion(max_tokens=2.0, n=2.0, prompt=[5.0, 6],
                                                                  stop_token_ids=[7.0], ignore_eos=True))
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1] and r.json()["usage"]["completion_tokens"] == 4
    r = call(live.app, "POST", "/v1/chat/completions", json=chat(temperature=0, top_p=1))
    assert r.status_code == 200, r.text


# -- known fields the engine does not honour ----------------------------------------------------
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
UNSUPPORTED_CASES = [
    ("/v1/chat/completions", chat(tools=[TOOL]), "tools"),
    ("/v1/chat/completions", chat(tool_choice="auto"), "tool_choice"),
    ("/v1/chat/completions", chat(parallel_tool_calls=True), "parallel_tool_calls"),
    ("/v1/chat/completions", chat(functions=[TOOL["function"]]), "functions"),
    ("/v1/chat/completions", chat(function_call="auto"), "function_call"),
    ("/v1/chat/completions", chat(response_format={"type": "json_object"}), "response_format"),
    ("/v1/chat/completions", chat(modalities=["text", "audio"]), "modalities"),
    ("/v1/chat/completions", chat(logit_bias={"50": 1}), "logit_bias"),
    ("/v1/completions", completion(logit_bias={"50": -100}), "logit_bias"),
    ("/v1/completions", completion(suffix="the end"), "suffix"),
    ("/v1/completions", completion(best_of=3), "best_of"),
    ("/v1/chat/completions", chat(spaces_between_special_tokens=False), "spaces_between_special_tokens"),
]


@pytest.mark.parametrize("path,body,param", UNSUPPORTED_CASES, ids=[c[2] + c[0] for c in UNSUPPORTED_CASES])
def test_unsupported_field_is_400_naming_it(live, path, body, param):
    err = assert_error(call(live.app, "POST", path, json=body), 400, param)
    assert "not supported" in err["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(live):
    r = call(live.app, "POST", "/v1/chat/completions",
             json=chat(tools=None, tool_choice=None, response_format={"type": "text"}, logit_bias={},
                       presence_penalty=0, frequency_penalty=0.0, modalities=["text"], skip_special_tokens=True,
                       spaces_between_special_tokens=None))
    assert r.status_code == 200, r.text
    r = call(live.app, "POST", "/v1/completions", json=completion(n=2, best_of=2, suffix=None, logit_bias=None))
    assert r.status_code == 200, r.text


# -- sampling fields: the engine's own checks name the field too ---------------------------------
SAMPLING_CASES = [
    ("/v1/completions", completion(max_tokens=2, min_tokens=5), "min_tokens"),
    ("/v1/chat/completions", chat(max_tokens=None, max_completion_tokens=2, min_tokens=5), "min_tokens"),
    ("/v1/completions", completion(seed=2**64), "seed"),
    ("/v1/completions", completion(seed=-(2**63) - 1), "seed"),
    ("/v1/completions", completion(top_k=2**63), "top_k"),
    ("/v1/completions", completion(top_k=-2), "top_k"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("/v1/chat/completions", chat(top_logprobs=2), "top_logprobs"),
    ("/v1/completions", completion(stop_token_ids=[-1]), "stop_token_ids"),
    ("/v1/completions", completion(stop_token_ids=[10**6]), "stop_token_ids"),
    ("/v1/completions", completion(max_tokens=0), "max_tokens"),
    ("/v1/completions", completion(max_tokens=MAX_MODEL_LEN), "max_tokens"),
    ("/v1/completions", completion(stream_options={"include_usage": True}), "stream_options"),
    ("/v1/completions", completion(prompt=[]), "prompt"),
    ("/v1/completions", completion(stop=""), "stop"),
    # penalties and min_p: vLLM's (and OpenAI's) ranges
    ("/v1/completions", completion(presence_penalty=2.5), "presence_penalty"),
    ("/v1/chat/completions", chat(presence_penalty=-2.01), "presence_penalty"),
    ("/v1/completions", completion(frequency_penalty=-3), "frequency_penalty"),
    ("/v1/chat/completions", chat(frequency_penalty=2.5), "frequency_penalty"),
    ("/v1/completions", completion(repetition_penalty=0), "repetition_penalty"),
    ("/v1/chat/completions", chat(repetition_penalty=-1.5), "repetition_penalty"),
    ("/v1/completions", completion(repetition_penalty=1e300), "repetition_penalty"),
    ("/v1/completions", completion(min_p=1.5), "min_p"),
    ("/v1/chat/completions", chat(min_p=-0.1), "min_p"),
    ("/v1/completions", completion(min_p="0.1"), "min_p"),
    ("/v1/completions", completion(include_stop_str_in_output="yes"), "include_stop_str_in_output"),
    ("/v1/chat/completions", chat(include_stop_str_in_output=1), "include_stop_str_in_output"),
]


@pytest.mark.parametrize("path,body,param", SAMPLING_CASES,
                         ids=[f"{c[2]}-{i}" for i, c in enumerate(SAMPLING_CASES)])
def test_bad_sampling_value_is_400_naming_the_field(live, path, body, param):
    assert_error(call(live.app, "POST", path, json=body), 400, param)


def test_sampling_params_mapping():
    from engine.serving.protocol import ChatCompletionRequest, CompletionRequest

    p = CompletionRequest(prompt="x", stream=True, logprobs=3).sampling_params()
    assert (p.output_kind, p.logprobs, p.prompt_logprobs, p.max_tokens) == ("delta", 3, None, 16)
    p = CompletionRequest(prompt="x", echo=True, logprobs=2, max_tokens=0).sampling_params()
    assert (p.output_kind, p.logprobs, p.prompt_logprobs, p.max_tokens) == ("final_only", 2, 2, 0)
    p = CompletionRequest(prompt="x", echo=True, max_tokens=0).sampling_params()
    assert p.prompt_logprobs == 0 and p.max_tokens == 0
    p = CompletionRequest(prompt="x", seed=-5, top_k=0, min_tokens=1, ignore_eos=True,
                          stop_token_ids=[7]).sampling_params()
    assert (p.seed, p.top_k, p.min_tokens, p.ignore_eos, p.stop_token_ids) == (-5, -1, 1, True, [7])
    p = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=5,
                              stream=False).sampling_params()
    assert (p.output_kind, p.logprobs, p.max_tokens) == ("final_only", 5, None)
    p = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True,
                              max_completion_tokens=3, stream=True).sampling_params()
    assert (p.output_kind, p.logprobs, p.max_tokens) == ("delta", 0, 3)
    p = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=False).sampling_params()
    assert p.logprobs is None
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.include_stop_str_in_output,
            p.penalized) == (0, 0, 1, 0, False, False)
    p = CompletionRequest(prompt="x", presence_penalty=-2, frequency_penalty=1.5, repetition_penalty=1.2,
                          min_p=0.05, include_stop_str_in_output=True).sampling_params()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p,
            p.include_stop_str_in_output) == (-2, 1.5, 1.2, 0.05, True)
    p = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], frequency_penalty=2, min_p=1,
                              repetition_penalty=0.5, include_stop_str_in_output=True).sampling_params()
    assert (p.frequency_penalty, p.min_p, p.repetition_penalty, p.include_stop_str_in_output) == (2, 1, 0.5, True)


def test_penalties_and_min_p_are_accepted(live):
    for path, body in (("/v1/completions", completion(presence_penalty=1.0, frequency_penalty=-0.5,
                                                      repetition_penalty=1.3, min_p=0.1, temperature=0.7, seed=1)),
                       ("/v1/chat/completions", chat(presence_penalty=2, frequency_penalty=2.0, repetition_penalty=2,
                                                     min_p=1, include_stop_str_in_output=True))):
        r = call(live.app, "POST", path, json=body)
        assert r.status_code == 200, r.text
        assert "X-Kvlab-Ignored-Fields" not in r.headers


def test_echo_with_max_tokens_zero_scores_the_prompt(live):
    r = call(live.app, "POST", "/v1/completions", json=completion(prompt="Hello there", echo=True, max_tokens=0,
                                                                  logprobs=1))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 0
    assert body["choices"][0]["text"] == "Hello there"


# -- errors --------------------------------------------------------------------------------------
def test_500_hides_the_exception_and_logs_it(live, monkeypatch, caplog):
    from engine.serving import responses

    async def broken(*args, **kwargs):
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(responses, "start_requests", broken)
    with caplog.at_level(logging.ERROR, logger="kvlab.serving"):
        r = call(live.app, "POST", "/v1/completions", json=completion(), raise_app_exceptions=False)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "secret" not in r.text and "RuntimeError" not in r.text
    assert "secret-internal-detail" in caplog.text  # the traceback stays in the server's log


# -- /v1/models/{id} ------------------------------------------------------------------------------
def test_model_by_id(live):
    r = call(live.app, "GET", f"/v1/models/{MODEL}")
    assert r.status_code == 200, r.text
    card = r.json()
    assert (card["id"], card["object"], card["max_model_len"]) == (MODEL, "model", MAX_MODEL_LEN)
    assert card == call(live.app, "GET", "/v1/models").json()["data"][0]
    for unknown in ("gpt-9", "org/some-model"):
        err = assert_error(call(live.app, "GET", f"/v1/models/{unknown}"), 404, "model", "model_not_found")
        assert unknown in err["message"]


def test_model_by_id_needs_the_key_when_one_is_set(live):
    from engine.serving.app import create_app

    app = create_app(live.engine, MODEL, api_key="k", limits=LIMITS)
    assert call(app, "GET", f"/v1/models/{MODEL}").status_code == 401
    assert call(app, "GET", f"/v1/models/{MODEL}", headers={"Authorization": "Bearer k"}).status_code == 200
