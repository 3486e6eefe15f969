"""Configs kvlab cannot run faithfully are refused or capped, never run silently wrong."""
import json

import pytest
import torch

from conftest import make_hf_checkpoint
from engine import LLM, SamplingParams
from engine.model_config import ModelConfig

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral_w8")
    return str(path), make_hf_checkpoint(path, "mistral", seed=3, sliding_window=8)


def test_a_window_shorter_than_max_model_len_is_refused(windowed_mistral):
    path, _ = windowed_mistral
    with pytest.raises(ValueError, match=r"sliding-window attention \(8 tokens\).*max_model_len <= 8"):
        LLM(path, device="cpu", max_model_len=64)


def test_max_model_len_left_to_the_engine_is_capped_to_the_window_and_matches_hf(windowed_mistral):
    """Up to the window full attention is sliding-window attention: HF's tokens, exactly."""
    path, hf = windowed_mistral
    llm = LLM(path, device="cpu", kv_cache_tokens=256)
    assert llm.engine.max_model_len == 8
    prompt = [5, 9, 17, 33]
    ours = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert ours == ref[0, len(prompt):].tolist()
    with pytest.raises(ValueError):  # a prompt beyond the window is refused, not cut
        llm.generate([list(range(5, 15))], SamplingParams(max_tokens=2))


def _cfg(**d):
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    return {**base, **d}


def test_which_configs_carry_a_window():
    assert ModelConfig.from_hf_dict(_cfg(model_type="mistral", sliding_window=4096)).sliding_window == 4096
    assert ModelConfig.from_hf_dict(_cfg(model_type="mistral", sliding_window=None)).sliding_window is None
    # Qwen2/3 configs carry a window that only use_sliding_window turns on
    assert ModelConfig.from_hf_dict(_cfg(model_type="qwen2", sliding_window=32768)).sliding_window is None
    on = _cfg(model_type="qwen2", sliding_window=4096, use_sliding_window=True)
    assert ModelConfig.from_hf_dict(on).sliding_window == 4096
    mixed = _cfg(model_type="qwen3", sliding_window=512, layer_types=["sliding_attention", "full_attention"])
    assert ModelConfig.from_hf_dict(mixed).sliding_window == 512
    assert ModelConfig.from_hf_dict(_cfg(model_type="llama", sliding_window=64)).sliding_window is None


def test_missing_model_type_and_unknown_architectures_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no model_type"):
        ModelConfig.from_hf_dict(_cfg())
    with pytest.raises(ValueError, match=r"architecture 'Gemma2ForCausalLM'.*LlamaForCausalLM"):
        ModelConfig.from_hf_dict(_cfg(model_type="llama", architectures=["Gemma2ForCausalLM"]))
    with pytest.raises(ValueError, match="architecture 'MistralForCausalLM'"):  # inconsistent with model_type
        ModelConfig.from_hf_dict(_cfg(model_type="llama", architectures=["MistralForCausalLM"]))
    assert ModelConfig.from_hf_dict(_cfg(model_type="qwen3", architectures=["Qwen3ForCausalLM"])).qk_norm
    (tmp_path / "config.json").write_text(json.dumps(_cfg(model_type="gemma2")))
    with pytest.raises(ValueError, match="model_type 'gemma2' is not supported"):
        LLM(str(tmp_path), device="cpu")
