"""The ragged decode term: its fit, the programs it models, and the profiled cost model using it."""
from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd
import pytest

from experiments.device_profile import DeviceProfile
from experiments.profiled_costmodel import ProfiledCostModel, _calibration_work
from experiments.ragged_decode import DecodePrograms, RaggedFit, contexts, decode_programs, fit
from tests.test_profiled_costmodel import MODEL, synthetic_profile

TRUTH = RaggedFit(rate_gbs=20.0, c0_us=3.0, k=0.4)
NUM_SMS, SPAN = 8, 2048
HEADS = dict(num_kv_heads=2, group=2, head_dim=16, elem_size=2, num_sms=NUM_SMS, span=SPAN)  # tiny-llama


def attention_s(b: int, c: float, slow: float) -> float:
    """The synthetic profile's decode attention (tests/test_profiled_costmodel.py)."""
    return 5e-6 + 1e-10 * b * c * slow


@functools.lru_cache(maxsize=1)
def ragged_profile() -> DeviceProfile:
    """The synthetic profile plus a ``ragged`` table whose batches take TRUTH's time: uniform
    ones the attention table's, ragged ones TRUTH.time of that."""
    base = synthetic_profile()
    rng = np.random.default_rng(0)
    rows = []
    for mode, bs in (("linear", 0), ("paged", 16)):
        slow = 1.0 if mode == "linear" else 1.0 + 0.4 / bs
        for b in (4, 16, 64):  # rows of the attention table: its uniform time is exact there
            for mean in (128, 512):
                for dist in ("uniform", "lognormal", "twopoint"):
                    ctxs = contexts(dist, b, mean, SPAN, rng)
                    p = decode_programs(ctxs, **HEADS)
                    uni = attention_s(b, mean, slow)
                    rows.append(dict(table="ragged", model=MODEL, mode=mode, block_size=bs, batch=b, dist=dist,
                                     mean=mean, context=float(np.mean(ctxs)), max_context=max(ctxs), span=SPAN,
                                     longest_bytes=p.longest_bytes, uniform_bytes=p.uniform_bytes,
                                     programs=p.programs, slots=p.slots, value=TRUTH.time(uni, p)))
    meta = {**base.meta, "num_sms": NUM_SMS, "max_model_len": SPAN}
    return DeviceProfile(pd.concat([base.df, pd.DataFrame(rows)], ignore_index=True), meta, "synthetic-ragged")


def cost_model(profile=None, **kw) -> ProfiledCostModel:
    from engine.loader import resolve_config
    from experiments.simulate import shape_of

    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged",
                calibrate_host=False)
    args.update(kw)
    return ProfiledCostModel(profile or ragged_profile(), shape_of(resolve_config(MODEL)), **args)


def test_decode_programs_follow_the_split_rule():
    uniform = decode_programs([700] * 4, **HEADS)
    assert uniform.longest_bytes == uniform.uniform_bytes  # a uniform batch is its own twin
    ragged = decode_programs([100, 100, 100, 2500 - 300], **HEADS)
    assert ragged.longest_bytes > uniform.longest_bytes and ragged.uniform_bytes == uniform.uniform_bytes
    # 4 sequences x 2 KV heads on 8 SMs: even splits bring programs to 4 an SM, all resident
    assert uniform.programs == 4 * 4 * 2 and uniform.programs <= uniform.slots
    many = decode_programs([700] * 64, **HEADS)
    assert many.programs == 64 * 2 > many.slots  # one split, more programs than slots
    # a padding row reads nothing, but counts as a launched program
    assert decode_programs([700, 0], **HEADS).programs == decode_programs([700, 700], **HEADS).programs


def test_fit_recovers_the_constants_it_was_made_with():
    f = ragged_profile().table("ragged", mode="paged")
    uni = f[f.dist == "uniform"].set_index(["batch", "mean"])["value"]
    rag = f[f.dist != "uniform"]
    got = fit(uni.loc[list(zip(rag["batch"], rag["mean"]))].to_numpy(), rag.value, rag.longest_bytes,
              rag.uniform_bytes, rag.programs, rag.slots)
    assert (got.rate_gbs, got.c0_us, got.k) == pytest.approx((TRUTH.rate_gbs, TRUTH.c0_us, TRUTH.k))
    assert got.mean_error < 1e-9 and got.base_error > 0.05 and got.n == len(rag)
    # both regimes are in the table, or c0 and k could not both be told
    assert (rag.programs <= rag.slots).any() and (rag.programs > rag.slots).any()


