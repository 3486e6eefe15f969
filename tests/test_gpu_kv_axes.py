"""FP8 KV caches, sliding windows and layer groups through the engine on a GPU (Triton
kernels, CUDA graphs where they apply, the CUDA VMM backend for virtual)."""
import pytest
import torch

from engine import LLM, SamplingParams
from experiments.parity import compare, hf_greedy, match_rate
from tests.test_gpu_engine import tiny_bf16  # noqa: F401 (the fixture)

pytestmark = pytest.mark.gpu
TIE = 0.06  # bf16 logits: a smaller gap is a tie
ALLOCATORS = [("paged", {}), ("contiguous", {"policy": "max"}), ("virtual", {"layout": "shared"})]


def _prompts(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in (40, 7, 90, 200, 17, 64)]


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    """Qwen3 with local (window 24) and global layers alternating, fp32 on the GPU."""
    from conftest import make_hf_checkpoint

    path = tmp_path_factory.mktemp("gpu_qwen3_local_global")
    hf = make_hf_checkpoint(path, "qwen3", seed=5, num_hidden_layers=4, sliding_window=24, use_sliding_window=True,
                            layer_types=["sliding_attention", "full_attention"] * 2, hidden_size=128,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    return str(path), hf.to("cuda")


@pytest.mark.parametrize("grouping", ["none", "shared"])
@pytest.mark.parametrize("allocator,args", ALLOCATORS, ids=[a for a, _ in ALLOCATORS])
def test_sliding_window_parity_on_gpu(interleaved, allocator, args, grouping):
    path, hf = interleaved
    prompts = _prompts(hf.config.vocab_size)
    want = hf_greedy(hf, prompts, 24)
    llm = LLM(path, allocator=allocator, allocator_args=dict(args), device="cuda", dtype="float32",
              max_model_len=512, max_num_seqs=16, max_num_batched_tokens=64, kv_grouping=grouping,
              kv_cache_tokens=8192 if allocator != "virtual" else 16 * 8192)
    assert (llm.engine.runner.graphs is not None) == (grouping == "none")  # graphs: one layer group only
    got = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))]
    divs = compare(hf, prompts, want, got)
    for d in divs:
        assert d.matched == d.total or d.logit_gap <= 1e-3, d  # fp32: only exact ties may differ
    assert match_rate(divs) >= 0.9


@pytest.mark.parametrize("allocator,args", ALLOCATORS, ids=[a for a, _ in ALLOCATORS])
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_on_gpu_stays_close_to_bf16(tiny_bf16, allocator, args, kv_dtype):
    """CUDA graphs read the calibrated scales (in place); tokens mostly match HF's bf16 greedy."""
    path, hf = tiny_bf16
    prompts = _prompts(512)
    want = hf_greedy(hf, prompts, 24)
    common = dict(allocator=allocator, allocator_args=dict(args), device="cuda", dtype="bfloat16",
                  max_model_len=512, max_num_seqs=16,
                  kv_cache_memory=256 * 8192 * (16 if allocator == "virtual" else 1))  # 256 bytes a bf16 token
    llm = LLM(path, kv_cache_dtype=kv_dtype, **common)
    bf16 = LLM(path, **common)
    assert llm.engine.kv_capacity_tokens >= 2 * bf16.engine.kv_capacity_tokens - 4096  # page rounding aside
    assert llm.engine.runner.graphs is not None
    got = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))]
    scale = llm.engine.model.model.layers[0].self_attn.k_scale
    assert (scale != 1.0).all()
    rate = match_rate(compare(hf, prompts, want, got))
    assert rate >= (0.5 if kv_dtype == "fp8_e4m3" else 0.3), rate
