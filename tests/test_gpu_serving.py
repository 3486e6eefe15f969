"""The OpenAI-compatible server on a GPU: qwen3-0.6b-shaped random model, real HTTP on loopback.

Runs in-process (uvicorn in a thread) so it needs no Hydra; the CPU suite (test_serving.py)
covers `kvlab serve` itself and every error case.
"""
import asyncio
import json
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url():
    from engine import LLMEngine
    from engine.config import EngineConfig
    from engine.serving.server import build_server

    engine = LLMEngine(EngineConfig(model="qwen3-0.6b", allocator="paged", max_model_len=1024, max_num_seqs=64,
                                    gpu_memory_utilization=0.3, record_memory=False))
    port = _free_port()
    server, async_engine = build_server(engine, "qwen3-0.6b", port=port, access_log=False, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    assert server.started, "server did not come up"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    async_engine.shutdown()


def _metrics(base_url) -> dict[str, float]:
    """/metrics as {name{labels minus model_name}: value}."""
    import httpx

    out = {}
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            for label in ('model_name="qwen3-0.6b"', 'engine="0"'):  # on every series: left out of the key
                name = name.replace(label + ",", "").replace("," + label, "").replace(label, "")
            out[name.replace("{}", "")] = float(value)
    return out


def test_complete_chat_and_models(base_url):
    import httpx

    r = httpx.post(f"{base_url}/v1/completions", json={"model": "qwen3-0.6b", "prompt": "Hello GPU",
                                                         "max_tokens": 8, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
    r = httpx.post(f"{base_url}/v1/chat/completions", json={
        "model": "qwen3-0.6b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"] == "qwen3-0.6b"
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_64_concurrent_streams_then_pool_empty(base_url):
    import httpx

    async def one(client, i):
        chunks, done = [], False
        async with client.stream("POST", f"{base_url}/v1/completions", json={
                "model": "qwen3-0.6b", "prompt": f"stream {i}", "max_tokens": 32, "stream": True,
                "ignore_eos": True, "temperature": 0.7, "seed": i}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunks.append(json.loads(line[6:]))
        return done, chunks

    async def all_streams():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    t0 = time.perf_counter()
    results = asyncio.run(all_streams())
    wall = time.perf_counter() - t0
    assert all(done for done, _ in results)
    for _, chunks in results:
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0].get("text") is not None) >= 1
    m = _metrics(base_url)
    print(f"\n64 streams x 32 tokens on the GPU in {wall:.2f} s")
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m['kvlab:kv_cache_bytes{state="free"}'] == m["kvlab:kv_cache_capacity_bytes"]
