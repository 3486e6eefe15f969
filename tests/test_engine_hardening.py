"""One request can never stop the engine for others: hostile sampling values are refused before
they are queued, a step that still fails fails only the request that causes it, chunked prefill
off always makes progress, and streamed outputs carry only what is new."""
import math

import pytest

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.fault_isolation import FatalEngineError
from engine.sampling_params import MAX_SEED

PROMPTS = [list(range(5, 5 + n)) for n in (3, 40, 64, 17, 9, 30)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
VOCAB = 512  # tiny-llama


def _engine(**kw) -> LLMEngine:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("kv_cache_tokens", 4096)
    return LLMEngine(EngineConfig(model="tiny-llama", device="cpu", **kw))


def _run(engine: LLMEngine, max_steps: int = 10_000) -> dict:
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert not engine.has_unfinished_requests(), "the engine made no progress"
    return done


def _assert_pool_empty(engine: LLMEngine) -> None:
    s = engine.allocator.stats()
    assert s.token_states == s.reservation == s.internal_frag == 0, s
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.fixture(scope="module")
def reference():
    e = _engine()
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, GREEDY)
    return {rid: out.token_ids for rid, out in _run(e).items()}


# -- item 1: values that used to raise inside the shared step ------------------------------
@pytest.mark.parametrize("field,value", [
    ("seed", 2**64), ("seed", -2**63 - 1), ("top_k", 2**63), ("top_k", -2), ("temperature", math.nan),
    ("temperature", math.inf), ("top_p", math.nan), ("n", 0), ("n", True), ("max_tokens", 0),
    ("max_tokens", -1), ("min_tokens", 10**12), ("logprobs", 21), ("stop", [""]), ("stop_token_ids", [-1]),
    ("ignore_eos", "yes"), ("output_kind", "streaming"),
])
def test_hostile_sampling_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_ids_outside_the_vocabulary_are_refused_and_the_engine_goes_on(reference):
    e = _engine()
    with pytest.raises(ValueError, match=r"stop_token_ids \[512\] outside the vocabulary"):
        e.add_request("bad", PROMPTS[0], SamplingParams(stop_token_ids=[VOCAB], min_tokens=1))
    assert not e.has_unfinished_requests()
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, GREEDY)
    assert {k: v.token_ids for k, v in _run(e).items()} == reference


def test_extreme_but_valid_values_run(reference):
    e = _engine()
    e.add_request("seed-max", PROMPTS[1], SamplingParams(max_tokens=4, seed=MAX_SEED, ignore_eos=True))
    e.add_request("seed-min", PROMPTS[1], SamplingParams(max_tokens=4, seed=-MAX_SEED - 1, ignore_eos=True))
    e.add_request("topk-huge", PROMPTS[1], SamplingParams(max_tokens=4, top_k=2**31 - 1, ignore_eos=True))
    e.add_request("tiny-temp", PROMPTS[1], SamplingParams(max_tokens=12, temperature=1e-40, ignore_eos=True))
    e.add_request("min-tokens", PROMPTS[1], SamplingParams(max_tokens=4, min_tokens=4, stop_token_ids=[VOCAB - 1]))
    done = _run(e)
    assert all(len(o.token_ids) == 4 for k, o in done.items() if k != "tiny-temp")
    # a temperature too small to divide by is greedy (as in vLLM), not NaN sampling of token 0
    assert done["tiny-temp"].token_ids == reference["r1"]


def test_top_logprobs_are_the_k_most_likely_and_include_the_sampled_token():
    e = _engine()
    e.add_request("r", PROMPTS[2], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))
    c = _run(e)["r"].outputs[0]
    assert len(c.top_logprobs) == len(c.token_ids) == len(c.logprobs) == 5
    for tok, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        assert len(top) == 3 and [x[1] for x in top] == sorted((x[1] for x in top), reverse=True)
        assert top[0] == (tok, pytest.approx(lp))  # greedy: the sampled token is the most likely


