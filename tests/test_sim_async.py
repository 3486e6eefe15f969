"""Simulate with ``async_scheduling``: a step's host work overlaps the device's previous step
(``AsyncSimRunner``), so a step period is the longer of the two, and tokens are known when
their step's device work ends."""
from __future__ import annotations

import pandas as pd
import pytest

from experiments.run import run_experiment
from experiments.simulate import AsyncSimRunner, SimRunner
from tests.test_simulate import config

HOST_S = 2e-3  # the roofline's fixed per-step overhead stands for host work


def _runs(tmp_path, host_s: float):
    common = ["mode=simulate", "model=tiny-llama", "allocator=paged", "workload=uniform",
              "workload.num_requests=24", "workload.input_len_min=32", "workload.input_len_max=64",
              "workload.output_len_min=16", "workload.output_len_max=48", "engine.kv_cache_tokens=4096",
              f"sim.step_overhead_s={host_s}"]
    out = {}
    for mode in ("sync", "async"):
        s = run_experiment(config(*common, f"++engine.async_scheduling={mode == 'async'}"), tmp_path / mode)
        out[mode] = (s, pd.read_parquet(tmp_path / mode / "steps.parquet"))
    return out


def test_async_simulation_hides_host_work_behind_the_device(tmp_path):
    """Host-bound (host 2 ms, device far less for a tiny model): a synchronous step costs host +
    device, an asynchronous one the host's 2 ms alone, the device's work done meanwhile."""
    runs = _runs(tmp_path, HOST_S)
    (sync, a), (asy, b) = runs["sync"], runs["async"]
    a, b = a[a["num_seqs"] > 0], b[b["num_seqs"] > 0]
    assert sync["total_output_tokens"] == asy["total_output_tokens"]
    # synchronous: every step is host + its device time, so longer than the host alone
    assert (a["duration"] > HOST_S).all()
    # asynchronous: the period is max(host, the previous step's device time) = the host's
    assert b["duration"].iloc[1:-1].to_numpy() == pytest.approx(HOST_S, rel=1e-9)
    assert asy["duration"] < sync["duration"]
    assert asy["duration"] >= HOST_S * len(b)


def test_async_simulation_is_device_bound_when_the_device_is_slower(tmp_path):
    """No host work: each step waits for the device's previous step, so the run takes what the
    device does (no more than the synchronous run) and a token is known when its step ends:
    TTFT is at least the first step's device time plus one step period."""
    runs = _runs(tmp_path, 0.0)
    (sync, a), (asy, b) = runs["sync"], runs["async"]
    assert asy["duration"] == pytest.approx(sync["duration"], rel=1e-6)
    ra = pd.read_parquet(tmp_path / "sync" / "requests.parquet").set_index("request_id")
    rb = pd.read_parquet(tmp_path / "async" / "requests.parquet").set_index("request_id")
    assert (rb["ttft"] >= ra["ttft"] - 1e-12).all()


def test_runner_kind_follows_async_scheduling():
    from experiments.run import build_engine

    base = ["mode=simulate", "model=tiny-llama", "allocator=paged", "engine.kv_cache_tokens=4096"]
    assert type(build_engine(config(*base)).runner) is SimRunner
    assert type(build_engine(config(*base, "++engine.async_scheduling=true")).runner) is AsyncSimRunner


def test_host_and_device_parts_add_up_to_the_step_time():
    """Both cost models split a step into the host's and the device's seconds that sum to
    ``step_time`` (asynchronous scheduling overlaps the one with the other)."""
    from experiments.costmodel import DEVICES, MODEL_SHAPES, RooflineCostModel
    from tests.test_profiled_costmodel import cost_model

    roof = RooflineCostModel(MODEL_SHAPES["opt-13b"], DEVICES["a100-40gb"])
    prof = cost_model(graph_max_tokens=2048)
    for work in ([(1, 300)] * 8, [(128, 128)] + [(1, 300)] * 7, [(4096, 4096)]):
        host, device = roof.host_device_time(work)
        assert host == roof.step_overhead_s and host + device == pytest.approx(roof.step_time(work))
        host, device = prof.host_device_time(work, None, 3, 1)
        assert host >= 3 * prof.map_s + prof.unmap_s and device > 0
        assert host + device == pytest.approx(prof.step_time(work, None, 3, 1))
