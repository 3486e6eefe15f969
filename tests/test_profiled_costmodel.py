"""The profiled cost model: tables from `kvlab profile`, interpolation, fallback, the profiler on CPU."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import re
import struct

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import profile_cases, profile_device, profile_models, profile_timing
from experiments.device_profile import DeviceProfile, Grid1D, Grid2D, load_profile
from experiments.profiled_costmodel import ProfiledCostModel
from experiments.simulate import shape_of
from experiments.validate_sim import compare

MODEL = "tiny-llama"
BATCHES = [1, 2, 4, 8, 16, 32, 48, 64]
CONTEXTS = [16, 128, 512, 2048]
QUERIES = [16, 128, 1024, 8192]


@functools.lru_cache(maxsize=1)
def synthetic_profile() -> DeviceProfile:
    """Monotone tables of plausible shape (seconds), as `kvlab profile` lays them out."""
    rows = []
    for mode, bs in (("linear", 0), ("paged", 8), ("paged", 16)):
        slow = 1.0 if mode == "linear" else 1.0 + 0.4 / bs  # small blocks cost more
        for b, c in itertools.product(BATCHES, CONTEXTS):
            rows.append(dict(table="decode_graph", model=MODEL, mode=mode, block_size=bs, batch=b, context=c,
                             value=1e-3 + 2e-6 * b + 4e-9 * b * c * slow))
        for b, c, mixed in itertools.product([1, 4, 16, 64], CONTEXTS, [False, True]):
            rows.append(dict(table="attention", model=MODEL, mode=mode, block_size=bs, batch=b, context=c, query=1,
                             mixed=mixed, value=(5e-6 + 1e-10 * b * c * slow) * (1.5 if mixed else 1.0)))
        for q, c0 in itertools.product(QUERIES, [0, 1024]):
            rows.append(dict(table="attention", model=MODEL, mode=mode, block_size=bs, batch=1, context=q + c0,
                             query=q, mixed=False, value=5e-6 + 1e-11 * q * (q / 2 + c0) * slow))
    for q in QUERIES:
        rows.append(dict(table="prefill_graph", model=MODEL, query=q, context=q, value=5e-4 + 1e-7 * q))
        rows.append(dict(table="eager_forward", model=MODEL, query=q, context=q, value=max(3e-3, 6e-4 + 1e-7 * q)))
    for m in [1, 16, 256, 8192]:
        for n, k in [(128, 64), (64, 64), (256, 64), (64, 128), (512, 64)]:
            rows.append(dict(table="gemm", m=m, n=n, k=k, value=2e-6 + 1e-12 * m * n * k))
    for s in [1, 8, 64]:
        rows.append(dict(table="sample", model=MODEL, batch=s, value=4e-6 + 1e-8 * s))
    for n in [1 << 16, 1 << 20, 1 << 24]:
        for op in ("h2d", "d2h"):
            rows.append(dict(table="copy", op=op, bytes=n, value=1e-5 + n / 50e9))
    rows.append(dict(table="vmm", op="cuMemMap+cuMemSetAccess", bytes=2 << 20, value=37e-6))
    meta = {"device": "Synthetic GPU", "commit": "abc", "models": MODEL}
    profile = DeviceProfile(pd.DataFrame(rows), meta, "synthetic")
    # engine steps as `kvlab profile` records them: each took its device time plus a known host time
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import _calibration_work

    rng = np.random.default_rng(0)
    for alloc, base in HOST_BASE.items():
        paged = alloc == "paged"
        dev = ProfiledCostModel(profile, shape_of(resolve_config(MODEL)), model=MODEL, paged=paged,
                                block_size=16 if paged else 0, max_graph_batch=64, calibrate_host=False)
        for b in range(1, 65):
            for p in (0,) * 20 + (256,) * 20:  # enough steps per batch-size bin
                row = dict(table="host", allocator=alloc, batch=b, prefill_tokens=p, decode_tokens=b - (p > 0),
                           context=b * 300 + p)
                device = dev.device_time(_calibration_work(pd.Series(row)))
                rows.append(dict(row, duration=device + base + 5e-6 * b + rng.normal(0, 1e-7)))
    return DeviceProfile(pd.DataFrame(rows), meta, "synthetic")


HOST_BASE = {"paged": 4e-4, "contiguous": 3e-4, "virtual": 5e-4}


def cost_model(**kw) -> ProfiledCostModel:
    from engine.loader import resolve_config

    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged")
    args.update(kw)
    return ProfiledCostModel(synthetic_profile(), shape_of(resolve_config(MODEL)), **args)


def test_grids_reproduce_points_and_interpolate_between():
    g = Grid1D([1, 4, 16], [1.0, 2.0, 8.0])
    assert [g(x) for x in (1, 4, 16)] == [1.0, 2.0, 8.0]
    assert g(0.5) == 1.0 and g(32) == 16.0  # clamped below, proportional above
    assert 1.0 < g(2) < 2.0 < g(10) < 8.0
    g2 = Grid2D([1, 1, 8, 8], [10, 100, 10, 100], [1.0, 2.0, 3.0, 5.0])
    assert g2(1, 10) == 1.0 and g2(8, 100) == 5.0
    assert 1.0 < g2(4, 10) < 3.0 and 2.0 < g2(4, 100) < 5.0


@settings(max_examples=200, deadline=None)
@given(xs=st.lists(st.integers(1, 5000), min_size=1, max_size=12),
       ys=st.lists(st.floats(1e-7, 1.0), min_size=12, max_size=12),
       probes=st.lists(st.one_of(st.integers(-10, 12000), st.floats(-10, 12000)), max_size=20))
def test_grid_interpolates_as_np_interp_to_the_bit(xs, ys, probes):
    """Grid1D interpolates scalars in Python floats (np.interp is slow on one value): the same
    values to the bit, at the points (repeated ones too), between and around them."""
    g = Grid1D(xs, ys[:len(xs)], above="clamp")
    pts = [*xs, *(x + d for x in xs for d in (-1, -0.5, 0.25, 1)), *probes]
    for x in pts:
        assert struct.pack("d", g(x)) == struct.pack("d", float(np.interp(x, g.xs, g.ys))), x
    p = Grid1D(xs, ys[:len(xs)])  # proportional above the last point
    top = float(p.xs[-1])
    for x in (top + 0.5, top + 7, 2 * top + 3):
        assert struct.pack("d", p(x)) == struct.pack("d", float(p.ys[-1] * x / p.xs[-1]))


def test_profiled_model_reproduces_its_tables_at_grid_points():
    m = cost_model()
    t = synthetic_profile().table("decode_graph", mode="paged", block_size=16)
    for r in t.itertuples():
        work = [(1, int(r.context))] * int(r.batch)
        # num_sampled=0: the graph replay alone
        assert m.device_time(work, num_sampled=0) == pytest.approx(r.value, rel=1e-12)
    # host time is what the recorded engine steps took beyond their modelled device time
    for b in (1, 10, 40, 56):  # 56: the median batch of the last bin
        assert m.host_time([(1, 100)] * b) == pytest.approx(HOST_BASE["paged"] + 5e-6 * b, rel=0.03)
    single = [(128, 128)]  # one prefill chunk, nothing cached: the measured forward itself
    assert m.device_time(single) == pytest.approx(3e-3, rel=1e-9)  # launch-bound at 128 tokens


def test_host_steps_of_another_model_do_not_calibrate_this_one():
    """Host tables are per model (`--host-model a,b`): rows of another model are left out, and
    rows from profiles made before rows named their model count as the profile's host model."""
    from engine.loader import resolve_config
    from experiments.device_profile import host_model_of

    prof = synthetic_profile()
    df = prof.df
    host = df[df["table"] == "host"]
    assert (host_model_of(prof) == MODEL).all()  # unnamed rows: the host model (meta "models")
    other = host.assign(model="another-model", duration=host["duration"] + 1e-3)
    mixed = DeviceProfile(pd.concat([df, other], ignore_index=True), prof.meta, "synthetic")
    m = ProfiledCostModel(mixed, shape_of(resolve_config(MODEL)), model=MODEL, paged=True, block_size=16,
                          max_graph_batch=64, allocator="paged")
    assert m.host_time([(1, 100)] * 10) == pytest.approx(HOST_BASE["paged"] + 5e-6 * 10, rel=0.03)


def test_interpolation_is_monotone_between_grid_points():
    m = cost_model()
    for b in (3, 5, 20, 40, 64):
        times = [m.device_time([(1, c)] * b) for c in range(16, 2048, 37)]
        assert all(x <= y + 1e-15 for x, y in zip(times, times[1:])), b
    times = [m.device_time([(1, 700)] * b) for b in range(1, 65)]
    assert all(x <= y + 1e-15 for x, y in zip(times, times[1:]))
    prefill = [m.device_time([(q, q)]) for q in range(16, 8192, 97)]
    assert all(x <= y + 1e-15 for x, y in zip(prefill, prefill[1:]))


def test_allocator_costs_differ_where_the_profile_says():
    linear = cost_model(paged=False, block_size=0, allocator="contiguous")
    paged8 = cost_model(block_size=8)
    paged16 = cost_model(block_size=16)
    work = [(1, 1000)] * 32
    assert linear.device_time(work) < paged16.device_time(work) < paged8.device_time(work)
    assert paged16.host_time(work) > linear.host_time(work)  # paged's host line is higher here
    assert cost_model(block_size=12).block_size in (8, 16)  # nearest measured block size
    virt = cost_model(paged=False, block_size=0, allocator="virtual")
    assert virt.step_time(work, vmm_maps=3) == pytest.approx(virt.step_time(work) + 3 * 37e-6)
    assert paged16.swap_time([1 << 20, 1 << 20], "d2h") == pytest.approx(2 * (1e-5 + (1 << 20) / 50e9))


def test_mixed_and_eager_steps():
    m = cost_model()
    decode = [(1, 500)] * 16
    mixed = decode + [(256, 256)]
    assert m.device_time(mixed) > m.device_time(decode)
    # more decode sequences than any captured graph: eager, and never below the launch floor
    big = [(1, 500)] * 80
    assert m.padded(80) is None and m.device_time(big) >= m.launch_floor


