"""Simulate charges a virtual allocator's page maps and unmaps to the step that made them.

The profiled cost model prices VMM driver calls on a step's path (``ProfiledCostModel._vmm_s``:
(maps x map_s + unmaps x unmap_s) x vmm_scale); simulate's ``MapCounter`` says how many the
allocator made. Here the allocator's backend calls are counted on their own (every ``map`` not
issued from a map-ahead, which the real engine makes on its background thread, and every
``unmap``) and each step's charge must equal them, page by page over every virtual range of a
per_layer layout; and the simulated steps must be longer by exactly that charge than the same
run with VMM calls free."""
from __future__ import annotations

import pytest

import experiments.run as run
from tests.test_sim_fastpath import config

# qwen3-0.6b is in the committed H200 profile (the profiled cost model); per_layer pages of 128
# tokens, 16 page groups for 16 slots: requests all at t=0 (decisions do not depend on the clock)
# that run the pool out, so groups are mapped on the step's path, mapped ahead, and reclaimed (unmapped)
BASE = ["mode=simulate", "model=qwen3-0.6b", "sim=h200", "allocator=virtual", "allocator.args.layout=per_layer",
        "allocator.args.page_size=262144", "engine.kv_cache_tokens=2048", "engine.max_model_len=256",
        "engine.max_num_batched_tokens=256", "engine.max_num_seqs=16"]
UNIFORM = ["workload=uniform", "workload.num_requests=48", "workload.input_len_min=32", "workload.input_len_max=96",
           "workload.output_len_min=16", "workload.output_len_max=80"]
# prefix caching: a request's first page (128 of its 160 shared tokens) mapped from another slot
# holding it (VirtualAllocator._share), on the step's path too
SHARED = ["engine.enable_prefix_caching=true", "workload=shared_prefix", "workload.prefix_len=160",
          "workload.num_prefixes=2", "workload.input_len=16", "workload.output_len=48", "workload.num_requests=48"]
MAP_S, UNMAP_S, SCALE = 3e-5, 2e-5, 1.5  # set on the cost model: known prices, a scale other than 1


class DriverCalls:
    """The allocator's backend map/unmap calls, counted apart from the allocator's counters:
    ``take()`` gives (maps on the step's path, unmaps) since the last call."""

    def __init__(self, allocator):
        self.maps = self.unmaps = 0
        self.all_maps = self.all_unmaps = 0
        self._ahead = 0  # inside a map-ahead (the real engine's background thread)
        backend = allocator.backend
        bmap, bunmap, amap = backend.map, backend.unmap, allocator._map

        def map_(*args, **kwargs):
            self.all_maps += 1
            self.maps += not self._ahead
            return bmap(*args, **kwargs)

        def unmap_(*args, **kwargs):
            self.all_unmaps += 1
            self.unmaps += 1
            return bunmap(*args, **kwargs)

        def map_group(group, slot, page, ahead):
            self._ahead += bool(ahead)
            try:
                return amap(group, slot, page, ahead)
            finally:
                self._ahead -= bool(ahead)

        backend.map, backend.unmap, allocator._map = map_, unmap_, map_group

    def take(self) -> tuple[int, int]:
        counts = self.maps, self.unmaps
        self.maps = self.unmaps = 0
        return counts


def simulate(monkeypatch, tmp_path, name: str, *extra: str, workload=UNIFORM, map_s=MAP_S, unmap_s=UNMAP_S,
             scale=SCALE):
    """A run of BASE, ``workload`` and ``extra`` step by step (the bulk path off), the cost model's
    VMM prices set; returns the engine, the driver calls counted (``DriverCalls``) and per step:
    the VMM calls it was charged, those the allocator made before it, its (host, device) seconds."""
    held: dict = {}
    build = run.build_engine

    def instrumented(cfg):
        e = held["engine"] = build(cfg)
        e.decode_fast_forward = None  # every step through LLMEngine.step: one charge per step
        cost = e.runner.cost_model
        assert e.runner.profiled and cost.name == "profiled"
        cost.map_s, cost.unmap_s, cost.vmm_scale = map_s, unmap_s, scale
        calls = held["calls"] = DriverCalls(e.allocator)
        steps = held["steps"] = []  # (charged (maps, unmaps), made (maps, unmaps), (host, device))
        inner = cost.host_device_time

        def host_device_time(work, num_sampled=None, vmm_maps=0, vmm_unmaps=0):
            made = calls.take()
            split = inner(work, num_sampled, vmm_maps, vmm_unmaps)
            steps.append(((vmm_maps, vmm_unmaps), made, split))
            return split

        cost.host_device_time = host_device_time  # step_time and AsyncSimRunner.launch call it
        return e

    monkeypatch.setattr(run, "build_engine", instrumented)
    run.run_experiment(config(*BASE, *workload, *extra), tmp_path / name)
    monkeypatch.setattr(run, "build_engine", build)
    return held["engine"], held["calls"], held["steps"]


