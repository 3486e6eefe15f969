"""vLLM's ``skip_special_tokens``: true (the default) leaves special tokens' text out of the output,
false keeps it. The oracle is HF's ``tokenizer.decode(ids, skip_special_tokens=...)`` of the whole
output; the engine decodes incrementally (stop strings, streaming) and must agree. A stop token's
or EOS's text that ends a sample is left out either way (vLLM), unless include_stop_str_in_output."""
from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
import torch

from engine import LLM, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import ByteTokenizer

CORPUS = "hello world the quick brown fox jumps over the lazy dog"
BOS, EOS = 1, 2
PROMPTS = ["hello world", "the quick brown", "lazy dog", "fox jumps over"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama whose greedy outputs hold BOS: the lm_head row of the token it samples most is
    copied to BOS's (argmax takes the lower id of a tie), and EOS's to another frequent one's."""
    from conftest import make_bpe_tokenizer, make_hf_checkpoint

    path = tmp_path_factory.mktemp("special")
    hf = make_hf_checkpoint(path, "llama", vocab_size=300, seed=3)
    tok = make_bpe_tokenizer(CORPUS)
    tok.save_pretrained(path)
    counts = Counter()
    for p in PROMPTS:
        ids = hf.generate(torch.tensor([tok.encode(p)]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        counts.update(t for t in ids[0, -24:].tolist() if t > EOS)
    (top, _), (second, _) = counts.most_common(2)
    with torch.no_grad():
        hf.lm_head.weight[BOS] = hf.lm_head.weight[top]
        hf.lm_head.weight[EOS] = hf.lm_head.weight[second]
    hf.save_pretrained(str(path), safe_serialization=True)
    return str(path), tok


def _generate(llm, **kw):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **kw)
    return llm.generate(PROMPTS, params)


@pytest.mark.parametrize("stop", [[], ["never in this text"]], ids=["whole", "incremental"])
def test_output_text_is_hf_decode_with_or_without_special_tokens(model_dir, stop):
    path, tok = model_dir
    llm = LLM(path, device="cpu", max_model_len=128, kv_cache_tokens=2048)
    kept, skipped = _generate(llm, skip_special_tokens=False, stop=stop), _generate(llm, stop=stop)
    ids = [o.token_ids for o in kept]
    assert ids == [o.token_ids for o in skipped]
    assert any(BOS in i for i in ids) and any(EOS in i for i in ids)  # the model does sample them
    assert [o.text for o in kept] == [tok.decode(i, skip_special_tokens=False) for i in ids]
    assert [o.text for o in skipped] == [tok.decode(i, skip_special_tokens=True) for i in ids]
    assert any("<s>" in o.text for o in kept) and not any("<s>" in o.text or "</s>" in o.text for o in skipped)


def test_streamed_deltas_keep_special_tokens_too(model_dir):
    path, tok = model_dir
    llm = LLM(path, device="cpu", max_model_len=128, kv_cache_tokens=2048)
    engine = llm.engine
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, skip_special_tokens=False,
                            output_kind="delta")
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    text, ids = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0] if out.outputs else None
            if c is not None:
                text[out.request_id] = text.get(out.request_id, "") + c.text
                ids[out.request_id] = ids.get(out.request_id, []) + list(c.token_ids)
    assert len(ids) == len(PROMPTS)
    assert any(BOS in v for v in ids.values())
    for rid in ids:
        assert text[rid] == tok.decode(ids[rid], skip_special_tokens=False)


def test_the_stop_token_s_text_is_left_out_unless_include_stop_str_in_output(model_dir):
    """A sample that ends on a stop token (here BOS, named in stop_token_ids): its text is not in
    the output even with skip_special_tokens=false (vLLM), and is with include_stop_str_in_output."""
    path, tok = model_dir
    llm = LLM(path, device="cpu", max_model_len=128, kv_cache_tokens=2048)
    plain = _generate(llm, skip_special_tokens=False, stop_token_ids=[BOS])
    kept = _generate(llm, skip_special_tokens=False, stop_token_ids=[BOS], include_stop_str_in_output=True)
    stopped = [i for i, o in enumerate(plain) if o.outputs[0].finish_reason == "stop"]
    assert stopped
    for i in stopped:
        ids = plain[i].token_ids
        assert ids[-1] == BOS and kept[i].token_ids == ids
        assert plain[i].text == tok.decode(ids[:-1], skip_special_tokens=False)
        assert kept[i].text == tok.decode(ids, skip_special_tokens=False) and kept[i].text.endswith("<s>")


def test_byte_tokenizer_prints_special_ids_only_when_kept():
    tok = ByteTokenizer(300, bos_token_id=1, eos_token_ids=[2])
    ids = tok.encode("hi") + [2, 0] + tok.encode("!")[1:]
    assert tok.decode(ids) == "hi!"
    assert tok.decode(ids, skip_special_tokens=False) == "<1>hi<2><0>!"
    det = IncrementalDetokenizer(tok, [1], [], skip_special_tokens=False)
    det.add(ids[1:])
    det.flush()
    assert det.delta(finished=True) == "hi<2><0>!"