def test_a_model_missing_from_the_profile_is_composed_from_its_tables():
    from experiments.costmodel import ModelShape

    wide = ModelShape("wide", 4, 64, 4, 2, 16, 128, 512)  # twice tiny-llama's layers
    m = ProfiledCostModel(synthetic_profile(), wide, model="wide", paged=True, block_size=16, max_graph_batch=64)
    base = cost_model()
    work = [(1, 300)] * 8
    assert m.profiled_model is None and "composed from tiny-llama" in m.describe()["cost_profile_model"]
    assert m.device_time(work) > base.device_time(work) > 0
    assert math.isfinite(m.step_time([(64, 64), (1, 10)]))


def test_missing_profile_falls_back_to_roofline_with_a_warning(caplog, tmp_path):
    from tests.test_simulate import config
    from experiments.run import build_engine

    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        eng = build_engine(config("mode=simulate", "sim=a100-80gb", f"sim.profile={tmp_path}/none.parquet"))
    assert eng.sim_summary["cost_model"] == "roofline"
    assert any("a100-80gb" in r.getMessage() and "roofline" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="no device profile for a100-80gb"):
        build_engine(config("mode=simulate", "sim=a100-80gb", "sim.cost_model=profiled"))


def test_profiler_runs_on_cpu_and_simulate_uses_its_profile(tmp_path, monkeypatch):
    """The real profiler on the tiny model (small grids), then a simulated run timed by it."""
    from tests.test_simulate import config
    from experiments.run import run_experiment

    monkeypatch.setattr(profile_cases, "CONTEXTS", [16, 64])
    monkeypatch.setattr(profile_cases, "PREFILL_QUERIES", [16, 64])
    monkeypatch.setattr(profile_cases, "GEMM_M", [1, 16])
    monkeypatch.setattr(profile_cases, "SAMPLE_ROWS", [1, 4])
    monkeypatch.setattr(profile_cases, "COPY_BYTES", [1 << 16])
    monkeypatch.setattr(profile_cases, "RAGGED_BATCHES", [4, 8])
    path = tmp_path / "cpu.parquet"
    assert profile_device.main(["--models", MODEL, "--device", "cpu", "--pool-tokens", "2048", "--reps", "1",
                                "--max-model-len", "128", "--host-requests", "4", "--host-kv-tokens", "1024",
                                "--virtual-page-size", "4096", "--host-repeats", "2", "--out", str(path)]) == 0
    prof = load_profile(str(path))
    assert prof.meta["models"] == MODEL and prof.meta["commit"]
    assert {"host", "gemm", "attention", "eager_forward", "sample", "copy", "ragged"} <= set(prof.df["table"])
    assert prof.meta["num_sms"] > 0
    ragged = prof.table("ragged")
    # every mode, batch, mean and distribution; contexts within the graph's bound (128 here)
    assert len(ragged) == 4 * 2 * 2 * 3 and (ragged["max_context"] <= 128).all()
    uni = ragged[ragged["dist"] == "uniform"]
    assert (uni["longest_bytes"] == uni["uniform_bytes"]).all()
    assert (ragged["programs"] > 0).all() and (ragged["slots"] > 0).all()
    # the steps' longest contexts, for calibrating against ragged steps
    steps = prof.table("host")
    assert (steps["max_context"] * steps["batch"] >= steps["context"]).all() and (steps["max_context"] > 0).all()
    host = prof.table("host")
    assert set(host["allocator"]) == {"paged", "contiguous", "virtual"}
    # two runs of each allocator's steps, pooled
    assert {(al, r) for al, r in zip(host["allocator"], host["repeat"])} == {
        (al, r) for al in ("paged", "contiguous", "virtual") for r in (0, 1)}
    assert (prof.df["value"] > 0).all()
    s = run_experiment(config("mode=simulate", "sim=h200", f"sim.profile={path}", "workload.num_requests=8",
                              "engine.kv_cache_tokens=1024", "engine.max_model_len=128"), tmp_path / "run")
    assert s["cost_model"] == "profiled" and s["cost_profile"] == str(path)
    assert s["output_throughput"] > 0


PROGRESS_LINE = r"^\[ *[\d.]+ s\] "
PART_START = re.compile(PROGRESS_LINE + r"(.+) \(part (\d+) of (\d+)\): (\d+) .* \(--skip (\w+) leaves them out\)$",
                        re.M)
PART_TICK = re.compile(PROGRESS_LINE + r"(.+): (\d+) of (\d+) in [\d.]+ s", re.M)
PART_END = re.compile(PROGRESS_LINE + r"(.+): done, (\d+) .* in [\d.]+ s, (\d+) rows \((\d+) so far in .+\)$", re.M)


def test_profiler_says_each_part_on_stderr_and_writes_the_same_rows(tmp_path, monkeypatch, capfd):
    """kvlab profile's progress, on stderr: a start line for each part it runs (which of how many,
    its measurements, the --skip that leaves it out), done/total lines inside it, an end line
    (its rows); the host steps' processes say their phases; a part left out says nothing. Stdout
    keeps the result line alone, and the profile's rows are those of a run without progress."""
    for name, v in (("CONTEXTS", [16, 64]), ("PREFILL_QUERIES", [16]), ("GEMM_M", [1, 16]), ("SAMPLE_ROWS", [1]),
                    ("COPY_BYTES", [1 << 16])):
        monkeypatch.setattr(profile_cases, name, v)
    monkeypatch.setattr(profile_timing, "PROGRESS_EVERY_S", 0.0)  # 0: a line at each measurement
    args = ["--models", MODEL, "--device", "cpu", "--pool-tokens", "2048", "--reps", "1", "--max-model-len", "128",
            "--block-sizes", "16", "--host-requests", "4", "--host-kv-tokens", "1024"]
    on = tmp_path / "on.parquet"
    assert profile_device.main([*args, "--skip", "ragged", "--out", str(on)]) == 0
    out, err = capfd.readouterr()  # capfd: the host steps' processes write to the same stderr
    prof = load_profile(str(on))
    assert out.splitlines() == [f"wrote {on}: {len(prof.df)} rows, {prof.meta['device']}"]
    starts, ends = PART_START.findall(err), PART_END.findall(err)
    labels = ["host steps", "gemm", f"model {MODEL}", "copy"]  # ragged left out; graphs and vmm: CUDA only
    assert [s[0] for s in starts] == labels and [e[0] for e in ends] == labels
    assert [s[4] for s in starts] == ["host", "gemm", "models", "copy"]
    assert [(int(s[1]), int(s[2])) for s in starts] == [(i, 4) for i in (1, 2, 3, 4)]
    assert [e[1] for e in ends] == [s[3] for s in starts]  # every measurement said counted, none more
    assert not re.search(PROGRESS_LINE + r"(ragged|graphs|vmm)", err, re.M)
    df = prof.df
    assert int(ends[-1][3]) == len(df)
    tables = {"host steps": {"host"}, "gemm": {"gemm"}, "copy": {"copy"},
              f"model {MODEL}": {"attention", "eager_forward", "prefill_graph", "sample"}}
    assert [int(e[2]) for e in ends] == [int(df["table"].isin(tables[lab]).sum()) for lab in labels]
    gemm = int(starts[1][3])
    assert [t[1:] for t in PART_TICK.findall(err) if t[0] == "gemm"] == [(str(i), str(gemm))
                                                                          for i in range(1, gemm + 1)]
    for alloc in ("paged", "contiguous", "virtual"):  # from each host-time process: its engine, each phase
        assert re.search(PROGRESS_LINE + rf"  {MODEL} {alloc}: engine built in", err, re.M)
        assert all(f"{MODEL} {alloc}: phase {i} of 3:" in err for i in (1, 2, 3))

    off = tmp_path / "off.parquet"  # --no-progress: the end lines alone, the same rows
    assert profile_device.main([*args, "--skip", "ragged,host", "--no-progress", "--out", str(off)]) == 0
    out, err = capfd.readouterr()
    assert out.startswith(f"wrote {off}:") and not PART_START.search(err) and not PART_TICK.search(err)
    assert [e[0] for e in PART_END.findall(err)] == labels[1:]

    def keys(d: pd.DataFrame) -> pd.DataFrame:  # the rows less their timings
        d = d[d["table"] != "host"].drop(columns="value").dropna(axis=1, how="all")
        d = d[sorted(d.columns)]
        return d.sort_values(list(d.columns)).reset_index(drop=True)

    assert len(keys(df)) == len(df) - int(ends[0][2])  # every row but the host steps' compared
    pd.testing.assert_frame_equal(keys(df), keys(load_profile(str(off)).df), check_dtype=False)


def test_validation_compares_time_with_tolerance_and_decisions_exactly():
    real = dict(output_throughput=100.0, mean_ttft_ms=50.0, mean_tpot_ms=10.0, p99_tpot_ms=20.0,
                token_states=0.5, preemptions=3, num_steps=40)
    sim = dict(output_throughput=104.0, mean_ttft_ms=60.0, mean_tpot_ms=10.1, p99_tpot_ms=22.0,
               token_states=0.5, preemptions=4, num_steps=40)
    rows = {r["metric"]: r for r in compare(real, sim, "offline")}
    assert rows["output_throughput"]["ok"] and rows["output_throughput"]["error"] == pytest.approx(0.04)
    assert not rows["mean_ttft_ms"]["ok"] and rows["p99_tpot_ms"]["ok"]
    assert rows["token_states"]["ok"] and not rows["preemptions"]["ok"] and rows["num_steps"]["ok"]
    online = {r["metric"] for r in compare(real, sim, "online-4rps")}
    assert "preemptions" not in online  # arrivals in time: decisions may differ online