@pytest.mark.parametrize("case", ["sync", "async", "prefix"])
def test_each_step_is_charged_the_vmm_calls_it_made(monkeypatch, tmp_path, case):
    workload = SHARED if case == "prefix" else UNIFORM
    e, calls, steps = simulate(monkeypatch, tmp_path, case, f"engine.async_scheduling={str(case == 'async').lower()}",
                               workload=workload)
    a = e.allocator
    assert a.layout == "per_layer" and a.num_ranges == 2 * 28  # K and V of each of qwen3-0.6b's 28 layers
    assert len(steps) == e.runner.num_steps > 0
    charged = [c for c, _, _ in steps]
    made = [m for _, m, _ in steps]
    for i, (c, m) in enumerate(zip(charged, made)):
        assert c == m, f"step {i}: charged (maps, unmaps) {c}, the allocator made {m}"
    maps = sum(m for m, _ in made)
    unmaps = sum(u for _, u in made)
    # the run exercises both, a page group at a time: every range of the group mapped
    assert maps > 0 and unmaps > 0, (maps, unmaps)
    assert all(m % a.num_ranges == 0 for m, _ in made) and all(u % a.num_ranges == 0 for _, u in made)
    if case == "prefix":  # pages mapped from another slot's prefix were among them
        assert a.num_shared_maps > 0
    else:  # maps ahead of need (premapped slots, prefetch) happened and were left out of the charge
        assert calls.all_maps > maps


@pytest.mark.parametrize("scheduling", ["sync", "async"])
def test_vmm_calls_lengthen_the_steps_by_their_price(monkeypatch, tmp_path, scheduling):
    """The same run (all requests at t=0: the same decisions) with the VMM calls priced and free:
    each step's host part is longer by (maps x map_s + unmaps x unmap_s) x vmm_scale exactly, its
    device part the same; a synchronous step's duration (host + device) by that too."""
    sched = f"engine.async_scheduling={str(scheduling == 'async').lower()}"
    e1, _, priced = simulate(monkeypatch, tmp_path, "priced", sched)
    e0, _, free = simulate(monkeypatch, tmp_path, "free", sched, map_s=0.0, unmap_s=0.0)
    assert len(priced) == len(free) > 0 and len(e1.step_records) == len(e0.step_records)
    for i, (r1, r0) in enumerate(zip(e1.step_records, e0.step_records)):
        assert (r1.num_seqs, r1.prefill_tokens, r1.decode_tokens, r1.preempted, r1.running, r1.waiting) == (
            r0.num_seqs, r0.prefill_tokens, r0.decode_tokens, r0.preempted, r0.running, r0.waiting), \
            f"step {i}: another decision"
    want = [(m * MAP_S + u * UNMAP_S) * SCALE for _, (m, u), _ in priced]
    assert sum(w > 0 for w in want) > 0
    for i, ((_, made, (h1, d1)), (_, _, (h0, d0)), w) in enumerate(zip(priced, free, want)):
        assert d1 == d0, i
        assert h1 - h0 == pytest.approx(w, rel=1e-9, abs=1e-12), (i, made)
    assert e1.runner.busy_s - e0.runner.busy_s == pytest.approx(sum(want), rel=1e-9)
    if scheduling == "sync":  # a step's duration is its host and device time
        for i, (r1, r0, w) in enumerate(zip(e1.step_records, e0.step_records, want)):
            assert r1.duration - r0.duration == pytest.approx(w, rel=1e-9, abs=1e-12), i
        assert e1.clock() - e0.clock() == pytest.approx(sum(want), rel=1e-9)
