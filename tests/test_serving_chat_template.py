"""Chat prompts through a model directory's own tokenizer and chat template (tiny HF checkpoint,
a byte-level BPE tokenizer whose encode adds BOS, as Llama's and Mistral's do).

The template writes BOS itself, so the chat endpoint must not add a second one (HF's
``apply_chat_template(tokenize=True)`` and vLLM's chat endpoint do not); a template that refuses
the messages (``raise_exception``: Gemma's "System role not supported", Mistral's alternating
roles) is the request's fault, a 400 naming ``messages``, not a 500.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest

pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev, which has it)")
pytest.importorskip("tokenizers", reason="HF tokenizers: a dependency of transformers")

BOS = 1
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ raise_exception('System role not supported') }}{% endif %}"
            "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def hf_app(tmp_path_factory):
    from conftest import make_bpe_tokenizer, make_hf_checkpoint
    from engine.async_engine import AsyncLLMEngine
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.serving.app import create_app

    path = tmp_path_factory.mktemp("hf_chat")
    make_hf_checkpoint(path, "llama", vocab_size=320)
    hf = make_bpe_tokenizer("hello world the quick brown fox jumps over the lazy dog", bos_post=True)
    hf.chat_template = TEMPLATE
    hf.save_pretrained(path)
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(path), device="cpu", max_model_len=128,
                                                   kv_cache_tokens=1024, record_memory=False)))
    yield create_app(engine, "m"), engine
    engine.shutdown()


def post(app, path: str, body: dict) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            return await http.post(path, json=body)

    return asyncio.run(run())


def test_chat_prompt_has_one_bos(hf_app):
    from engine.async_engine import ChatPrompt

    app, engine = hf_app
    messages = [{"role": "user", "content": "hello world"}]
    text, ids = asyncio.run(engine.tokenize(ChatPrompt(messages)))
    assert text.startswith("<s>") and ids[:2] != [BOS, BOS] and ids.count(BOS) == 1, ids
    assert ids == engine.tokenizer.tok.encode(text, add_special_tokens=False)
    chat = post(app, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    same = post(app, "/v1/completions", {"prompt": text[len("<s>"):], "max_tokens": 1})  # encode adds the BOS
    assert chat.status_code == 200 and same.status_code == 200, (chat.text, same.text)
    assert chat.json()["usage"]["prompt_tokens"] == same.json()["usage"]["prompt_tokens"] == len(ids)


def test_chat_template_refusal_is_400_naming_messages(hf_app):
    app, _ = hf_app
    r = post(app, "/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": "hello"}], "max_tokens": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "System role not supported" in err["message"], err
    ok = post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1})
    assert ok.status_code == 200, ok.text  # and the server goes on serving
