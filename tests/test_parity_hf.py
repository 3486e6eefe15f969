"""Greedy kvlab generation equals HF transformers generate, token for token (CPU, fp32;
the bf16 GPU counterpart is tests/test_gpu_engine.py)."""
import pytest
import torch

from engine import LLM, SamplingParams

PROMPT_LENS = [1, 5, 17, 33, 64, 9, 120, 2]
MAX_TOKENS = 12


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_greedy(model, prompts):
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


ALLOCATORS = [
    ("paged", {}),
    ("contiguous", dict(max_model_len=256)),
    # a pool that holds ~1.5 requests: forces recompute preemption
    ("paged", dict(kv_cache_tokens=160, block_size=4)),
    ("contiguous", dict(kv_cache_tokens=160, max_model_len=160, policy="oracle")),
]


@pytest.mark.parametrize("fixture", ["hf_llama", "hf_qwen3"])
@pytest.mark.parametrize("allocator,kwargs", ALLOCATORS, ids=lambda v: str(v))
def test_greedy_matches_hf(request, fixture, allocator, kwargs):
    path, hf = request.getfixturevalue(fixture)
    prompts = _prompts(hf.config.vocab_size)
    expected = _hf_greedy(hf, prompts)
    llm = LLM(path, allocator=allocator, device="cpu", **kwargs)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    if "kv_cache_tokens" in kwargs:
        if allocator == "paged":
            assert sum(o.metrics.num_preemptions for o in outs) > 0, "pool was meant to force preemption"
        else:
            # reservation never preempts: a small pool queues requests instead
            assert max(r.num_seqs for r in llm.engine.step_records) < len(prompts)
    # every block or region is back in the pool
    stats = llm.engine.allocator.stats()
    assert stats.free + stats.external_frag == stats.capacity


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_families_match_hf(tmp_path, kind):
    from conftest import make_hf_checkpoint

    hf = make_hf_checkpoint(tmp_path, kind, seed=3)
    prompts = _prompts(hf.config.vocab_size, seed=1)[:4]
    llm = LLM(str(tmp_path), allocator="paged", device="cpu")
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == _hf_greedy(hf, prompts)


def test_llama31_rope_scaling_and_tied_embeddings_match_hf(tmp_path):
    """Llama 3.1 frequency scaling (positions past the original context) and tied embeddings."""
    from conftest import make_hf_checkpoint

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    hf = make_hf_checkpoint(tmp_path, "llama", seed=4, rope_scaling=scaling, rope_theta=500000.0,
                            tie_word_embeddings=True)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (90, 150)]
    llm = LLM(str(tmp_path), allocator="paged", device="cpu")
    assert llm.engine.model_config.rope_scaling["rope_type"] == "llama3"
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == _hf_greedy(hf, prompts)


@pytest.mark.parametrize("fixture", ["hf_llama", "hf_qwen3"])
def test_prompt_logprobs_match_hf(request, fixture):
    """Scoring a prompt (echo + max_tokens=0, what lm-eval-harness sends): every prompt token's
    logprob and the top-k equal HF's teacher-forced log-softmax, prompt computed in chunks."""
    path, hf = request.getfixturevalue(fixture)
    prompt = _prompts(hf.config.vocab_size)[6]  # 120 tokens
    llm = LLM(str(path), allocator="paged", device="cpu", max_num_batched_tokens=48)
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=3))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    want = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert out.token_ids == [] and out.prompt_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), want, atol=1e-4, rtol=1e-4)
    top = ref[:-1].topk(3, dim=-1)
    assert [[t for t, _ in row] for row in out.prompt_top_logprobs[1:]] == top.indices.tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_attention_bias_loads_and_matches_hf(tmp_path, kind):
    """attention_bias=True puts a bias on o_proj too in HF's Llama and Qwen3 (not Qwen2's)."""
    from conftest import make_hf_checkpoint

    hf = make_hf_checkpoint(tmp_path, kind, seed=6, attention_bias=True)
    prompts = _prompts(hf.config.vocab_size, seed=2)[:3]
    llm = LLM(str(tmp_path), allocator="paged", device="cpu")
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == _hf_greedy(hf, prompts)


@pytest.mark.parametrize("fixture", ["hf_llama", "hf_qwen3"])
def test_sample_logprobs_match_hf(request, fixture):
    """Each sampled token's logprob, its top-k and the cumulative logprob (vLLM's
    ``CompletionOutput.cumulative_logprob``) equal HF's teacher-forced log-softmax of the
    prompt and the tokens kvlab sampled (seeded random sampling: not only the argmax)."""
    path, hf = request.getfixturevalue(fixture)
    prompt = _prompts(hf.config.vocab_size)[1]
    llm = LLM(str(path), allocator="paged", device="cpu")
    c = llm.generate([prompt], SamplingParams(max_tokens=8, seed=5, ignore_eos=True, logprobs=3))[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + c.token_ids])).logits[0].float(), dim=-1)
    rows = ref[len(prompt) - 1:-1]
    want = rows.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)
    assert [[t for t, _ in row] for row in c.top_logprobs] == rows.topk(3, dim=-1).indices.tolist()
    assert c.cumulative_logprob == pytest.approx(want.sum().item(), abs=1e-3)
