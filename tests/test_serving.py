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
import pytest

pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev, which has it)")
openai = pytest.importorskip("openai", reason="the real openai client: the dev extra (make setup)")

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


STARTUP_CEILING_S = 600  # a loaded machine has taken 98 s to start the server; a live one is waited for


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, ceiling: float = STARTUP_CEILING_S) -> None:
    """Wait while the server process lives and is not yet healthy (up to ``ceiling`` seconds); fail
    at once, with its log, if it exits."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before it was healthy:\n{log_path.read_text()}")
        try:
            status = httpx.get(f"{url}/health", timeout=5).status_code
        except httpx.TransportError:
            status = None  # not listening yet
        if status == 200:
            return
        if status is not None:  # listening, so started, but the engine is not running: it never will be
            pytest.fail(f"server up but /health answers {status}:\n{log_path.read_text()}")
        if time.monotonic() - start > ceiling:
            pytest.fail(f"server alive but not healthy after {ceiling:.0f} s:\n{log_path.read_text()}")
        time.sleep(0.2)


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
        _wait_healthy(proc, url, log_path)
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
            for label in (f'model_name="{MODEL}"', 'engine="0"'):  # on every series: left out of the key
                key = key.replace(label + ",", "").replace("," + label, "").replace(label, "")
            out[key.replace("{}", "")] = float(value)
    return out


def wait_metrics(url: str, pred, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    m = metrics(url)
    while not pred(m) and time.monotonic() < deadline:
        time.sleep(0.05)
        m = metrics(url)
    return m


def pool_empty(m: dict[str, float]) -> bool:
    return (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
            and m['kvlab:kv_cache_bytes{state="free"}'] == m["kvlab:kv_cache_capacity_bytes"])


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


def test_include_stop_str_in_output_keeps_the_stop_string(client):
    """vLLM's include_stop_str_in_output (extra_body): the text ends with the stop string, whole
    and streamed, in completions and chat."""
    kw = dict(model=MODEL, prompt="stop here", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[10:13]
    expected = full[: full.find(stop) + len(stop)]
    keep = dict(model=MODEL, prompt="stop here", max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    r = client.completions.create(**keep, stop=[stop])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**keep, stop=[stop], stream=True))
    assert streamed == expected

    messages = [{"role": "user", "content": "stop here"}]
    ckw = dict(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**ckw, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[8:10]
    expected = full[: full.find(stop) + len(stop)]
    extra = {"ignore_eos": True, "include_stop_str_in_output": True}
    r = client.chat.completions.create(**ckw, stop=stop, extra_body=extra)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(**ckw, stop=stop, extra_body=extra, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_penalties_change_greedy_text(client):
    """presence / frequency (OpenAI's own parameters) and repetition_penalty (extra_body) reach the
    sampler: greedy text with a strong penalty is not the plain greedy text, and is reproducible."""
    kw = dict(model=MODEL, prompt="repeat", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                  {"extra_body": {"ignore_eos": True, "repetition_penalty": 2.0}}):
        args = {**kw, **extra}
        a, b = (client.completions.create(**args).choices[0].text for _ in range(2))
        assert a == b and a != plain, extra


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
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == expected_tokens
    assert (after['vllm:request_success_total{finished_reason="length"}']
            - before.get('vllm:request_success_total{finished_reason="length"}', 0)) == 64
    assert after["vllm:time_to_first_token_seconds_count"] - before["vllm:time_to_first_token_seconds_count"] == 64


def test_metrics_are_valid_prometheus_text(server):
    from prometheus_client import parser  # a dev dependency: always installed
    text = httpx.get(f"{server}/metrics", timeout=10).text
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    states = {s.labels["state"]: s.value for s in families["kvlab:kv_cache_bytes"].samples}
    assert set(states) == {"token_states", "reservation", "internal_frag", "external_frag", "idle_mapped", "free"}
    assert sum(states.values()) == families["kvlab:kv_cache_capacity_bytes"].samples[0].value
    for name in ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds"):
        assert families[name].type == "histogram"
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "kvlab:prefix_cache_hit_rate", "vllm:prompt_tokens", "vllm:generation_tokens"):
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
     400, "min_tokens", "invalid_value"),
    ("logprobs", "/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 99}, AUTH, 400, "logprobs",
     "invalid_value"),
    ("token outside vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, AUTH, 400, "prompt", None),
    ("no messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, AUTH, 400, "messages",
     "invalid_value"),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, AUTH,
     400, "messages", "invalid_value"),
    ("top_logprobs alone", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                    "top_logprobs": 2}, AUTH, 400, "top_logprobs", "invalid_value"),
    ("penalty", "/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, AUTH, 400,
     "presence_penalty", "invalid_value"),
    ("repetition_penalty", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                    "repetition_penalty": 0}, AUTH, 400, "repetition_penalty",
     "invalid_value"),
    ("min_p", "/v1/completions", {"model": MODEL, "prompt": "hi", "min_p": 2}, AUTH, 400, "min_p", "invalid_value"),
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
    aborts = before.get('vllm:request_success_total{finished_reason="abort"}', 0)
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
            assert held["vllm:num_requests_running"] == 1
            assert held['kvlab:kv_cache_bytes{state="free"}'] < held["kvlab:kv_cache_capacity_bytes"]
        # leaving the block closes the connection mid-stream
    after = wait_metrics(server, lambda m: pool_empty(m) and m.get(
        'vllm:request_success_total{finished_reason="abort"}', 0) == aborts + 1)
    assert pool_empty(after)
    assert after['vllm:request_success_total{finished_reason="abort"}'] == aborts + 1
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 3 <= generated < MAX_MODEL_LEN - 32  # it stopped early, not at max_tokens


def test_disconnect_while_waiting_for_a_whole_response_frees_memory(server):
    before = metrics(server)
    aborts = before.get('vllm:request_success_total{finished_reason="abort"}', 0)

    async def run():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=30) as http:
            task = asyncio.create_task(http.post("/v1/chat/completions", json=_long_request(False)))
            deadline = time.monotonic() + 10
            while metrics(server)["vllm:num_requests_running"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not task.done(), "the request finished before the client could leave"
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    after = wait_metrics(server, lambda m: pool_empty(m) and m.get(
        'vllm:request_success_total{finished_reason="abort"}', 0) == aborts + 1)
    assert pool_empty(after)
    assert after['vllm:request_success_total{finished_reason="abort"}'] == aborts + 1


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
        stream = await async_engine.add_request("long", SamplingParams(max_tokens=50, ignore_eos=True), "long")
        await stream.__anext__()
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("late", SamplingParams(), "late")

    asyncio.run(run())
    assert not async_engine.is_running and not async_engine._reader.is_alive()
    assert async_engine.stats().num_requests_running == 0 and async_engine.stats().memory.free == \
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


def test_a_fault_fails_one_stream_while_the_others_complete(async_engine):
    """A step that raises only for one request: that stream ends with an error output, the
    concurrent ones complete with the tokens of a clean run, the pool ends empty, the engine lives."""
    from engine import SamplingParams

    engine = async_engine.engine
    real = engine.runner.launch

    def launch(batch, inflight=None):
        if any(s.request_id == "bad" for s in batch.seqs):
            raise RuntimeError("injected fault")
        return real(batch, inflight)

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, output_kind="delta")

    async def collect(rid: str, prompt: list[int]):
        toks, last = [], None
        async for out in async_engine.generate(prompt, params, rid):
            toks += out.outputs[0].token_ids if out.outputs else []
            last = out
        return toks, last

    async def run(prompts: dict[str, list[int]]):
        return dict(zip(prompts, await asyncio.gather(*(collect(r, p) for r, p in prompts.items()))))

    prompts = {f"ok{i}": list(range(5 + i, 12 + 2 * i)) for i in range(6)}
    clean = asyncio.run(run(prompts))
    engine.runner.launch = launch
    got = asyncio.run(run({**prompts, "bad": [7, 8, 9]}))
    engine.runner.launch = real
    assert got["bad"][1].finished and got["bad"][1].error and got["bad"][1].outputs[0].finish_reason == "error"
    assert {r: got[r][0] for r in prompts} == {r: clean[r][0] for r in prompts}
    deadline = time.monotonic() + 5
    while async_engine.stats().memory.free != async_engine.stats().memory.capacity and time.monotonic() < deadline:
        time.sleep(0.01)
    assert async_engine.stats().memory.free == async_engine.stats().memory.capacity
    assert async_engine.is_running and async_engine.stats().finished_total.get("error") == 1


def test_fast_chunks_equal_pydantic_chunks():
    """The streaming hot path formats its JSON by hand; it must say exactly what the models say."""
    from engine import SamplingParams
    from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from engine.serving import responses
    from engine.serving.protocol import (ChatCompletionChunk, ChatStreamChoice, CompletionChoice, CompletionChunk,
                                         DeltaMessage)

    params = SamplingParams(n=2, max_tokens=4)
    texts = ['plain', 'quote " and \\ back\nslash', 'ünïcødé ✓ 🎉', '']
    for j, (text, reason) in enumerate(zip(texts, [None, None, "stop", "length"])):
        out = RequestOutput("r", [1, 2], [CompletionOutput(1, [5], text, reason)], reason is not None,
                            RequestMetrics(0.0, None, None, None))
        cmpl = responses.CompletionChunker(None, 'id-"x"', "m/ü", params, 2, False)
        got = [json.loads(e[6:]) for e in cmpl.on_output(1, out)]
        want = CompletionChunk(id='id-"x"', created=cmpl.created, model="m/ü", choices=[
            CompletionChoice(index=3, text=text, finish_reason=reason)]).model_dump(exclude={"usage"})
        assert got == ([want] if text or reason else [])
        chat = responses.ChatChunker(None, "c", "m", params, None, False)
        got = [json.loads(e[6:]) for e in chat.on_output(0, out)]
        want = [ChatCompletionChunk(id="c", created=chat.created, model="m", choices=[ChatStreamChoice(
            index=1, delta=d, finish_reason=r)]).model_dump(exclude={"usage"})
            for d, r in ([(DeltaMessage(content=text), None)] if text else []) +
            ([(DeltaMessage(), reason)] if reason else [])]
        assert got == want


@pytest.mark.parametrize("kind", ["delta", "cumulative", "final_only"])
def test_front_end_stop_strings_end_the_sample_in_the_core(async_engine, kind):
    """Text and stop strings are the front end's: the stop string never reaches the caller, the
    core ends the samples there (its KV freed long before max_tokens), each output kind holds."""
    from engine import SamplingParams

    prompt = [5, 9, 14, 20, 27]

    async def run(params, rid):
        outs = [o async for o in async_engine.generate(prompt, params, rid)]
        return outs

    ref = asyncio.run(run(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), f"ref-{kind}"))[-1]
    text = ref.outputs[0].text
    stop = text[6:9]
    before = async_engine.stats().generation_tokens_total
    outs = asyncio.run(run(SamplingParams(n=2, max_tokens=40, temperature=0, ignore_eos=True, stop=[stop],
                                          output_kind=kind), f"stop-{kind}"))
    final = outs[-1]
    assert final.finished
    if kind == "final_only":
        assert len(outs) == 1
    for j in range(2):
        if kind == "delta":
            got = "".join(c.text for o in outs for c in o.outputs if c.index == j)
            reasons = [c.finish_reason for o in outs for c in o.outputs if c.index == j and c.finish_reason]
            assert reasons == ["stop"]
        else:
            c = next(c for c in final.outputs if c.index == j)
            got = c.text
            assert (c.finish_reason, c.stop_reason) == ("stop", stop)
        assert got == text[:text.find(stop)]
    # the core stopped both samples within a step or two of the stop string, not at max_tokens
    generated = async_engine.stats().generation_tokens_total - before
    assert generated < 2 * 40 and async_engine.stats().memory.free == async_engine.stats().memory.capacity


def test_engine_process_death_fails_requests_and_tells_the_server():
    """`kvlab serve`'s engine runs in its own process: if it dies, open requests fail, new ones get
    EngineDeadError, and the dead listener (the server's exit-non-zero hook) is told why."""
    import signal as sig

    from engine import SamplingParams
    from engine.async_engine import AsyncLLMEngine, EngineDeadError
    from engine.config import EngineConfig

    ae = AsyncLLMEngine.start_process(EngineConfig(model="tiny-llama", device="cpu", max_model_len=128,
                                                   kv_cache_tokens=1024))
    told: list[str] = []
    ae.add_dead_listener(told.append)

    async def run():
        out = [o async for o in ae.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0), "a")][-1]
        assert out.finished and len(out.token_ids) == 3
        stream = await ae.add_request([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True), "b")
        os.kill(ae._proc.pid, sig.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await ae.add_request([5], SamplingParams(), "c")

    try:
        asyncio.run(run())
        assert not ae.is_running and told and "exited with code" in told[0]
    finally:
        ae.shutdown(timeout=5)


def test_front_end_text_with_a_byte_level_bpe_tokenizer(tmp_path):
    """A local HF directory with a real (byte-level BPE) tokenizer: streamed text, decoded a few
    tokens at a time in the front end, equals decoding the whole output at once, and each token's
    bytes are its own (a token may hold part of a UTF-8 character)."""
    from conftest import make_bpe_tokenizer, make_hf_checkpoint
    from engine import SamplingParams
    from engine.async_engine import AsyncLLMEngine
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    make_hf_checkpoint(tmp_path, "llama", vocab_size=320)
    make_bpe_tokenizer("hello world ünïcødé ✓ the quick brown fox jumps over the lazy dog").save_pretrained(tmp_path)
    ae = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", max_model_len=128,
                                               kv_cache_tokens=1024)))

    async def run():
        params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True, output_kind="delta")
        return [o async for o in ae.generate("hello ünïcødé ✓", params, "a")]

    try:
        outs = asyncio.run(run())
        ids = [t for o in outs for c in o.outputs for t in c.token_ids]
        text = "".join(c.text for o in outs for c in o.outputs)
        assert len(ids) == 40 and text == ae.tokenizer.decode(ids)
        special = set(ae.tokenizer.tok.all_special_ids)  # no text of their own (skipped when decoding)
        raw = b"".join(bytes(ae.token_bytes(t)) for t in ids if t not in special)
        assert raw.decode("utf-8", errors="replace") == text
    finally:
        ae.shutdown()


