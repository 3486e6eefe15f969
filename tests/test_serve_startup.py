"""`kvlab serve` start-up errors and request-level messages (tiny-llama on CPU).

Start-up: a bad setting is one line on stderr naming the key and the fix, exit code 2, no
traceback, found before the model loads where it needs no model (the engine's own checks of
its device, allocator and pool included). Requests: NaN is not a number, a body that is not a
JSON object says so, a near miss of a request field is a 400 naming the field meant, and other
unknown fields are served and named in the ``X-Kvlab-Ignored-Fields`` response header.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev, which has it)")

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MODEL = "tiny"
BASE = ["device=cpu", "model=tiny-llama", "log_level=warning"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KVLAB_API_KEY", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def kvlab_serve(*overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``kvlab serve`` in a subprocess (killed if it outlives ``timeout``: it would be serving)."""
    cmd = [sys.executable, "-m", "experiments.cli", "serve", *BASE, *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"kvlab serve {' '.join(overrides)} did not exit within {timeout} s (it started?):\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_user_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, one line on stderr containing every fragment, no traceback, no engine built."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("kvlab serve: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert "KV cache:" not in r.stdout + r.stderr, "the engine (and its model) was built: " + r.stdout + r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# -- start-up: subprocess, as a user runs it ----------------------------------------------------
STARTUP_ERRORS = [
    # the engine's own checks, before the engine process loads the model
    ("block_size", ["allocator.args.block_size=0"], ["block_size=0", "between 1 and"]),
    ("kv_cache_tokens", ["engine.kv_cache_tokens=1"], ["KV pool of 1 tokens", "block_size"]),
    # Hydra's "not in struct", made one line naming the key and what exists
    ("top-level key", ["foo=1"], ["foo: no such key", "port", "log_level"]),
    ("limits key", ["limits.fo=1"], ["limits.fo: no such key", "max_n", "did you mean"]),
    ("misspelt top-level key", ["prot=8000"], ["prot: no such key", "did you mean port?"]),
    ("allocator option", ["allocator.args.blok_size=8"], ["allocator.args.blok_size", "allocator=paged",
                                                          "did you mean allocator.args.block_size?"]),
    ("log level", ["log_level=loud"], ["log_level=loud", "critical", "debug"]),
    ("host", ["host=256.1.1.1"], ["host=256.1.1.1", "host=127.0.0.1"]),
]


@pytest.mark.parametrize("name,overrides,fragments", STARTUP_ERRORS, ids=[e[0] for e in STARTUP_ERRORS])
def test_bad_setting_is_one_line_exit_2(name, overrides, fragments):
    assert_user_error(kvlab_serve(f"port={_free_port()}", *overrides), *fragments)


def test_device_cuda_without_cuda_is_one_line_exit_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert_user_error(kvlab_serve(f"port={_free_port()}", "device=cuda"), "device='cuda'", "device=cpu")


def test_port_in_use_is_one_line_exit_2_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = assert_user_error(kvlab_serve(f"host={HOST}", f"port={port}"), f"port={port}", "already in use")
    assert "port=0" in line  # the fix


# -- start-up: in-process, the checks come before the model loads -------------------------------
def _serve_config(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    from experiments import serve

    cfg = serve._compose([*BASE, *serve.check_overrides(list(overrides))])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def no_model_load(monkeypatch):
    """AsyncLLMEngine.start_process (which loads the model) fails the test if it is reached."""
    from engine.async_engine import AsyncLLMEngine

    def start_process(*a, **kw):
        raise AssertionError("the model started loading before the setting was checked")

    monkeypatch.setattr(AsyncLLMEngine, "start_process", classmethod(lambda cls, *a, **kw: start_process()))


@pytest.mark.parametrize("overrides,match", [
    (["allocator.args.block_size=0"], "block_size=0"),
    (["engine.kv_cache_tokens=1"], "KV pool of 1 tokens"),
    (["engine.max_model_len=100000"], "max_model_len=100000"),
    (["allocator=virtual", "allocator.args.page_size=1000"], "allocator.args.page_size=1000"),
    (["allocator=virtual", "allocator.args.backend=sim"], "backend 'sim'"),
    (["log_level=loud"], "log_level=loud"),
    (["access_log=maybe"], "access_log=maybe"),
    (["host=256.1.1.1"], "host=256.1.1.1"),
    (["host=null"], "host=null"),
    (["host=192.0.2.1"], "not an address of this machine"),  # TEST-NET-1: no machine's own address
    (["+engine.max_num_seq=4"], r"engine\.max_num_seq: .*did you mean engine\.max_num_seqs\?"),
])
def test_setting_is_refused_before_the_model_loads(no_model_load, overrides, match):
    from engine.serving import server

    cfg = _serve_config(f"port={_free_port()}", *overrides)
    with pytest.raises(ValueError, match=match):
        server.main(cfg)


def test_port_in_use_is_refused_before_the_model_loads(no_model_load):
    from engine.serving import server

    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"port={port}: .*already in use"):
            server.main(_serve_config(f"host={HOST}", f"port={port}"))
        with pytest.raises(ValueError, match=rf"port={port}: .*already in use"):  # localhost: each address
            server.check_listen("localhost", port)
    server.check_listen(HOST, 0)  # any free port
    server.check_listen(HOST, port)  # free again


@pytest.mark.parametrize("level,want", [("info", "info"), ("WARNING", "warning"), ("trace", "trace"), (10, 10)])
def test_log_levels_uvicorn_takes(level, want):
    from engine.serving.server import check_log_level

    assert check_log_level(level) == want


def test_a_near_miss_log_level_is_named():
    from engine.serving.server import check_log_level

    with pytest.raises(ValueError, match=r"log_level=warnin: .*did you mean log_level=warning\?"):
        check_log_level("warnin")


@pytest.mark.parametrize("overrides,match", [
    (["limits.foo=1"], r"^limits\.foo: no such key; limits has max_body_bytes"),
    (["foo=1"], r"^foo: no such key; kvlab serve takes .*port"),
    (["+foo=1"], r"^\+foo: no such key"),
    (["allocator.args.policy=pow2"], r"allocator=paged takes no such option; it takes block_size"),
    (["allocator.args.enable_prefix_caching=true"], r"engine\.enable_prefix_caching"),
    (["allocator=pagd"], r"did you mean allocator=paged\?"),
    (["device=gpu"], r"device=gpu: not a valid value"),
    (["port=abc"], r"port=abc: expects a number"),
    (["port=1,2"], r"runs one server"),
    (["engine.max_num_seq=3"], r"did you mean engine\.max_num_seqs\?"),
])
def test_overrides_are_checked_before_hydra(overrides, match):
    from experiments import serve
    from experiments.preflight import UserError

    with pytest.raises(UserError, match=match) as e:
        serve.check_overrides(overrides)
    assert "\n" not in str(e.value)


def test_allocator_option_its_yaml_lacks_is_added_as_in_kvlab_run():
    from experiments import serve

    out = serve.check_overrides(["allocator=virtual", "allocator.args.prefetch=false", "port=9000"])
    assert out == ["allocator=virtual", "++allocator.args.prefetch=false", "port=9000"]
    assert serve._compose(out).allocator.args.prefetch is False


def test_engine_that_cannot_start_is_one_line_exit_1(monkeypatch, capsys):
    """A fault of the engine process after the checks: one line, no traceback, exit code 1."""
    from engine.async_engine import AsyncLLMEngine
    from experiments import serve

    def start_process(cls, *a, **kw):
        raise RuntimeError("the engine could not start: weights of layer 3 are missing")

    monkeypatch.setattr(AsyncLLMEngine, "start_process", classmethod(start_process))
    monkeypatch.setattr(sys, "argv", ["kvlab serve", *BASE, f"port={_free_port()}"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as e:
        serve.main()
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["kvlab serve: the engine could not start: weights of layer 3 are missing"], err


def test_a_setting_the_engine_process_refuses_is_a_value_error(tmp_path):
    """A setting only the engine process finds (here a model folder without weights, found as the
    weights load) comes back as ValueError (kvlab serve: exit 2), a fault as RuntimeError."""
    pytest.importorskip("transformers")
    from conftest import make_hf_checkpoint

    from engine import EngineConfig
    from engine.async_engine import AsyncLLMEngine

    make_hf_checkpoint(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match=r"the engine could not start: no \*.safetensors in "):
        AsyncLLMEngine.start_process(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32",
                                                  max_model_len=64, kv_cache_tokens=256))


def test_python_m_experiments_serve_exits_with_the_code(tmp_path):
    """``python -m experiments.serve`` (the test servers' command) exits 2 too, not 0."""
    r = subprocess.run([sys.executable, "-m", "experiments.serve", "nope=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=_env())
    assert r.returncode == 2 and r.stderr.strip().startswith("kvlab serve: nope: no such key"), r.stderr


# -- requests ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    from engine import EngineConfig, LLMEngine
    from engine.async_engine import AsyncLLMEngine
    from engine.serving.app import create_app

    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=64,
                                                   kv_cache_tokens=1024, record_memory=False)))
    yield create_app(engine, MODEL)
    engine.shutdown()


def call(app, path: str, **kw) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            return await http.post(path, **kw)

    return asyncio.run(run())


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_non_finite_number_is_named_as_such(app, field, value):
    body = b'{"prompt": "hi", "max_tokens": 2, "%s": %s}' % (field.encode(), value)
    err = error_of(call(app, "/v1/completions", content=body, headers=JSON))
    assert err["param"] == field and "finite number" in err["message"], err
    assert "<=" not in err["message"] and "less than" not in err["message"], err


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_not_sent_as_json_says_so(app, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    err = error_of(call(app, "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}]}',
                        headers=headers))
    assert "JSON object" in err["message"] and "Content-Type: application/json" in err["message"], err
    assert str(content_type or "none") in err["message"] and "valid dictionary" not in err["message"], err


@pytest.mark.parametrize("body,what", [(b"[1, 2]", "an array"), (b'"hi"', "a string"), (b"3", "a number")])
def test_json_body_that_is_not_an_object_says_what_it_is(app, body, what):
    err = error_of(call(app, "/v1/completions", content=body, headers=JSON))
    assert err["message"] == f"The request body must be a JSON object (this one is {what}).", err


@pytest.mark.parametrize("path,body,param,meant", [
    ("/v1/completions", {"prompt": "Hi", "max_token": 3, "temprature": 0.5}, "max_token",
     ["max_token (did you mean max_tokens?)", "temprature (did you mean temperature?)"]),
    ("/v1/completions", {"prompt": "Hi", "maxTokens": 3}, "maxTokens", ["did you mean max_tokens?"]),
    ("/v1/completions", {"prompt": "Hi", "top-p": 0.5}, "top-p", ["did you mean top_p?"]),
    ("/v1/completions", {"prompt": "Hi", "streaming": True}, "streaming", ["did you mean stream?"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_token": 2},
     "max_completion_token", ["did you mean max_completion_tokens?"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "Temperature": 0.1},
     "Temperature", ["did you mean temperature?"]),
])
def test_near_miss_of_a_field_is_400_naming_the_field_meant(app, path, body, param, meant):
    err = error_of(call(app, path, json=body))
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "Unrecognized request argument" in err["message"], err
    for m in meant:
        assert m in err["message"], err


@pytest.mark.parametrize("path,body,param,where,meant", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "contnet": "hi"}]}, "messages", "messages.0",
     "contnet (did you mean content?)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"rol": "user", "content": "x"}]},
     "messages", "messages.1", "rol (did you mean role?)"),
    ("/v1/completions", {"prompt": "Hi", "stream": True, "stream_options": {"include_usge": True}},
     "stream_options", "stream_options", "include_usge (did you mean include_usage?)"),
])
def test_near_miss_inside_a_message_or_stream_options_is_400(app, path, body, param, where, meant):
    # ignored, the message would be sent empty and the usage chunk silently left out
    err = error_of(call(app, path, json=body))
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert f"{where}: Unrecognized request argument supplied: {meant}" in err["message"], err


