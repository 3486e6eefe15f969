"""vLLM's penalties and min-p (SamplingParams.presence_penalty, frequency_penalty,
repetition_penalty, min_p) against their oracles: HF transformers' RepetitionPenaltyLogitsProcessor
and MinPLogitsWarper on random logits and token ids, OpenAI's closed form for presence and
frequency; end to end, greedy generation equals HF ``generate(repetition_penalty=...)`` (and HF
with the closed form as a logits processor), with synchronous and asynchronous steps (on CPU,
``async_scheduling=True`` overlaps steps too: a step's last token is still in flight when the
next is sampled, and the penalties count it from the device)."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from engine import LLM, SamplingParams
from engine.sampler import Sampler, apply_min_p
from engine.sequence import PENDING, Sequence

V = 97
# the unit oracles on the GPU too: its scatter_add / index_put_ counting and the in-flight token
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _seq(prompt: list[int], output: list[int], **params) -> Sequence:
    s = Sequence("r", prompt, SamplingParams(temperature=0, **params), max_model_len=1024)
    for t in output:
        s.append_token(t, None, 0.0)
    return s


def _random_case(seed: int, settings: list[dict]):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for kw in settings:
        # a small range of ids: tokens repeat in the output, and the prompt and output overlap
        prompt = torch.randint(0, 30, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        output = torch.randint(0, 30, (int(torch.randint(0, 25, (1,), generator=g)),), generator=g).tolist()
        seqs.append(_seq(prompt, output, **kw))
    logits = torch.randn(len(seqs), V, generator=g) * 3
    return logits, seqs


def _closed_form(logits_row: torch.Tensor, output: list[int], freq: float, pres: float) -> torch.Tensor:
    """OpenAI's definition: logits -= frequency * count + presence * (count > 0), over the output."""
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits_row.shape[-1]).float()
    counts = counts.to(logits_row.device)
    return logits_row - freq * counts - pres * (counts > 0).float()


def _oracle(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """HF's repetition penalty over prompt + output ids, then the closed form (vLLM's order)."""
    rows = []
    for x, s in zip(logits, seqs):
        p = s.params
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([s.token_ids]), x[None].clone())[0]
        rows.append(_closed_form(x, s.output_token_ids, p.frequency_penalty, p.presence_penalty))
    return torch.stack(rows)


SETTINGS = [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),  # < 1 favours repeats
    dict(frequency_penalty=0.5),
    dict(presence_penalty=-1.2),
    dict(frequency_penalty=2.0, presence_penalty=2.0),
    dict(repetition_penalty=1.8, frequency_penalty=-0.4, presence_penalty=0.6),
    dict(),  # no penalty, in a batch with some: untouched
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(5))
def test_penalties_equal_hf_repetition_penalty_and_the_closed_form(seed, device):
    logits, seqs = _random_case(seed, SETTINGS)
    got = logits.clone().to(device)
    Sampler(device)._apply_penalties(got, seqs, [i for i, s in enumerate(seqs) if s.params.penalized], None)
    # the GPU's float32 division may differ from the CPU's in the last bit
    torch.testing.assert_close(got.cpu(), _oracle(logits, seqs), rtol=0, atol=1e-6 if device == "cpu" else 1e-5)
    assert torch.equal(got[-1].cpu(), logits[-1])


@pytest.mark.parametrize("penalty", [0.5, 1.2, 3.0])
def test_repetition_penalty_is_hf_s_processor_exactly(penalty):
    """Only the repetition penalty: bit for bit HF's (a logit > 0 divided, else multiplied), over
    every token of the prompt and of the output, each counted once however often it occurs."""
    for seed in range(3):
        logits, seqs = _random_case(100 + seed, [dict(repetition_penalty=penalty)] * 6)
        got = logits.clone()
        Sampler("cpu")._apply_penalties(got, seqs, list(range(len(seqs))), None)
        want = torch.cat([RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([s.token_ids]), x[None].clone())
                          for x, s in zip(logits, seqs)])
        assert torch.equal(got, want)
        # and it did something: tokens seen are changed, the others are not
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for i, s in enumerate(seqs):
            seen[i, s.token_ids] = True
        assert torch.equal(got[~seen], logits[~seen]) and (got[seen] != logits[seen]).all()


