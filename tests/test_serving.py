"""The OpenAI-compatible server, end to end: `kvlab serve` (tiny-llama on CPU) in a subprocess on a
loopback port, exercised with the official openai client and raw httpx."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 256
KV_TOKENS = 1024  # 64 blocks of 16: 64 concurrent requests do not all fit at once
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a running `kvlab serve`; its log is printed if it fails to come up."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "experiments.serve", f"port={port}", f"host={HOST}", "device=cpu",
           "model=tiny-llama", "allocator=paged", f"engine.max_model_len={MAX_MODEL_LEN}",
           f"engine.kv_cache_tokens={KV_TOKENS}", "engine.max_num_seqs=64", f"api_key={KEY}",
           f"served_model_name={MODEL}", "access_log=false", "log_level=warning"]
    env = {k: v for k, v in os.environ.items() if k != "KVLAB_API_KEY"}
    # a 0.1 M-parameter model gains nothing from intra-op threads, and on a busy CPU OpenMP's
    # spinning threads slow it down by an order of magnitude
    env["OMP_NUM_THREADS"] = "1"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy within 60 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    log_text = log_path.read_text()
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in log_text, log_text


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name{labels minus model_name}: value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key.replace(f'model_name="{MODEL}",', "").replace(f'{{model_name="{MODEL}"}}', "")] = float(value)
    return out


def wait_metrics(url: str, pred, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    m = metrics(url)
    while not pred(m) and time.monotonic() < deadline:
        time.sleep(0.05)
        m = metrics(url)
    return m


def pool_empty(m: dict[str, float]) -> bool:
    return (m["kvlab_num_requests_running"] == 0 and m["kvlab_num_requests_waiting"] == 0
            and m['kvlab_kv_cache_bytes{state="free"}'] == m["kvlab_kv_cache_capacity_bytes"])


def parse_sse(body: str) -> list[dict]:
    """Events of an SSE body; asserts the framing and the final [DONE]."""
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events[:3]
    assert events[-1] == "data: [DONE]", events[-3:]
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


# -- the official client ---------------------------------------------------------------------
def test_openai_client_completes(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 8, 14)  # BOS + 5 bytes

    a, b = (client.completions.create(model=MODEL, prompt="seeded", max_tokens=12, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True}) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text

    r = client.completions.create(model=MODEL, prompt=["one", "two"], n=2, max_tokens=5, logprobs=1,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 4 * 5 and r.usage.prompt_tokens == 4 + 4
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 5
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset == sorted(c.logprobs.text_offset)


def test_openai_client_chats(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > len("hi")
    assert len(r.choices[0].logprobs.content) == 6
    assert all(len(t.top_logprobs) == 1 for t in r.choices[0].logprobs.content)


def test_openai_client_streams_the_same_text(client):
    """Streamed deltas add up to the non-streamed text (greedy, same batch shape), usage at the end."""
    messages = [{"role": "user", "content": "stream me"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    ckw = dict(model=MODEL, prompt="stream me", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**ckw).choices[0].text
    chunks = list(client.completions.create(**ckw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"

    # several prompts and samples: choice i * n + j is sample j of prompt i
    chunks = list(client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1, 2, 3] and chunks[-1].usage.completion_tokens == 16


def test_stop_string_is_cut_in_both_modes(client):
    kw = dict(model=MODEL, prompt="stop here", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[10:13]
    expected = full[: full.find(stop)]
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=[stop], stream=True))
    assert streamed == expected  # nothing of the stop string leaked out before it was complete


# -- load ------------------------------------------------------------------------------------
async def _stream(http: httpx.AsyncClient, i: int) -> tuple[list[dict], int, int]:
    """One streaming request (chat or completion, n=1 or 2); returns its events and expectations."""
    n, max_tokens = 1 + i % 2, 8 + i % 17
    body = {"model": MODEL, "max_tokens": max_tokens, "n": n, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "temperature": 0.8, "seed": i}
    if i % 3:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"client {i}"}]
    else:
        path, body["prompt"] = "/v1/completions", f"client {i}"
    async with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join([chunk async for chunk in r.aiter_text()])
    return parse_sse(text), n, max_tokens


def test_64_concurrent_streams_complete_and_free_the_pool(server):
    before = metrics(server)

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(_stream(http, i) for i in range(64)))

    results = asyncio.run(run())
    expected_tokens = 0
    for events, n, max_tokens in results:
        assert len({e["id"] for e in events}) == 1
        *chunks, usage = events
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == n * max_tokens
        assert all(len(e["choices"]) == 1 for e in chunks)
        choices = [e["choices"][0] for e in chunks]
        if chunks[0]["object"] == "chat.completion.chunk":
            assert [(c["index"], c["delta"]) for c in choices[:n]] == [(j, {"role": "assistant", "content": ""})
                                                                        for j in range(n)]
        finished: set[int] = set()
        for c in choices:  # nothing of a choice after its finish_reason, one finish each
            assert c["index"] not in finished
            if c["finish_reason"]:
                assert c["finish_reason"] == "length"
                finished.add(c["index"])
        assert finished == set(range(n))
        expected_tokens += n * max_tokens
    after = wait_metrics(server, pool_empty)
    assert pool_empty(after)
    assert after["kvlab_kv_cache_usage_perc"] == 0
    assert after["kvlab_generation_tokens_total"] - before["kvlab_generation_tokens_total"] == expected_tokens
    assert (after['kvlab_request_success_total{finished_reason="length"}']
            - before.get('kvlab_request_success_total{finished_reason="length"}', 0)) == 64
    assert after["kvlab_time_to_first_token_seconds_count"] - before["kvlab_time_to_first_token_seconds_count"] == 64


def test_metrics_are_valid_prometheus_text(server):
    parser = pytest.importorskip("prometheus_client.parser")
    text = httpx.get(f"{server}/metrics", timeout=10).text
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    states = {s.labels["state"]: s.value for s in families["kvlab_kv_cache_bytes"].samples}
    assert set(states) == {"token_states", "reservation", "internal_frag", "external_frag", "free"}
    assert sum(states.values()) == families["kvlab_kv_cache_capacity_bytes"].samples[0].value
    for name in ("kvlab_time_to_first_token_seconds", "kvlab_time_per_output_token_seconds"):
        assert families[name].type == "histogram"
    for name in ("kvlab_num_requests_running", "kvlab_num_requests_waiting", "kvlab_kv_cache_usage_perc",
                 "kvlab_prefix_cache_hit_rate", "kvlab_prompt_tokens", "kvlab_generation_tokens"):
        assert name in families, sorted(families)


# -- bad input -------------------------------------------------------------------------------
LONG = "x" * (MAX_MODEL_LEN + 10)
BAD_REQUESTS = [
    # (name, path, json body or raw bytes, headers, status, param, code)
    ("malformed json", "/v1/completions", b'{"model": "tiny", "prompt": ', AUTH, 400, None, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", AUTH, 400, None, "invalid_value"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, AUTH, 404, "model", "model_not_found"),
    ("prompt too long", "/v1/completions", {"model": MODEL, "prompt": LONG}, AUTH, 400, "prompt",
     "context_length_exceeded"),
    ("chat too long", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]},
     AUTH, 400, "messages", "context_length_exceeded"),
    ("temperature", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, AUTH, 400,
     "temperature", "invalid_value"),
    ("top_p", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                       "top_p": 0}, AUTH, 400, "top_p", "invalid_value"),
    ("n", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, AUTH, 400, "n", "invalid_value"),
    ("max_tokens", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, AUTH, 400,
     "max_tokens", "invalid_value"),
    ("min_tokens", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "min_tokens": 5}, AUTH,
     400, None, "invalid_value"),
    ("logprobs", "/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 99}, AUTH, 400, "logprobs",
     "invalid_value"),
    ("token outside vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, AUTH, 400, "prompt", None),
    ("no messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, AUTH, 400, "messages",
     "invalid_value"),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, AUTH,
     400, "messages", "invalid_value"),
    ("top_logprobs alone", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                    "top_logprobs": 2}, AUTH, 400, None, "invalid_value"),
    ("penalty", "/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 1.0}, AUTH, 400, None,
     "invalid_value"),
    ("missing key", "/v1/completions", {"model": MODEL, "prompt": "hi"}, {}, 401, None, None),
    ("wrong key", "/v1/completions", {"model": MODEL, "prompt": "hi"}, {"Authorization": "Bearer nope"}, 401,
     None, "invalid_api_key"),
    ("wrong key, bad body", "/v1/chat/completions", b"{", {"Authorization": "Bearer nope"}, 401, None,
     "invalid_api_key"),
    ("no route", "/v1/embeddings", {"model": MODEL, "input": "hi"}, AUTH, 404, None, None),
]


@pytest.mark.parametrize("name,path,body,headers,status,param,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_openai_error(server, name, path, body, headers, status, param, code):
    kw = {"content": body, "headers": {**headers, "Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": headers}
    r = httpx.post(f"{server}{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code), err


def test_server_keeps_serving_after_errors(server, client):
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt=LONG)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    r = client.completions.create(model=MODEL, prompt="still here", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    assert pool_empty(wait_metrics(server, pool_empty))


# -- disconnects -----------------------------------------------------------------------------
def _long_request(stream: bool) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "stream": stream,
            "max_tokens": MAX_MODEL_LEN - 32, "ignore_eos": True}


def test_disconnect_mid_stream_frees_memory(server):
    before = metrics(server)
    aborts = before.get('kvlab_request_success_total{finished_reason="abort"}', 0)
    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=_long_request(True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            contents = 0
            for line in lines:  # bounded: the stream has at most max_tokens + 3 events
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    contents += 1
                    if contents == 3:
                        break
            assert contents == 3
            held = metrics(server)
            assert held["kvlab_num_requests_running"] == 1
            assert held['kvlab_kv_cache_bytes{state="free"}'] < held["kvlab_kv_cache_capacity_bytes"]
        # leaving the block closes the connection mid-stream
    after = wait_metrics(server, lambda m: pool_empty(m) and m.get(
        'kvlab_request_success_total{finished_reason="abort"}', 0) == aborts + 1)
    assert pool_empty(after)
    assert after['kvlab_request_success_total{finished_reason="abort"}'] == aborts + 1
    generated = after["kvlab_generation_tokens_total"] - before["kvlab_generation_tokens_total"]
    assert 3 <= generated < MAX_MODEL_LEN - 32  # it stopped early, not at max_tokens


def test_disconnect_while_waiting_for_a_whole_response_frees_memory(server):
    before = metrics(server)
    aborts = before.get('kvlab_request_success_total{finished_reason="abort"}', 0)

    async def run():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=30) as http:
            task = asyncio.create_task(http.post("/v1/chat/completions", json=_long_request(False)))
            deadline = time.monotonic() + 10
            while metrics(server)["kvlab_num_requests_running"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not task.done(), "the request finished before the client could leave"
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    after = wait_metrics(server, lambda m: pool_empty(m) and m.get(
        'kvlab_request_success_total{finished_reason="abort"}', 0) == aborts + 1)
    assert pool_empty(after)
    assert after['kvlab_request_success_total{finished_reason="abort"}'] == aborts + 1


# -- the async engine on its own ---------------------------------------------------------------
@pytest.fixture
def async_engine():
    from engine import EngineConfig, LLMEngine
    from engine.async_engine import AsyncLLMEngine

    engine = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256,
                                    record_memory=False))
    ae = AsyncLLMEngine(engine)
    yield ae
    ae.shutdown()


def test_async_engine_sleeps_when_idle_and_shuts_down_in_flight_requests(async_engine):
    from engine import SamplingParams
    from engine.async_engine import EngineDeadError

    async def run():
        out = [o async for o in async_engine.generate("warm", SamplingParams(max_tokens=2), "warm")][-1]
        assert out.finished and len(out.token_ids) == 2
        cpu = time.process_time()
        await asyncio.sleep(0.5)
        assert time.process_time() - cpu < 0.1  # the engine thread blocks on its queue: no polling
        stream = await async_engine.add_request("long", SamplingParams(max_tokens=60, ignore_eos=True), "long")
        await stream.__anext__()
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("late", SamplingParams(), "late")

    asyncio.run(run())
    assert not async_engine.is_running and not async_engine._thread.is_alive()
    assert async_engine.stats().num_running == 0 and async_engine.stats().memory.free == \
        async_engine.stats().memory.capacity


def test_async_engine_fails_requests_when_a_step_raises(async_engine):
    from engine import SamplingParams
    from engine.async_engine import EngineDeadError

    def broken_step():
        raise RuntimeError("boom")

    async_engine.engine.step = broken_step

    async def run():
        with pytest.raises(EngineDeadError, match="boom"):
            async for _ in async_engine.generate("x", SamplingParams(max_tokens=4), "x"):
                pass

    asyncio.run(run())
    assert not async_engine.is_running
