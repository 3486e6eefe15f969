"""engine.prompt_attention=qkv: a step of whole prompts reads its keys from its own K/V projection
(LINEAR, ``AttentionMetadata.own_kv``), not through the allocator's addressing. Same tokens as
reading the cache; only such steps take it; the cache is written all the same."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.runner import BatchInputs
from kernels.metadata import Addressing

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [9, 10], list(range(20, 43)), [3] * 17]


def _spy_steps(llm) -> list[tuple[bool, bool, Addressing]]:
    """(whole_prompts, own_kv, mode) of every eager step's metadata from now on."""
    runner = llm.engine.runner
    seen = []
    meta_of = runner._metadata

    def spy(inputs, group=0, own_kv=False):
        meta = meta_of(inputs, group, own_kv)
        seen.append((inputs.whole_prompts, meta.own_kv, meta.mode))
        return meta

    runner._metadata = spy
    return seen


def _generate(prompt_attention: str, allocator: str = "paged", **kw):
    llm = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256, allocator=allocator,
              max_num_batched_tokens=24, max_num_seqs=4, prompt_attention=prompt_attention, **kw)
    seen = _spy_steps(llm)
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = [o.token_ids for o in llm.generate(PROMPTS, p)]
    return out, seen, llm


def test_whole_prompt_steps_read_their_own_keys_and_give_the_same_tokens():
    want, cache_steps, _ = _generate("cache")
    got, steps, _ = _generate("qkv")
    assert got == want
    assert [w for w, _, _ in steps] == [w for w, _, _ in cache_steps]  # the same schedule
    assert not any(own for _, own, _ in cache_steps)
    # exactly the steps of whole prompts (a 24-token budget chunks the long prompts: their first
    # chunk is whole, later ones are not, nor are decodes)
    assert any(own for _, own, _ in steps) and not all(own for _, own, _ in steps)
    for whole, own, mode in steps:
        assert own == whole
        assert mode == (Addressing.LINEAR if own else Addressing.PAGED)


def test_prefix_cache_hits_read_the_cache():
    """A prompt whose prefix is cached starts past token 0: its step reads the cache."""
    kw = dict(enable_prefix_caching=True)
    want, _, _ = _generate("cache", **kw)
    llm = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256, allocator="paged",
              max_num_batched_tokens=64, max_num_seqs=4, prompt_attention="qkv", **kw)
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first = [o.token_ids for o in llm.generate([list(range(40, 72))], p)]
    seen = _spy_steps(llm)
    again = [o.token_ids for o in llm.generate([list(range(40, 72)) + [1, 2]], p)]
    assert seen[0] == (False, False, Addressing.PAGED)  # 32 cached tokens, two new ones
    ref = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256, allocator="paged",
              max_num_batched_tokens=64, max_num_seqs=4)
    assert first == [o.token_ids for o in ref.generate([list(range(40, 72))], p)]
    assert again == [o.token_ids for o in ref.generate([list(range(40, 72)) + [1, 2]], p)]


@pytest.mark.parametrize("allocator", ["contiguous", "virtual"])
def test_linear_allocators_read_their_cache(allocator):
    """LINEAR allocators gain nothing from it: their steps keep the cache's addressing."""
    _, steps, _ = _generate("qkv", allocator=allocator)
    assert steps and not any(own for _, own, _ in steps)


@pytest.mark.parametrize("scale", [None, 0.05])
def test_fp8_caches_read_the_cache(scale):
    """An fp8 cache holds other values than the projection: attention reads what decode reads
    (scales calibrated by the first prefill, or fixed: then only the cache's dtype says so)."""
    _, steps, llm = _generate("qkv", kv_cache_dtype="fp8_e4m3", kv_scale=scale)
    assert not llm.engine.runner.prompt_qkv and not any(own for _, own, _ in steps)


def test_own_kv_attention_ignores_the_cache():
    """An own_kv step's attention reads the projection, not the cache: with the cache's keys
    poisoned after the write, the output is still the one over the written cache."""
    from engine.model import CausalLM
    from engine.presets import preset_config
    from kernels.metadata import AttentionMetadata

    torch.manual_seed(0)
    attn = CausalLM(preset_config("tiny-llama"), 64).model.layers[0].self_attn.eval()
    hkv, d = attn.num_kv_heads, attn.head_dim
    t = 7
    q = torch.randn(t, attn.num_heads, d)
    k, v = torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    cache = (torch.zeros(64, hkv, d), torch.zeros(64, hkv, d))
    slots = torch.arange(20, 20 + t)
    lens = dict(query_start_loc=torch.tensor([0, 3, t], dtype=torch.int32),
                seq_lens=torch.tensor([3, t - 3], dtype=torch.int32), max_query_len=4, max_seq_len=4)
    via_cache = AttentionMetadata(mode=Addressing.LINEAR, slot_mapping=slots,
                                  seq_base=torch.tensor([20, 23]), **lens)
    own = AttentionMetadata(mode=Addressing.LINEAR, slot_mapping=slots, seq_base=torch.tensor([0, 3]),
                            own_kv=True, **lens)
    want = attn._attend(q, k, v, via_cache, cache)
    with torch.no_grad():
        got = attn._attend(q, k, v, own, cache)  # writes the cache again, then reads k, v
        assert torch.equal(cache[0][slots], k)
        cache[0][slots] = float("nan")
        cache[1][slots] = float("nan")
        poisoned = attn.attend(q, own, cache, own=(k, v))
    assert torch.allclose(got, want, atol=1e-6) and torch.equal(poisoned, got)


def test_batch_inputs_say_when_every_sequence_starts_at_token_zero():
    _, _, llm = _generate("qkv")
    eng = llm.engine
    seen = []
    init = BatchInputs.__init__

    def spy(self, batch, *a, **k):
        init(self, batch, *a, **k)
        seen.append((self.whole_prompts, all(s.num_computed_tokens == 0 for s in batch.seqs)))

    BatchInputs.__init__ = spy
    try:
        llm.generate(PROMPTS, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    finally:
        BatchInputs.__init__ = init
    assert seen and {w for w, _ in seen} == {True, False}
    assert all(w == want for w, want in seen)
    assert eng.config.prompt_attention == "qkv"


def test_unknown_prompt_attention_is_refused():
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="prompt_attention must be 'cache'.*'qkv'"):
        EngineConfig(prompt_attention="own")


def test_bench_prompt_attention_times_the_three_ways_on_cpu(tmp_path, capsys):
    """The engine benchmark's CPU run: every shape in all three ways, each step checked to have
    read its keys the way its row says (the script raises otherwise), a CSV and a table."""
    import pandas as pd

    from experiments import bench_prompt_attention

    assert bench_prompt_attention.main(["--models", "tiny-llama", "--shapes", "2x8,1x16", "--reps", "1",
                                        "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "prompt_attention_cpu.csv")
    assert sorted(zip(df["allocator"], df["prompt_attention"])) == sorted(
        [("paged", "cache"), ("paged", "qkv"), ("contiguous", "cache")] * 2)
    assert (df["ms"] > 0).all() and (df[df["allocator"] == "contiguous"]["vs_linear_pct"] == 0).all()
    assert "| tiny-llama | 2x8 | paged | qkv |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_prompt_attention.main(["--shapes", "2x0"])
