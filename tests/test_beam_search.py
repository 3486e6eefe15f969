"""Beam search (``SamplingParams(beam_width=k)``): the k beams of a request share their blocks
copy-on-write (``LLMEngine._beam_step``).

- On the tiny model (CPU), the beams equal a brute-force beam search over the model's logits
  (each prefix run from scratch), the allocator ends empty and the accounts stay exact.
- In simulate mode (``SimRunner.beam_candidates``: a fixed rule, every ``p``-th token the best
  beam's continuations take all k places) the KV memory saved by sharing equals its closed form.
"""
from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir

from allocators.stats import STAT_FIELDS
from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from experiments.driver import sampling_params
from experiments.metrics import _logical_index
from experiments.run import CONF_DIR, run_experiment
from experiments.simulate import SimRunner
from experiments.workloads import make_workload

P, O, K, C, M = 6, 6, 3, 1024, 64  # prompt, output, beam width, pool tokens, max_model_len


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("kw, msg", [
    (dict(beam_width=0), "beam_width must be an integer"),
    (dict(beam_width=2.5), "beam_width must be an integer"),
    (dict(beam_width=2, n=3, temperature=0), "n must be <= beam_width"),
    (dict(beam_width=2), "temperature=0"),
    (dict(beam_width=2, temperature=0, top_k=5), "temperature=0"),
    (dict(beam_width=2, temperature=0, logprobs=2), "logprobs must be None or 0"),
    (dict(beam_width=2, temperature=0, stop=["x"]), "stop strings"),
    (dict(beam_width=2, temperature=0, output_kind="delta"), "delta"),
])
def test_bad_beam_params_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_beam_params():
    p = SamplingParams(beam_width=4, n=2, temperature=0)
    assert p.use_beam_search and p.num_seqs == 4
    assert SamplingParams(n=3).num_seqs == 3 and not SamplingParams().use_beam_search


def test_async_scheduling_is_refused():
    e = LLMEngine(EngineConfig(model="tiny-llama", kv_cache_tokens=C, max_model_len=M, device="cpu",
                               async_scheduling=True, detokenize=False))
    with pytest.raises(ValueError, match="async_scheduling=false or auto"):
        e.add_request("a", [5, 6, 7], SamplingParams(beam_width=2, temperature=0))


def test_auto_async_runs_beam_steps_synchronously(reference, monkeypatch):
    """async_scheduling=auto as on a GPU (resolved on): plain requests overlap; once a beam-search
    request is live the steps are synchronous (the one in flight read first, its outputs kept),
    and they overlap again after it. Every request gets the tokens of a synchronous engine."""
    monkeypatch.setattr(EngineConfig, "resolved_async", lambda self, device, simulate=False: True)
    prompt, want = reference
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def run(e: LLMEngine) -> tuple[dict, list[bool]]:
        overlapped, outs = [], {}
        e.add_request("p0", [7, 8, 9, 10], plain)
        e.add_request("p1", [3, 1, 4, 1, 5], plain)
        for i in range(40):
            if i == 3:
                e.add_request("beam", prompt, SamplingParams(beam_width=K, max_tokens=O, temperature=0,
                                                             ignore_eos=True, logprobs=0))
            if i == 5:
                e.add_request("p2", [2, 7, 1, 8], plain)
            for o in e.step():
                outs.setdefault(o.request_id, []).append(o)
            overlapped.append(e._inflight is not None)
            if not e.has_unfinished_requests() and i > 5:
                break
        return outs, overlapped

    auto = LLMEngine(EngineConfig(model="tiny-llama", kv_cache_tokens=C, max_model_len=M, device="cpu",
                                  detokenize=False))
    assert auto.async_auto and auto.config.async_scheduling is True
    got, overlapped = run(auto)
    monkeypatch.undo()
    sync = tiny("paged", block_size=16)
    assert sync.config.async_scheduling is False  # auto on a CPU
    ref, _ = run(sync)
    assert overlapped[:3] == [True] * 3 and not any(overlapped[3:3 + O]) and overlapped[-2]
    for rid in ("p0", "p1", "p2"):
        assert got[rid][-1].finished and got[rid][-1].outputs[0].token_ids == ref[rid][-1].outputs[0].token_ids
    beams = [list(c.token_ids) for c in got["beam"][-1].outputs]
    assert got["beam"][-1].finished and beams == [list(c.token_ids) for c in ref["beam"][-1].outputs]
    assert beams[0] == want[0][0]  # the brute-force search's best beam
    assert auto._beam_requests == 0 and auto.allocator.num_free_blocks == auto.allocator.num_blocks  # all back


