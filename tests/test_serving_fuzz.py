"""Hypothesis fuzz of request bodies over full value ranges, in-process (tiny-llama on CPU).

Bodies mix every field both routes know with values of any JSON type and extreme ranges: huge
and negative integers (2**64, -2**63 - 1, 10**30), tiny and huge floats (1e-40, 5e-324, 1e308),
random strings, nested junk, stop token ids beyond the vocabulary, min_tokens, top_k up to
2**63, seeds, plus bodies that are not objects or not JSON at all. Whatever comes in: never a
5xx (nor a server error inside a stream), always OpenAI's error body with the field at fault,
and afterwards the engine is healthy and serves a normal request.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev, which has it)")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "tiny"
MAX_MODEL_LEN = 64
EXAMPLES = 250  # per route

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

EXTREME_INTS = [0, 1, -1, 2, 7, 20, 21, 511, 512, 10**6, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
                2**64, 2**64 + 1, -(2**31), -(2**63), -(2**63) - 1, -(2**64), 10**30, -(10**30)]
EXTREME_FLOATS = [0.0, -0.0, 1e-40, 5e-324, 1e-320, 1e-5, 1e-6, 0.5, 0.9999999, 1.0, 1.0000001, 2.0, 2.0000001,
                  3.5, 1e10, 1e308, -1e308, -1e-40, -0.5, 1.7976931348623157e308]

ints = st.one_of(st.sampled_from(EXTREME_INTS), st.integers(), st.integers(-(2**70), 2**70))
floats = st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(allow_nan=False, allow_infinity=False))
texts = st.one_of(st.text(max_size=24), st.sampled_from(["", " ", "\n", "\x00", "\ufffd", "é", "😀", "</s>", "a" * 300]))
leaf = st.one_of(st.none(), st.booleans(), ints, floats, texts)
junk = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                    max_leaves=8)
token_ids = st.lists(ints, max_size=6)


VOCAB = 512  # tiny-llama


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a value of the right shape over its full range, sometimes anything at all."""
    return st.one_of(plausible, plausible, plausible, junk)


# 1. chaos: every field any shape, full ranges (mostly refused: checks the refusals)
COMMON = {
    "model": field(st.sampled_from([MODEL, None, "gpt-9", ""])),
    "n": field(ints),
    "temperature": field(st.one_of(floats, ints)),
    "top_p": field(st.one_of(floats, ints)),
    "top_k": field(ints),
    "min_tokens": field(ints),
    "max_tokens": field(ints),
    "seed": field(ints),
    "stop": field(st.one_of(texts, st.lists(texts, max_size=6))),
    "stop_token_ids": field(token_ids),
    "ignore_eos": field(st.booleans()),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})),
    "presence_penalty": field(floats),
    "frequency_penalty": field(floats),
    "repetition_penalty": field(floats),
    "min_p": field(floats),
    "include_stop_str_in_output": field(st.booleans()),
    "logit_bias": field(st.dictionaries(texts, floats, max_size=3)),
    "user": field(texts),
}
COMPLETION = {
    **COMMON,
    "prompt": field(st.one_of(texts, st.lists(texts, max_size=6), token_ids, st.lists(token_ids, max_size=6))),
    "logprobs": field(ints),
    "echo": field(st.booleans()),
    "suffix": field(texts),
    "best_of": field(ints),
}
message = st.fixed_dictionaries({"role": field(st.sampled_from(["user", "system", "assistant", "tool", "robot"])),
                                 "content": field(st.one_of(texts, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=3)))})
CHAT = {
    **COMMON,
    "messages": field(st.lists(message, max_size=4)),
    "max_completion_tokens": field(ints),
    "logprobs": field(st.booleans()),
    "top_logprobs": field(ints),
    "tools": field(st.lists(junk, max_size=2)),
    "response_format": field(st.sampled_from([{"type": "text"}, {"type": "json_object"}])),
}