# -- fault isolation ----------------------------------------------------------------------
def _inject(engine: LLMEngine, bad: str, where: str = "launch", times: int = 10**9) -> list:
    """Make every step that computes request ``bad`` raise (``times`` times at most)."""
    calls = []
    if where == "launch":
        real = engine.runner.launch

        def launch(batch, inflight=None):
            if any(s.request_id == bad for s in batch.seqs) and len(calls) < times:
                calls.append(len(batch.seqs))
                raise RuntimeError("injected fault")
            return real(batch, inflight)

        engine.runner.launch = launch
    return calls


@pytest.mark.parametrize("allocator,args", [("paged", {}), ("contiguous", {"policy": "max"}),
                                            ("virtual", {"backend": "host", "page_size": 4096})])
def test_a_fault_fails_one_request_and_the_others_finish_unchanged(reference, allocator, args):
    e = _engine(allocator=allocator, allocator_args=args)
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, GREEDY)
    e.add_request("bad", PROMPTS[3], GREEDY)
    calls = _inject(e, "bad")
    done = _run(e)
    assert done["bad"].outputs[0].finish_reason == "error" and done["bad"].error
    assert {k: v.token_ids for k, v in done.items() if k != "bad"} == reference
    assert len(calls) <= 2 + 2 * math.ceil(math.log2(len(PROMPTS) + 1))  # found by halving, not one by one
    _assert_pool_empty(e)
    e.add_request("after", PROMPTS[0], GREEDY)  # and it keeps serving
    assert _run(e)["after"].token_ids == reference["r0"]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_fault_mid_decode_keeps_the_tokens_already_made(reference, async_scheduling):
    # asynchronous scheduling: the failed step has a step in flight whose tokens are dropped and resampled
    e = _engine(async_scheduling=async_scheduling)
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, GREEDY)
    for _ in range(5):
        e.step()
    e.add_request("bad", PROMPTS[1], GREEDY)
    _inject(e, "bad")
    done = _run(e)
    assert done["bad"].outputs[0].finish_reason == "error"
    assert {k: v.token_ids for k, v in done.items() if k != "bad"} == reference
    _assert_pool_empty(e)


def test_a_transient_fault_fails_nobody(reference):
    e = _engine()
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, GREEDY)
    _inject(e, "r2", times=1)
    done = _run(e)
    assert {k: v.token_ids for k, v in done.items()} == reference


def test_failures_no_request_explains_are_fatal():
    e = _engine()
    e.add_request("a", PROMPTS[0], GREEDY)
    e.add_request("b", PROMPTS[1], GREEDY)
    real = e.runner.launch

    def launch(batch, inflight=None):  # fails whenever two requests run together
        if len({s.request_id for s in batch.seqs}) > 1:
            raise RuntimeError("batch-level fault")
        return real(batch, inflight)

    e.runner.launch = launch
    with pytest.raises(FatalEngineError):
        _run(e)


def test_a_fault_in_output_processing_fails_that_request_alone(reference):
    e = _engine()
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=["never"]))
    decode = e.tokenizer.decode
    poison = reference["r4"][3]

    def bad_decode(ids):
        if poison in ids and len(ids) and e.requests.get("r4") is not None:
            raise UnicodeError("injected")
        return decode(ids)

    e.tokenizer.decode = bad_decode
    done = _run(e)
    assert done["r4"].outputs[0].finish_reason == "error"
    assert all(done[f"r{i}"].token_ids == reference[f"r{i}"] for i in range(len(PROMPTS)) if i != 4)
    _assert_pool_empty(e)


def test_offline_generate_after_a_failed_request():
    llm = LLM("tiny-llama", device="cpu", max_model_len=256, kv_cache_tokens=4096)
    _inject(llm.engine, "gen-0")
    first = llm.generate([PROMPTS[0], PROMPTS[1]], GREEDY)
    assert first[0].outputs[0].finish_reason == "error" and first[1].outputs[0].finish_reason == "length"
    again = llm.generate([PROMPTS[1]], GREEDY)
    assert again[0].token_ids == first[1].token_ids


# -- chunked prefill off ------------------------------------------------------------------
def test_chunked_prefill_off_needs_a_budget_of_max_model_len():
    with pytest.raises(ValueError, match="max_num_batched_tokens >= max_model_len"):
        _engine(enable_chunked_prefill=False, max_num_batched_tokens=64)


