"""FP8 KV caches through the engine: pool sized in bytes of the chosen dtype, scales from the
first prefill (or given), tokens close to the full-precision run."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig

PROMPTS = [[(5 * i + 1) % 500 + 3 for i in range(30)], list(range(40, 60)), [7, 8, 9] * 8]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def _llm(**kw):
    return LLM("tiny-llama", device="cpu", allocator=kw.pop("allocator", "paged"), kv_cache_memory=1 << 20,
               max_model_len=256, **kw)


def test_config_validates_kv_dtype_fields():
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4'.*fp8_e4m3"):
        EngineConfig(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="kv_scale_granularity"):
        EngineConfig(kv_scale_granularity="channel")
    with pytest.raises(ValueError, match="kv_scale must be a positive number"):
        EngineConfig(kv_scale=-1.0)
    assert EngineConfig(kv_cache_dtype="fp8").resolved_kv_dtype(torch.bfloat16) == torch.float8_e4m3fn
    assert EngineConfig().resolved_kv_dtype(torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("allocator", ["paged", "contiguous", "virtual"])
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_fp8_pool_holds_four_times_the_fp32_tokens_and_tokens_stay_close(allocator, granularity):
    full = _llm(allocator=allocator)
    fp8 = _llm(allocator=allocator, kv_cache_dtype="fp8_e4m3", kv_scale_granularity=granularity)
    e = fp8.engine
    assert e.allocator.spec.dtype == torch.float8_e4m3fn
    assert e.allocator.kv_cache(0)[0].dtype == torch.float8_e4m3fn
    assert e.allocator.bytes_per_token * 4 == full.engine.allocator.bytes_per_token
    assert e.kv_capacity_tokens >= 4 * full.engine.kv_capacity_tokens - 64  # same bytes, page rounding aside
    a = [o.token_ids for o in full.generate(PROMPTS, GREEDY)]
    b = [o.token_ids for o in fp8.generate(PROMPTS, GREEDY)]
    attn = e.model.model.layers[0].self_attn
    assert (attn.k_scale != 1.0).all() and (attn.v_scale != 1.0).all()  # set by the first prefill
    if granularity == "tensor":
        assert torch.unique(attn.k_scale).numel() == 1
    else:
        assert torch.unique(attn.k_scale).numel() == attn.num_kv_heads
    # random tiny weights give near-tied logits; fp8 noise may flip some, not most
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q)) / sum(map(len, a))
    assert same >= 0.5, same


def test_given_scale_is_used_and_not_recalibrated():
    llm = _llm(kv_cache_dtype="fp8_e5m2", kv_scale=0.05)
    llm.generate(PROMPTS[:1], GREEDY)
    attn = llm.engine.model.model.layers[1].self_attn
    assert torch.equal(attn.k_scale, torch.full_like(attn.k_scale, 0.05))


def test_fp8_logits_close_to_full_precision():
    """The greedy token's logprob (the max, continuous in the logits even where near-tied random
    weights flip the argmax) under fp8 KV: close to the fp32 run's."""
    lp = []
    for kw in ({}, {"kv_cache_dtype": "fp8_e4m3"}):
        out = _llm(**kw).generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, logprobs=0))
        lp.append([(o.outputs[0].token_ids[0], o.outputs[0].logprobs[0]) for o in out])
    for (t_full, lp_full), (t_fp8, lp_fp8) in zip(*lp):
        assert abs(lp_full - lp_fp8) < 0.1
        assert lp_full != lp_fp8  # the fp8 run really rounds K/V
