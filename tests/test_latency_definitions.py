"""Request latencies against their definitions, in closed form (README "Results", docs/ARCHITECTURE.md
"Measurement protocol", ``experiments.metrics.requests_frame``'s docstring).

Hand-made finished requests with known arrival, token and finish times go through the functions a
run uses (``run.py``: ``requests_frame(engine.finished_requests, t0)`` then ``summarize``); every
expected figure below is written out by hand from the timelines, not computed by the code under test.

Definitions (per request; the times of a request with n > 1 samples are its samples' earliest
first token and latest finish, its ``output_len`` the longest sample):
  ttft = first token - arrival             e2el = finish - arrival
  tpot = (e2el - ttft) / (output_len - 1)  NaN for a 1-token request (no second token to time);
                                           the summary's TPOT statistics leave such requests out
  itl  = gaps between consecutive tokens of the first sample (a 1-token request has none);
         the summary pools every request's gaps
  normalized_latency = e2el / output_len   (the summary: its mean over requests)
Summary statistics are in ms: mean, p50, p90, p99; percentiles are numpy's default ("linear",
Hyndman & Fan type 7: rank p/100 * (n - 1) between sorted values, interpolated linearly), the
convention of ``_latency_stats`` (``np.percentile`` with no method) and of ``vllm bench serve``.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from engine.llm_engine import RequestState
from engine.outputs import FinishedRequest
from engine.sampling_params import SamplingParams
from engine.sequence import SeqStatus, Sequence
from experiments.atomic import write_parquet
from experiments.metrics import LATENCIES, PERCENTILES, UNITS, requests_frame, summarize

T0 = 99.0  # the run's start: the frame's arrival / first_token / finish columns are relative to it

# request id -> (arrival, prompt_len, [(token times, finish) per sample]); absolute clock seconds.
# Finish times are a little after the last token where the engine's clock was read again
# (``_finish_seq``), so TPOT and the mean ITL differ for those requests.
TIMELINES = {
    "a": (100.0, 12, [([100.05, 100.07, 100.10, 100.16, 100.20], 100.21)]),
    "b": (100.5, 7, [([100.9], 100.9)]),  # one output token: no TPOT, no ITL
    "c": (101.0, 30, [([101.30, 101.32, 101.38], 101.40)]),
    "d": (102.0, 4, [([102.02, 102.03, 102.05, 102.08, 102.12, 102.17, 102.23, 102.30], 102.31)]),
    # n = 2: first token the earliest of the samples (sample 1), finish the latest (sample 1),
    # output_len the longest sample (5), the ITL those of sample 0
    "e": (103.0, 9, [([103.6, 103.7, 103.9], 103.9),
                     ([103.5, 103.55, 103.65, 103.75, 104.0], 104.0)]),
}

# by hand from TIMELINES (seconds)
EXPECTED = {
    # (ttft, e2el, output_len, num_output_tokens, tpot, itl, normalized_latency)
    "a": (0.05, 0.21, 5, 5, 0.16 / 4, [0.02, 0.03, 0.06, 0.04], 0.21 / 5),
    "b": (0.40, 0.40, 1, 1, math.nan, [], 0.40 / 1),
    "c": (0.30, 0.40, 3, 3, 0.10 / 2, [0.02, 0.06], 0.40 / 3),
    "d": (0.02, 0.31, 8, 8, 0.29 / 7, [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07], 0.31 / 8),
    "e": (0.50, 1.00, 5, 8, 0.50 / 4, [0.10, 0.20], 1.00 / 5),
}
TPOT_HAND = {"a": 0.04, "c": 0.05, "d": 0.0414285714285714, "e": 0.125}  # the divisions above, done by hand
ITL_MEAN_HAND = {"a": 0.0375, "c": 0.04, "d": 0.04, "e": 0.15}


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-12, nan_ok=True)


def make_request(rid: str) -> RequestState:
    """A finished RequestState as the engine leaves it: tokens appended at their times, then finished."""
    arrival, prompt_len, samples = TIMELINES[rid]
    params = SamplingParams(n=len(samples), max_tokens=16, ignore_eos=True)
    seqs = []
    for i, (times, finish) in enumerate(samples):
        s = Sequence(rid, list(range(prompt_len)), params, max_model_len=256, arrival_time=arrival, index=i)
        s.first_scheduled_time = arrival + 0.001
        for k, t in enumerate(times):
            s.append_token(10 + k, None, t)
        s.status, s.finish_reason, s.finish_time = SeqStatus.FINISHED, "length", finish
        seqs.append(s)
    return RequestState(rid, None, list(range(prompt_len)), params, seqs, arrival, finished=True)


def finished_requests(kind: str) -> list:
    reqs = [make_request(r) for r in TIMELINES]
    # the engine keeps FinishedRequest (gaps only, ``FinishedSeq.itl``); RequestState (token_times) also works
    return [FinishedRequest.of(r) for r in reqs] if kind == "compact" else reqs


def linear_percentile(xs, p: float) -> float:
    """Hyndman & Fan type 7 written out: rank p/100 * (n - 1) in the sorted values, linear in between."""
    v = sorted(xs)
    rank = p / 100 * (len(v) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (rank - lo) * (v[hi] - v[lo])


def test_hand_percentile_is_numpys_linear_convention():
    """The helper the expectations use agrees with numpy's method="linear" (the default the code uses)."""
    xs = [0.3, 0.01, 0.5, 0.02, 0.07, 0.04]
    for p in (0, 10, 50, 90, 99, 100):
        assert linear_percentile(xs, p) == pytest.approx(float(np.percentile(xs, p, method="linear")), rel=1e-12)
    assert linear_percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)  # rank 3.6: 4 + 0.6 * 1
    assert linear_percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)


