"""Engine features vLLM users rely on: parallel sampling by fork, swap preemption, prefix
caching and the sampling parameters; all checked against greedy runs of the same model."""
import pytest
import torch

from engine import LLM, SamplingParams

PROMPTS = [list(range(5, 5 + n)) for n in (3, 40, 64, 17)]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

ALLOCATORS = [("paged", {"block_size": 16}), ("contiguous", {"policy": "oracle"}),
              ("virtual", {"backend": "host", "page_size": 4096})]


def _llm(allocator="paged", args=None, **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("kv_cache_tokens", 4096)
    return LLM("tiny-llama", allocator=allocator, allocator_args=dict(args or {}), device="cpu", **kw)


@pytest.fixture(scope="module")
def greedy_reference():
    return [o.token_ids for o in _llm().generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("allocator,args", ALLOCATORS, ids=[a for a, _ in ALLOCATORS])
def test_parallel_greedy_samples_equal_single(allocator, args, greedy_reference):
    llm = _llm(allocator, args)
    outs = llm.generate(PROMPTS, SamplingParams(n=3, max_tokens=10, temperature=0, ignore_eos=True))
    for out, ref in zip(outs, greedy_reference):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == ref for c in out.outputs)
    stats = llm.engine.allocator.stats()
    assert stats.free + stats.external_frag + stats.idle_mapped == stats.capacity


def test_fork_shares_the_prompt_blocks():
    llm = _llm("paged", {"block_size": 16})
    eng = llm.engine
    eng.add_request("r", list(range(5, 69)), SamplingParams(n=4, max_tokens=4, temperature=0, ignore_eos=True))
    eng.step()  # prompt minus its last token, then the fork
    eng.step()  # each sample computes the last prompt token: copy-on-write of the shared tail
    pool = eng.allocator
    held_blocks = pool.num_blocks - pool.pool.num_free
    assert held_blocks < 4 * 4, f"{held_blocks} blocks held: the prompt was not shared"
    while eng.has_unfinished_requests():
        eng.step()
    assert pool.pool.num_free == pool.num_blocks


def test_seeded_parallel_samples_differ_and_reproduce():
    p = SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    a = _llm().generate([PROMPTS[1]], p)[0]
    b = _llm().generate([PROMPTS[1], PROMPTS[2]], [p, SamplingParams(max_tokens=3)])[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_swap_preemption_keeps_outputs(greedy_reference):
    # a pool of ~1.3 requests: swapping must happen, and must not change a token
    llm = _llm("paged", {"block_size": 4}, kv_cache_tokens=96, preemption_mode="swap")
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == greedy_reference
    assert llm.engine.scheduler.num_swaps > 0
    assert llm.engine.allocator.pool.num_free == llm.engine.allocator.num_blocks


def test_swap_falls_back_to_recompute_where_unsupported(greedy_reference):
    llm = _llm("contiguous", {"policy": "oracle"}, kv_cache_tokens=96, preemption_mode="swap")
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == greedy_reference


def test_prefix_caching_hits_and_keeps_outputs():
    shared = list(range(100, 148))  # three full blocks of 16
    prompts = [shared + [7, 8, 9], shared + [10, 11]]
    ref = [o.token_ids for o in _llm().generate(prompts, GREEDY)]
    llm = _llm(enable_prefix_caching=True)
    first = llm.generate(prompts[:1], GREEDY)
    second = llm.generate(prompts[1:], GREEDY)
    assert [first[0].token_ids, second[0].token_ids] == ref
    assert second[0].metrics.num_cached_tokens == 48
    assert llm.engine.allocator.prefix_cache_hit_rate > 0


def test_sampling_parameters():
    llm = _llm()
    greedy = llm.generate([PROMPTS[1]], GREEDY)[0].token_ids
    top1 = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True))
    assert top1[0].token_ids == greedy
    tiny_p = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, ignore_eos=True))
    assert tiny_p[0].token_ids == greedy
    # stop token: generation ends at its first occurrence, and it is kept as the last token
    stop_at = greedy[4]
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == greedy[: greedy.index(stop_at) + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    # logprobs of the sampled tokens
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=5, temperature=0, logprobs=0, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 5 and all(lp <= 0 for lp in lps)


def test_min_tokens_and_eos():
    llm = _llm()
    eos = llm.engine.eos_token_ids[0]
    # make EOS the greedy choice everywhere: a bias on the lm_head row of the EOS token
    with torch.no_grad():
        llm.engine.model.lm_head.weight[eos] = llm.engine.model.model.embed_tokens.weight.sum(0) * 0 + 5.0
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0))[0]
    assert out.token_ids[-1] == eos and out.outputs[0].finish_reason == "stop"
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, min_tokens=6, temperature=0))[0]
    assert len(out.token_ids) >= 7 and eos not in out.token_ids[:6]


