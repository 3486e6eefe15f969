"""A model directory without tokenizer files: token-id prompts run, text is an error, not bytes."""
from __future__ import annotations

import asyncio

import pytest

from conftest import make_hf_checkpoint
from engine import LLM, SamplingParams
from engine.tokenizer import TOKENIZER_FILES, ByteTokenizer, NoTokenizer, TokenizerMissingError, load_tokenizer

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    """save_pretrained writes config.json and model.safetensors, no tokenizer."""
    path = tmp_path_factory.mktemp("no_tokenizer")
    make_hf_checkpoint(path, "llama")
    assert not any((path / f).exists() for f in TOKENIZER_FILES)
    return path


@pytest.fixture(scope="module")
def llm(bare_dir):
    return LLM(model=str(bare_dir), device="cpu", max_model_len=64, kv_cache_tokens=256)


def test_token_id_prompts_still_work(llm):
    outs = llm.generate([[5, 6, 7, 8], [9, 10]], GREEDY)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
    assert all(o.outputs[0].text == "" for o in outs)  # no tokenizer, so no text: never byte garbage


def test_a_text_prompt_is_an_error_naming_the_directory_and_the_files(llm, bare_dir):
    with pytest.raises(TokenizerMissingError) as err:
        llm.generate("Hello", GREEDY)
    msg = str(err.value)
    assert str(bare_dir) in msg and "tokenizer.json" in msg and "tokenizer.model" in msg
    assert "token ids" in msg  # the way out that works without one


def test_stop_strings_are_an_error_too(llm):
    with pytest.raises(TokenizerMissingError, match="stop strings"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, stop=["."]))


def test_the_async_front_end_refuses_text_and_chat(llm):
    from engine.async_engine import AsyncLLMEngine, ChatPrompt

    ae = AsyncLLMEngine(llm.engine)
    try:
        async def run():
            with pytest.raises(TokenizerMissingError, match="text prompts"):
                await ae.tokenize("Hello")
            with pytest.raises(TokenizerMissingError, match="chat messages"):
                await ae.tokenize(ChatPrompt([{"role": "user", "content": "hi"}]))
            assert await ae.tokenize([1, 2, 3]) == (None, [1, 2, 3])

        asyncio.run(run())
    finally:
        ae.shutdown()


def test_presets_keep_their_byte_tokenizer():
    """Presets have random weights and no vocabulary of their own: bytes are their tokenizer."""
    tok = load_tokenizer("tiny-llama", 512, 1, [2])
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode("héllo")) == "héllo"
    out = LLM(model="tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256).generate("Hello", GREEDY)
    assert out[0].prompt_token_ids == ByteTokenizer(512).encode("Hello") and len(out[0].outputs[0].token_ids) == 6


def test_a_directory_with_tokenizer_files_loads_them(tmp_path, bare_dir):
    assert isinstance(load_tokenizer(str(bare_dir), 320, 1, [2]), NoTokenizer)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), 320, 1, [2])
    assert not isinstance(loaded, (NoTokenizer, ByteTokenizer)) and loaded.encode("hello world") == [3, 4]


def _word_tokenizer(path, eos_id: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "hello": 3, "world": 4, "</s>": eos_id},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def test_a_tokenizer_eos_beyond_the_models_vocabulary_does_not_fail_min_tokens(tmp_path):
    """The tokenizer's EOS (id 400) is past the model's vocabulary (320): it was added to the EOS ids,
    and every request with min_tokens failed inside a step (IndexError, finish_reason "error")."""
    make_hf_checkpoint(tmp_path, "llama")
    _word_tokenizer(tmp_path, 400)
    llm = LLM(model=str(tmp_path), device="cpu", max_model_len=64, kv_cache_tokens=256)
    assert llm.engine.eos_token_ids == [2]  # config.json's; the model cannot produce 400
    (out,) = llm.generate(["hello world"], SamplingParams(max_tokens=4, min_tokens=2, temperature=0))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("name, text", [("tokenizer.json", "{bad"), ("tokenizer.json", ""),
                                        ("tokenizer_config.json", "{bad")])
def test_damaged_tokenizer_files_are_named_with_the_fix(tmp_path, name, text):
    """A damaged tokenizer file failed the engine's start with JSON's own message ("Expecting value:
    line 1 column 1"), naming neither the file nor the folder."""
    _word_tokenizer(tmp_path, 2)
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=r"the tokenizer files in .* cannot be loaded .*save the tokenizer again") as e:
        load_tokenizer(str(tmp_path), 320, 1, [2])
    assert str(tmp_path) in str(e.value) and name in str(e.value)