def test_presence_and_frequency_count_the_output_only():
    """The prompt's tokens are not penalised by presence / frequency (OpenAI, vLLM): only the output."""
    s = _seq([7, 7, 7, 9], [3, 3, 3, 9, 5], presence_penalty=0.25, frequency_penalty=0.5)
    logits = torch.zeros(1, 12)
    Sampler("cpu")._apply_penalties(logits, [s], [0], None)
    want = torch.zeros(12)
    want[3] = -(3 * 0.5 + 0.25)
    want[9] = -(0.5 + 0.25)
    want[5] = -(0.5 + 0.25)
    assert torch.equal(logits[0], want)  # 7 (prompt only) untouched


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_takes_the_argmax_of_the_penalised_logits_and_logprobs_stay_raw(device):
    """A batch of greedy rows with and without penalties: each token is the argmax of its own
    row's penalised logits; the logprobs reported are the model's (vLLM's raw logprobs)."""
    logits, seqs = _random_case(7, SETTINGS)
    tokens, _ = Sampler(device).sample(logits.clone().to(device), seqs, eos_ids=[])
    tokens = tokens.cpu()
    assert tokens.tolist() == _oracle(logits, seqs).argmax(dim=-1).tolist()
    # the penalties decide some of these tokens (else the test would not tell)
    assert tokens.tolist() != logits.argmax(dim=-1).tolist()
    for s in seqs:
        s.params.logprobs = 2
    tokens2, packed = Sampler(device).sample(logits.clone().to(device), seqs, eos_ids=[])
    packed = packed.cpu()
    assert tokens2.tolist() == tokens.tolist()
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(packed[:, 0], raw.gather(1, tokens[:, None])[:, 0])
    torch.testing.assert_close(packed[:, 1:3], raw.topk(2, dim=-1).values)


class _Inflight:
    """What the sampler reads of the in-flight step's handle (StepHandle.rows, .tokens)."""

    def __init__(self, seqs: list[Sequence], tokens: list[int]):
        self.rows = {s.seq_id: i for i, s in enumerate(seqs)}
        self.tokens = torch.tensor(tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_a_token_still_in_flight_is_counted_from_the_device(device):
    """Asynchronous scheduling: the last output token may not be read back yet (PENDING); the
    penalties count it from the in-flight step's sampled tokens, as if it were known."""
    logits, known = _random_case(11, SETTINGS[:6])
    _, pending = _random_case(11, SETTINGS[:6])
    last = [s.output_token_ids[-1] if s.output_token_ids else 4 for s in known]
    for s, t in zip(known, last):
        if not s.output_token_ids:
            s.append_token(t, None, 0.0)
    for s in pending:
        if s.output_token_ids:
            s.output_token_ids.pop()
            s.token_ids.pop()
        s.append_pending()
        assert s.output_token_ids[-1] == PENDING
    # the in-flight step sampled other sequences too, in another order
    others = [_seq([1], []) for _ in range(3)]
    inflight = _Inflight(others[:1] + pending[::-1] + others[1:], [0] + last[::-1] + [0, 0])
    inflight.tokens = inflight.tokens.to(device)
    rows = list(range(len(known)))
    a, b = logits.clone().to(device), logits.clone().to(device)
    Sampler(device)._apply_penalties(a, known, rows, None)
    Sampler(device)._apply_penalties(b, pending, rows, inflight)
    assert torch.equal(a, b)
    assert not torch.equal(a.cpu(), logits)


def test_a_batch_without_penalties_never_counts_tokens(monkeypatch):
    """The fast path (greedy, no logprobs) is what it was for a batch where no row has a penalty."""
    def boom(*a, **k):
        raise AssertionError("penalties applied to a batch without any")

    monkeypatch.setattr(Sampler, "_apply_penalties", boom)
    logits, seqs = _random_case(3, [dict(), dict(min_p=0.5), dict(repetition_penalty=1.0)])
    tokens, packed = Sampler("cpu").sample(logits.clone(), seqs, eos_ids=[])
    assert packed is None and tokens.tolist() == logits.argmax(dim=-1).tolist()


# -- min_p -------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.3, 0.9, 1.0])
def test_min_p_removes_what_hf_s_warper_removes(min_p):
    g = torch.Generator().manual_seed(int(min_p * 1000))
    logits = torch.randn(16, 200, generator=g) * 4
    got = apply_min_p(logits, torch.full((16,), min_p))
    want = MinPLogitsWarper(min_p)(None, logits.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])  # what stays is untouched
    assert (~torch.isinf(got)).sum(dim=-1).min() >= 1
    if min_p < 1:
        assert torch.isinf(got).any() and not torch.isinf(got).all(dim=-1).any()