# 2. hostile but well-typed: the extremes of every range the server accepts, and just past them,
# so that most requests reach the engine (temperature 1e-40, seeds at +-2**63, top_k at 2**31 - 1,
# stop ids at and past the vocabulary with min_tokens, special tokens in prompts, ...)
small = st.integers(0, 8)
ids = st.lists(st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([0, 1, 2, VOCAB - 1])), min_size=1, max_size=8)
EDGE_COMMON = {
    "n": st.integers(1, 4),
    "temperature": st.sampled_from([0, 0.0, 1e-40, 5e-324, 1e-320, 1e-6, 1e-5, 0.5, 1, 2]),
    "top_p": st.sampled_from([5e-324, 1e-40, 1e-6, 0.5, 1, 1.0]),
    "top_k": st.one_of(st.sampled_from([-1, 0, 1, 2, VOCAB - 1, VOCAB, VOCAB + 1, 2**31 - 1, 2**31, 2**63]),
                       st.integers(-1, 2**31 - 1)),
    "seed": st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64]), st.integers(
        -(2**63), 2**63 - 1)),
    "min_tokens": small,
    "ignore_eos": st.booleans(),
    "stop": st.one_of(st.sampled_from(["\n", "a", "\ufffd", "😀", "x" * 256, "x" * 257]), st.lists(texts, max_size=5)),
    "stop_token_ids": st.lists(st.one_of(st.integers(0, VOCAB + 2), st.sampled_from([2, VOCAB - 1, VOCAB, 2**31 - 1])),
                               max_size=4),
    "stream": st.booleans(),
    # penalties and min_p at and just past their bounds (a whole vocabulary seen: tiny prompts, 512 ids)
    "presence_penalty": st.sampled_from([-2, -2.0, 0, 1.5, 2, 2.0000001]),
    "frequency_penalty": st.sampled_from([-2, 0.5, 2, -2.5]),
    "repetition_penalty": st.sampled_from([0.001, 0.5, 1, 1.3, 1000, 1000.5, 0]),
    "min_p": st.sampled_from([0, 5e-324, 0.5, 1, 1.0000001]),
    "include_stop_str_in_output": st.booleans(),
}
EDGE_COMPLETION = {
    **EDGE_COMMON,
    "max_tokens": st.one_of(small, st.sampled_from([None, MAX_MODEL_LEN - 1, MAX_MODEL_LEN])),
    "logprobs": st.sampled_from([None, 0, 1, 5, 20, 21]),
    "echo": st.booleans(),
    "prompt": st.one_of(texts, ids, st.lists(ids, min_size=1, max_size=4), st.lists(texts, min_size=1, max_size=4)),
}
EDGE_CHAT = {
    **EDGE_COMMON,
    "max_completion_tokens": st.one_of(st.integers(1, 8), st.sampled_from([None, MAX_MODEL_LEN - 1])),
    "logprobs": st.booleans(),
    "top_logprobs": st.sampled_from([None, 0, 1, 20]),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": texts}), min_size=1, max_size=3),
}


def bodies(fields: dict, edge: dict, required: str) -> st.SearchStrategy[bytes]:
    chaos = st.fixed_dictionaries({}, optional=fields)
    hostile = st.fixed_dictionaries({required: edge[required]}, optional={k: v for k, v in edge.items()
                                                                          if k != required})
    return st.one_of(hostile, hostile, hostile, chaos, chaos).map(lambda d: json.dumps(d).encode()) \
        | junk.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)


@pytest.fixture(scope="module")
def fuzz_app():
    from engine import EngineConfig, LLMEngine
    from engine.async_engine import AsyncLLMEngine
    from engine.serving.app import create_app
    from engine.serving.limits import ServerLimits

    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=MAX_MODEL_LEN,
                                                   kv_cache_tokens=2048, record_memory=False)))
    app = create_app(engine, MODEL, limits=ServerLimits(max_n=4, max_prompts_per_request=4))
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120)

    def post(path: str, content: bytes) -> httpx.Response:
        return loop.run_until_complete(client.post(path, content=content,
                                                   headers={"Content-Type": "application/json"}))

    def get(path: str) -> httpx.Response:
        return loop.run_until_complete(client.get(path))

    try:
        yield post, get, engine
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        engine.shutdown()


def check(r: httpx.Response, body: bytes) -> None:
    request = body[:400]
    assert r.status_code < 500, (r.status_code, r.text[:500], request)
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert "server_error" not in r.text, (r.text[-500:], request)
            assert r.text.endswith("data: [DONE]\n\n"), (r.text[-300:], request)
        return
    assert r.status_code in (400, 404), (r.status_code, r.text, request)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], (err, request)
    try:
        sent = json.loads(body)
    except ValueError:
        return
    if isinstance(sent, dict):  # a JSON object was refused: some field of it is at fault, and named
        assert err["param"] is not None, (err, request)


def _fuzz(route: str, strategy: st.SearchStrategy[bytes], fuzz_app) -> None:
    post, get, _ = fuzz_app

    @FUZZ
    @given(body=strategy)
    def run(body: bytes) -> None:
        check(post(route, body), body)

    run()


def _still_serving(fuzz_app) -> None:
    post, get, engine = fuzz_app
    assert engine.is_running
    assert get("/health").status_code == 200
    r = post("/v1/completions", json.dumps({"model": MODEL, "prompt": "still here", "max_tokens": 3,
                                            "ignore_eos": True}).encode())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    r = post("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                 "ignore_eos": True, "stream": True}).encode())
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text


def test_fuzz_completions_never_5xx(fuzz_app):
    _fuzz("/v1/completions", bodies(COMPLETION, EDGE_COMPLETION, "prompt"), fuzz_app)
    _still_serving(fuzz_app)


def test_fuzz_chat_completions_never_5xx(fuzz_app):
    _fuzz("/v1/chat/completions", bodies(CHAT, EDGE_CHAT, "messages"), fuzz_app)
    _still_serving(fuzz_app)