def test_chunked_prefill_off_completes_long_prompts_and_preempted_requests(reference):
    # a pool of 160 tokens: the six requests cannot all stay, so some are preempted and recomputed
    e = _engine(enable_chunked_prefill=False, max_num_batched_tokens=256, kv_cache_tokens=160)
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, GREEDY)
    e.add_request("long", list(range(3, 3 + 120)), GREEDY)
    done = _run(e, max_steps=2000)
    assert {k: v.token_ids for k, v in done.items() if k != "long"} == reference
    assert len(done["long"].token_ids) == 12
    assert e.scheduler.num_preemptions > 0


# -- streaming outputs ---------------------------------------------------------------------
def test_delta_outputs_add_up_to_the_whole_and_never_show_a_stop_string():
    text = LLM("tiny-llama", device="cpu", max_model_len=256).generate(
        [PROMPTS[1]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].text
    stop = text[10:13]
    cut = text.find(stop)
    for kind in ("delta", "cumulative"):
        e = _engine()
        e.add_request("r", PROMPTS[1], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop],
                                                      output_kind=kind, logprobs=0))
        ids, pieces, lps, last = [], [], [], None
        while e.has_unfinished_requests():
            for out in e.step():
                c = out.outputs[0]
                if kind == "delta":
                    ids += c.token_ids
                    pieces.append(c.text)
                    lps += c.logprobs
                    assert stop not in "".join(pieces)
                else:
                    assert c.text.startswith("".join(pieces)) and stop not in c.text
                    pieces = [c.text]
                    ids, lps = c.token_ids, c.logprobs
                last = out
        assert last.finished and last.outputs[0].finish_reason == "stop"
        assert "".join(pieces) == text[:cut]
        assert len(ids) == len(lps) and len(ids) <= 40


def test_final_only_outputs_come_once():
    e = _engine()
    e.add_request("r", PROMPTS[1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                  output_kind="final_only"))
    outs = [o for _ in range(50) for o in e.step()]
    assert len(outs) == 1 and outs[0].finished and len(outs[0].token_ids) == 8
    assert len(outs[0].metrics.inter_token_latencies) == 7


# -- prompt logprobs (scoring: echo + max_tokens=0) -----------------------------------------
def test_prompt_logprobs_match_a_full_forward_pass():
    prompt = PROMPTS[2]
    e = _engine(max_num_batched_tokens=24)  # the prompt is computed in chunks
    e.add_request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
    e.add_request("gen", prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=0, ignore_eos=True))
    done = _run(e)
    out = done["score"]
    assert out.token_ids == [] and out.outputs[0].finish_reason == "length"
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None and all(lp <= 0 for lp in lps[1:])
    assert all(len(t) == 2 and t[0][1] >= t[1][1] for t in out.prompt_top_logprobs[1:])
    # the values themselves are checked against HF transformers in tests/test_parity_hf.py


def test_engine_core_messages_carry_every_token_once(reference):
    """The engine core's per-step messages (packed outputs, plus flat columns for one new token
    of a single-sample stream) give back each request's tokens exactly, then its finish."""
    from engine.engine_core import EngineCore, message_outputs, unpack_output

    e = _engine()
    sent: list[tuple] = []
    core = EngineCore(e, sent.append)
    for i, p in enumerate(PROMPTS):
        kind = "delta" if i % 2 == 0 else "final_only"
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, output_kind=kind))
    while e.has_unfinished_requests():
        core._step()
    tokens: dict[str, list[int]] = {}
    finished = set()
    fast_rows = 0
    for msg in sent:
        fast_rows += len(msg[3][0]) if len(msg) > 3 and msg[3] else 0
        for t in message_outputs(msg):
            out = unpack_output(t, [], None)
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids if out.outputs else [])
            if out.finished:
                assert out.request_id not in finished and out.metrics.num_generation_tokens == 12
                finished.add(out.request_id)
    assert fast_rows > 0 and finished == set(reference)
    assert tokens == reference