def test_min_p_per_row_after_temperature():
    """Each row its own min_p, applied to logits / temperature (vLLM's order; HF's
    TemperatureLogitsWarper then MinPLogitsWarper): a sampled token is always one that HF keeps."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(V, generator=g)
    cases = [(0.5, 0.2), (1.0, 0.2), (2.0, 0.2), (1.0, 0.0), (1.5, 0.6)]
    seqs, allowed = [], []
    for t, mp in cases:
        seqs.append(Sequence("r", [1], SamplingParams(temperature=t, min_p=mp), max_model_len=64))
        z = base[None] / t
        allowed.append(~torch.isinf(MinPLogitsWarper(mp)(None, z.clone())[0]) if mp else torch.ones(V, dtype=bool))
    reps = 400
    batch = [s for s in seqs for _ in range(reps)]
    tokens, _ = Sampler("cpu", seed=3).sample(base.repeat(len(batch), 1), batch, eos_ids=[])
    tokens = tokens.view(len(cases), reps)
    for (t, mp), drawn, ok in zip(cases, tokens, allowed):
        assert ok[drawn].all(), (t, mp)
        if mp:  # the set is smaller than the vocabulary, and the draws reach more than one token
            assert ok.sum() < V and len(set(drawn.tolist())) > 1
    # a higher temperature flattens the distribution: min_p keeps more tokens
    assert allowed[0].sum() < allowed[1].sum() < allowed[2].sum()


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(presence_penalty=2.5), r"presence_penalty must be a finite number in \[-2, 2\], got 2.5"),
    (dict(frequency_penalty=-3), r"frequency_penalty must be a finite number in \[-2, 2\], got -3"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty must be a finite number in \[-2, 2\]"),
    (dict(repetition_penalty=0), r"repetition_penalty must be a finite number in \[0.001, 1000\], got 0"),
    (dict(repetition_penalty=float("inf")), r"repetition_penalty must be a finite number in \[0.001, 1000\]"),
    (dict(repetition_penalty=1e-300), r"repetition_penalty must be a finite number in \[0.001, 1000\]"),
    (dict(repetition_penalty=1e4), r"repetition_penalty must be a finite number in \[0.001, 1000\]"),
    (dict(min_p=1.5), r"min_p must be a finite number in \[0, 1\], got 1.5"),
    (dict(min_p=-0.1), r"min_p must be a finite number in \[0, 1\]"),
    (dict(presence_penalty="1"), r"presence_penalty must be a finite number"),
    (dict(include_stop_str_in_output=1), r"include_stop_str_in_output must be true or false"),
    (dict(beam_width=2, temperature=0, repetition_penalty=1.2), r"penalties are not supported with beam search"),
])
def test_sampling_params_refuse_out_of_range_values_naming_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_neutral_and_edge_values_are_accepted():
    for kw in (dict(presence_penalty=-2, frequency_penalty=2), dict(repetition_penalty=1e-3), dict(min_p=0),
               dict(min_p=1), dict(repetition_penalty=1000)):
        SamplingParams(**kw)
    assert not SamplingParams(min_p=0.5).penalized and SamplingParams(frequency_penalty=0.1).penalized


# -- end to end ----------------------------------------------------------------------------------
MAX_TOKENS = 16


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (1, 5, 17, 33, 9)]


class _OpenAIPenalties(LogitsProcessor):
    """The closed form over the generated ids (after the prompt), for HF's generate."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        return _closed_form(scores[0], input_ids[0, self.prompt_len:].tolist(), self.frequency, self.presence)[None]