def test_validation_against_repeated_real_runs_uses_their_mean_and_ci():
    reals = [dict(output_throughput=v, mean_ttft_ms=50.0) for v in (90.0, 100.0, 110.0)]
    rows = {r["metric"]: r for r in compare(reals, dict(output_throughput=104.0, mean_ttft_ms=50.0), "online-4rps")}
    tput = rows["output_throughput"]
    assert tput["real"] == pytest.approx(100.0) and tput["real_n"] == 3
    assert tput["error"] == pytest.approx(0.04) and tput["ok"]
    # t(0.975, 2) * sd 10 / sqrt(3), relative to the mean 100
    assert tput["real_ci"] == pytest.approx(4.303 * 10 / 3 ** 0.5 / 100, rel=1e-3)
    assert tput["real_spread"] == pytest.approx(0.2)
    assert rows["mean_ttft_ms"]["real_ci"] == 0.0  # identical repeats: no spread


def test_validate_sim_real_repeats_are_found_again_by_sim_only(tmp_path, capsys):
    from experiments import validate_sim

    out = tmp_path / "v"
    args = ["model=tiny-llama", "workload.num_requests=6", "device=cpu", "engine.kv_cache_tokens=512",
            "--label", "tiny", "--out", str(out)]
    assert validate_sim.main([*args, "--real-only", "--real-repeats", "2"]) == 0
    assert (out / "real" / "offline" / "summary.json").exists() and (out / "real-2" / "offline" / "summary.json").exists()
    assert validate_sim.main([*args, "--sim-only"]) == 0
    table = pd.read_csv(out / "validation.csv")
    assert (table.loc[table["metric"] == "output_throughput", "real_n"] == 2).all()
    assert "(n=2) |" in (out / "validation.md").read_text()
    # runs of other settings (e.g. an older default) are another engine: refused, naming the key and the fix
    capsys.readouterr()
    simulated = (out / "sim" / "offline" / "summary.json").read_text()
    assert validate_sim.main(["engine.max_num_seqs=8", *args, "--sim-only"]) == 2
    assert (out / "sim" / "offline" / "summary.json").read_text() == simulated  # refused before simulating
    assert re.search(r"engine\.max_num_seqs: real 64, simulated 8.*engine\.max_num_seqs=64", capsys.readouterr().err)
    # the real engine again into those folders with other settings: refused with the message, not a traceback
    assert validate_sim.main(["engine.max_num_seqs=8", *args, "--real-only"]) == 2
    assert "holds a run of a different configuration" in capsys.readouterr().err


def test_config_mismatch_names_settings_both_runs_record():
    from experiments.validate_sim import config_mismatch

    real = {"cfg.mode": "offline", "cfg.engine.cuda_graph_max_tokens": 2048, "cfg.engine.max_num_batched_tokens": 8192,
            "cfg.allocator.name": "paged", "cfg.model.path": "/device/ckpt", "mean_ttft_ms": 1.0}
    sim = {"cfg.mode": "simulate", "cfg.engine.cuda_graph_max_tokens": 8192, "cfg.engine.max_num_batched_tokens": 8192,
           "cfg.allocator.name": "paged", "cfg.model.path": "/cpu/ckpt", "cfg.sim.name": "h200",
           "cfg.engine.cuda_graph_mode": "full", "mean_ttft_ms": 2.0}
    assert config_mismatch(real, sim) == ({"engine.cuda_graph_max_tokens": (2048, 8192)}, ["engine.cuda_graph_mode"])
    assert config_mismatch(real, {**sim, "cfg.engine.cuda_graph_max_tokens": 2048})[0] == {}
    # the engine caps the graphs at the token budget: under a 2048-token budget both are one engine
    small = {"cfg.engine.max_num_batched_tokens": 2048}
    assert config_mismatch({**real, **small}, {**sim, **small})[0] == {}


def test_validate_sim_end_to_end_on_cpu(tmp_path):
    """The real engine (CPU) and simulate on one config: files written, decisions and memory exact
    offline, the simulated runs named by their cost model (the H200 profile, tiny-llama composed)."""
    import json

    from experiments import validate_sim

    out = tmp_path / "v"
    args = ["model=tiny-llama", "workload.num_requests=12", "device=cpu", "engine.kv_cache_tokens=512",
            "--rates", "40", "--online-requests", "6", "--label", "tiny", "--out", str(out)]
    assert validate_sim.main(args) == 0
    table = pd.read_csv(out / "validation.csv")
    exact = table[(table["mode"] == "offline") & (table["target"] == 0.0)]
    assert len(exact) >= 8 and exact["ok"].astype(str).eq("True").all()
    assert set(table["mode"]) == {"offline", "online-40rps"}
    assert (out / "validation.png").stat().st_size > 0 and "| tiny | offline |" in (out / "validation.md").read_text()
    assert "| decode |" in (out / "steps_compare.md").read_text()  # offline steps side by side
    sim = json.loads((out / "sim" / "offline" / "summary.json").read_text())
    assert sim["cost_model"] == "profiled" and "composed from" in sim["cost_profile_model"]
    # --sim-only re-simulates against the real runs already there; a forced roofline sits beside
    assert validate_sim.main([*args, "--sim-only", "--cost-model", "roofline"]) == 0
    roof = json.loads((out / "sim-roofline" / "offline" / "summary.json").read_text())
    assert roof["cost_model"] == "roofline" and (out / "validation-roofline.csv").exists()


def test_host_calibration_trickle_gives_prefills_at_small_batch():
    """Requests arriving one at a time: prefill steps beside a few decoding sequences, the shape of
    a light online load, so the small-batch host bins are measured rather than clamped. The
    steps run through the experiments' driver, whose time between steps each row carries."""
    from experiments.profile_host import host_rows

    rows = host_rows(MODEL, "paged", {"block_size": 8}, max_model_len=256, kv_cache_tokens=2048, device="cpu",
                     phases=((-12, 16, 64, 16, 40),), skip_steps=0)
    prefill_batches = [r["batch"] for r in rows if r["prefill_tokens"] > 0]
    # the first request prefilled alone; the others arrive spaced in time, each on a step of its own
    # unless a slow step (a busy CI machine) lets two arrive before the next one; never all at once
    assert 8 <= len(prefill_batches) <= 12 and prefill_batches[0] == 1 and max(prefill_batches) < 12
    assert all(r["duration"] >= r["value"] >= 0 for r in rows)
    assert sum(r["gap"] > 0 for r in rows) > len(rows) // 2 and max(r["gap"] for r in rows) < 1.0


def _with_piecewise(floor: float = 1e-3) -> DeviceProfile:
    prof = synthetic_profile()
    rows = [dict(table="piecewise_forward", model=MODEL, query=q, context=q, value=max(floor, 6e-4 + 1e-7 * q))
            for q in (16, 128, 1024, 2048)]
    return DeviceProfile(pd.concat([prof.df, pd.DataFrame(rows)], ignore_index=True), prof.meta, "synthetic+pw")


def test_piecewise_graph_steps_use_their_table_at_the_padded_size(caplog):
    """Prefill/mixed steps up to graph_max_tokens cost the piecewise forward of their padded size
    (its grid points reproduced exactly), larger ones the eager forward; without the table the
    model says so and stays eager."""
    from engine.loader import resolve_config
    from engine.piecewise_graphs import token_sizes

    shape = shape_of(resolve_config(MODEL))
    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged", graph_mode="piecewise")
    pw = ProfiledCostModel(_with_piecewise(), shape, graph_max_tokens=2048, **args)
    eager = ProfiledCostModel(_with_piecewise(), shape, graph_max_tokens=0, **args)
    for q in (16, 128, 1024, 2048):  # grid points: one fresh chunk is the measured forward itself
        assert pw.piecewise_size(q) == q
        assert pw.device_time([(q, q)]) == pytest.approx(max(1e-3, 6e-4 + 1e-7 * q), rel=1e-9)
        assert eager.device_time([(q, q)]) == pytest.approx(max(3e-3, 6e-4 + 1e-7 * q), rel=1e-9)
    assert pw.piecewise_size(100) == next(s for s in token_sizes(2048) if s >= 100) == 112
    assert pw.piecewise_size(4096) is None  # beyond the cap: eager
    assert pw.device_time([(4096, 4096)]) == pytest.approx(eager.device_time([(4096, 4096)]))
    # padding: a 100-token chunk costs what the 112-token forward costs
    assert pw.device_time([(100, 100)]) == pytest.approx(pw.device_time([(112, 112)]), rel=0.02)
    times = [pw.device_time([(q, q)]) for q in range(16, 2049, 37)]
    assert all(x <= y + 1e-15 for x, y in zip(times, times[1:]))
    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        old = cost_model(graph_max_tokens=2048)
    assert old.piecewise_size(128) is None and "no piecewise_forward table" in caplog.text


def _with_full_forward() -> DeviceProfile:
    """``_with_piecewise``'s profile with a full_forward table: 2 ms + 0.1 us a token."""
    base = _with_piecewise()
    rows = [dict(table="full_forward", model=MODEL, query=q, context=q, value=2e-3 + 1e-7 * q)
            for q in (16, 128, 1024, 2048)]
    return DeviceProfile(pd.concat([base.df, pd.DataFrame(rows)], ignore_index=True), base.meta, "synthetic+full")


def test_full_graph_steps_use_the_full_table_or_say_they_fall_back(caplog):
    """cuda_graph_mode=full times prefill/mixed steps from the profile's full_forward table; a
    profile without one falls back to the piecewise table and says so."""
    from engine.loader import resolve_config

    shape = shape_of(resolve_config(MODEL))
    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged", graph_max_tokens=2048)
    base = _with_piecewise()
    full_prof = _with_full_forward()
    full = ProfiledCostModel(full_prof, shape, graph_mode="full", **args)
    piecewise = ProfiledCostModel(full_prof, shape, graph_mode="piecewise", **args)
    for q in (16, 128, 1024, 2048):
        assert full.device_time([(q, q)]) == pytest.approx(2e-3 + 1e-7 * q, rel=1e-9)
        assert piecewise.device_time([(q, q)]) == pytest.approx(max(1e-3, 6e-4 + 1e-7 * q), rel=1e-9)
    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        fallback = ProfiledCostModel(base, shape, graph_mode="full", **args)
    assert "no full_forward table" in caplog.text
    assert fallback.device_time([(128, 128)]) == pytest.approx(piecewise.device_time([(128, 128)]))


