"""What the sampler draws, against an oracle: temperature, top-k and top-p (and the three
together; min-p with them, HF's MinPLogitsWarper as its oracle) checked on fixed logits, by
membership (no draw outside the allowed set) and by
frequency (the empirical distribution is softmax(logits / T) renormalised over that set).

The oracle is written here in float64 numpy, independently of engine/sampler.py. Every case
is ~20k independent draws, all of a group sampled in one batched ``Sampler.sample`` call (so
the per-row temperatures, k and p of a mixed batch are exercised as well). The sampler's
generator has a fixed seed, so the draws, and the outcome, are deterministic; the bounds (5
sigma per token, a chi-square far in its tail) would make a failure of a correct sampler
negligible (~1e-4 over the whole file) even with a fresh seed.

Seeded requests drawing the same tokens whatever they are batched with is covered elsewhere
(test_engine_features.py::test_seeded_parallel_samples_differ_and_reproduce on CPU,
test_gpu_engine.py::test_seeded_sampling_is_reproducible_on_gpu), so it is not repeated here.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

# 12 distinct logits, deliberately not in index order: the sampler sorts, filters and scatters back
LOGITS = np.array([-0.1, 2.1, -1.4, 0.9, -2.7, 1.6, -0.5, 0.2, -2.0, 1.2, -0.9, 0.5])
V = len(LOGITS)
N = 20_000  # draws per case


def oracle(temperature: float, top_k: int = -1, top_p: float = 1.0, logits=LOGITS) -> np.ndarray:
    """Each token's probability (float64): softmax(logits / T) over the k largest logits, then
    over the nucleus of those: the smallest prefix (by decreasing probability) whose mass
    reaches ``top_p`` (vLLM's and HF's convention: a token is in iff the mass before it is < p)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    k = top_k if 0 < top_k < len(z) else len(z)
    kept = order[:k]
    q = np.exp(z[kept] - z[kept].max())
    q /= q.sum()
    if top_p < 1.0:
        cum = np.cumsum(q)
        # a case whose p sits on a prefix sum would depend on rounding: keep them out of here
        assert np.abs(cum[:-1] - top_p).min() > 1e-4, "ambiguous case: p is on a prefix sum"
        before = cum - q
        kept, q = kept[before < top_p], q[before < top_p]
        q = q / q.sum()
    out = np.zeros(len(z))
    out[kept] = q
    return out


def sorted_prefix_sums(temperature: float) -> np.ndarray:
    z = LOGITS / temperature
    q = np.sort(np.exp(z - z.max()) / np.exp(z - z.max()).sum())[::-1]
    return np.cumsum(q)


S1 = sorted_prefix_sums(1.0)

# (temperature, top_k, top_p), sampled together in one batch with no top-k / top-p at all
# (the sampler skips its filter then)
TEMPERATURE_CASES = {
    "T0.5": (0.5, -1, 1.0),
    "T1": (1.0, -1, 1.0),
    "T2": (2.0, -1, 1.0),
}
# sampled together in one batch that goes through the top-k / top-p filter
FILTER_CASES = {
    "k2": (1.0, 2, 1.0),
    "k3": (1.0, 3, 1.0),
    "k5-T2": (2.0, 5, 1.0),
    "k3-T0.5": (0.5, 3, 1.0),
    "p0.5": (1.0, -1, 0.5),
    "p0.8": (1.0, -1, 0.8),
    "p0.9-T2": (2.0, -1, 0.9),
    "p0.6-T0.5": (0.5, -1, 0.6),
    # just below / just above the mass of the 3 most likely tokens: 3 tokens / 4 tokens
    "p-below-S3": (1.0, -1, float(S1[2]) - 2e-3),
    "p-above-S3": (1.0, -1, float(S1[2]) + 2e-3),
    # all three: top-p applies to the top-k renormalised distribution of logits / T
    # (each nucleus is smaller than both top-k's set and the nucleus of the full distribution)
    "T0.7-k3-p0.8": (0.7, 3, 0.8),
    "T1.5-k4-p0.8": (1.5, 4, 0.8),
    "T2-k5-p0.75": (2.0, 5, 0.75),
    # no limit, in a batch that is filtered for other rows: untouched
    "unlimited": (1.0, -1, 1.0),
    "k-vocab": (1.3, V, 1.0),
    "k-over-vocab": (1.3, 1000, 1.0),
}
ALL_CASES = {**TEMPERATURE_CASES, **FILTER_CASES}