def test_merge_deltas_concatenates_without_touching_the_inputs():
    from engine.frontend_output import merge_deltas
    from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

    m = RequestMetrics(0.0, None, None, None)
    outs = [RequestOutput("r", [1], [CompletionOutput(0, [5], "a", None, None, [-0.1], [1.0], [[(5, -0.1)]]),
                                     CompletionOutput(1, [7], "x", None)], False, m),
            RequestOutput("r", [1], [CompletionOutput(0, [6, 8], "bc", None, None, [-0.2, -0.3], [2.0, 3.0],
                                                      [[(6, -0.2)], [(8, -0.3)]])], False, m),
            RequestOutput("r", [1], [CompletionOutput(0, [], "", "stop", "z", [], [], [])], True, m)]
    got = merge_deltas(outs)
    c0, c1 = got.outputs
    assert (c0.token_ids, c0.text, c0.logprobs, c0.token_times) == ([5, 6, 8], "abc", [-0.1, -0.2, -0.3],
                                                                    [1.0, 2.0, 3.0])
    assert c0.top_logprobs == [[(5, -0.1)], [(6, -0.2)], [(8, -0.3)]] and (c0.finish_reason, c0.stop_reason) == (
        "stop", "z")
    assert (c1.index, c1.token_ids, c1.text, c1.logprobs) == (1, [7], "x", None) and got.finished
    assert outs[0].outputs[0].token_ids == [5] and outs[0].outputs[0].logprobs == [-0.1]