def test_full_graph_steps_pay_the_logits_of_their_padded_rows():
    """A full-graph step computes its sampled rows' logits by a graph of the decode graphs' row counts
    (``FullGraphs.logit_graphs``: 9 rows replay the 16-row GEMM); a piecewise or eager step, or a
    full-graph engine's step too large for its graphs, multiplies exactly its rows."""
    from engine.loader import resolve_config

    shape = shape_of(resolve_config(MODEL))
    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged", graph_max_tokens=2048)
    prof = _with_full_forward()
    mixed = [(100, 100)] + [(1, 50)] * 8  # nine sampled rows, 108 tokens: a graphed step
    for mode, work, want in (("full", mixed, 16), ("piecewise", mixed, 9),
                             ("full", [(3000, 3000)] + [(1, 50)] * 8, 9)):  # over the cap: eager
        m = ProfiledCostModel(prof, shape, graph_mode=mode, **args)
        seen, lm_head = [], m.lm_head
        m.lm_head = lambda r, lm_head=lm_head: seen.append(r) or lm_head(r)
        m.device_time(work)
        assert want in seen and 9 + 16 - want not in seen, (mode, seen)


def test_host_time_is_calibrated_with_the_graphs_the_steps_ran_with():
    """Host steps recorded with piecewise graphs (cap 2048) calibrate a simulated config without
    them (cap 0, or a budget under the cap) to the same host time: the recorded steps' device
    time is modelled with the recorded settings, not the simulated ones (else an eager launch
    floor is taken off steps that never had it, and host time vanishes)."""
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import _calibration_work

    shape = shape_of(resolve_config(MODEL))
    base = _with_piecewise()
    recorder = ProfiledCostModel(base, shape, model=MODEL, paged=True, block_size=16, max_graph_batch=64,
                                 graph_max_tokens=2048, calibrate_host=False, graph_mode="piecewise")
    df = base.df[base.df["table"] != "host"]
    rows = []
    for b in range(1, 33):
        for p in (0,) * 20 + (128,) * 20:
            row = dict(table="host", allocator="paged", batch=b, prefill_tokens=p, decode_tokens=b - (p > 0),
                       context=b * 300 + p, graph_max_tokens=2048, max_graph_batch=64)
            rows.append(dict(row, duration=recorder.device_time(_calibration_work(pd.Series(row))) + 4e-4))
    prof = DeviceProfile(pd.concat([df, pd.DataFrame(rows)], ignore_index=True), base.meta, "recorded")
    prefill = [(128, 128)] + [(1, 300)] * 7
    for cap in (2048, 512, 0):
        m = ProfiledCostModel(prof, shape, model=MODEL, paged=True, block_size=16, max_graph_batch=64,
                              graph_max_tokens=cap, graph_mode="piecewise")
        assert m.host_time(prefill) == pytest.approx(4e-4, rel=0.02), cap
        assert m.host_time([(1, 300)] * 8) == pytest.approx(4e-4, rel=0.02), cap


def test_layer_groups_are_simulated_without_graphs():
    """The runner captures no CUDA graphs for a layer-grouped allocator: simulate's profiled model
    times its steps as eager (no decode graph, no piecewise sizes); without groups it has both."""
    from experiments.run import build_engine
    from tests.test_simulate import config

    base = ["mode=simulate", "sim=h200", "sim.cost_model=profiled", "model=gemma2-9b-like", "device=cuda",
            "engine.kv_cache_tokens=20000", "engine.max_model_len=2048", "allocator=paged"]
    grouped = build_engine(config(*base, "engine.kv_grouping=shared")).cost_model
    plain = build_engine(config(*base)).cost_model
    assert grouped.name == plain.name == "profiled"
    assert grouped.graph_sizes == [] and grouped.piecewise_sizes == []
    assert plain.graph_sizes and plain.piecewise_sizes


def test_host_steps_recorded_with_full_graphs_are_modelled_with_the_full_table():
    """Host time = a recorded step's duration less its device time as the engine that ran it ran
    it: steps recorded with full graphs (``graph_mode`` column) are modelled with ``full_forward``,
    whichever mode is simulated, so host time comes out the same (taking the piecewise table off
    full-graph steps would leave 1 ms too much or too little host time)."""
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import _calibration_work

    shape = shape_of(resolve_config(MODEL))
    base = _with_piecewise()
    extra = [dict(table="full_forward", model=MODEL, query=q, context=q, value=2e-3 + 1e-7 * q)
             for q in (16, 128, 1024, 2048)]
    df = pd.concat([base.df[base.df["table"] != "host"], pd.DataFrame(extra)], ignore_index=True)
    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, graph_max_tokens=2048)
    recorder = ProfiledCostModel(DeviceProfile(df, base.meta, "x"), shape, graph_mode="full",
                                 calibrate_host=False, **args)
    rows = []
    for b in range(1, 33):
        for p in (0,) * 20 + (128,) * 20:
            row = dict(table="host", allocator="paged", batch=b, prefill_tokens=p, decode_tokens=b - (p > 0),
                       context=b * 300 + p, graph_max_tokens=2048, max_graph_batch=64, graph_mode="full")
            rows.append(dict(row, duration=recorder.device_time(_calibration_work(pd.Series(row))) + 4e-4))
    prof = DeviceProfile(pd.concat([df, pd.DataFrame(rows)], ignore_index=True), base.meta, "recorded-full")
    prefill = [(128, 128)] + [(1, 300)] * 7
    for mode in ("full", "piecewise"):
        m = ProfiledCostModel(prof, shape, graph_mode=mode, **args)
        assert m.host_time(prefill) == pytest.approx(4e-4, rel=0.02), mode
    # the same rows read as piecewise steps (no graph_mode column) leave a different residual
    legacy = DeviceProfile(prof.df.drop(columns=["graph_mode"]), base.meta, "legacy")
    assert ProfiledCostModel(legacy, shape, graph_mode="full", **args).host_time(prefill) > 1e-3
    # the driver's time between steps (``gap``) is part of host time: a run's wall clock holds it
    gapped = DeviceProfile(prof.df.assign(gap=np.where(prof.df["table"] == "host", 1e-4, np.nan)), base.meta, "gap")
    assert ProfiledCostModel(gapped, shape, graph_mode="full", **args).host_time(prefill) == pytest.approx(5e-4, rel=0.02)


def test_host_time_of_prefill_steps_by_how_they_run():
    """Prefill/mixed steps that replay graphs and those that run eagerly have host tables of their
    own (the one copies metadata into static buffers, the other launches every kernel)."""
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import _calibration_work

    shape = shape_of(resolve_config(MODEL))
    base = _with_piecewise()
    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, graph_max_tokens=2048,
                graph_mode="piecewise")
    recorder = ProfiledCostModel(base, shape, calibrate_host=False, **args)
    df = base.df[base.df["table"] != "host"]
    rows = []
    for b in range(1, 17):
        for p in (0,) * 20 + (128,) * 20 + (4096,) * 20:
            row = dict(table="host", allocator="paged", batch=b, prefill_tokens=p, decode_tokens=b - (p > 0),
                       context=b * 300 + p, graph_max_tokens=2048, max_graph_batch=64, graph_mode="piecewise")
            host = {0: 2e-4, 128: 5e-4, 4096: 9e-4}[p]
            rows.append(dict(row, duration=recorder.device_time(_calibration_work(pd.Series(row))) + host))
    m = ProfiledCostModel(DeviceProfile(pd.concat([df, pd.DataFrame(rows)], ignore_index=True), base.meta, "k"),
                          shape, **args)
    assert m.step_kind(8, 0, 8) == "graph" and m.step_kind(8, 128, 7) == "mixed_graph"
    assert m.step_kind(8, 4096, 7) == "eager"
    # the calibration's vectorized kinds are step_kind's, at the graphs' edges too (64 sequences, 2048 tokens)
    grid = [(b, p, d) for b in (1, 63, 64, 65, 300) for p in (0, 1, 1983, 1984, 2047, 2048, 2049)
            for d in (0, b - 1, b) if p + d > 0]
    b, p, d = (np.array(x) for x in zip(*grid))
    assert m.step_kinds(b, p, d).tolist() == [m.step_kind(*g) for g in grid]
    assert {"graph", "mixed_graph", "eager"} == set(m.step_kinds(b, p, d))
    eager = ProfiledCostModel(base, shape, calibrate_host=False, model=MODEL, paged=True, block_size=16,
                              enforce_eager=True)
    assert eager.step_kinds(b, p, d).tolist() == [eager.step_kind(*g) for g in grid] == ["eager"] * len(grid)
    assert m.host_time([(1, 300)] * 8) == pytest.approx(2e-4, rel=0.02)
    assert m.host_time([(128, 128)] + [(1, 300)] * 7) == pytest.approx(5e-4, rel=0.02)
    assert m.host_time([(4096, 4096)] + [(1, 300)] * 7) == pytest.approx(9e-4, rel=0.02)


def test_host_time_of_mixed_steps_follows_their_tokens():
    """What prefill/mixed steps take beyond their modelled device time grows or shrinks with their
    tokens at one batch size: a light-load step (a short prompt beside a few decodes) is charged
    its own, not the mean of the bin's full-budget steps."""
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import _calibration_work, _token_slope

    shape = shape_of(resolve_config(MODEL))
    base = _with_piecewise()
    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, graph_max_tokens=2048,
                graph_mode="piecewise")
    recorder = ProfiledCostModel(base, shape, calibrate_host=False, **args)
    rng = np.random.default_rng(0)
    rows = []
    for b in (2, 6, 8, 12, 16, 40):  # 8 and 16: the bins' right edges
        for p in rng.integers(16, 1900, 60):  # light-load prompts beside full-budget chunks
            row = dict(table="host", allocator="paged", batch=b, prefill_tokens=int(p), decode_tokens=b - 1,
                       context=b * 300 + int(p), graph_max_tokens=2048, max_graph_batch=64, graph_mode="piecewise")
            host = 3e-4 + 1e-5 * b + 4e-7 * (p + b - 1)  # 0.4 us a token on top of the batch's base
            rows.append(dict(row, duration=recorder.device_time(_calibration_work(pd.Series(row))) + host))
    df = base.df[base.df["table"] != "host"]
    m = ProfiledCostModel(DeviceProfile(pd.concat([df, pd.DataFrame(rows)], ignore_index=True), base.meta, "k"),
                          shape, **args)
    assert m.token_slope["mixed_graph"] == pytest.approx(4e-7, rel=0.01)
    for b, p in ((6, 64), (6, 1500), (8, 100), (12, 200), (16, 1700), (40, 1800)):
        work = [(p, p)] + [(1, 300)] * (b - 1)
        assert m.host_time(work) == pytest.approx(3e-4 + 1e-5 * b + 4e-7 * (p + b - 1), rel=0.03), (b, p)
    # decode graph steps keep their table by batch size alone; no spread of tokens within a bin: no slope
    assert m.token_slope["graph"] == 0.0
    assert _token_slope(np.full(40, 8.0), np.full(40, 100.0), rng.random(40)) == 0.0
    assert _token_slope(np.full(5, 8.0), np.arange(5.0), np.arange(5.0)) == 0.0  # too few steps