@pytest.mark.parametrize("kind", ["compact", "state"])
def test_per_request_latencies_match_their_definitions(kind):
    df = requests_frame(finished_requests(kind), T0)
    assert list(df["request_id"]) == list(TIMELINES)
    for _, row in df.iterrows():
        rid = row["request_id"]
        ttft, e2el, out_len, num_out, tpot, itl, norm = EXPECTED[rid]
        arrival, prompt_len, samples = TIMELINES[rid]
        assert (row["prompt_len"], row["output_len"], row["num_output_tokens"], row["n"]) == (
            prompt_len, out_len, num_out, len(samples)), rid
        assert row["arrival"] == approx(arrival - T0), rid
        assert row["first_token"] == approx(arrival + ttft - T0), rid
        assert row["finish"] == approx(arrival + e2el - T0), rid
        assert row["ttft"] == approx(ttft), rid
        assert row["e2el"] == approx(e2el), rid
        assert row["normalized_latency"] == approx(norm), rid
        assert np.asarray(row["itl"], dtype=float) == approx(itl), rid
        if out_len == 1:  # the documented case: no TPOT and no gaps for one output token
            assert math.isnan(row["tpot"]) and math.isnan(row["itl_mean"]) and len(row["itl"]) == 0, rid
        else:
            assert row["tpot"] == approx(tpot) == pytest.approx(TPOT_HAND[rid], rel=1e-12), rid
            assert row["itl_mean"] == pytest.approx(ITL_MEAN_HAND[rid], rel=1e-9), rid


def expected_stats(values_s: list[float], name: str) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    out = {f"mean_{name}_ms": sum(ms) / len(ms)}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = linear_percentile(ms, p)
        assert out[f"p{p}_{name}_ms"] == pytest.approx(float(np.percentile(ms, p, method="linear")), rel=1e-12)
    return out


def expected_summary() -> dict[str, float]:
    rows = EXPECTED.values()
    ttft = [r[0] for r in rows]
    e2el = [r[1] for r in rows]
    tpot = [r[4] for r in rows if not math.isnan(r[4])]  # the 1-token request has no TPOT: left out
    itl = [x for r in rows for x in r[5]]  # every gap of every request, pooled
    assert len(ttft) == 5 and len(tpot) == 4 and len(itl) == 15
    out = {"normalized_latency": sum(r[6] for r in rows) / len(rows)}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        out |= expected_stats(values, name)
    return out


def test_expectations_are_spread_out():
    """The statistics compared below differ from one another, so a percentile computed as another
    (p90 as the median, p99 as p90, a mean as a median) cannot pass by coincidence."""
    want = expected_summary()
    for name in LATENCIES:
        figs = [want[f"mean_{name}_ms"], *(want[f"p{p}_{name}_ms"] for p in PERCENTILES)]
        assert len({round(f, 6) for f in figs}) == len(figs), (name, figs)


@pytest.mark.parametrize("kind", ["compact", "state"])
def test_summary_latency_statistics(kind, tmp_path):
    df = requests_frame(finished_requests(kind), T0)
    summary = summarize(df, None, duration=5.0)
    want = expected_summary()
    for name in LATENCIES:
        for stat in ("mean", *(f"p{p}" for p in PERCENTILES)):
            key = f"{stat}_{name}_ms"
            assert UNITS[key] == "ms"
            assert summary[key] == approx(want[key]), key
    assert summary["normalized_latency"] == approx(want["normalized_latency"])
    assert summary["num_requests"] == 5 and summary["total_output_tokens"] == 5 + 1 + 3 + 8 + 8
    assert summary["mean_output_len"] == approx((5 + 1 + 3 + 8 + 5) / 5)
    # the same figures from requests.parquet as run.py writes it (itl: a list<double> column)
    write_parquet(tmp_path / "requests.parquet", df)
    again = summarize(pd.read_parquet(tmp_path / "requests.parquet"), None, duration=5.0)
    for key in want:
        assert again[key] == approx(summary[key]), key


def test_a_request_without_output_tokens_leaves_normalized_latency_finite():
    """A request that ended with no token (a failed one, or a scoring request) has no normalized
    latency (NaN in its row); the summary's mean leaves it out, as TPOT's does, instead of inf."""
    df = requests_frame(finished_requests("compact"), T0)
    row = df.iloc[[0]].copy()
    row["request_id"], row["output_len"], row["num_output_tokens"] = "empty", 0, 0
    row["normalized_latency"], row["tpot"] = math.nan, math.nan
    summary = summarize(pd.concat([df, row], ignore_index=True), None, duration=5.0)
    assert summary["normalized_latency"] == approx(expected_summary()["normalized_latency"])


def test_failed_requests_are_counted_in_the_summary():
    df = requests_frame(finished_requests("compact"), T0)
    assert summarize(df, None, duration=5.0)["num_failed_requests"] == 0
    df.loc[1, "finish_reason"] = "error"
    assert summarize(df, None, duration=5.0)["num_failed_requests"] == 1
