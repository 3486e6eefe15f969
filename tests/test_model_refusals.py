"""Configs kvlab cannot run faithfully are refused, never run silently wrong."""
import json

import pytest
import torch

from conftest import make_hf_checkpoint
from engine import LLM, SamplingParams
from engine.model_config import ModelConfig

pytest.importorskip("transformers")


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
    assert ModelConfig.from_hf_dict(on).sliding_window is None  # layers below max_window_layers (28): full
    on["max_window_layers"] = 0
    assert ModelConfig.from_hf_dict(on).layer_windows() == [4096, 4096]
    mixed = _cfg(model_type="qwen3", sliding_window=512, layer_types=["sliding_attention", "full_attention"])
    assert ModelConfig.from_hf_dict(mixed).sliding_window is None  # HF: off without use_sliding_window
    on = ModelConfig.from_hf_dict({**mixed, "use_sliding_window": True})
    assert on.sliding_window == 512 and on.layer_windows() == [512, 0]
    # Qwen's default: layers from max_window_layers on slide
    deep = ModelConfig.from_hf_dict(_cfg(model_type="qwen2", sliding_window=64, use_sliding_window=True,
                                         num_hidden_layers=4, max_window_layers=3))
    assert deep.layer_windows() == [0, 0, 0, 64]
    assert ModelConfig.from_hf_dict(_cfg(model_type="mistral", sliding_window=32)).layer_windows() == [32, 32]
    with pytest.raises(ValueError, match="not attention kvlab runs"):
        ModelConfig(num_hidden_layers=2, sliding_window=8, layer_types=["sliding_attention", "chunked_attention"])
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


@pytest.mark.parametrize("eos", ["2", [2, None], 320, -5, 2.0])
def test_eos_ids_outside_the_vocabulary_are_refused_naming_the_field(eos):
    """An EOS id that is no id of the vocabulary (config.json or hf_overrides) failed every request
    with min_tokens inside a step (the sampler bans EOS by index): IndexError / RuntimeError, the
    request's finish_reason "error"; a negative one banned another token instead."""
    with pytest.raises(ValueError, match=r"eos_token_id=.* not a token id .* vocabulary \[0, 320\).*config.json"):
        ModelConfig.from_hf_dict(_cfg(model_type="llama", eos_token_id=eos))
    with pytest.raises(ValueError, match=r"bos_token_id=.* not a token id"):
        ModelConfig.from_hf_dict(_cfg(model_type="llama", bos_token_id=320))


def test_a_null_eos_means_no_eos_and_min_tokens_still_runs(tmp_path):
    """config.json's ``"eos_token_id": null`` (a real HF config may have it) became [None]: every
    request with min_tokens then failed with finish_reason "error"."""
    make_hf_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["eos_token_id"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.from_dir(tmp_path).eos_token_id == []
    llm = LLM(str(tmp_path), device="cpu", max_model_len=64)
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, min_tokens=2, temperature=0))
    assert out.outputs[0].finish_reason == "length" and len(out.token_ids) == 4


@pytest.mark.parametrize("fields, expected", [
    (dict(rms_norm_eps=-1.0), "rms_norm_eps=-1.0 must be a finite number > 0"),  # ran: NaN, every token 0
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps='1e-6' must be a finite number > 0"),
    (dict(rope_theta=0), "rope_theta=0 must be a finite number > 0"),
    (dict(rope_theta=[1]), r"rope_theta=\[1\] must be"),  # TypeError
    (dict(rope_parameters={"rope_theta": float("nan"), "rope_type": "default"}), "rope_theta=nan must be"),
    (dict(rope_parameters="x"), "rope_parameters='x' in config.json is not an object"),  # AttributeError
    (dict(rope_scaling="linear"), "rope_scaling='linear' is not an object"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "rope_scaling.factor=0 must be"),  # ran: NaN
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling.low_freq_factor=None"),  # KeyError
    (dict(model_type="mistral", sliding_window=4.5), "sliding_window must be a positive int"),  # cut to 4
])
def test_rope_and_norm_numbers_are_checked_naming_the_field(fields, expected):
    """config.json's RoPE and RMSNorm numbers are hostile input too: a NaN, zero or negative value ran
    and every output token was 0 (NaN hidden states), a text or a malformed scaling failed with a
    TypeError / KeyError / AttributeError while the model was built."""
    with pytest.raises(ValueError, match=expected):
        ModelConfig.from_hf_dict(_cfg(**{"model_type": "llama", **fields}))


def test_a_negative_norm_eps_through_hf_overrides_is_refused_before_the_model_runs():
    with pytest.raises(ValueError, match=r"rms_norm_eps=-1.0 must be a finite number > 0 .*hf_overrides"):
        LLM("tiny-llama", device="cpu", hf_overrides={"rms_norm_eps": -1.0})


