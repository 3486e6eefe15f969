"""Bad input gets a clear error naming the problem and the fix, and loses nothing."""
import pytest

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineConfig


def test_unknown_allocator():
    with pytest.raises(ValueError, match=r"unknown allocator 'nope'.*paged"):
        LLM("tiny-llama", allocator="nope")


def test_unknown_model():
    with pytest.raises(ValueError, match=r"unknown model 'gpt-17'.*preset.*local HF directory"):
        LLM("gpt-17")


def test_prompt_longer_than_max_model_len():
    llm = LLM("tiny-llama", max_model_len=64)
    with pytest.raises(ValueError, match=r"prompt of 100 tokens does not fit max_model_len=64"):
        llm.generate([list(range(3, 103))], SamplingParams(max_tokens=4))


def test_bad_prompt_loses_nothing():
    """A bad prompt among good ones is rejected before any work; the engine keeps working."""
    llm = LLM("tiny-llama", max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5, 6, 7], list(range(3, 103))], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    outs = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(outs[0].token_ids) == 4


def test_pool_too_small_for_one_request():
    with pytest.raises(ValueError, match=r"cannot fit a single request.*kv_cache_memory"):
        LLM("tiny-llama", allocator="contiguous", max_model_len=512, kv_cache_tokens=256)


def test_request_larger_than_pool():
    llm = LLM("tiny-llama", allocator="paged", max_model_len=512, kv_cache_tokens=64)
    with pytest.raises(ValueError, match=r"may need 104 KV tokens.*at most 64.*kv_cache_memory"):
        llm.generate([list(range(3, 7))], SamplingParams(max_tokens=100))


@pytest.mark.parametrize("allocator,n,beams,want", [
    # the prompt (200 tokens) shares 12 whole blocks (192 tokens); each sample holds 48 of its own
    ("paged", 2, 1, 192 + 2 * 48), ("paged", 1, 3, 192 + 3 * 48), ("virtual", 3, 1, 3 * 240)])
def test_samples_that_cannot_fit_the_pool_together_are_refused(allocator, n, beams, want):
    """A request's samples (beams) are scheduled and preempted together: if they cannot fit the pool
    together, the group would be admitted, preempted and readmitted for ever (it hung)."""
    llm = LLM("tiny-llama", allocator=allocator, max_model_len=256, kv_cache_tokens=256)
    params = SamplingParams(max_tokens=40, n=n, beam_width=beams, temperature=0 if beams > 1 else 1.0,
                            ignore_eos=True)
    with pytest.raises(ValueError, match=rf"its {max(n, beams)} samples may need {want} KV tokens together "
                                         rf".*holds 256.*lower {'beam_width' if beams > 1 else 'n'}"):
        llm.generate([list(range(3, 203))], params)
    # one sample fits; so do two short ones
    assert len(llm.generate([list(range(3, 203))], SamplingParams(max_tokens=40, ignore_eos=True))[0].token_ids) == 40
    out = llm.generate([list(range(3, 23))], SamplingParams(max_tokens=20, n=2, ignore_eos=True))[0]
    assert [len(c.token_ids) for c in out.outputs] == [20, 20]


def test_pool_with_no_block():
    with pytest.raises(ValueError, match=r"holds no block of 16.*smaller block_size"):
        LLM("tiny-llama", allocator="paged", kv_cache_tokens=8)


def test_bad_sampling_params():
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be a finite number in \(0, 1\]"):
        SamplingParams(top_p=0)


def test_token_ids_outside_vocab():
    engine = LLMEngine(EngineConfig(model="tiny-llama"))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 512\)"):
        engine.add_request("r", [1, 99999], SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("r", [], SamplingParams())


def test_unknown_engine_dtype():
    with pytest.raises(ValueError, match=r"dtype 'float8'"):
        EngineConfig(dtype="float8")


def test_a_large_model_on_the_cpu_is_said_to_be_slow_before_its_weights(monkeypatch, caplog):
    # was: a README GPU command run on a CPU (validate-sim, llama3-8b) built 8B random weights for minutes, unsaid
    import engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "CPU_SLOW_PARAMS", 1000)  # tiny-llama's ~0.1M parameters count as large
    with caplog.at_level("WARNING", logger="kvlab.engine"):
        LLMEngine(EngineConfig(model="tiny-llama", device="cpu"))
    assert any("parameters on the CPU" in r.getMessage() and "device=cuda" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(llm_engine, "CPU_SLOW_PARAMS", 2_000_000_000)
    with caplog.at_level("WARNING", logger="kvlab.engine"):
        LLMEngine(EngineConfig(model="tiny-llama", device="cpu"))
    assert not any("parameters on the CPU" in r.getMessage() for r in caplog.records)
