"""Roofline cost model: shapes, monotonicity, the memory-bound decode limit, KV capacity."""
from __future__ import annotations

import pytest

from experiments.costmodel import (
    DEVICES, MODEL_SHAPES, ModelShape, RooflineCostModel, get_device, get_model_shape,
)

OPT13B, A100 = MODEL_SHAPES["opt-13b"], DEVICES["a100-40gb"]


@pytest.fixture
def cm() -> RooflineCostModel:
    return RooflineCostModel(OPT13B, A100)


def test_registries_hold_the_named_entries():
    assert {"a100-40gb", "a100-80gb", "h100-sxm", "h200"} <= set(DEVICES)
    assert {"opt-13b", "opt-66b", "llama2-7b", "llama2-13b", "llama3-8b", "qwen3-0.6b", "tiny-llama"} <= set(MODEL_SHAPES)
    assert get_device("h200").mem_bandwidth == 4.8e12
    with pytest.raises(ValueError, match="unknown device 'v100'.*a100-40gb"):
        get_device("v100")
    with pytest.raises(ValueError, match="unknown model shape 'gpt5'.*opt-13b"):
        get_model_shape("gpt5")


@pytest.mark.parametrize("name, billions", [
    ("opt-13b", 12.85), ("opt-66b", 65.7), ("llama2-7b", 6.74), ("llama2-13b", 13.0),
    ("llama3-8b", 8.03), ("qwen3-0.6b", 0.596),
])
def test_param_counts_match_published_sizes(name, billions):
    assert get_model_shape(name).num_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_kv_bytes_per_token():
    assert OPT13B.kv_bytes_per_token == 800 * 1024  # the PagedAttention paper's 800 KB
    assert MODEL_SHAPES["llama3-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # GQA: 8 kv heads
    tiny = MODEL_SHAPES["tiny-llama"]
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_heads, tiny.num_kv_heads, tiny.head_dim,
            tiny.intermediate_size, tiny.vocab_size) == (2, 64, 4, 2, 16, 128, 512)
    assert tiny.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2


def test_opt13b_a100_40gb_capacity_is_the_papers_15_7k(cm):
    assert cm.kv_capacity_tokens() == pytest.approx(15_700, rel=0.05)
    assert cm.kv_capacity_tokens(activation_reserve_bytes=10 * 819200) == cm.kv_capacity_tokens() - 10
    assert cm.kv_capacity_tokens(0.8) < cm.kv_capacity_tokens(0.9)


def test_model_that_does_not_fit_raises():
    with pytest.raises(ValueError, match="opt-66b.*leaves no KV memory.*a100-40gb"):
        RooflineCostModel(MODEL_SHAPES["opt-66b"], A100).kv_capacity_tokens()


def test_batch1_decode_is_memory_bound_at_weight_bytes_over_bandwidth():
    cm = RooflineCostModel(OPT13B, A100, efficiency=1.0, step_overhead_s=0.0)
    cost = cm.step_cost([(1, 128)])
    assert cost.memory_bound and cost.compute_s < 0.01 * cost.memory_s
    assert cm.step_time([(1, 128)]) == pytest.approx(OPT13B.weight_bytes / A100.mem_bandwidth, rel=0.01)
    # efficiency and overhead come on top of the physical limit
    real = RooflineCostModel(OPT13B, A100, efficiency=0.8, step_overhead_s=1e-3)
    assert real.step_time([(1, 128)]) == pytest.approx(cost.memory_s / 0.8 + 1e-3, rel=1e-9)


def test_long_prefill_is_compute_bound(cm):
    cost = cm.step_cost([(2048, 2048)])
    assert not cost.memory_bound
    assert cost.compute_s == pytest.approx(2 * OPT13B.num_params * 2048 / (A100.flops * 0.8), rel=0.1)


def test_step_time_monotonic_in_batch_size_and_context(cm):
    by_batch = [cm.step_time([(1, 512)] * b) for b in (1, 2, 8, 32, 128, 256)]
    assert all(a < b for a, b in zip(by_batch, by_batch[1:]))
    by_context = [cm.step_time([(1, c)] * 32) for c in (16, 256, 1024, 2048)]
    assert all(a < b for a, b in zip(by_context, by_context[1:]))
    by_chunk = [cm.step_time([(q, q)]) for q in (64, 512, 1024, 2048)]
    assert all(a < b for a, b in zip(by_chunk, by_chunk[1:]))


def test_kv_traffic_is_counted(cm):
    # 64 sequences of 1000 tokens read 64 * 1000 * 800 KiB of KV on top of the weights
    cost = cm.step_cost([(1, 1000)] * 64)
    assert cost.bytes == OPT13B.weight_bytes + 64 * 1000 * OPT13B.kv_bytes_per_token + 64 * OPT13B.kv_bytes_per_token


def test_causal_attention_flops():
    cm = RooflineCostModel(OPT13B, A100)
    # a chunk of 4 new tokens after 10 cached ones attends to 11 + 12 + 13 + 14 keys
    diff = cm.step_cost([(4, 14)]).flops - cm.step_cost([(4, 4)]).flops
    per_key = 4 * OPT13B.num_layers * OPT13B.num_heads * OPT13B.head_dim
    assert diff == per_key * ((11 + 12 + 13 + 14) - (1 + 2 + 3 + 4))


def test_empty_batch_takes_no_time(cm):
    assert cm.step_time([]) == 0.0


def test_faster_device_is_faster():
    batch = [(1, 1024)] * 64
    times = [RooflineCostModel(OPT13B, DEVICES[d]).step_time(batch) for d in ("a100-40gb", "a100-80gb", "h100-sxm", "h200")]
    assert all(a > b for a, b in zip(times, times[1:]))


def test_from_hf_config_matches_presets():
    llama3 = dict(model_type="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                  num_hidden_layers=32, intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192)
    assert ModelShape.from_hf_config(llama3, "llama3-8b") == MODEL_SHAPES["llama3-8b"]
    opt = dict(model_type="opt", hidden_size=5120, num_attention_heads=40, num_hidden_layers=40, ffn_dim=20480,
               vocab_size=50272, max_position_embeddings=2048)
    assert ModelShape.from_hf_config(opt, "opt-13b") == OPT13B


@pytest.mark.parametrize("kwargs", [dict(efficiency=0.0), dict(efficiency=1.5), dict(step_overhead_s=-1.0)])
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        RooflineCostModel(OPT13B, A100, **kwargs)