def test_stop_strings_truncate_text():
    llm = _llm()
    text = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].text
    stop = text[3:6]
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.outputs[0].finish_reason == "stop" and stop not in out.text and text.startswith(out.text)


ASYNC_CASES = {
    "greedy": SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
    "seeded-n3": SamplingParams(n=3, max_tokens=8, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True),
    "logprobs": SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True),
}


@pytest.mark.parametrize("case", list(ASYNC_CASES))
@pytest.mark.parametrize("allocator,args,kw", [
    ("paged", {"block_size": 4}, {}),
    ("paged", {"block_size": 4}, {"kv_cache_tokens": 96}),  # recompute preemption
    ("paged", {"block_size": 4}, {"kv_cache_tokens": 96, "preemption_mode": "swap"}),
    ("contiguous", {"policy": "pow2"}, {}),
    ("virtual", {"backend": "host", "page_size": 4096}, {}),
], ids=["paged", "paged-recompute", "paged-swap", "contiguous", "virtual"])
def test_async_scheduling_gives_the_same_outputs(case, allocator, args, kw):
    """Tokens read one step late (fed to the next step on the device) change nothing."""
    p = ASYNC_CASES[case]
    sync = _llm(allocator, args, **kw).generate(PROMPTS, p)
    llm = _llm(allocator, args, async_scheduling=True, **kw)
    got = llm.generate(PROMPTS, p)
    for a, b in zip(got, sync):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.logprobs for c in a.outputs] == [c.logprobs for c in b.outputs]
        assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in b.outputs]
    assert not llm.engine.has_unfinished_requests()
    stats = llm.engine.allocator.stats()
    assert stats.free + stats.external_frag + stats.idle_mapped == stats.capacity


@pytest.mark.parametrize("case", ["reclaim", "chunked", "failed-step"])
def test_async_virtual_unmaps_only_once_the_launched_steps_are_done(case):
    """Unmapping a page is not ordered by the device's stream: with asynchronous scheduling the
    virtual allocator first waits for the newest launched step (the device runs steps in order),
    whether it was read back or not, sampled anything or not (a prefill chunk), or failed. Without
    that wait an H200 faulted (illegal address) in qwen3-0.6b's offline run. On CPU: at every
    unmap the newest launched step's handle has completed, and the tokens are the synchronous
    engine's (where no step was made to fail)."""
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 64, 17, 90, 120, 33, 7, 150, 60)]
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    # tight: idle slots' pages are reclaimed; "chunked": prompts split into chunks that sample nothing
    kw = dict(max_model_len=256, kv_cache_tokens=256, max_num_seqs=8,
              max_num_batched_tokens=32 if case == "chunked" else 2048)
    args = {"backend": "host", "page_size": 4096}
    llm = _llm("virtual", args, async_scheduling=True, **kw)
    eng = llm.engine
    launched, seen = [], []
    launch = eng.runner.launch

    def tracked(batch, inflight=None):
        launched.append(launch(batch, inflight))
        return launched[-1]

    eng.runner.launch = tracked
    backend = eng.allocator.backend
    unmap = backend.unmap

    def checked(r, page):
        seen.append(not launched or launched[-1].complete)
        unmap(r, page)

    backend.unmap = checked
    if case == "failed-step":  # output handling fails once: the step in flight is undone, unread
        resolve, calls = eng._resolve, [0]

        def failing(handle):
            calls[0] += 1
            if calls[0] == 34:  # a point after which pages are reclaimed (found by trying)
                raise RuntimeError("injected output-handling failure")
            return resolve(handle)

        eng._resolve = failing
    got = llm.generate(prompts, p)
    assert len(seen) > 0 and all(seen)
    assert not eng.has_unfinished_requests()
    if case != "failed-step":
        want = _llm("virtual", args, async_scheduling=False, **kw).generate(prompts, p)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    if case == "chunked":  # the case it is about: steps that sampled nothing were launched
        assert any(not h.seqs for h in launched)


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
def test_step_host_time_holds_output_handling(async_):
    """A step's recorded host time holds its output handling in both modes (overlapped: the
    previous step's outputs, handled while this one runs): simulate's host tables are made of it."""
    import time

    llm = _llm(async_scheduling=async_)
    eng = llm.engine
    process = eng.output_processor.process

    def slow(*a, **k):
        time.sleep(0.004)
        return process(*a, **k)

    eng.output_processor.process = slow
    llm.generate(PROMPTS, GREEDY)
    handled = [r.host_s for r in eng.step_records if r.num_seqs][1:]  # async: the first step reads nothing
    assert handled and min(handled) >= 0.004