# --------------------------------------------------------------------------- the tiny model
def tiny(allocator: str, prefix_caching: bool = False, **args) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny-llama", allocator=allocator, allocator_args=args, kv_cache_tokens=C,
                                  max_model_len=M, device="cpu", detokenize=False,
                                  enable_prefix_caching=prefix_caching))


def top_k(ref: LLMEngine, tokens: list[int], k: int) -> list[tuple[int, float]]:
    """The k likeliest next tokens after ``tokens``, the prefix computed from scratch."""
    rid = f"ref{len(ref.finished_requests)}"
    ref.add_request(rid, tokens, SamplingParams(max_tokens=1, temperature=0, logprobs=k, ignore_eos=True))
    while ref.has_unfinished_requests():
        for o in ref.step():
            if o.finished:
                out = o.outputs[0].top_logprobs[0]
    return out


def brute_force(ref: LLMEngine, prompt: list[int], k: int, steps: int) -> list[tuple[list[int], float]]:
    """Textbook beam search: every beam's k best tokens, the k best of all by cumulative logprob."""
    beams = [([], 0.0)]
    for _ in range(steps):
        cands = [(cum + lp, out + [tok]) for out, cum in beams for tok, lp in top_k(ref, prompt + out, k)]
        cands.sort(key=lambda c: -c[0])
        beams = [(out, cum) for cum, out in cands[:k]]
    return beams


def run_beams(e: LLMEngine, prompt: list[int], k: int, steps: int, n: int):
    e.add_request("beam", prompt, SamplingParams(beam_width=k, n=n, max_tokens=steps, temperature=0,
                                                 ignore_eos=True, logprobs=0))
    out = None
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                out = o
    return out


@pytest.fixture(scope="module")
def reference():
    prompt = [11, 22, 33, 44, 55, 66][:P]
    return prompt, brute_force(tiny("paged", block_size=4), prompt, K, O)


@pytest.mark.parametrize("allocator, args", [("paged", {"block_size": 4}), ("paged", {"block_size": 1}),
                                             ("paged", {"block_size": 2, "prefix_caching": True}),
                                             ("contiguous", {}), ("virtual", {})])
def test_beams_equal_a_brute_force_beam_search(allocator, args, reference):
    """All k beams, best first, equal the brute-force search's (tokens; cumulative logprobs to
    float precision); the pool is empty at the end and every step's accounts add up."""
    prompt, want = reference
    e = tiny(allocator, **args)
    out = run_beams(e, prompt, K, O, n=K)
    got = [(c.token_ids, sum(c.logprobs)) for c in out.outputs]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [c.index for c in out.outputs] == list(range(K))
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4)
    assert len({tuple(t) for t, _ in got}) == K  # distinct beams: a mix-up would show
    # the allocator ends empty, the accounts of every step add up to the pool
    s = e.allocator.stats()
    s.check()
    assert s.token_states == 0 and s.free + s.idle_mapped == s.capacity  # virtual keeps pages mapped for reuse
    if allocator == "paged":
        assert e.allocator.num_free_blocks == C // args["block_size"]
    rows = e.accountant.table() / e.accountant.bpt
    assert (rows.sum(axis=1) == C).all() and len(rows) == O + 1