def _hf(model, prompts, **kw):
    dev = next(model.parameters()).device
    out = []
    for p in prompts:
        extra = {}
        if "frequency_penalty" in kw:
            extra["logits_processor"] = LogitsProcessorList([_OpenAIPenalties(len(p), kw["frequency_penalty"],
                                                                              kw["presence_penalty"])])
        ids = model.generate(torch.tensor([p], device=dev), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0, repetition_penalty=kw.get("repetition_penalty", 1.0), **extra)
        out.append(ids[0, len(p):].tolist())
    return out


PENALTY_CASES = {
    "repetition": dict(repetition_penalty=1.5),
    "presence-frequency": dict(frequency_penalty=0.6, presence_penalty=0.4),
    # penalties that favour repeats: the last token (in flight under async scheduling) decides
    # what comes next, so counting it late or not at all shows
    "repetition-below-1": dict(repetition_penalty=0.5),
    "negative": dict(frequency_penalty=-1.0, presence_penalty=-0.5),
}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("case", list(PENALTY_CASES))
def test_greedy_with_penalties_equals_hf_generate(hf_llama, case, async_scheduling, monkeypatch):
    path, hf = hf_llama
    kw = PENALTY_CASES[case]
    prompts = _prompts(hf.config.vocab_size)
    want = _hf(hf, prompts, **kw)
    plain = _hf(hf, prompts)
    assert want != plain  # the penalty changes the greedy tokens of this model
    in_flight = []
    apply = Sampler._apply_penalties

    def spy(self, logits, seqs, rows, inflight):
        in_flight.append(sum(seqs[i].output_token_ids[-1:] == [PENDING] for i in rows))
        return apply(self, logits, seqs, rows, inflight)

    monkeypatch.setattr(Sampler, "_apply_penalties", spy)
    llm = LLM(path, device="cpu", async_scheduling=async_scheduling, block_size=4)
    # penalised requests batched with plain ones (those get HF's plain greedy tokens)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, **kw)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts + prompts, [params] * len(prompts) + [greedy] * len(prompts))
    assert [o.token_ids for o in outs[:len(prompts)]] == want
    assert [o.token_ids for o in outs[len(prompts):]] == plain
    # asynchronous steps: most tokens were sampled while the previous one was still on the device
    assert (sum(in_flight) > 0) == async_scheduling