@pytest.mark.parametrize("fields, expected", [
    (dict(max_window_layers="28"), "max_window_layers='28' is not a model size"),  # int() took the text
    (dict(max_window_layers="x"), "max_window_layers='x' is not a model size"),  # ValueError naming nothing
    (dict(max_window_layers=None), "max_window_layers=None is not a model size"),  # TypeError
    (dict(max_window_layers=-1), r"max_window_layers=-1 is not a model size: give a whole number in \[0, "),  # all slid
    (dict(num_hidden_layers="2"), "num_hidden_layers='2' is not a model size"),  # TypeError in range()
])
def test_qwen_window_layer_counts_are_checked_naming_the_field(fields, expected):
    """A Qwen config with use_sliding_window reads max_window_layers and num_hidden_layers to lay out
    its sliding layers, before the size checks: a wrong type crashed naming no field."""
    d = _cfg(model_type="qwen2", sliding_window=64, use_sliding_window=True, **fields)
    with pytest.raises(ValueError, match=rf"custom: {expected}.*\(config.json\)"):
        ModelConfig.from_hf_dict(d)


def test_qwen_window_layer_counts_missing_or_beyond_the_layers():
    d = _cfg(model_type="qwen2", sliding_window=64, use_sliding_window=True)
    del d["num_hidden_layers"]  # KeyError (now refused with every missing size, before the windows)
    with pytest.raises(ValueError, match=r"config.json gives no num_hidden_layers"):
        ModelConfig.from_hf_dict(d)
    # real Qwen2.5 configs: max_window_layers above the layer count, so no layer slides
    big = ModelConfig.from_hf_dict(_cfg(model_type="qwen2", sliding_window=64, use_sliding_window=True,
                                        max_window_layers=70))
    assert big.sliding_window is None and big.layer_windows() == [0, 0]


@pytest.mark.parametrize("fields", [
    dict(tie_word_embeddings="false"),
    dict(tie_word_embeddings=0),
    dict(attention_bias="false"),
    dict(model_type="qwen2", attention_bias="no"),
    dict(model_type="qwen2", sliding_window=64, use_sliding_window="false"),  # every layer slid
])
def test_boolean_fields_of_config_json_must_be_booleans(fields):
    """bool("false") is True: a text false was taken as true (a window turned on, a bias or a tied
    lm_head that the checkpoint does not have), failing later naming another thing or not at all."""
    (field, value), = [(k, v) for k, v in fields.items() if k not in ("model_type", "sliding_window")]
    with pytest.raises(ValueError, match=rf"custom: {field}={value!r} is not a boolean: give true or false"):
        ModelConfig.from_hf_dict(_cfg(**{"model_type": "llama", "max_window_layers": 0, **fields}))


def test_null_booleans_keep_their_defaults():
    null = dict(tie_word_embeddings=None, attention_bias=None, use_sliding_window=None, sliding_window=64)
    assert not ModelConfig.from_hf_dict(_cfg(model_type="llama", **null)).tie_word_embeddings
    qwen = ModelConfig.from_hf_dict(_cfg(model_type="qwen2", **null))
    assert qwen.attention_bias and qwen.sliding_window is None  # Qwen2's bias; no window unless turned on


def test_a_text_false_in_a_saved_folder_or_hf_overrides_is_refused_naming_the_field(tmp_path):
    """The saved untied model with ``"tie_word_embeddings": "false"`` failed at load with "checkpoint
    tensor 'lm_head.weight' has no place in the kvlab model", which does not name the cause."""
    make_hf_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": "false"}))
    with pytest.raises(ValueError, match=r"tie_word_embeddings='false' is not a boolean: give true or false"):
        LLM(str(tmp_path), device="cpu", max_model_len=64)
    with pytest.raises(ValueError, match=r"qk_norm='false' is not a boolean: .*engine.hf_overrides"):
        LLM("tiny-llama", device="cpu", hf_overrides={"qk_norm": "false"})


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads"])
@pytest.mark.parametrize("how", ["missing", "null"])
def test_a_size_config_json_leaves_out_is_refused_not_taken_from_a_tiny_default(key, how):
    """A size left out of config.json (or null) took the dataclass's tiny default (2 layers, hidden 64):
    simulate then timed a model of another shape without a word."""
    d = _cfg(model_type="llama")
    if how == "missing":
        del d[key]
    else:
        d[key] = None
    with pytest.raises(ValueError, match=rf"config.json gives no {key}: restore"):
        ModelConfig.from_hf_dict(d)


def test_no_num_key_value_heads_is_one_kv_head_a_query_head_as_in_hf():
    d = _cfg(model_type="llama")
    del d["num_key_value_heads"]
    assert ModelConfig.from_hf_dict(d).num_key_value_heads == 4
    with pytest.raises(ValueError, match="num_key_value_heads=0"):  # a zero is refused, not replaced
        ModelConfig.from_hf_dict(_cfg(model_type="llama", num_key_value_heads=0))


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_a_text_layer_types_is_refused_naming_the_field(model_type):
    """A text layer_types was split into characters (Qwen: "layers" 's', 'l', ...), or ignored where it
    held no "sliding_attention"; through hf_overrides it reaches the dataclass directly."""
    d = _cfg(model_type="qwen2", sliding_window=64, use_sliding_window=True, layer_types="full_attention")
    with pytest.raises(ValueError, match=r"layer_types='full_attention' must be a list"):
        ModelConfig.from_hf_dict(d)
    with pytest.raises(ValueError, match=r"layer_types='sliding_attention' must be a list"):
        ModelConfig(model_type=model_type, layer_types="sliding_attention", sliding_window=8)