def _draw(cases: dict, seed: int, logits=LOGITS) -> dict[str, np.ndarray]:
    """N draws per case, every case's rows in one ``Sampler.sample`` call. Each case's rows share
    one Sequence (unseeded rows all draw from the sampler's generator: only the params matter)."""
    seqs = []
    for i, (t, k, p) in enumerate(cases.values()):
        params = SamplingParams(temperature=t, top_k=k, top_p=p, max_tokens=1)
        seqs += [Sequence(f"case{i}", [1, 2, 3], params, max_model_len=64)] * N
    x = torch.tensor(logits, dtype=torch.float32).repeat(len(seqs), 1)
    tokens, logprobs = Sampler("cpu", seed=seed).sample(x, seqs, eos_ids=[])
    assert logprobs is None and tokens.shape == (len(seqs),)
    tokens = tokens.numpy().reshape(len(cases), N)
    return dict(zip(cases, tokens))


@pytest.fixture(scope="module")
def draws() -> dict[str, np.ndarray]:
    return {**_draw(TEMPERATURE_CASES, seed=1234), **_draw(FILTER_CASES, seed=4321)}


def _check_frequencies(tokens: np.ndarray, q: np.ndarray, what: str) -> None:
    counts = np.bincount(tokens, minlength=len(q)).astype(np.float64)
    n = counts.sum()
    expected = n * q
    # per token: within 5 binomial sigmas (+3 draws of slack for the tiny probabilities)
    sigma = np.sqrt(n * q * (1 - q))
    bad = np.abs(counts - expected) > 5 * sigma + 3
    assert not bad.any(), (f"{what}: tokens {np.flatnonzero(bad).tolist()} off; counts {counts.astype(int).tolist()}"
                           f" vs expected {np.round(expected, 1).tolist()}")
    # chi-square over the allowed tokens, those expected < 5 times pooled into one cell
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big & (q > 0)].sum()] if (~big & (q > 0)).any() else [])
    exp = list(expected[big]) + ([expected[~big & (q > 0)].sum()] if (~big & (q > 0)).any() else [])
    obs, exp = np.array(obs), np.array(exp)
    keep = exp > 0
    chi2 = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    df = max(int(keep.sum()) - 1, 1)
    limit = df + 7 * math.sqrt(2 * df)  # P(chi2_df > limit) < 1e-5 for these df
    assert chi2 < limit, f"{what}: chi-square {chi2:.1f} >= {limit:.1f} (df {df}); counts {counts.astype(int).tolist()}"


def _top_k_set(k: int) -> set[int]:
    return set(np.argsort(-LOGITS)[:k].tolist())


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_draws_only_the_k_most_likely_tokens(draws, k):
    want = _top_k_set(k)
    cases = [c for c, (t, kk, p) in FILTER_CASES.items() if kk == k]
    assert cases
    for case in cases:
        t, kk, p = FILTER_CASES[case]
        got = set(np.unique(draws[case]).tolist())
        assert got <= want, f"{case}: drew {sorted(got - want)} outside the top {k} {sorted(want)}"
        if p == 1.0:
            assert got == want, f"{case}: never drew {sorted(want - got)} of the top {k}"


@pytest.mark.parametrize("case", [c for c, (t, k, p) in FILTER_CASES.items() if p < 1])
def test_top_p_draws_only_the_nucleus(draws, case):
    t, k, p = FILTER_CASES[case]
    want = set(np.flatnonzero(oracle(t, k, p)).tolist())
    got = set(np.unique(draws[case]).tolist())
    assert got <= want, f"{case}: drew {sorted(got - want)} outside the nucleus {sorted(want)}"


def test_top_p_keeps_the_smallest_prefix_that_reaches_p(draws):
    """p a hair below the mass of the 3 most likely tokens: those 3 reach it; a hair above: a 4th
    is needed. Exactly those sets are drawn."""
    top = np.argsort(-LOGITS)
    assert np.count_nonzero(oracle(1.0, -1, S1[2] - 2e-3)) == 3  # the oracle agrees (sanity)
    assert np.count_nonzero(oracle(1.0, -1, S1[2] + 2e-3)) == 4
    assert set(np.unique(draws["p-below-S3"]).tolist()) == set(top[:3].tolist())
    assert set(np.unique(draws["p-above-S3"]).tolist()) == set(top[:4].tolist())


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_frequencies_match_the_renormalised_softmax(draws, case):
    t, k, p = ALL_CASES[case]
    _check_frequencies(draws[case], oracle(t, k, p), case)


def test_the_cases_tell_the_settings_apart():
    """Sanity of the cases themselves: every setting changes the distribution it is checked
    against, so that ignoring it (or applying another) cannot pass the frequency test."""
    base = {c: oracle(*v) for c, v in ALL_CASES.items()}
    for t in (0.5, 2.0):
        assert np.abs(oracle(t) - oracle(1.0)).max() > 0.05
    for c, (t, k, p) in FILTER_CASES.items():
        if 0 < k < V or p < 1:
            assert np.abs(base[c] - oracle(t)).max() > 0.02, c
        if 0 < k < V and p < 1:  # top-p over the top-k renormalised distribution, not the full one
            assert np.abs(base[c] - oracle(t, -1, p)).max() > 0.02, c
            assert np.abs(base[c] - oracle(t, k, 1.0)).max() > 0.02, c