def _mixed_penalty_batch(max_tokens: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts, and seeded random sampling with every penalty and min_p (n=2) beside greedy rows
    with one penalty each or none."""
    prompts = [list(range(5, 5 + n)) for n in (3, 12, 30, 7, 21, 9, 14)]
    common = dict(max_tokens=max_tokens, ignore_eos=True)
    params = [SamplingParams(n=2, temperature=1.0, seed=11, repetition_penalty=1.3, frequency_penalty=0.5,
                             presence_penalty=0.3, min_p=0.05, **common),
              SamplingParams(temperature=0, **common),
              SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=1, **common),
              SamplingParams(temperature=0.8, seed=3, frequency_penalty=-0.5, **common),
              SamplingParams(temperature=0, presence_penalty=1.5, **common),
              # favouring repeats: the token in flight decides the next
              SamplingParams(temperature=0, repetition_penalty=0.5, **common),
              SamplingParams(temperature=0, presence_penalty=-1.0, **common)]
    return prompts, params


@pytest.mark.parametrize("allocator,kw", [
    ("paged", dict(block_size=4)),
    ("paged", dict(block_size=4, kv_cache_tokens=96)),  # recompute preemption
    ("contiguous", dict(policy="pow2")),
], ids=["paged", "paged-recompute", "contiguous"])
def test_async_scheduling_gives_the_same_tokens_with_penalties(allocator, kw):
    """Seeded random sampling with every penalty and min_p, n=2, beside plain requests: the same
    tokens whether each step's tokens are read back at once or one step late."""
    prompts, params = _mixed_penalty_batch(max_tokens=20)
    outs = {}
    for async_ in (False, True):
        llm = LLM("tiny-llama", allocator, device="cpu", max_model_len=128, async_scheduling=async_, **kw)
        outs[async_] = llm.generate(prompts, params)
    for a, b in zip(outs[True], outs[False]):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.logprobs for c in a.outputs] == [c.logprobs for c in b.outputs]


# -- on the GPU: the runner's staging, CUDA graphs and asynchronous steps --------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("case", ["repetition", "presence-frequency", "repetition-below-1"])
def test_greedy_with_penalties_on_the_gpu_equals_hf_generate(hf_llama, case, async_scheduling):
    """float32 on the GPU (CUDA graphs for decode, the runner's pinned staging of the penalty
    tables), HF's generate on the same weights on the same GPU."""
    import copy

    path, hf_cpu = hf_llama
    hf = copy.deepcopy(hf_cpu).to("cuda")
    kw = PENALTY_CASES[case]
    prompts = _prompts(hf.config.vocab_size)
    want = [[int(t) for t in o] for o in _hf(hf, prompts, **kw)]
    plain = [[int(t) for t in o] for o in _hf(hf, prompts)]
    assert want != plain
    llm = LLM(path, device="cuda", dtype="float32", async_scheduling=async_scheduling, max_model_len=128,
              kv_cache_tokens=4096)  # not 90% of the GPU: the last test's engine may not be freed yet
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, **kw)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts + prompts, [params] * len(prompts) + [greedy] * len(prompts))
    assert [o.token_ids for o in outs[:len(prompts)]] == want
    assert [o.token_ids for o in outs[len(prompts):]] == plain



@pytest.mark.gpu
@pytest.mark.parametrize("allocator,args", [("paged", {}), ("contiguous", {"policy": "max"}),
                                            ("virtual", {"layout": "shared"})], ids=["paged", "contiguous", "virtual"])
def test_async_scheduling_gives_the_same_tokens_with_penalties_on_the_gpu(allocator, args):
    """As on the CPU: seeded sampling with every penalty and min_p, beside plain greedy rows, the
    same tokens and logprobs whether steps overlap or not (bf16, CUDA graphs)."""
    prompts, params = _mixed_penalty_batch(max_tokens=24)
    outs = {}
    for async_ in (False, True):
        llm = LLM("tiny-llama", allocator, allocator_args=dict(args), device="cuda", max_model_len=128,
                  kv_cache_tokens=4096 if allocator != "virtual" else 16 * 8192, async_scheduling=async_)
        outs[async_] = llm.generate(prompts, params)
    for a, b in zip(outs[True], outs[False]):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.logprobs for c in a.outputs] == [c.logprobs for c in b.outputs]
    # the penalties act on the GPU too: without them the greedy rows' tokens differ
    bare = LLM("tiny-llama", allocator, allocator_args=dict(args), device="cuda", max_model_len=128,
               kv_cache_tokens=4096 if allocator != "virtual" else 16 * 8192).generate(
        prompts[2:3], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert bare[0].token_ids != outs[False][2].token_ids