def test_time_is_never_below_the_uniform_twin_and_a_uniform_batch_is_its_twin():
    p_res = DecodePrograms(longest_bytes=1e3, uniform_bytes=1e3, programs=10, slots=64)
    assert TRUTH.time(50e-6, p_res) == 50e-6  # a short longest program hides behind the batch
    p_tail = DecodePrograms(longest_bytes=1e6, uniform_bytes=2e6, programs=100, slots=64)
    assert TRUTH.time(50e-6, p_tail) == 50e-6  # shorter than a uniform batch's: no excess
    # one or two sequences: one program can take longer than the fitted rate says the measured
    # uniform batch took; the same batch is still its own twin, and only what is longer counts
    one = DecodePrograms(longest_bytes=2e5, uniform_bytes=2e5, programs=8, slots=64)
    assert TRUTH.c0_us * 1e-6 + 2e5 / (TRUTH.rate_gbs * 1e9) > 9e-6
    assert TRUTH.time(9e-6, one) == 9e-6
    longer = DecodePrograms(longest_bytes=3e5, uniform_bytes=2e5, programs=8, slots=64)
    assert TRUTH.time(9e-6, longer) == pytest.approx(9e-6 + 1e5 / (TRUTH.rate_gbs * 1e9))


@pytest.mark.parametrize("paged", [True, False])
def test_uniform_decode_steps_are_unchanged_and_ragged_ones_cost_more(paged):
    kw = dict(paged=paged, block_size=16 if paged else 0)
    plain, ragged = cost_model(synthetic_profile(), **kw), cost_model(**kw)
    assert plain.ragged is None and ragged.ragged is not None
    slower = []
    for b in (4, 16, 64):
        uniform = [(1, 512)] * b
        assert ragged.device_time(uniform) == pytest.approx(plain.device_time(uniform), rel=1e-12)
        # the same total context, one sequence holding more and more of it: never faster
        times = []
        for longest in (512, 1024, 1536, 2048):
            rest, extra = divmod(512 * b - longest, b - 1)
            work = [(1, longest)] + [(1, rest + (i < extra)) for i in range(b - 1)]
            assert sum(c for _, c in work) == 512 * b
            times.append(ragged.device_time(work))
        assert times == sorted(times), times
        slower.append(times[-1] / plain.device_time(uniform) - 1)
    # and slower where the longest program outlasts the others' waves (64 sequences: one split)
    assert slower[-1] > 1e-3, slower


def test_the_excess_is_every_layers_fitted_term():
    m = cost_model()
    work = [(1, 2000)] + [(1, 100)] * 15
    p = decode_programs([c for _, c in work], **HEADS)
    uni = m.attn_decode(16, sum(c for _, c in work) / 16)
    expected = m.num_layers * m.ragged.excess(uni, p)
    assert expected > 0
    assert m.device_time(work) - cost_model(synthetic_profile()).device_time(work) == pytest.approx(expected)
    # prefill and mixed steps keep the tables' terms: the fitted kernel is the decode graph's
    mixed = [(64, 64)] + work
    assert m.device_time(mixed) == pytest.approx(cost_model(synthetic_profile()).device_time(mixed), rel=1e-12)


def test_a_profile_without_the_device_sm_count_has_no_ragged_term():
    p = ragged_profile()
    meta = {k: v for k, v in p.meta.items() if k != "num_sms"}
    assert cost_model(DeviceProfile(p.df, meta, "no-sms")).ragged is None


def with_host_max_context(profile: DeviceProfile, longest) -> DeviceProfile:
    df = profile.df.copy()
    host = df["table"] == "host"
    df.loc[host, "max_context"] = longest(df[host])
    return DeviceProfile(df, profile.meta, profile.path + "+max")