def test_async_scheduling_stops_late_but_drops_the_extra_token():
    """A stop token is seen one step after it was sampled; the token sampled past it is dropped."""
    greedy = _llm().generate([PROMPTS[1]], GREEDY)[0].token_ids
    stop_at = greedy[3]
    p = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at])
    want = _llm().generate([PROMPTS[1]], p)[0]
    llm = _llm(async_scheduling=True)
    got = llm.generate([PROMPTS[1]], p)[0]
    assert got.token_ids == want.token_ids == greedy[: greedy.index(stop_at) + 1]
    assert got.outputs[0].finish_reason == "stop"
    text = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].text
    stop = text[3:6]
    s = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=[stop])
    assert llm.generate([PROMPTS[1]], s)[0].text == _llm().generate([PROMPTS[1]], s)[0].text


@pytest.mark.parametrize("kw", [{}, {"kv_cache_tokens": 160}, {"kv_cache_tokens": 160, "preemption_mode": "swap"}],
                         ids=["roomy", "recompute", "swap"])
def test_async_scheduling_with_prefix_caching_gives_the_same_tokens(kw):
    """Under asynchronous scheduling a block that fills with a token not yet read back is
    indexed once the token is known: a second turn (prompt + first answer) hits the same cached
    blocks as under synchronous scheduling, the tokens are the same, and no cached block is keyed
    on a pending id."""
    shared = list(range(100, 148))  # three blocks of 16
    first = [shared + [7, 8, 9], shared + [10, 11], list(range(200, 237))]
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    def two_turns(**extra):
        llm = _llm(enable_prefix_caching=True, **kw, **extra)
        a = llm.generate(first, p)
        second = [q + o.token_ids for q, o in zip(first, a)]
        b = llm.generate(second, p)
        return llm, [o.token_ids for o in a + b], [o.metrics.num_cached_tokens for o in b]

    llm, tokens, hits = two_turns(async_scheduling=True)
    _, sync_tokens, sync_hits = two_turns()
    assert tokens == sync_tokens == [o.token_ids for o in _llm(**kw).generate(first, p)] + tokens[3:]
    assert hits == sync_hits and sum(hits) > 0
    if not kw:  # room for everything: every full block of turn one, generated tokens included, hits
        assert hits == [80, 80, 64]
    keys = llm.engine.allocator.cache._block_of
    assert keys and all(min(k[1]) >= 0 for k in keys)