def test_validation_tally_counts_time_and_exact_figures_apart():
    from experiments.validate_sim import _tally

    df = pd.DataFrame(dict(metric=["a", "b", "c", "d", "e"], target=[0.05, 0.15, 0.0, 0.0, None],
                           ok=[True, False, True, True, None]))
    assert _tally(df) == "1 of 2 time figures, 2 of 2 exact figures within target"
    assert _tally(df[df["metric"] == "e"]) == "no checked figures"


def _with_async_host(cpu_s=lambda b: 9e-4 + 2e-5 * b) -> DeviceProfile:
    """The synthetic profile plus asynchronous host steps (``--host-scheduling async``): their CPU
    time per step is ``cpu_s(batch)``, far above the synchronous residual."""
    prof = synthetic_profile()
    rows = [dict(table="host", model=MODEL, allocator=alloc, batch=b, prefill_tokens=0, decode_tokens=b,
                 context=100 * b, duration=5e-3, gap=0.0, scheduling="async", value=cpu_s(b))
            for alloc in ("paged", "contiguous") for b in range(1, 65) for _ in range(25)]
    return DeviceProfile(pd.concat([prof.df, pd.DataFrame(rows)], ignore_index=True), prof.meta, "synthetic+async")


def test_overlapped_steps_take_host_time_from_asynchronous_steps():
    """An asynchronous engine's host part is the CPU time of the profile's asynchronous steps
    (launch included), reproduced at their batch sizes; a synchronous engine keeps the residual of
    synchronous steps, and the summary names which steps calibrated it."""
    from engine.loader import resolve_config

    prof = _with_async_host()
    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged")
    over = ProfiledCostModel(prof, shape_of(resolve_config(MODEL)), overlapped=True, **args)
    sync = ProfiledCostModel(prof, shape_of(resolve_config(MODEL)), **args)
    for b in (1, 3, 10, 40):
        assert over.host_time([(1, 100)] * b) == pytest.approx(9e-4 + 2e-5 * b, rel=0.03)
        assert sync.host_time([(1, 100)] * b) == pytest.approx(HOST_BASE["paged"] + 5e-6 * b, rel=0.03)
    assert over.describe()["cost_host_steps"] == "async" and sync.describe()["cost_host_steps"] == "sync"
    host, device = over.host_device_time([(1, 100)] * 10)
    assert host == pytest.approx(over.host_time([(1, 100)] * 10)) and device == over.device_time([(1, 100)] * 10)


def test_overlapped_without_asynchronous_steps_warns_and_uses_synchronous_ones(caplog):
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import _warn_host_fallback

    _warn_host_fallback.cache_clear()  # once per profile and model: another test may have warned
    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        m = ProfiledCostModel(synthetic_profile(), shape_of(resolve_config(MODEL)), model=MODEL, paged=True,
                              block_size=16, max_graph_batch=64, allocator="paged", overlapped=True)
    assert m.describe()["cost_host_steps"] == "sync"
    assert m.host_time([(1, 100)] * 10) == pytest.approx(HOST_BASE["paged"] + 5e-6 * 10, rel=0.03)
    assert any("no asynchronous host steps" in r.getMessage() for r in caplog.records)


def test_synchronous_engine_with_only_asynchronous_steps_takes_their_cpu_time(caplog):
    """A profile made with ``--host-scheduling async`` alone: a synchronous engine takes those
    steps' CPU time (their wall time overlapped the device: no residual to take), with a warning."""
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import _warn_host_fallback

    prof = _with_async_host()
    df = prof.df
    only_async = DeviceProfile(df[(df["table"] != "host") | (df.get("scheduling") == "async")], prof.meta, "async-only")
    _warn_host_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        m = ProfiledCostModel(only_async, shape_of(resolve_config(MODEL)), model=MODEL, paged=True, block_size=16,
                              max_graph_batch=64, allocator="paged")
    assert m.describe()["cost_host_steps"] == "async"
    assert m.host_time([(1, 100)] * 10) == pytest.approx(9e-4 + 2e-5 * 10, rel=0.03)
    assert any("only asynchronous host steps" in r.getMessage() for r in caplog.records)


def test_asynchronous_host_steps_record_the_cpu_time_without_waits():
    """``host_rows(async_scheduling=True)``: each row's value is the step's host work plus its
    launch's CPU time, never more than the step took (waits left out)."""
    from experiments.profile_host import host_rows

    rows = host_rows(MODEL, "paged", {"block_size": 8}, max_model_len=256, kv_cache_tokens=2048, device="cpu",
                     phases=((12, 16, 64, 16, 40),), skip_steps=0, async_scheduling=True)
    assert rows and all(r["scheduling"] == "async" for r in rows)
    assert all(r["value"] == pytest.approx(r["host_s"] + r["launch_cpu"]) for r in rows)
    assert all(0 < r["value"] <= r["duration"] * 1.001 for r in rows)
    sync = host_rows(MODEL, "paged", {"block_size": 8}, max_model_len=256, kv_cache_tokens=2048, device="cpu",
                     phases=((12, 16, 64, 16, 40),), skip_steps=0)
    assert all(r["scheduling"] == "sync" and r["duration"] >= r["value"] >= 0 for r in sync)


def test_host_steps_leave_the_device_alone_unless_asked_for_events(monkeypatch):
    """``kvlab profile``'s host steps stand for real runs, which have no timer: by default the
    launch timer makes and records no CUDA event (the CPU time of the launch, the longest context
    and the VMM calls are still kept) and rows carry no device time; ``events=True`` brackets each
    launch with two, for the ``gpu`` column. (The device path, driven on a CPU engine with stand-in
    events.)"""
    import torch

    import experiments.step_timing as step_timing
    from experiments.profile_host import host_rows

    made = []

    class Event:  # torch.cuda.Event's part the timer uses
        def __init__(self, enable_timing=False):
            made.append(self)

        def record(self):
            self.recorded = True

        def elapsed_time(self, end):
            return 2.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    real = step_timing.LaunchTimer
    timers = []

    def on_device(eng, cuda, events=True):  # as on a GPU, whatever the engine's device
        timers.append(real(eng, True, events=events))
        return timers[-1]

    monkeypatch.setattr(step_timing, "LaunchTimer", on_device)
    spec = dict(max_model_len=256, kv_cache_tokens=2048, device="cpu", phases=((6, 16, 64, 8, 16),), skip_steps=0)
    quiet = host_rows(MODEL, "paged", {"block_size": 8}, **spec)
    assert quiet and not made and all(not r["events"] and "gpu" not in r and "value" not in r for r in quiet)
    assert all(r["launch_cpu"] > 0 and r["max_context"] > 0 for r in quiet)
    assert all(math.isnan(d) for d, _ in timers[-1].device_times().values())
    timed = host_rows(MODEL, "paged", {"block_size": 8}, **spec, events=True)
    assert len(made) == 2 * len(timers[-1].marks) and all(e.recorded for e in made)
    assert all(r["events"] and r["gpu"] >= 0 and r["value"] == max(0.0, r["duration"] - r["gpu"]) for r in timed)
    # the same steps either way
    shape = ("step", "batch", "prefill_tokens", "decode_tokens", "context")
    assert [tuple(r[k] for k in shape) for r in quiet] == [tuple(r[k] for k in shape) for r in timed]


def test_host_steps_run_apart_in_a_process_of_their_own():
    """``kvlab profile`` records each host-time engine in a process of its own (as each real run of
    validate-sim is one): the same steps as in this process, and what ran there is not here."""
    from experiments.profile_host import host_rows, host_rows_apart

    spec = dict(max_model_len=256, kv_cache_tokens=2048, device="cpu", phases=((10, 16, 64, 16, 40),), skip_steps=0)
    here = host_rows(MODEL, "paged", {"block_size": 8}, **spec)
    apart = host_rows_apart(MODEL, "paged", {"block_size": 8}, **spec)
    shape = ("step", "batch", "prefill_tokens", "decode_tokens", "context", "allocator", "scheduling")
    assert [tuple(r[k] for k in shape) for r in apart] == [tuple(r[k] for k in shape) for r in here]
    assert all(r["duration"] > 0 for r in apart)
    import subprocess

    with pytest.raises(subprocess.CalledProcessError):  # the child's failure is the caller's
        host_rows_apart(MODEL, "no-such-allocator", {}, **spec)


def test_profile_merge_keeps_host_steps_of_the_other_scheduling(tmp_path):
    """``--host-scheduling async --merge old``: the old profile's synchronous host steps stay, its
    asynchronous ones of the re-measured model are replaced."""
    old = tmp_path / "old.parquet"
    profile_device.main(["--models", MODEL, "--device", "cpu", "--skip", "gemm,models,ragged,copy,vmm", "--host-in-process",
                         "--host-requests", "8", "--out", str(old)])
    made = load_profile(str(old))  # as profiles were written before host rows named their scheduling
    old = tmp_path / "legacy.parquet"
    legacy_meta = {k: v for k, v in made.meta.items() if k != "num_sms"}  # ... and before num_sms
    profile_device.write_profile(old, made.df.drop(columns="scheduling").to_dict("records"), legacy_meta)
    before = load_profile(str(old)).table("host")
    assert "scheduling" not in before
    new = tmp_path / "new.parquet"
    profile_device.main(["--models", MODEL, "--device", "cpu", "--skip", "gemm,models,ragged,copy,vmm", "--host-in-process",
                         "--host-requests", "8", "--host-scheduling", "async", "--merge", str(old),
                         "--out", str(new)])
    assert load_profile(str(new)).meta["num_sms"] > 0  # the measuring device's, for the ragged term
    host = load_profile(str(new)).table("host")
    sched = host["scheduling"].fillna("sync")
    assert (sched == "sync").sum() == len(before) and (sched == "async").sum() > 0
    with pytest.raises(SystemExit):
        profile_device.main(["--models", MODEL, "--device", "cpu", "--host-scheduling", "overlapped",
                             "--out", str(tmp_path / "x.parquet")])