def test_other_apis_fields_inside_a_message_are_served(app):
    msg = {"role": "assistant", "content": "a", "tool_calls": [], "refusal": None, "reasoning_content": "r"}
    r = call(app, "/v1/chat/completions", json={"messages": [msg, {"role": "user", "content": "hi"}], "max_tokens": 2,
                                                "stream": True, "stream_options": {"include_usage": True,
                                                                                   "continuous_usage_stats": True}})
    assert r.status_code == 200 and '"usage": {' in r.text.replace('"usage":{', '"usage": {'), r.text


def test_other_unknown_fields_are_served_and_named_in_a_header(app, caplog):
    from engine.serving.app import IGNORED_FIELDS_HEADER

    body = {"prompt": "Hi", "max_tokens": 2, "store": True, "metadata": {"a": "b"}, "prompt_logprobs": 1,
            "x_vendor\n\u00e9": 1}
    with caplog.at_level(logging.WARNING, logger="kvlab.serving"):
        r = call(app, "/v1/completions", json=body)
        r2 = call(app, "/v1/completions", json=body)
    assert r.status_code == 200 and r2.status_code == 200, r.text
    assert r.headers[IGNORED_FIELDS_HEADER] == "store, metadata, prompt_logprobs, x_vendor\\n\\xe9"
    warned = [rec.getMessage() for rec in caplog.records if "ignored request field" in rec.getMessage()]
    assert len(warned) == 1 and "'store'" in warned[0] and "'prompt_logprobs'" in warned[0], warned  # once
    plain = call(app, "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert plain.status_code == 200 and IGNORED_FIELDS_HEADER not in plain.headers


def test_streamed_response_names_ignored_fields_too(app):
    from engine.serving.app import IGNORED_FIELDS_HEADER

    r = call(app, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                "stream": True, "service_tier": "auto"})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
    assert r.headers[IGNORED_FIELDS_HEADER] == "service_tier"