def test_prefix_caching_under_preemption_never_pins_the_pool():
    """A request preempted by recompute finds its own blocks cached when it is tried again; one
    that then does not fit used to keep them while waiting, and with several such requests put
    back in front of the queue the whole pool ended up pinned by waiting requests: nothing ran,
    nothing finished (found in simulate at 600 ShareGPT requests; the real engine hung the same)."""
    from engine import LLMEngine
    from engine.config import EngineConfig

    prompts = [[5 + (7 * i + j) % 400 for j in range(30 + 9 * (i % 7))] for i in range(16)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    def run(caching: bool):
        eng = LLMEngine(EngineConfig(model="tiny-llama", allocator="paged", allocator_args={"block_size": 16},
                                     device="cpu", max_model_len=256, kv_cache_tokens=256,
                                     max_num_batched_tokens=256, enable_prefix_caching=caching))
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params)
        outs, steps = {}, 0
        while eng.has_unfinished_requests() and steps < 5000:  # bounded: a pinned pool loops forever
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0].token_ids
            steps += 1
        return outs, eng

    cached, eng = run(True)
    assert not eng.has_unfinished_requests(), f"{eng.num_running} running, pool pinned by waiting requests"
    assert eng.scheduler.num_preemptions > 0 and eng.allocator.prefix_cache_hit_rate > 0
    assert cached == run(False)[0]  # and the same tokens as without the cache


def test_a_closed_engine_is_collected_after_start_up_froze_it():
    """The CUDA runner freezes start-up objects (gc.freeze); close() must let a dropped engine be
    collected, weights included, or a process that builds engine after engine (bench, profile)
    keeps them all."""
    import gc
    import weakref

    from engine import LLMEngine
    from engine.config import EngineConfig

    eng = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256))
    gc.freeze()  # what ModelRunner does on CUDA after start-up
    try:
        model = weakref.ref(eng.model)
        eng.runner.launch = lambda *a, _e=eng: None  # a cycle through the engine, as wrappers make
        eng.close()
        del eng
        gc.collect()
        assert model() is None
    finally:
        gc.unfreeze()


def test_greedy_sampling_takes_bf16_logits_as_they_are():
    """Greedy steps argmax the model-dtype logits (no float32 copy); the result is float32's, and
    min_tokens and logprobs still work (those widen)."""
    from types import SimpleNamespace

    from engine.sampler import Sampler

    g = torch.Generator().manual_seed(0)
    logits32 = torch.randn(6, 50, generator=g)
    logits32[2, 7] = logits32[2].max() + 5  # the EOS is the argmax of row 2
    logits = logits32.to(torch.bfloat16)

    def seqs(**kw):
        return [SimpleNamespace(params=SamplingParams(temperature=0, **kw), num_output_tokens=0, seq_id=i)
                for i in range(6)]

    s = Sampler("cpu")
    tokens, lp = s.sample(logits.clone(), seqs(), eos_ids=[7])
    assert lp is None and tokens.tolist() == logits.float().argmax(-1).tolist()
    assert tokens[2] == 7
    tokens, _ = s.sample(logits.clone(), seqs(min_tokens=1), eos_ids=[7])  # EOS banned at first
    assert tokens[2] != 7 and tokens.tolist()[:2] == logits.float().argmax(-1).tolist()[:2]
    tokens, lp = s.sample(logits.clone(), seqs(logprobs=2), eos_ids=[7])
    assert lp.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(lp[:, 0], ref.gather(1, tokens[:, None]).squeeze(1))


def test_async_scheduling_auto_is_on_for_one_cuda_device_and_in_simulate():
    from engine.config import EngineConfig

    c = EngineConfig()
    assert c.async_scheduling == "auto"
    assert c.resolved_async("cuda") and c.resolved_async("cuda:0") and c.resolved_async("cpu", simulate=True)
    assert not c.resolved_async("cpu")
    assert not EngineConfig(tensor_parallel_size=2).resolved_async("cuda")
    assert EngineConfig(async_scheduling=True).resolved_async("cpu")
    assert not EngineConfig(async_scheduling=False).resolved_async("cuda")
    with pytest.raises(ValueError, match="async_scheduling must be true, false or auto"):
        EngineConfig(async_scheduling="yes")
    e = LLM(model="tiny-llama", device="cpu", kv_cache_tokens=256, max_model_len=64).engine
    assert e.async_auto and e.config.async_scheduling is False  # resolved once, at start-up