def test_profile_merge_on_a_cpu_keeps_the_graph_tables(tmp_path, monkeypatch):
    """The prefill/mixed graph tables are a part of their own (``graphs``, CUDA only): a merge that
    measures nothing of it keeps them, named as before; an unknown part is refused."""
    monkeypatch.setattr(profile_cases, "COPY_BYTES", [1 << 16])
    old = tmp_path / "old.parquet"
    graph_rows = [dict(table=t, model=MODEL, mode="linear", query=q, context=q, value=1e-3 * q)
                  for t in ("full_forward", "piecewise_forward") for q in (16, 8192)]
    profile_device.write_profile(old, graph_rows, {"device": "cpu", "models": MODEL})
    new = tmp_path / "new.parquet"
    profile_device.main(["--models", MODEL, "--device", "cpu", "--skip", "host,gemm,models,ragged,vmm",
                         "--merge", str(old), "--out", str(new)])
    merged = load_profile(str(new))
    assert len(merged.table("full_forward", model=MODEL)) == 2 and len(merged.table("piecewise_forward")) == 2
    assert set(merged.meta["updated"]) >= {"copy"} and "full_forward" not in merged.meta["updated"]
    assert len(merged.table("copy")) > 0
    with pytest.raises(SystemExit):
        profile_device.main(["--models", MODEL, "--device", "cpu", "--skip", "graph", "--out", str(tmp_path / "x.parquet")])


def test_vmm_calls_cost_what_the_engine_steps_say_beyond_the_driver_call():
    """Steps that made VMM calls took 1.6x the driver's time for them beyond steps that made none
    (the allocator's work around a call): the host tables leave that out and the calls are charged
    at that scale; too few steps with calls, or calls cheaper than the driver's, leave it at 1."""
    from experiments.profiled_costmodel import _vmm_scale

    rng = np.random.default_rng(0)
    batch = rng.integers(17, 64, 600)
    kinds = np.array(["graph"] * 400 + ["mixed_graph"] * 200)
    driver = np.where(rng.random(600) < 0.1, rng.integers(10, 150, 600) * 40e-6, 0.0)
    rest = 1e-3 + 5e-6 * batch + (kinds == "mixed_graph") * 8e-4 + 1.6 * driver + rng.normal(0, 2e-5, 600)
    assert _vmm_scale(rest, driver, kinds, batch) == pytest.approx(1.6, rel=0.05)
    few = driver * (np.arange(600) < 30)  # 3 steps with calls at most per bin
    assert _vmm_scale(rest - 1.6 * driver, few, kinds, batch) == 1.0
    assert _vmm_scale(rest - 1.6 * driver + 0.5 * driver, driver, kinds, batch) == 1.0  # never below the call
    m = cost_model(allocator="virtual", paged=False, block_size=0)
    m.vmm_scale = 1.6
    host, _ = m.host_device_time([(1, 100)] * 8, vmm_maps=3)
    assert host == pytest.approx(m.host_time([(1, 100)] * 8) + 3 * 1.6 * 37e-6)


def test_collect_merges_configurations_not_a_nested_collection(tmp_path):
    """`validate-sim --collect`: every configuration's table under OUT, once; a subfolder that is
    itself a collection (results/sim_validation/async/) is left out."""
    from experiments.validate_sim import main

    row = dict(mode="offline", metric="output_throughput", real=100.0, sim=101.0, error=0.01, target=0.05, ok=True)
    for folder, label in (("a", "cfg-a"), ("b", "cfg-b"), ("nested/c", "cfg-c")):
        (tmp_path / folder).mkdir(parents=True)
        pd.DataFrame([dict(row, label=label)]).to_csv(tmp_path / folder / "validation.csv", index=False)
    assert main(["--collect", "--out", str(tmp_path / "nested")]) == 0  # nested/validation.csv: a collection
    assert main(["--collect", "--out", str(tmp_path)]) == 0
    assert sorted(pd.read_csv(tmp_path / "validation.csv")["label"]) == ["cfg-a", "cfg-b"]


def _bubble(b: int) -> float:
    return 6e-5 + 1e-6 * b


def _with_async_periods(base: DeviceProfile | None = None, max_context=True) -> DeviceProfile:
    """``base`` (the synthetic profile) plus asynchronous decode runs as ``kvlab profile`` records
    them: every step's batch differs from the one before, and a device-bound step's period is the
    step before's modelled device time plus ``_bubble`` of that step's batch. Every eighth step
    waits on the CPU; each run starts with a long period and ends on 40 sequences (pairing across
    runs would read that period against the other run's last step); one step of each run was left
    out (an idle one: the step after it is not paired across the hole)."""
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import _calibration_work

    prof = base or synthetic_profile()
    dev = ProfiledCostModel(prof, shape_of(resolve_config(MODEL)), model=MODEL, paged=True, block_size=16,
                            max_graph_batch=64, calibrate_host=False, max_model_len=2048)
    rows = []
    for rep in range(6):
        batches = [1 + (j * 7 + rep) % 64 for j in range(199)] + [40]
        prev = None
        for j, b in enumerate(batches):
            step = j + (j >= 100)  # step 100 left out
            row = dict(table="host", model=MODEL, allocator="paged", step=step, batch=b, prefill_tokens=0,
                       decode_tokens=b, context=b * 300 + 40 * b,
                       max_context=(340 + 200 * (b > 1)) if max_context else None, gap=1e-5, scheduling="async",
                       repeat=rep)
            d = dev.device_time(_calibration_work(pd.Series(row)))
            if prev is None or j == 100:  # a run's first step, the one after the hole: a long wait
                cpu, period = 2e-4, 10e-3
            elif j % 8 == 0:  # waits on the CPU
                cpu = period = 3 * prev[0] + 1e-4
            else:
                cpu, period = 2e-4, prev[0] + _bubble(prev[1])
            rows.append(dict(row, value=cpu - 1e-5, duration=period - 1e-5))
            prev = (d, b)
    return DeviceProfile(pd.concat([prof.df, pd.DataFrame(rows)], ignore_index=True), prof.meta,
                         prof.path + "+periods")


def test_asynchronous_decode_steps_take_the_period_the_profile_steps_took():
    """Device-bound asynchronous steps took their predecessor's modelled device time plus a bubble
    that grows with its batch: an overlapped engine's decode graph steps add that bubble to their
    device part (read off each step's successor, CPU-bound steps, run boundaries and holes left
    out); a synchronous engine, whose host residual holds it, and prefill steps do not."""
    from engine.loader import resolve_config

    prof = _with_async_periods()
    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged", max_model_len=2048)
    over = ProfiledCostModel(prof, shape_of(resolve_config(MODEL)), overlapped=True, **args)
    sync = ProfiledCostModel(prof, shape_of(resolve_config(MODEL)), **args)
    assert over.describe()["cost_period_term"] and not sync.describe()["cost_period_term"]
    for b in (1, 3, 10, 40, 60):
        work = [(1, 340)] * b
        host, device = over.host_device_time(work)
        assert device - over.device_time(work) == pytest.approx(_bubble(b), rel=0.1, abs=3e-6)
        assert sync.host_device_time(work)[1] == sync.device_time(work)
    prefill = [(256, 256)] + [(1, 340)] * 3
    assert over.host_device_time(prefill)[1] == over.device_time(prefill)


def test_asynchronous_steps_without_their_longest_context_leave_the_period_term_out(caplog):
    """With the ragged term, steps that do not record their longest context cannot tell a bubble
    from a ragged batch's excess: no period term, with a warning naming the command that records
    it. Without the ragged term nothing can count twice: the term is there."""
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import _warn_no_period
    from tests.test_ragged_decode import ragged_profile

    _warn_no_period.cache_clear()
    args = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged", overlapped=True,
                max_model_len=2048)
    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        m = ProfiledCostModel(_with_async_periods(ragged_profile(), max_context=False),
                              shape_of(resolve_config(MODEL)), **args)
    assert m.ragged is not None and not m.describe()["cost_period_term"]
    assert m.host_device_time([(1, 340)] * 8)[1] == m.device_time([(1, 340)] * 8)
    assert any("--host-scheduling async --merge" in r.getMessage() for r in caplog.records)
    plain = ProfiledCostModel(_with_async_periods(max_context=False), shape_of(resolve_config(MODEL)), **args)
    assert plain.ragged is None and plain.describe()["cost_period_term"]