def test_greedy_rows_in_a_sampled_batch_take_the_argmax():
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5), SamplingParams(temperature=1.0, top_k=3)]
    seqs = [Sequence(f"g{i}", [1], params[i % 2], max_model_len=64) for i in range(2000)]
    x = torch.tensor(LOGITS, dtype=torch.float32).repeat(len(seqs), 1)
    tokens, _ = Sampler("cpu", seed=7).sample(x, seqs, eos_ids=[])
    tokens = tokens.numpy()
    assert (tokens[0::2] == int(np.argmax(LOGITS))).all()
    assert set(np.unique(tokens[1::2]).tolist()) == _top_k_set(3)


def test_top_p_exact_boundary_excludes_the_token_after_mass_p():
    """Dyadic probabilities 1/2, 1/4, 1/8, 1/16, 1/16 (exact in float32), top_p = 3/4: the first
    two tokens reach 3/4 exactly, so vLLM (and HF) draw only those two; a third is too many."""
    logits = np.array([-3.0, 0.0, -2.0, -1.0, -3.0]) * math.log(2)  # token 1, 3, 2, then 0 and 4
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=-1)
    if probs.tolist() != [1 / 16, 1 / 2, 1 / 8, 1 / 4, 1 / 16]:
        pytest.skip("this platform's float32 softmax is not exact on these logits")
    params = SamplingParams(temperature=1.0, top_p=0.75)
    seqs = [Sequence("b", [1], params, max_model_len=64)] * 4000
    x = torch.tensor(logits, dtype=torch.float32).repeat(len(seqs), 1)
    tokens, _ = Sampler("cpu", seed=3).sample(x, seqs, eos_ids=[])
    assert set(np.unique(tokens.numpy()).tolist()) == {1, 3}


# -- min_p: HF's MinPLogitsWarper on logits / T is the oracle's first filter (vLLM's order: min-p
# after temperature, before top-k and top-p)
MIN_P_CASES = {  # (temperature, top_k, top_p, min_p)
    "minp0.1": (1.0, -1, 1.0, 0.1),
    "minp0.3-T0.7": (0.7, -1, 1.0, 0.3),
    "minp0.2-T2": (2.0, -1, 1.0, 0.2),
    "minp0.2-k6": (1.0, 6, 1.0, 0.2),
    "minp0.1-p0.8": (1.0, -1, 0.8, 0.1),
    "minp0": (1.0, -1, 1.0, 0.0),  # beside the others: untouched
}


def min_p_oracle(t: float, k: int, p: float, min_p: float) -> np.ndarray:
    from transformers import MinPLogitsWarper

    z = torch.tensor(LOGITS / t, dtype=torch.float64)[None]
    if min_p > 0:
        z = MinPLogitsWarper(min_p)(None, z)
    return oracle(1.0, k, p, logits=z[0].numpy())


@pytest.fixture(scope="module")
def min_p_draws() -> dict[str, np.ndarray]:
    seqs = []
    for i, (t, k, p, mp) in enumerate(MIN_P_CASES.values()):
        params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp, max_tokens=1)
        seqs += [Sequence(f"minp{i}", [1, 2, 3], params, max_model_len=64)] * N
    x = torch.tensor(LOGITS, dtype=torch.float32).repeat(len(seqs), 1)
    tokens, _ = Sampler("cpu", seed=2468).sample(x, seqs, eos_ids=[])
    return dict(zip(MIN_P_CASES, tokens.numpy().reshape(len(MIN_P_CASES), N)))


@pytest.mark.parametrize("case", list(MIN_P_CASES))
def test_min_p_frequencies_match_hf_s_warper(min_p_draws, case):
    q = min_p_oracle(*MIN_P_CASES[case])
    drawn = set(np.unique(min_p_draws[case]).tolist())
    assert drawn <= set(np.flatnonzero(q).tolist()), f"{case}: drew tokens that min_p removes"
    _check_frequencies(min_p_draws[case], q, case)


def test_the_min_p_cases_remove_tokens():
    """Sanity: each min_p case's kept set is smaller than without min_p (else ignoring it would pass)."""
    for case, (t, k, p, mp) in MIN_P_CASES.items():
        if mp:
            assert np.count_nonzero(min_p_oracle(t, k, p, mp)) < np.count_nonzero(oracle(t, k, p)), case