def test_the_output_is_the_n_best_beams(reference):
    prompt, want = reference
    out = run_beams(tiny("paged", block_size=4), prompt, K, O, n=1)
    assert [c.token_ids for c in out.outputs] == [want[0][0]]


def test_paged_beams_share_blocks():
    """With beams forked from one another, the paged pool holds fewer token states than the
    beams' tokens (each counted once per beam)."""
    e = tiny("paged", block_size=2)
    e.config.record_memory = True
    run_beams(e, [11, 22, 33, 44, 55, 66, 77, 88], K, O, n=1)
    rows = e.accountant.table() / e.accountant.bpt
    ts = rows[:, STAT_FIELDS.index("token_states")]
    logical = _logical_index(e.logical_tokens)[1]
    assert len(ts) == len(logical)
    assert all(t <= lg for t, lg in zip(ts, logical)) and any(t < lg for t, lg in zip(ts, logical))


# --------------------------------------------------------------------------- closed form
def closed_form(p: int, o: int, k: int, b: int, period: int) -> float:
    """``sharing_saving`` of one request (prompt p, output o, width k, block size b) under
    SimRunner's rule (beam 0's continuations take all places at output tokens 0, period, 2*period, ..).

    Step 0 computes the prompt but its last token (p - 1 tokens, one sequence): nothing shared,
    saving 0. Then for t = 0 .. o-1 the step computes position S = p - 1 + t in each of the k
    beams, which share the first S0 tokens: S0 = p - 1 at t = 0 (forked from the prompt), else
    S0 = p + t_f, t_f = period * floor((t - 1) / period) the last fork token before t (the
    dropped beams were forked from beam 0 once it held p + t_f tokens). The shared full
    blocks hold F0 = b * floor(S0 / b) tokens once; every beam holds the rest privately (the
    shared partial block was copied on write): token states F0 + k (S + 1 - F0), logical
    tokens k (S + 1). ``sharing_saving`` is the mean over the o + 1 steps of 1 - states / logical.
    """
    total = 0.0
    for t in range(o):
        s = p - 1 + t
        s0 = p - 1 if t == 0 else p + period * ((t - 1) // period)
        f0 = b * (s0 // b)
        total += 1 - (f0 + k * (s + 1 - f0)) / (k * (s + 1))
    return total / (o + 1)


def sim_config(p: int, o: int, k: int, b: int, extra=()):
    overrides = ["progress=false", "report=false", "mode=simulate", "model=tiny-llama", "allocator=paged",
                 f"allocator.args.block_size={b}", "engine.kv_cache_tokens=4096", "engine.max_model_len=512",
                 "engine.max_num_batched_tokens=512", "engine.max_num_seqs=64", "engine.enable_prefix_caching=false",
                 "workload=fixed", f"workload.input_len={p}", f"workload.output_len={o}",
                 "workload.num_requests=1", f"++workload.beam_width={k}", *extra]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("p, o, k, b, period", [(40, 30, 4, 16, 1), (40, 30, 4, 16, 4), (37, 50, 2, 8, 3),
                                                (33, 20, 6, 16, 5)])
def test_beam_search_saving_equals_its_closed_form(p, o, k, b, period, tmp_path, monkeypatch):
    monkeypatch.setattr(SimRunner, "beam_period", period)
    summary = run_experiment(sim_config(p, o, k, b), tmp_path)
    want = closed_form(p, o, k, b, period)
    assert summary["sharing_saving"] == pytest.approx(want, abs=1e-9)
    assert summary["preemptions"] == 0


def test_closed_form_by_hand():
    """p = 5, o = 2, k = 2, b = 4, period 1: t = 0 shares the 4 prompt tokens (one full block),
    states 4 + 2 * 1 = 6 of 10; t = 1 shares 5 (the full block once, a copy of the partial one
    each), states 4 + 2 * 2 = 8 of 12. Saving (0 + 0.4 + 1/3) / 3."""
    assert closed_form(5, 2, 2, 4, 1) == pytest.approx((0 + 0.4 + 1 / 3) / 3)


# --------------------------------------------------------------------------- workloads
def test_workload_beam_width_reaches_the_sampling_params():
    specs = make_workload({"name": "alpaca", "num_requests": 3, "beam_width": 4}, 1000, 512)
    assert all(s.beam_width == 4 for s in specs)
    p = sampling_params(specs[0], 0)
    assert p.beam_width == 4 and p.n == 1 and p.ignore_eos
    with pytest.raises(ValueError, match="beam_width"):
        make_workload({"name": "alpaca", "num_requests": 3, "beam_width": 0}, 1000, 512)
    with pytest.raises(ValueError, match="beam_width"):
        make_workload({"name": "alpaca", "num_requests": 3, "beam_width": 2, "n": 3}, 1000, 512)


def test_alpaca_beam_search_runs_in_simulate(tmp_path):
    summary = run_experiment(_alpaca(4), tmp_path)
    assert summary["sharing_saving"] > 0.2 and math.isfinite(summary["sharing_saving"])
    # the paper comparison's figure: time-weighted over the steady-state window (the drain's steps, fewer
    # beams sharing less, weigh nothing there)
    assert summary["steady_state_reason"] is None and 0.2 < summary["sharing_saving_tw"] < 1


def _alpaca(k: int):
    overrides = ["progress=false", "report=false", "mode=simulate", "model=tiny-llama", "allocator=paged",
                 "engine.max_model_len=512", "engine.enable_prefix_caching=false", "workload=alpaca",
                 "workload.num_requests=20", f"++workload.beam_width={k}"]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


# --------------------------------------------------------------------------- pressure, stops
def beams_by_request(e: LLMEngine) -> dict:
    """Step ``e`` until done: each finished request's beams (token ids)."""
    outs = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                outs[o.request_id] = [c.token_ids for c in o.outputs]
    return outs


def pressed(pool: int, mode: str) -> tuple[dict, LLMEngine]:
    e = LLMEngine(EngineConfig(model="tiny-llama", allocator="paged", allocator_args={"block_size": 8},
                               kv_cache_tokens=pool, max_model_len=256, device="cpu", max_num_batched_tokens=256,
                               max_num_seqs=32, preemption_mode=mode, detokenize=False))
    for i in range(8):
        prompt = [(7 * i + j) % 100 + 3 for j in range(40)]
        e.add_request(str(i), prompt, SamplingParams(beam_width=4, n=4, max_tokens=30, ignore_eos=True,
                                                     temperature=0))
    return beams_by_request(e), e


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_beams_under_memory_pressure_are_unchanged(mode):
    """8 requests x 4 beams in a 400-token pool preempt (whole requests: their beams go
    together); every beam equals the run without pressure and the pool ends empty."""
    free, e0 = pressed(4096, "recompute")
    assert e0.scheduler.num_preemptions == 0
    outs, e = pressed(400, mode)
    assert e.scheduler.num_preemptions > 0
    assert outs == free
    s = e.allocator.stats()
    s.check()
    assert s.token_states == 0 and e.allocator.num_free_blocks == 50


def crowded(**kw) -> tuple[dict, LLMEngine]:
    """4 requests x 4 beams, greedy, in an engine with ``kw``; their beams by request."""
    e = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", detokenize=False, max_model_len=64,
                               **{"kv_cache_tokens": 2048, **kw}))
    for i, prompt in enumerate([[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [3, 4, 5, 6, 7, 8, 9]]):
        e.add_request(str(i), prompt, SamplingParams(beam_width=4, n=4, max_tokens=12, temperature=0,
                                                     ignore_eos=True))
    return beams_by_request(e), e


@pytest.mark.parametrize("kw", [
    dict(max_num_seqs=4), dict(max_num_seqs=6),  # a request's beams would not all fit beside another's
    dict(max_num_batched_tokens=5), dict(max_num_seqs=8, max_num_batched_tokens=6),  # nor in the budget
    dict(allocator="contiguous", kv_cache_tokens=400),  # forks that copy, out of room
])
def test_a_requests_beams_run_together_in_a_crowded_engine(kw):
    """Every live beam of a request runs in each step, the same tokens each: with room for few
    sequences, a small token budget, or a copying allocator out of memory, the beams equal the
    roomy engine's (they used to lose step: duplicated or wrong beams, silently)."""
    roomy, _ = crowded(max_num_seqs=64)
    assert all(len({tuple(b) for b in beams}) == 4 for beams in roomy.values())
    outs, e = crowded(**kw)
    assert outs == roomy
    assert e.allocator.stats().token_states == 0


def test_beams_that_cannot_fit_are_refused():
    """More beams than a step holds is refused when added; beams whose copies cannot all fit the
    pool even alone fail that request only."""
    e = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=1024,
                               max_num_seqs=3))
    with pytest.raises(ValueError, match=r"beam_width=4 beams run in one step but a step holds at most 3 "
                                         r"sequences \(max_num_seqs=3"):
        e.add_request("b", [5, 6, 7], SamplingParams(beam_width=4, temperature=0))
    e = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=150,
                               allocator="contiguous", detokenize=False))
    e.add_request("b", [5, 6, 7, 8], SamplingParams(beam_width=4, n=4, max_tokens=12, temperature=0))
    e.add_request("plain", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    outs = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                outs[o.request_id] = o
    assert [c.finish_reason for c in outs["b"].outputs] == ["error"] * 4
    assert len(outs["plain"].outputs[0].token_ids) == 5


def test_a_beam_that_stops_keeps_its_place(reference):
    """A stop token ends the beam that chose it; the others go on to max_tokens; the pool ends empty."""
    prompt, want = reference
    stop = want[1][0][2]  # the third token of the second-best beam
    e = tiny("paged", block_size=4)
    e.add_request("s", prompt, SamplingParams(beam_width=K, n=K, max_tokens=O, temperature=0, ignore_eos=True,
                                              stop_token_ids=[stop]))
    out = None
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                out = o
    reasons = [c.finish_reason for c in out.outputs]
    assert "stop" in reasons
    assert all(c.token_ids[-1] == stop for c in out.outputs if c.finish_reason == "stop")
    assert all(len(c.token_ids) == O for c in out.outputs if c.finish_reason == "length")
    assert e.allocator.stats().token_states == 0 and e.allocator.num_free_blocks == C // 4


def test_a_failed_switch_step_keeps_the_outputs_of_the_step_in_flight(monkeypatch):
    """Back to synchronous steps, the step in flight is read first (a plain request may finish
    there); if the new step then fails, that request's final output still reaches the caller."""
    monkeypatch.setattr(EngineConfig, "resolved_async", lambda self, device, simulate=False: True)
    e = LLMEngine(EngineConfig(model="tiny-llama", kv_cache_tokens=C, max_model_len=M, device="cpu",
                               detokenize=False))
    e.add_request("p0", [7, 8, 9, 10], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    fails = [RuntimeError("beam step")]
    beam_step = e._beam_step

    def flaky(group):
        if fails:
            raise fails.pop()
        return beam_step(group)

    monkeypatch.setattr(e, "_beam_step", flaky)
    finished = {}
    for i in range(30):
        if i == 2:
            e.add_request("beam", [5], SamplingParams(beam_width=2, max_tokens=3, temperature=0, ignore_eos=True))
        for o in e.step():
            if o.finished:
                finished[o.request_id] = o
        if not e.has_unfinished_requests():
            break
    assert not fails  # the failure happened
    assert "p0" in finished and len(finished["p0"].outputs[0].token_ids) == 2
    assert "beam" in finished and not e.requests and e._beam_requests == 0