def test_profile_host_add_pools_another_run_as_further_repeats(tmp_path):
    """``--host-add --merge old``: the old host steps stay and this run's follow them as the next
    repeat (the tables pool both); without --merge it is refused."""
    old = tmp_path / "old.parquet"
    args = ["--models", MODEL, "--device", "cpu", "--skip", "gemm,models,ragged,copy,vmm", "--host-in-process", "--host-requests", "8"]
    profile_device.main([*args, "--out", str(old)])
    before = load_profile(str(old)).table("host")
    new = tmp_path / "new.parquet"
    profile_device.main([*args, "--merge", str(old), "--host-add", "--out", str(new)])
    after = load_profile(str(new)).table("host")
    assert len(after) > len(before) and set(after["repeat"]) == {0, 1}
    assert (after["repeat"] == 0).sum() == len(before)
    runs = load_profile(str(new)).meta["updated"]["host_runs"]
    assert [r.get("first_repeat") for r in runs] == [None, 1] and "--host-add" in runs[-1]["command"]
    # a profile from before the repeat column: its steps are run 0, the added ones run 1
    legacy = tmp_path / "legacy.parquet"
    made = load_profile(str(old))
    profile_device.write_profile(legacy, made.df.drop(columns="repeat").to_dict("records"), made.meta)
    profile_device.main([*args, "--merge", str(legacy), "--host-add", "--out", str(new)])
    assert set(load_profile(str(new)).table("host")["repeat"].fillna(0)) == {0, 1}
    with pytest.raises(SystemExit):
        profile_device.main([*args, "--host-add", "--out", str(tmp_path / "x.parquet")])
    # steps of an engine with other graphs (here 2048 tokens; on a CPU none) are not pooled with these
    other = tmp_path / "other.parquet"
    profile_device.write_profile(other, made.df.assign(graph_max_tokens=2048.0).to_dict("records"), made.meta)
    with pytest.raises(SystemExit):
        profile_device.main([*args, "--merge", str(other), "--host-add", "--out", str(tmp_path / "y.parquet")])
    assert not (tmp_path / "y.parquet").exists()
    # nor steps timed with the launch timer's CUDA events (--host-events) with steps without them
    timed = tmp_path / "timed.parquet"
    profile_device.write_profile(timed, made.df.assign(events=True).to_dict("records"), made.meta)
    with pytest.raises(SystemExit):
        profile_device.main([*args, "--merge", str(timed), "--host-add", "--out", str(tmp_path / "z.parquet")])
    assert not (tmp_path / "z.parquet").exists()


def test_profile_merge_of_another_device_is_refused(tmp_path):
    """A run on one device merged into another's profile kept the old device name over this
    device's times (an H100's host steps in "NVIDIA H200"'s profile): refused before measuring."""
    old = tmp_path / "h200.parquet"
    profile_device.write_profile(old, [dict(table="copy", bytes=1 << 16, value=1e-6)], {"device": "NVIDIA H200"})
    new = tmp_path / "new.parquet"
    with pytest.raises(SystemExit):
        profile_device.main(["--models", MODEL, "--device", "cpu", "--skip", "host,gemm,models,ragged,vmm",
                             "--merge", str(old), "--out", str(new)])
    assert not new.exists() and not new.with_name("new.partial.parquet").exists()
    assert not profile_device._same_device_kind("NVIDIA H200", "NVIDIA H100 80GB HBM3")
    assert profile_device._same_device_kind("cpu", "cpu (x86_64)") and profile_device._same_device_kind(None, "x")


def test_profile_merge_remeasuring_one_model_keeps_the_others_tables(tmp_path, monkeypatch):
    """``--models B --merge old`` (old: A and B): B's model, ragged and GEMM tables are replaced,
    A's stay (and A's GEMM shapes), and the metadata names both models."""
    monkeypatch.setattr(profile_cases, "CONTEXTS", [16, 64])
    monkeypatch.setattr(profile_cases, "PREFILL_QUERIES", [16])
    monkeypatch.setattr(profile_cases, "GEMM_M", [1, 16])
    monkeypatch.setattr(profile_cases, "SAMPLE_ROWS", [1])
    monkeypatch.setattr(profile_cases, "RAGGED_BATCHES", [4])
    args = ["--device", "cpu", "--pool-tokens", "2048", "--reps", "1", "--max-model-len", "128",
            "--block-sizes", "16", "--skip", "host,copy,vmm"]
    old, new = tmp_path / "old.parquet", tmp_path / "new.parquet"
    profile_device.main(["--models", f"{MODEL},tiny-qwen3", *args, "--out", str(old)])
    before = load_profile(str(old)).df
    profile_device.main(["--models", "tiny-qwen3", *args, "--merge", str(old), "--out", str(new)])
    prof = load_profile(str(new))
    after = prof.df
    assert prof.models() == {MODEL, "tiny-qwen3"} and set(prof.meta["models"].split(",")) == {MODEL, "tiny-qwen3"}
    for table in ("eager_forward", "attention", "ragged", "sample"):
        mine = lambda df, m: df[(df["table"] == table) & (df["model"] == m)]  # noqa: E731
        assert len(mine(after, MODEL)) == len(mine(before, MODEL)) > 0
        assert mine(after, MODEL)["value"].tolist() == mine(before, MODEL)["value"].tolist()  # kept, not re-timed
        assert len(mine(after, "tiny-qwen3")) == len(mine(before, "tiny-qwen3")) > 0
    gemm = lambda df: set(zip(df[df["table"] == "gemm"]["n"], df[df["table"] == "gemm"]["k"]))  # noqa: E731
    assert gemm(after) == gemm(before) and len(after[after["table"] == "gemm"]) == len(before[before["table"] == "gemm"])


def test_host_compare_sets_a_profiles_host_steps_beside_a_runs():
    """``python -m experiments.host_compare``: per step kind and batch bin, the profile's residual
    (wall less modelled device time) is the host time its steps were made with, and a real run's
    steps come with their own host work and launch time."""
    from engine import LLMEngine
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from experiments.host_compare import compare

    eng = LLMEngine(EngineConfig(model=MODEL, device="cpu", max_model_len=256, kv_cache_tokens=4096, seed=0))
    for i in range(12):
        eng.add_request(str(i), list(range(3, 20 + 9 * i)),  # requests end one by one: every batch size
                        SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    steps = pd.DataFrame([dataclasses.asdict(r) for r in eng.step_records])
    table = compare(synthetic_profile(), steps, model=MODEL, allocator="paged", graph_max_tokens=0)
    dec = table.loc["graph"]
    assert len(dec) >= 2 and (dec["n_profile"] > 0).all() and (dec["n_run"] > 0).all()
    for b, row in dec.iterrows():  # synthetic host time: HOST_BASE + 5 us a sequence
        mid = (max(b.left, 0) + b.right) / 2
        assert row["residual_ms_profile"] == pytest.approx((HOST_BASE["paged"] + 5e-6 * mid) * 1e3, rel=0.15), b
    assert (dec["launch_ms_run"] > 0).all() and dec["launch_ms_profile"].isna().all()
    assert np.allclose(dec["residual_ratio"], dec["residual_ms_profile"] / dec["residual_ms_run"])


def test_host_compare_reads_the_runs_graph_bound(tmp_path):
    """The graph bound a run's engine had: its recorded setting capped at its token budget."""
    import json

    from engine.config import EngineConfig
    from experiments.host_compare import run_graph_tokens

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"cfg.engine.cuda_graph_max_tokens": 2048,
                                                  "cfg.engine.max_num_batched_tokens": 8192}))
    assert run_graph_tokens(run) == 2048
    (run / "summary.json").write_text(json.dumps({"cfg.engine.cuda_graph_max_tokens": 8192,
                                                  "cfg.engine.max_num_batched_tokens": 1024}))
    assert run_graph_tokens(run) == 1024
    assert run_graph_tokens(tmp_path / "none") == EngineConfig.cuda_graph_max_tokens


def test_prompt_attention_qkv_times_whole_prompt_steps_with_linear_attention():
    """engine.prompt_attention=qkv: a PAGED step of whole prompts attends LINEAR over its own K and
    V (ModelRunner.prompt_qkv), so its attention comes from the linear table; a step with a cached
    prefix or a decode, a piecewise graph's step and a linear allocator's steps are as before."""
    def attn_of(m, work):
        seen = []
        inner = m._mixed_device
        m._mixed_device = lambda tokens, sampled, attn, *a: seen.append(attn) or inner(tokens, sampled, attn, *a)
        m.device_time(work)
        return seen[0]

    whole = [(1024, 1024), (128, 128), (16, 16)]
    cache, qkv = cost_model(), cost_model(prompt_qkv=True)
    linear = cost_model(paged=False, block_size=0, allocator="contiguous")
    assert cache.attn_prompt is None and qkv.attn_prompt is not None
    want = sum(linear._prefill_attn(q, 0) for q, _ in whole)  # the linear table at those grid points
    assert attn_of(qkv, whole) == pytest.approx(want, rel=1e-12)
    assert attn_of(cache, whole) == pytest.approx(sum(cache._prefill_attn(q, 0) for q, _ in whole), rel=1e-12)
    assert attn_of(cache, whole) > attn_of(qkv, whole)  # PAGED from the cache costs more
    for work in ([(1024, 2048), (128, 128)], [(128, 128), (1, 300)]):  # a cached prefix; a decode
        assert attn_of(qkv, work) == attn_of(cache, work)
    qkv_linear = cost_model(paged=False, block_size=0, allocator="contiguous", prompt_qkv=True)
    assert qkv_linear.attn_prompt is None
    pw = ProfiledCostModel(_with_piecewise(), cache.model, model=MODEL, paged=True, block_size=16,
                           max_graph_batch=64, allocator="paged", graph_mode="piecewise", graph_max_tokens=2048,
                           prompt_qkv=True)
    assert pw.piecewise_size(1168) is not None
    assert attn_of(pw, whole) == pytest.approx(attn_of(cache, whole), rel=1e-12)  # piecewise reads the cache
    assert attn_of(pw, [(4096, 4096)]) == pytest.approx(linear._prefill_attn(4096, 0), rel=1e-12)  # eager
    # full graphs timed with the piecewise table (a profile without full_forward): the engine's full
    # graphs still read the step's own K and V
    full = ProfiledCostModel(_with_piecewise(), cache.model, model=MODEL, paged=True, block_size=16,
                             max_graph_batch=64, allocator="paged", graph_mode="full", graph_max_tokens=2048,
                             prompt_qkv=True)
    assert full.graph_mode == "piecewise" and full.piecewise_size(1168) is not None
    assert attn_of(full, whole) == pytest.approx(want, rel=1e-12)


def test_a_step_of_one_token_prompts_is_no_decode_graph_step():
    """The scheduler counts a one-token prompt as prefill (ScheduledBatch.add), so the runner replays
    no decode graph for it: neither does the model (one query over one key: no decode has fewer)."""
    m = cost_model()
    assert m.graph_batch([(1, 300), (1, 20)]) == m.padded(2)
    assert m.graph_batch([(1, 1)]) is None and m.graph_batch([(1, 300), (1, 1)]) is None
    assert m.device_time([(1, 1), (1, 300)]) == m._device_time([(1, 1), (1, 300)], 2, [], 301, None)