@pytest.mark.parametrize("name,meant", [
    ("max_token", "max_tokens"), ("Max_Tokens", "max_tokens"), ("maxTokens", "max_tokens"), ("top-p", "top_p"),
    ("temprature", "temperature"), ("max_new_tokens", "max_tokens"),
    ("store", None), ("prompt_logprobs", None), ("top_a", None), ("metadata", None), ("foo", None), ("x", None),
])
def test_misspelt_field(name, meant):
    from engine.serving.protocol import CompletionRequest, misspelt_field

    assert misspelt_field(name, CompletionRequest.model_fields) == meant


def test_openai_client_fields_pass_and_a_typo_in_extra_body_is_a_bad_request(app):
    openai = pytest.importorskip("openai", reason="the real openai client: the dev extra (make setup)")

    async def run():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http, max_retries=0)
        ok = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=2, temperature=0.5,
            top_p=0.9, seed=1, user="me", stream_options=None, extra_body={"ignore_eos": True})
        with pytest.raises(openai.BadRequestError, match="did you mean ignore_eos"):
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"ignore_eso": True})
        await http.aclose()
        return ok

    ok = asyncio.run(run())
    assert ok.http_response.status_code == 200 and "x-kvlab-ignored-fields" not in ok.http_response.headers


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b'{"prompt": "hi", "model": "\\ud800x"}', 404, "model"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\udfff"}', 404, "model"),
    ("/v1/completions", b'{"prompt": "hi", "max_token\\ud800": 2}', 400, "max_token\\ud800"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "contnet\\ud800": "hi"}]}', 400, "messages"),
], ids=["model", "chat-model", "near-miss-field", "near-miss-in-message"])
def test_lone_surrogate_echoed_in_an_error_is_escaped_not_a_500(app, path, body, status, param):
    """JSON may carry a lone surrogate (``"\\ud800"``); an error message that quotes it (the model
    asked for, a misspelt field's name) is still sent, with the surrogate escaped, not a 500."""
    err = error_of(call(app, path, content=body, headers=JSON), status)
    assert err["param"] == param and "\\ud" in err["message"], err


def test_empty_body_says_it_is_empty(app):
    err = error_of(call(app, "/v1/completions", content=b"", headers=JSON))
    assert err["message"].startswith("The request body is empty") and "Content-Type: application/json" in \
        err["message"], err


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
], ids=["completions", "chat"])
@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_chunks_carry_usage_null_until_the_usage_chunk(app, path, body, include_usage):
    """OpenAI: with ``stream_options.include_usage`` every chunk has ``"usage": null`` but the last,
    which has the usage and no choices; without it no chunk has a usage key."""
    import json

    r = call(app, path, json={**body, "stream": True, "stream_options": {"include_usage": include_usage},
                              "ignore_eos": True})
    assert r.status_code == 200, r.text
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # a slow reader gets a choice's tokens coalesced into fewer chunks (as vLLM's stream may): at least one
    # chunk a choice, each with its choice, then the usage chunk where asked for
    content = chunks[:-1] if include_usage else chunks
    assert len(content) >= body.get("n", 1) and all(c["choices"] for c in content), chunks
    if include_usage:
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), chunks
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3 * body.get("n", 1)
    else:
        assert not any("usage" in c for c in chunks), chunks
