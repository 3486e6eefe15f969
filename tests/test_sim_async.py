"""Simulate with ``async_scheduling``: a step's host work overlaps the device's previous step
(``AsyncSimRunner``), so a step period is the longer of the two, and tokens are known when
their step's device work ends."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from experiments.run import run_experiment
from experiments.simulate import AsyncSimRunner, SimRunner, SimStepHandle
from tests.test_simulate import config

HOST_S = 2e-3  # the roofline's fixed per-step overhead stands for host work


def _runs(tmp_path, host_s: float):
    common = ["mode=simulate", "model=tiny-llama", "allocator=paged", "workload=uniform",
              "workload.num_requests=24", "workload.input_len_min=32", "workload.input_len_max=64",
              "workload.output_len_min=16", "workload.output_len_max=48", "engine.kv_cache_tokens=4096",
              f"sim.step_overhead_s={host_s}"]
    out = {}
    for mode in ("sync", "async"):
        s = run_experiment(config(*common, f"engine.async_scheduling={mode == 'async'}"), tmp_path / mode)
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


def test_async_simulation_without_host_work_is_the_device_alone(tmp_path):
    """No host work: each step waits for the device's previous one, a token is known when its
    step's device work ends, read one step later: the same times as the synchronous run."""
    runs = _runs(tmp_path, 0.0)
    (sync, a), (asy, b) = runs["sync"], runs["async"]
    assert asy["duration"] == pytest.approx(sync["duration"], rel=1e-9)
    ra = pd.read_parquet(tmp_path / "sync" / "requests.parquet").set_index("request_id")
    rb = pd.read_parquet(tmp_path / "async" / "requests.parquet").set_index("request_id")
    assert rb.loc[ra.index, "ttft"].to_numpy() == pytest.approx(ra["ttft"].to_numpy(), rel=1e-9)


class _Scripted:
    """A cost model whose steps cost the (host, device) seconds it is given, in order."""

    name = "scripted"
    model = SimpleNamespace(kv_bytes_per_token=1)

    def __init__(self, costs):
        self.costs = list(costs)

    def host_device_time(self, work, num_sampled=None, vmm_maps=0, vmm_unmaps=0):
        return self.costs.pop(0)


def _batch(seq):
    return SimpleNamespace(seqs=[seq], num_new_tokens=[1], swap_transfers=[])


def test_async_step_period_is_the_longer_of_host_and_the_device_step_before():
    """The engine's loop (launch step i, then read step i-1's tokens): call i ends at
    max(its start + host_i, end of device step i-1), and device step i starts when both the host
    has launched it and the device is free."""
    from experiments.simulate import VirtualClock

    costs = [(1.0, 3.0), (2.0, 0.5), (1.0, 4.0), (3.0, 1.0), (1.0, 1.0)]
    clock = VirtualClock()
    runner = AsyncSimRunner(_Scripted(costs), clock, 1000, [2])
    seq = SimpleNamespace(seq_id=1, num_computed_tokens=9, token_ids=list(range(10)), num_tokens=10)
    ends, inflight, device_end = [], None, 0.0
    expected, t = [], 0.0
    for host, device in costs:
        start = max(t + host, device_end)  # device step i
        t = max(t + host, device_end)  # the call waits for step i-1 (device_end still its end)
        device_end = start + device
        expected.append(t)
        handle = runner.launch(_batch(seq))
        if inflight is not None:
            inflight.results()
        inflight = handle
        ends.append(clock())
    assert ends == pytest.approx(expected)
    assert [b - a for a, b in zip([0.0, *ends], ends)] == pytest.approx([1.0, 3.0, 1.0, 4.0, 1.0])
    inflight.results()  # the last step's tokens: its device end
    assert clock() == pytest.approx(device_end)
    # a step that samples nothing is not waited for (its device time still delays the next)
    empty = SimStepHandle([], ready_at=clock() + 5.0, clock=clock)
    now = clock()
    assert empty.results() == [] and clock() == now


def test_runner_kind_follows_async_scheduling():
    from experiments.run import build_engine

    base = ["mode=simulate", "model=tiny-llama", "allocator=paged", "engine.kv_cache_tokens=4096"]
    assert type(build_engine(config(*base)).runner) is SimRunner
    assert type(build_engine(config(*base, "engine.async_scheduling=true")).runner) is AsyncSimRunner


def test_host_and_device_parts_add_up_to_the_step_time():
    """Both cost models split a step into the host's and the device's seconds that sum to
    ``step_time`` (asynchronous scheduling overlaps the one with the other)."""
    from experiments.costmodel import DEVICES, MODEL_SHAPES, RooflineCostModel
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import ProfiledCostModel
    from experiments.simulate import shape_of
    from tests.test_profiled_costmodel import MODEL, _with_piecewise

    roof = RooflineCostModel(MODEL_SHAPES["opt-13b"], DEVICES["a100-40gb"])
    prof = ProfiledCostModel(_with_piecewise(), shape_of(resolve_config(MODEL)), model=MODEL, paged=True,
                             block_size=16, max_graph_batch=64, graph_max_tokens=2048, graph_mode="piecewise")
    assert prof.step_kind(8, 128, 7) == "mixed_graph"  # the decode graph, mixed graphs and eager below
    for work in ([(1, 300)] * 8, [(128, 128)] + [(1, 300)] * 7, [(4096, 4096)]):
        host, device = roof.host_device_time(work)
        assert host == roof.step_overhead_s and host + device == pytest.approx(roof.step_time(work))
        host, device = prof.host_device_time(work, None, 3, 1)
        assert host >= 3 * prof.map_s + prof.unmap_s and device > 0
        assert host + device == pytest.approx(prof.step_time(work, None, 3, 1))