def test_simulating_small_linear_steps_says_the_profile_times_cublas(caplog):
    """engine.fused_gemv_max_tokens changes the real engine's small steps, not the profile's tables:
    simulate says so (and only then)."""
    from tests.test_simulate import config
    from experiments.run import build_engine

    for value, said in ((0, False), (8, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
            build_engine(config("mode=simulate", "sim=h200", f"engine.fused_gemv_max_tokens={value}"))
        assert any("fused_gemv_max_tokens=8" in r.getMessage() and "cuBLAS" in r.getMessage()
                   for r in caplog.records) == said


@pytest.mark.parametrize("pdl_rows", [False, True], ids=["profile-without-pdl-rows", "profile-with-them"])
def test_simulating_pdl_says_where_the_profile_has_no_pdl_rows(caplog, monkeypatch, pdl_rows):
    """engine.enable_pdl with small_linear decodes: simulate warns where the profile's small_linear decode graphs
    were all measured without PDL (and not with cuBLAS decodes, where PDL changes a step within noise)."""
    from tests.test_simulate import config
    from experiments import device_profile
    from experiments.run import build_engine

    real = device_profile.load_profile

    def with_gemv_rows(path):  # the committed profile plus small_linear rows (and PDL rows)
        p = real(path)
        g = p.table("decode_graph")
        extra = [g[g["batch"] <= 16].assign(gemv=16)] + ([g[g["batch"] <= 16].assign(gemv=16, pdl=1)] if pdl_rows else [])
        return DeviceProfile(pd.concat([p.df, *extra], ignore_index=True), p.meta, p.path)

    monkeypatch.setattr(device_profile, "load_profile", with_gemv_rows)
    for gemv, pdl, said in ((8, False, False), (8, True, not pdl_rows), (0, True, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
            eng = build_engine(config("mode=simulate", "sim=h200", "model=qwen3-0.6b",  # a model the profile has
                                      f"engine.fused_gemv_max_tokens={gemv}", f"engine.enable_pdl={str(pdl).lower()}"))
        assert any("enable_pdl=true" in r.getMessage() and "programmatic dependent launch" in r.getMessage()
                   for r in caplog.records) == said, (gemv, pdl)
        assert eng.cost_model.describe()["cost_pdl_table"] == (pdl and pdl_rows and gemv > 0)


def _with_gemv_rows(factor: float) -> DeviceProfile:
    """The synthetic profile plus decode graphs measured through small_linear (``gemv`` 16): the
    cuBLAS rows of up to 16 sequences times ``factor``."""
    p = synthetic_profile()
    g = p.table("decode_graph")
    fast = g[g["batch"] <= 16].assign(gemv=16, value=lambda d: d["value"] * factor)
    return DeviceProfile(pd.concat([p.df, fast], ignore_index=True), p.meta, "synthetic-gemv")


@pytest.mark.parametrize("bound", [8, 16])
def test_decode_graphs_through_small_linear_are_timed_from_their_rows(bound):
    """engine.fused_gemv_max_tokens=N: decode graphs of up to N rows from the gemv rows, larger ones (and
    every one with N=0) from cuBLAS's; the composition factor and the cuBLAS grid ignore the gemv rows."""
    from engine.loader import resolve_config

    shape = shape_of(resolve_config(MODEL))
    kw = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged", calibrate_host=False)
    with_rows = _with_gemv_rows(0.9)
    fast = ProfiledCostModel(with_rows, shape, gemv_max_tokens=bound, **kw)
    off = ProfiledCostModel(with_rows, shape, **kw)
    plain = ProfiledCostModel(synthetic_profile(), shape, **kw)
    assert fast.describe()["cost_gemv_table"] and not off.describe()["cost_gemv_table"]
    for b in (1, 2, 4, 8, 16, 32):
        work = [(1, 512)] * b
        want = plain.device_time(work, num_sampled=0)
        assert off.device_time(work, num_sampled=0) == pytest.approx(want, rel=1e-12)
        got = fast.device_time(work, num_sampled=0)
        assert got == pytest.approx(0.9 * want if b <= bound else want, rel=1e-9), b
    no_rows = ProfiledCostModel(synthetic_profile(), shape, gemv_max_tokens=bound, **kw)
    assert no_rows.decode_graph_gemv is None
    assert no_rows.device_time([(1, 512)], num_sampled=0) == plain.device_time([(1, 512)], num_sampled=0)


def test_decode_graphs_with_pdl_are_timed_from_their_rows():
    """engine.enable_pdl with fused_gemv_max_tokens: small_linear decode graphs from the rows measured with
    PDL; without enable_pdl (or without such rows) from those measured without; cuBLAS's untouched."""
    from engine.loader import resolve_config

    shape = shape_of(resolve_config(MODEL))
    kw = dict(model=MODEL, paged=True, block_size=16, max_graph_batch=64, allocator="paged", calibrate_host=False)
    p = _with_gemv_rows(0.9)
    g = p.table("decode_graph")
    launched = g[g["gemv"] == 16].assign(pdl=1, value=lambda d: d["value"] * 0.8)
    both = DeviceProfile(pd.concat([p.df, launched], ignore_index=True), p.meta, "synthetic-pdl")
    plain = ProfiledCostModel(synthetic_profile(), shape, **kw)
    on = ProfiledCostModel(both, shape, gemv_max_tokens=16, pdl=True, **kw)
    off = ProfiledCostModel(both, shape, gemv_max_tokens=16, **kw)
    no_rows = ProfiledCostModel(p, shape, gemv_max_tokens=16, pdl=True, **kw)
    cublas = ProfiledCostModel(both, shape, pdl=True, **kw)
    assert on.describe()["cost_pdl_table"] and not off.describe()["cost_pdl_table"]
    assert not no_rows.describe()["cost_pdl_table"] and no_rows.describe()["cost_gemv_table"]
    for b in (1, 8, 16, 32):
        work = [(1, 512)] * b
        want = plain.device_time(work, num_sampled=0)
        small = b <= 16
        assert on.device_time(work, num_sampled=0) == pytest.approx(want * (0.9 * 0.8 if small else 1), rel=1e-9), b
        assert off.device_time(work, num_sampled=0) == pytest.approx(want * (0.9 if small else 1), rel=1e-9), b
        assert no_rows.device_time(work, num_sampled=0) == pytest.approx(want * (0.9 if small else 1), rel=1e-9), b
        assert cublas.device_time(work, num_sampled=0) == pytest.approx(want, rel=1e-12), b


@pytest.mark.parametrize("pdl", [False, True])
def test_decode_graph_rows_through_small_linear_with_stand_in_graphs(monkeypatch, pdl):
    """The profile's CUDA-only decode-graph part, driven on a CPU with stand-in graphs: the uniform
    batches of up to GEMV_TOKENS sequences are timed again with graphs captured through small_linear
    (``gemv`` rows), and (``pdl``: a Hopper GPU) once more captured with programmatic dependent launch
    (``pdl`` rows), the others with cuBLAS's; as many figures as the progress total says."""
    from types import SimpleNamespace

    import torch

    from engine.loader import resolve_config
    from engine.model import CausalLM

    monkeypatch.setattr(profile_cases, "DECODE_BATCHES", [1, 2, 16, 32])
    monkeypatch.setattr(profile_cases, "CONTEXTS", [16, 64])
    monkeypatch.setattr(profile_cases, "RAGGED_BATCHES", [2, 32])
    replays = []

    class Graphs:  # engine.cuda_graphs.DecodeGraphs's inputs; replay says which path it captured
        def __init__(self, model, stub, caches, table, max_bs, max_model_len, device):
            self.model, self.sizes, self.graphs = model, [], {}
            self.seq_lens = torch.zeros(max_bs, dtype=torch.int32)
            self.inputs = torch.zeros(4, max_bs, dtype=torch.long)

        def static_inputs(self, bs):
            return tuple(self.inputs[:, :bs])

        def capture(self):
            gemv, launch = self.model.model.layers[0].gemv_max_tokens, self.model.pdl
            self.graphs = {s: SimpleNamespace(replay=lambda s=s, g=gemv, p=launch: replays.append((s, g, p)))
                           for s in self.sizes}

    monkeypatch.setattr("engine.cuda_graphs.DecodeGraphs", Graphs)
    mc = resolve_config("tiny-llama")
    model = CausalLM(mc, 256).fuse()
    caches = profile_models._scratch_caches(mc, 4096, torch.float32, torch.device("cpu"))
    ticks = []
    timer = SimpleNamespace(replay=lambda run: run() or 1e-3)
    rows = pd.DataFrame(profile_models._rows_decode_graphs(timer, model, caches, mc, "tiny-llama", 4096, 256, [16],
                                                           torch.device("cpu"), tick=lambda: ticks.append(1), pdl=pdl))
    dg = rows[rows["table"] == "decode_graph"]
    gemv = dg[dg["gemv"].notna()]
    launched = gemv[gemv["pdl"] == 1] if "pdl" in gemv else gemv[:0]
    assert set(gemv["gemv"]) == {profile_cases.GEMV_TOKENS} and set(gemv["batch"]) == {1, 2, 16}
    # linear and paged 16 x batches 1, 2, 16 x two contexts, twice with pdl
    assert len(gemv) == 2 * 3 * 2 * (2 if pdl else 1) and len(launched) == (2 * 3 * 2 if pdl else 0)
    assert set(dg[dg["gemv"].isna()]["batch"]) == {1, 2, 16, 32}
    assert {(g, p) for s, g, p in replays if s == 32} == {(0, False)}  # cuBLAS's graphs replayed for those rows
    assert sorted(replays[-len(launched) or len(replays):]) == sorted((int(b), 16, pdl) for b in gemv["batch"][
        -len(launched) or len(gemv):])
    assert [p for s, g, p in replays if g].count(True) == len(launched)
    cpu_part = profile_cases._model_count(4096, 256, [16], cuda=False)
    assert len(ticks) == profile_cases._model_count(4096, 256, [16], cuda=True, pdl=pdl) - cpu_part