def test_synchronous_host_steps_without_their_longest_context_turn_the_term_off(caplog):
    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        m = cost_model(calibrate_host=True)
    assert m.ragged is None and "longest context" in caplog.text
    # steps that recorded it: the calibration takes the term out of their residual, so it stays
    prof = with_host_max_context(ragged_profile(), lambda h: h["context"] // h["batch"])
    assert cost_model(prof, calibrate_host=True).ragged is not None


def test_calibration_of_a_ragged_step_takes_its_excess_out_of_host_time():
    """Recorded decode steps whose longest sequence holds most of the context: with the longest
    context recorded, host time is the same as for uniform steps (the device part took it)."""
    prof = with_host_max_context(ragged_profile(), lambda h: h["context"] // h["batch"])
    ragged = with_host_max_context(ragged_profile(), lambda h: np.where(
        h["batch"] > 1, h["context"] - (h["batch"] - 1) * 16, h["context"]))
    uniform_host = cost_model(prof, calibrate_host=True).host_time([(1, 300)] * 16)
    # the steps' durations are the same: taking a larger device part leaves less host time
    assert cost_model(ragged, calibrate_host=True).host_time([(1, 300)] * 16) < uniform_host


def test_calibration_work_keeps_the_sum_and_the_longest():
    row = pd.Series(dict(batch=8, prefill_tokens=0, context=8 * 300, max_context=1500))
    work = _calibration_work(row)
    assert len(work) == 8 and max(c for _, c in work) == 1500
    assert sum(c for _, c in work) == pytest.approx(2400, abs=8)
    row["max_context"] = float("nan")  # profiles from before: uniform
    assert _calibration_work(row) == [(1, 300)] * 8


def test_check_compares_the_model_with_measured_ragged_steps(tmp_path):
    """bench_ragged --check: the cost model's steps against the profile's measured ones; steps
    measured exactly as the term says are matched by it and missed by the uniform tables."""
    import json

    from experiments.bench_ragged import check_profile
    from experiments.profile_device import write_profile

    m = cost_model()
    rows = []
    for b in (16, 64):
        ctxs = [2000] + [100] * (b - 1)
        rows.append(dict(table="decode_graph_ragged", model=MODEL, mode="paged", block_size=16, batch=b, mean=300,
                         context=float(np.mean(ctxs)), max_context=2000, contexts=json.dumps(ctxs),
                         value=m.device_time([(1, c) for c in ctxs], num_sampled=0)))
    prof = ragged_profile()
    path = tmp_path / "p.parquet"
    write_profile(path, pd.concat([prof.df, pd.DataFrame(rows)]).to_dict("records"), prof.meta)
    out = check_profile(str(path))
    assert "ragged: mean |error| 0.0%" in out
    uniform = [line for line in out.splitlines() if line.startswith("uniform:")][0]
    assert float(uniform.split()[3].rstrip("%,")) > 0.1, out


@pytest.mark.parametrize("bs", [0, 16])
def test_profiler_fills_the_decode_graph_for_each_sequences_own_context(bs):
    """kvlab profile's decode-graph inputs for a ragged batch: each sequence's length, position
    and the slot of its last token (LINEAR regions back to back; PAGED through its block row)."""
    from types import SimpleNamespace

    import torch

    from engine.cuda_graphs import DecodeGraphs
    from experiments.profile_models import _fill_decode_graph
    from kernels.metadata import Addressing

    ctxs = [5, 40, 17, 1]
    table = SimpleNamespace(device_t=torch.full((8, 4), -1, dtype=torch.int32))
    stub = SimpleNamespace(mode=Addressing.PAGED if bs else Addressing.LINEAR, block_size=bs)
    graphs = DecodeGraphs(None, stub, [], table, 8, 64, torch.device("cpu"))
    _fill_decode_graph(graphs, table, ctxs, bs, 1024, torch.Generator().manual_seed(0), torch.device("cpu"))
    addressing, ids, positions, slots = graphs.static_inputs(4)  # the inputs the graph of four sequences reads
    assert graphs.seq_lens[:4].tolist() == ctxs and positions.tolist() == [c - 1 for c in ctxs]
    assert ids.tolist() == [11] * 4
    slots = slots.tolist()
    if bs:
        rows = table.device_t[:4].tolist()
        assert addressing.tolist() == [0, 1, 2, 3]
        assert slots == [rows[i][(c - 1) // bs] * bs + (c - 1) % bs for i, c in enumerate(ctxs)]
        used = [b for i, c in enumerate(ctxs) for b in rows[i][:-(-c // bs)]]
        assert len(set(used)) == len(used)  # no two sequences share a block
    else:
        assert addressing.tolist() == [0, 5, 45, 62] and slots == [4, 44, 61, 62]


def test_a_window_bounds_the_split_config_of_its_layers(monkeypatch):
    """Windowed layers: the kernel picks its split config under the window, not max_model_len."""
    import dataclasses

    import experiments.device_pieces as pieces  # _group_excess calls it through this module's name
    from engine.loader import resolve_config
    from experiments.simulate import shape_of

    spans = []
    real = pieces.programs_of_sums
    monkeypatch.setattr(pieces, "programs_of_sums", lambda *a, **kw: spans.append(kw["span"]) or real(*a, **kw))
    shape = dataclasses.replace(shape_of(resolve_config(MODEL)), layer_windows=(512, 0))
    m = ProfiledCostModel(ragged_profile(), shape, model=MODEL, paged=True, block_size=16, max_graph_batch=64,
                          calibrate_host=False)
    m.device_time([(1, 2000)] + [(1, 100)] * 7)
    assert sorted(spans) == [512, SPAN]


def test_a_term_turned_off_is_not_taken_out_of_host_time_either():
    """Synchronous host steps, some without their longest context: the term is off, and the host
    tables are those of a profile without it, also where the steps' own engine is modelled apart
    (here: another max_model_len than the recorded one)."""
    def longest(h):  # ragged steps where recorded, the others not recorded
        return np.where(np.arange(len(h)) % 2 == 0, h["context"] - (h["batch"] - 1) * 16, np.nan)

    with_term = with_host_max_context(ragged_profile(), longest)
    df = with_term.df[with_term.df["table"] != "ragged"]
    without = DeviceProfile(df, with_term.meta, "no-ragged")
    a = cost_model(with_term, calibrate_host=True, max_model_len=1024)
    b = cost_model(without, calibrate_host=True, max_model_len=1024)
    assert a.ragged is None and b.ragged is None
    for n in (1, 8, 32, 64):
        assert a.host_time([(1, 300)] * n) == pytest.approx(b.host_time([(1, 300)] * n), rel=1e-12)


def test_batches_the_engine_orders_take_their_uniform_twins_time(monkeypatch):
    """From SEQ_MAJOR_MIN_SEQS sequences in one split the engine hands the kernel its batch longest
    first and launches it sequence by sequence (bench_ragged: about a uniform batch's time): no
    ragged term there, and such rows of a profile's ragged table are left out of the fit."""
    import experiments.ragged_decode as rd
    from experiments.profiled_costmodel import ragged_fit
    from experiments.ragged_decode import as_launched

    ctxs = [2000] + [100] * 63
    p = decode_programs(ctxs, **HEADS)
    assert p.programs > p.slots and not p.ordered  # 64 < SEQ_MAJOR_MIN_SEQS
    assert TRUTH.excess(50e-6, p) > 0 and as_launched(ctxs, p) == ctxs
    monkeypatch.setattr(rd, "decode_seq_major", lambda n, splits: splits == 1 and n >= 64)
    q = decode_programs(ctxs, **HEADS)
    assert q.ordered and TRUTH.time(50e-6, q) == 50e-6
    assert as_launched([5, 700, 30], q) == [700, 30, 5] and as_launched([5, 700, 30], p) == [5, 700, 30]
    m = cost_model()
    work = [(1, c) for c in ctxs]
    plain = cost_model(synthetic_profile())
    assert m.device_time(work) == pytest.approx(plain.device_time(work), rel=1e-12)
    assert m.device_time(work[:16]) > plain.device_time(work[:16])  # 16 sequences: split, not ordered
    # a profile's ordered rows (their time: the uniform twin's) are not the critical path: not fitted
    prof = ragged_profile()
    df = prof.df.copy()
    rag = (df["table"] == "ragged") & (df["batch"] == 16)  # resident: rate and c0 come from batch 4 then
    uniform = df[rag & (df["dist"] == "uniform")].set_index(["mode", "mean"])["value"]
    df["ordered"] = np.where(df["table"] == "ragged", rag.to_numpy(), np.nan)
    df.loc[rag, "value"] = [uniform[(r.mode, r.mean)] for r in df[rag].itertuples()]
    with_ordered = DeviceProfile(df, prof.meta, "ordered-rows")
    got = ragged_fit(with_ordered, MODEL, "paged", 16)
    assert got.mean_error < 1e-9  # the rows left are TRUTH's exactly
    mixed_in = ragged_fit(DeviceProfile(df.drop(columns=["ordered"]), prof.meta, "unmarked"), MODEL, "paged", 16)
    paged = prof.table("ragged", mode="paged").query("dist != 'uniform'")
    assert got.n == (paged["batch"] != 16).sum() and mixed_in.n == len(paged)
