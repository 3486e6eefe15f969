"""Sliding-window and interleaved local/global models: greedy tokens equal HF transformers'
beyond the window, under every allocator (the CPU path: the torch reference kernels)."""
import pytest
import torch

from conftest import make_hf_checkpoint
from engine import LLM, SamplingParams

pytest.importorskip("transformers")

ALLOCATORS = ["paged", "contiguous", "virtual"]
PROMPTS = [[(7 * i + 3) % 300 + 5 for i in range(40)], [11, 12, 13, 200, 201, 5, 9] * 3]


@pytest.fixture(scope="module")
def mistral_w8(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral_w8")
    return str(path), make_hf_checkpoint(path, "mistral", seed=3, sliding_window=8)


@pytest.fixture(scope="module")
def qwen3_interleaved(tmp_path_factory):
    """Local (window 6) and global layers alternating, as Gemma-2 does."""
    path = tmp_path_factory.mktemp("qwen3_local_global")
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    return str(path), make_hf_checkpoint(path, "qwen3", seed=5, num_hidden_layers=4, sliding_window=6,
                                         use_sliding_window=True, layer_types=types)


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def _check(path, hf, allocator, **engine):
    llm = LLM(path, device="cpu", allocator=allocator, kv_cache_tokens=512, max_model_len=128, **engine)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == _hf_greedy(hf, prompt, 12)
    return llm


@pytest.mark.parametrize("grouping", ["none", "shared"])
@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_mistral_window_smaller_than_prompt_matches_hf(mistral_w8, allocator, grouping):
    path, hf = mistral_w8
    llm = _check(path, hf, allocator, kv_grouping=grouping, max_num_batched_tokens=7 if grouping == "shared" else 1024)
    assert [layer.self_attn.window for layer in llm.engine.model.model.layers] == [8, 8]


@pytest.mark.parametrize("grouping", ["none", "shared"])
@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_interleaved_local_global_matches_hf(qwen3_interleaved, allocator, grouping):
    """Also with window-aware allocation (layer groups): paged frees blocks behind the window,
    contiguous and virtual keep a ring (small chunks: a ring of 6 + 5 - 1 slots)."""
    path, hf = qwen3_interleaved
    llm = _check(path, hf, allocator, kv_grouping=grouping, max_num_batched_tokens=5 if grouping == "shared" else 1024)
    assert [layer.self_attn.window for layer in llm.engine.model.model.layers] == [6, 0, 6, 0]
    if grouping == "shared":
        assert llm.engine.allocator.plan.windows == (0, 6)


def test_chunked_prefill_across_the_window_matches_hf(mistral_w8):
    """Prompt chunks of 5 tokens: each chunk's queries see keys of the chunk before it."""
    path, hf = mistral_w8
    _check(path, hf, "paged", max_num_batched_tokens=5)


def test_the_window_changes_the_tokens(mistral_w8):
    """The oracle has teeth: the same weights with full attention give other tokens."""
    path, hf = mistral_w8
    llm = LLM(path, device="cpu", kv_cache_tokens=512, max_model_len=128)
    for layer in llm.engine.model.model.layers:
        layer.self_attn.window = 0
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert any(o.token_ids != _hf_greedy(hf, p, 12) for p, o in zip(PROMPTS, outs))