def test_sampling_params_refuse_a_non_boolean():
    with pytest.raises(ValueError, match="skip_special_tokens must be true or false"):
        SamplingParams(skip_special_tokens="no")
    assert SamplingParams().skip_special_tokens is True


def test_server_takes_skip_special_tokens(model_dir):
    pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev)")
    import httpx

    from engine.async_engine import AsyncLLMEngine
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.serving.app import create_app

    path, tok = model_dir
    ae = AsyncLLMEngine(LLMEngine(EngineConfig(model=path, device="cpu", max_model_len=128, kv_cache_tokens=2048)))
    app = create_app(ae, "m")

    async def post(body):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as http:
            return await http.post("/v1/completions", json={"model": "m", "max_tokens": 24, "temperature": 0,
                                                            "ignore_eos": True, **body})

    try:
        texts = {}
        for skip in (False, True):
            r = asyncio.run(post({"prompt": PROMPTS, "skip_special_tokens": skip, "logprobs": 0}))
            assert r.status_code == 200, r.text
            texts[skip] = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert any("<s>" in t for t in texts[False]) and not any("<s>" in t for t in texts[True])
        assert [t.replace("<s>", "").replace("</s>", "") for t in texts[False]] == texts[True]
        r = asyncio.run(post({"prompt": "hello", "skip_special_tokens": "no"}))
        assert r.status_code == 400 and r.json()["error"]["param"] == "skip_special_tokens", r.text
        r = asyncio.run(post({"prompt": "hello", "spaces_between_special_tokens": False}))
        assert r.status_code == 400 and r.json()["error"]["param"] == "spaces_between_special_tokens", r.text
    finally:
        ae.shutdown()


def _ascii(text: str) -> str:
    """The text less its non-ASCII characters: a token that is part of a UTF-8 character reads as
    U+FFFD alone, and as the character in the whole text."""
    return "".join(ch for ch in text if ch < "\x80")


def test_logprobs_tokens_and_echo_follow_skip_special_tokens(model_dir):
    """The logprobs' token strings are the text's pieces (text_offset indexes the choice's text), with
    special tokens' text or without it as the text has it; so is an echoed token-id prompt."""
    pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev)")
    import httpx

    from engine.async_engine import AsyncLLMEngine
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.serving.app import create_app

    path, tok = model_dir
    ae = AsyncLLMEngine(LLMEngine(EngineConfig(model=path, device="cpu", max_model_len=128, kv_cache_tokens=2048)))
    app = create_app(ae, "m")

    async def post(route, body):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as http:
            return await http.post(route, json={"model": "m", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                                                **body})

    try:
        for skip in (False, True):
            prompts = [[BOS] + tok.encode(p) for p in PROMPTS]
            for echo in (False, True):
                r = asyncio.run(post("/v1/completions", {"prompt": prompts, "skip_special_tokens": skip,
                                                         "logprobs": 1, "echo": echo}))
                assert r.status_code == 200, r.text
                choices = r.json()["choices"]
                assert any("<s>" in c["text"] for c in choices) is not skip
                for c in choices:
                    lp = c["logprobs"]
                    assert _ascii("".join(lp["tokens"])) == _ascii(c["text"]), (skip, echo)
                    assert lp["tokens"].count("<s>") == c["text"].count("<s>"), (skip, echo)
            # streamed: each chunk's tokens are its text's pieces too
            r = asyncio.run(post("/v1/completions", {"prompt": prompts, "skip_special_tokens": skip, "logprobs": 1,
                                                     "echo": True, "stream": True}))
            assert r.status_code == 200, r.text
            text, tokens = {}, {}
            for line in r.text.splitlines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        text[c["index"]] = text.get(c["index"], "") + c["text"]
                        tokens[c["index"]] = tokens.get(c["index"], []) + (c["logprobs"] or {}).get("tokens", [])
            assert len(text) == len(PROMPTS) and any("<s>" in t for t in text.values()) is not skip
            for i in text:
                assert _ascii("".join(tokens[i])) == _ascii(text[i]) and tokens[i].count("<s>") == text[i].count("<s>")
            texts = []
            for p in PROMPTS:
                r = asyncio.run(post("/v1/chat/completions", {"messages": [{"role": "user", "content": p}],
                                                              "skip_special_tokens": skip, "logprobs": True}))
                assert r.status_code == 200, r.text
                c = r.json()["choices"][0]
                texts.append(c["message"]["content"])
                tokens = [t["token"] for t in c["logprobs"]["content"]]
                assert _ascii("".join(tokens)) == _ascii(c["message"]["content"]), skip
                assert tokens.count("<s>") == c["message"]["content"].count("<s>"), skip
            assert any("<s>" in t for t in texts) is not skip
    finally:
        ae.shutdown()
