"""Simulate's bulk path (experiments/sim_fastpath.py): runs of decode steps advanced at once give
exactly the run of the steps one by one: the same step records, memory rows, requests and
summary, and the same engine state (allocator included) wherever a run ends."""
from __future__ import annotations

import functools
import itertools
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import engine.chunked_rows as chunked_rows
import engine.sequence as sequence
import experiments.run as run
import experiments.sim_fastpath as sim_fastpath
from allocators.stats import MemoryStats
from engine.accounting import MemoryAccountant
from experiments.costmodel import DEVICES, MODEL_SHAPES, RooflineCostModel
from experiments.driver import sampling_params
from experiments.sim_exactness import VOLATILE
from experiments.workloads import make_workload, tokenize_requests

COMMON = ["mode=simulate", "model=tiny-llama", "engine.kv_cache_tokens=1024", "engine.max_model_len=256",
          "engine.max_num_batched_tokens=256", "engine.max_num_seqs=16"]
# 64 requests of up to 176 tokens in a 1024-token pool, all at t=0: the pool runs out and preempts
UNIFORM = ["workload=uniform", "workload.num_requests=64", "workload.input_len_min=32", "workload.input_len_max=96",
           "workload.output_len_min=16", "workload.output_len_max=80"]
CASES = {
    "paged": ["allocator=paged", "allocator.args.block_size=8", *UNIFORM],
    "paged-online": ["allocator=paged", "allocator.args.block_size=8", *UNIFORM, "workload.request_rate=400"],
    # a pool that holds them all: admission waits for the step's token budget, not for memory
    "paged-budget": ["allocator=paged", "allocator.args.block_size=8", *UNIFORM, "engine.kv_cache_tokens=16384",
                     "engine.max_num_seqs=64", "engine.enable_chunked_prefill=false"],
    "paged-swap": ["allocator=paged", "++engine.preemption_mode=swap", "++engine.swap_space=0.001", *UNIFORM],
    "paged-fork-n2": ["allocator=paged", "workload=parallel", "workload.n=2", "workload.input_len=40",
                      "workload.output_len=60", "workload.num_requests=24"],
    "contiguous-max": ["allocator=contiguous", "allocator.args.policy=max", *UNIFORM, "engine.max_model_len=128"],
    "contiguous-pow2": ["allocator=contiguous", "allocator.args.policy=pow2", *UNIFORM],
    "virtual": ["allocator=virtual", "allocator.args.page_size=4096", *UNIFORM],
    "virtual-online": ["allocator=virtual", "allocator.args.page_size=4096", *UNIFORM, "workload.request_rate=400"],
    # the profiled cost model (the committed H200 profile): a model it holds, VMM calls on the step's path,
    # and a model composed from another's tables
    "paged-profiled": ["allocator=paged", *UNIFORM, "sim=h200", "model=qwen3-0.6b"],
    "virtual-profiled": ["allocator=virtual", "allocator.args.page_size=262144", *UNIFORM, "sim=h200",
                         "model=qwen3-0.6b"],
    "contiguous-profiled": ["allocator=contiguous", "allocator.args.policy=pow2", *UNIFORM, "sim=h200"],
    # asynchronous steps (the engine's default): each run starts and ends with a step in flight
    "paged-async": ["allocator=paged", "allocator.args.block_size=8", *UNIFORM, "engine.async_scheduling=true"],
    "paged-online-async": ["allocator=paged", "allocator.args.block_size=8", *UNIFORM, "workload.request_rate=400",
                           "engine.async_scheduling=true"],
    "contiguous-max-async": ["allocator=contiguous", "allocator.args.policy=max", *UNIFORM, "engine.max_model_len=128",
                             "engine.async_scheduling=true"],
    "virtual-async": ["allocator=virtual", "allocator.args.page_size=4096", *UNIFORM, "engine.async_scheduling=true"],
    # the step after a last token skips that sequence: a budget larger by it may admit (not modelled)
    "paged-budget-async": ["allocator=paged", "allocator.args.block_size=8", *UNIFORM, "engine.kv_cache_tokens=16384",
                           "engine.max_num_seqs=64", "engine.enable_chunked_prefill=false",
                           "engine.async_scheduling=true"],
    # ... where heads wait for just the tokens of the skipped ones (32-token steps, prompts of 1-12)
    "paged-budget-skip-async": ["allocator=paged", "allocator.args.block_size=4", "engine.max_model_len=32",
                                "engine.max_num_batched_tokens=32", "engine.enable_chunked_prefill=false",
                                "engine.max_num_seqs=64", "engine.kv_cache_tokens=65536", "workload=uniform",
                                "workload.num_requests=150", "workload.input_len_min=1", "workload.input_len_max=12",
                                "workload.output_len_min=10", "workload.output_len_max=16", "seed=685",
                                "engine.async_scheduling=true"],
    "paged-profiled-async": ["allocator=paged", *UNIFORM, "sim=h200", "model=qwen3-0.6b", "engine.async_scheduling=true"],
    "virtual-profiled-async": ["allocator=virtual", "allocator.args.page_size=262144", *UNIFORM, "sim=h200",
                               "model=qwen3-0.6b", "engine.async_scheduling=true"],
}
# cases whose runs are mostly plain decode steps: the bulk path must take most of them
MOSTLY_FAST = {"paged", "paged-budget", "contiguous-max", "contiguous-pow2", "virtual", "paged-profiled",
               "virtual-profiled", "contiguous-profiled", "paged-async", "contiguous-max-async", "virtual-async",
               "paged-profiled-async", "virtual-profiled-async"}


def config(*overrides: str):
    with initialize_config_dir(run.CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["progress=false", "report=false", "resume=false", *overrides])


def run_with(monkeypatch, cfg, out, fast: bool, eos: set[int] | None = None):
    """run_experiment with the bulk path on or off; returns (summary, engine)."""
    held = {}
    build = run.build_engine

    def keep(c):
        e = held["engine"] = build(c)
        if not fast:
            e.decode_fast_forward = None  # the driver then steps every step
        if eos is not None:  # the token ids the simulated runner must not give (replaced when hit)
            e.runner.eos = set(eos)
        return e

    monkeypatch.setattr(run, "build_engine", keep)
    summary = run.run_experiment(cfg, out)
    monkeypatch.setattr(run, "build_engine", build)
    return summary, held["engine"]


def assert_same_run(a, b, sa: dict, sb: dict) -> None:
    for table in ("steps.parquet", "requests.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / table), pd.read_parquet(b / table), check_exact=True)
    for k in sorted((set(sa) | set(sb)) - VOLATILE):
        x, y = sa.get(k), sb.get(k)
        assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), k


@pytest.mark.parametrize("case", list(CASES))
def test_bulk_run_equals_steps_one_by_one(case, tmp_path, monkeypatch):
    cfg = config(*COMMON, *CASES[case])
    sa, ea = run_with(monkeypatch, cfg, tmp_path / "steps", fast=False)
    sb, eb = run_with(monkeypatch, cfg, tmp_path / "bulk", fast=True)
    ff = eb.decode_fast_forward
    assert ff.steps > 0 and ff.runs > 0, "the bulk path took no step"
    assert eb.runner.profiled == ("profiled" in case)
    if case in MOSTLY_FAST:
        assert ff.steps > 0.5 * len(eb.step_records), (ff.steps, len(eb.step_records))
    if case.startswith("paged") and case != "paged-fork-n2" and "budget" not in case:
        assert sa["preemptions"] > 0, "the case should preempt"
    if case in ("paged-async", "paged-profiled-async"):  # the step that finishes a run's sequences preempts
        assert ff.finishing_preemptions > 0, "the case should reach a finishing step that preempts"
    if case.startswith("paged"):  # a paged pool models finishes and admissions at any step
        assert ff.finishes_within > 0, "runs should go on past finishes"
    if case in ("paged", "paged-async", "paged-profiled", "paged-profiled-async"):
        assert ff.readmissions > 0, "the case should admit a run's victim again in that run"
    assert_same_run(tmp_path / "steps", tmp_path / "bulk", sa, sb)
    np.testing.assert_array_equal(ea.accountant.table(), eb.accountant.table())


@pytest.mark.parametrize("eos", [range(4, 120), range(4, 12)], ids=["many", "few"])
def test_bulk_run_replaces_end_of_sequence_tokens_as_the_runner(eos):
    """Sampled ids that are EOS ids are replaced by the next id, in bulk as step by step (the
    sequences' token ids compared after every call; the step tables hold no ids): a quarter of
    tiny-llama's 508 ids the formula gives, or a model's few."""
    cfg = config(*COMMON, *CASES["paged"], "workload.num_requests=40")

    def set_eos(e):
        e.runner.eos = set(eos)

    states, _ = _drive(cfg, fast=False, before_call=set_eos)
    _, compared = _drive(cfg, fast=True, snapshots=states, before_call=set_eos)
    assert compared < 0.8 * len(states)  # runs of several steps were taken


def test_bulk_run_with_tiny_chunks_spilled(tmp_path, monkeypatch):
    """Memory rows and step records of a run that cross chunks (settled, spilled to disk) as the
    steps one by one do."""
    cfg = config(*COMMON, *CASES["paged"])
    monkeypatch.setattr(chunked_rows, "CHUNK_ROWS", 7)
    monkeypatch.setattr(chunked_rows, "KEEP_CHUNKS", 1)
    sa, ea = run_with(monkeypatch, cfg, tmp_path / "steps", fast=False)
    sb, eb = run_with(monkeypatch, cfg, tmp_path / "bulk", fast=True)
    assert eb.decode_fast_forward.steps > 0 and eb.accountant.store.num_spilled > 0
    assert eb.step_records.rows.num_spilled > 0
    assert_same_run(tmp_path / "steps", tmp_path / "bulk", sa, sb)


# ----------------------------------------------------------------- the state where runs end

def _state(e, seqs: list) -> dict:
    """What the engine holds between steps, allocator and accountant included; ``seqs``: every
    sequence added so far (finished ones too: their last steps are also a run's)."""
    sched, alloc, acc = e.scheduler, e.allocator, e.accountant
    out = dict(running=[s.seq_id for s in sched.running], waiting=[s.seq_id for s in sched.waiting],
               clock=e.clock(), busy=e.runner.busy_s, generated=e.num_generation_tokens,
               preemptions=sched.num_preemptions, memory_rows=acc.num_steps,
               seqs={s.seq_id: (list(s.token_ids), s.num_computed_tokens, list(s.token_times), s.status,
                                s.finish_time) for s in seqs},
               # the live sequences' capacity intervals (with lengths that end at their bound, the
               # finished ones' intervals correct nothing, so the table alone would not show them)
               intervals=(dict(acc._open), list(acc._ids), list(acc._caps), dict(acc._events)))
    h = e._inflight  # asynchronous steps: the step in flight, and when the device is free
    if h is not None:
        out["inflight"] = ([s.seq_id for s in h.seqs], list(h.positions), list(h._ready), h.ready_at,
                           e.runner.device_free_at, e._launched is h)
    if hasattr(alloc, "_seqs"):  # paged: block tables, fills, the free stack's order
        out["blocks"] = {i: (st.num_tokens, list(st.table)) for i, st in alloc._seqs.items()}
        out["pool"] = (list(alloc.pool.ref), list(alloc.pool.fill), list(alloc.pool._plain), alloc.pool.filled_total)
    elif hasattr(alloc, "_regions"):
        out["regions"] = {i: (r.start, r.length, r.used) for i, r in alloc._regions.items()}
    else:
        out["slots"] = [(s.seq.seq_id if s.seq else None, s.used, list(s.groups)) for s in alloc.slots]
        out["free_groups"] = list(alloc._free_groups)
    return out


def _drive(cfg, fast: bool, snapshots: dict | None = None, before_call=None) -> tuple[dict, int]:
    """The driver's loop, the engine's state taken after every call (keyed by steps so far);
    ``before_call(engine)`` runs before each call."""
    sequence._ids = itertools.count()  # the same sequence ids (and so tokens) in both runs
    e = run.build_engine(cfg)
    specs = make_workload(OmegaConf.to_container(cfg.workload, resolve=True), e.model_config.vocab_size,
                          e.max_model_len)
    pending = sorted(tokenize_requests(specs, e.tokenizer.encode, e.max_model_len), key=lambda s: s.arrival_s)
    states, compared, t0, i, added = {}, 0, e.clock(), 0, []
    while i < len(pending) or e.has_unfinished_requests():
        while i < len(pending) and pending[i].arrival_s <= e.clock() - t0:
            s = pending[i]
            e.add_request(s.request_id, s.prompt_token_ids, sampling_params(s, cfg.seed),
                          arrival_time=t0 + s.arrival_s, oracle_len=s.prompt_len + s.output_len)
            added += e.requests[s.request_id].seqs
            i += 1
        if not e.has_unfinished_requests():
            e.advance_idle(pending[i].arrival_s - (e.clock() - t0))
            continue
        nxt = pending[i].arrival_s if i < len(pending) else math.inf
        if before_call is not None:
            before_call(e)
        if not fast or e.decode_fast_forward(t0, nxt) is None:
            e.step()
        n = len(e.step_records)
        if snapshots is None:
            states[n] = _state(e, added)
        else:
            assert _state(e, added) == snapshots[n], f"the engine differs after step {n}"
            compared += 1
    return states, compared


@pytest.mark.parametrize("case", ["paged", "paged-online", "paged-budget", "contiguous-pow2", "virtual",
                                  "virtual-profiled", "paged-async", "paged-online-async", "paged-budget-async",
                                  "virtual-profiled-async"])
@pytest.mark.parametrize("max_steps", [5, sim_fastpath.MAX_STEPS])
def test_bulk_run_leaves_the_engine_as_its_steps(case, max_steps, monkeypatch):
    """The state is compared where runs end: runs of at most 5 steps end all along (mid-run
    finishes, admissions and preemptions behind them)."""
    monkeypatch.setattr(sim_fastpath, "MAX_STEPS", max_steps)
    cfg = config(*COMMON, *CASES[case], "workload.num_requests=40")
    states, _ = _drive(cfg, fast=False)
    _, compared = _drive(cfg, fast=True, snapshots=states)
    assert compared < 0.8 * len(states)  # runs of several steps were taken


@pytest.mark.parametrize("case", ["virtual-profiled", "virtual-profiled-async"])
def test_vmm_calls_before_a_run_are_charged_to_its_first_step(case):
    """VMM calls counted between two steps (here: added by hand, as the engine's frees would add
    them) are charged to the next step, in bulk as step by step: the engine's state after every
    call agrees, and some of the counts fell right before a run."""
    cfg = config(*COMMON, *CASES[case], "workload.num_requests=40")
    calls = []  # (steps so far, runs so far) before each call of the bulk driver
    _drive(cfg, fast=True, before_call=lambda e: calls.append((len(e.step_records), e.decode_fast_forward.runs)))
    # where both drivers call: every few of the bulk driver's call points (the other one calls at every step)
    points = {n for n, _ in calls[::3]}
    before_run = [n for (n, r), (_, nxt) in zip(calls, calls[1:]) if n in points and nxt > r]
    assert before_run, "no run starts at a call point"

    def inject(e):
        if len(e.step_records) in points:  # one page group mapped on the step's path, two unmaps
            e.runner.vmm_counter.sync_maps -= 1
            e.runner.vmm_counter.unmaps += 2

    states, _ = _drive(cfg, fast=False, before_call=inject)
    _, compared = _drive(cfg, fast=True, snapshots=states, before_call=inject)
    assert compared == len(calls)


# ----------------------------------------------------------------- the pieces

@pytest.mark.parametrize("shape,tp", [("opt-13b", 1), ("llama3-8b", 1), ("llama3-8b", 4)])
def test_roofline_sums_give_step_time_to_the_bit(shape, tp):
    """The bulk path's step times from sums: host and device parts as ``host_device_time``'s, and
    device + host (a synchronous step) as ``step_time``, to the bit."""
    device = DEVICES["h200"] if tp > 1 else DEVICES["a100-40gb"]
    cm = RooflineCostModel(MODEL_SHAPES[shape], device, tensor_parallel_size=tp)
    rng = random.Random(0)
    for _ in range(300):
        contexts = [rng.randint(1, 4096) for _ in range(rng.randint(1, 256))]
        work = [(1, c) for c in contexts]
        host, device = cm.decode_host_device(len(contexts), sum(contexts))
        assert device + host == cm.step_time(work)
        assert (host, device) == cm.host_device_time(work)
        prompts = [rng.randint(1, 512) for _ in range(rng.randint(1, 4))]
        sums = (len(work) + sum(prompts), len(work) + len(prompts),
                sum(contexts) + sum(n * (n + 1) // 2 for n in prompts), sum(contexts) + sum(prompts))
        work += [(n, n) for n in prompts]
        host, device = cm.sums_host_device(*sums)
        assert device + host == cm.step_time(work)
        assert (host, device) == cm.host_device_time(work)
    assert cm.decode_host_device(0, 0) == cm.host_device_time([]) == (0.0, 0.0) and cm.step_time([]) == 0.0


@functools.lru_cache(maxsize=1)
def committed_profile():
    from experiments.device_profile import load_profile

    return load_profile(str(Path(run.CONF_DIR).parent / "results" / "profiles" / "nvidia-h200.parquet"))


@pytest.mark.parametrize("model,allocator,tp,overlapped,prompt_qkv", [
    ("llama3-8b", "paged", 1, False, False),  # the profiled model's own tables: decode graphs, the ragged term
    ("qwen3-0.6b", "virtual", 1, True, False),  # VMM calls on the step's path, asynchronous steps' period term
    ("tiny-llama", "contiguous", 1, False, False),  # composed from another model's tables
    ("llama3-8b", "paged", 2, False, False),  # tensor parallelism: composed, plus the all-reduces
    ("llama3-8b", "paged", 1, False, True),  # prompt_attention=qkv: steps of whole prompts attend LINEAR
])
def test_profiled_sums_give_step_time_to_the_bit(model, allocator, tp, overlapped, prompt_qkv):
    """What simulate's bulk path asks the profiled model for a decode step (sums, longest context,
    VMM calls) or a step admitting whole prompts is ``host_device_time`` of the step's list, and
    device + host its ``step_time``, to the bit; None where the sums do not say it."""
    from engine.loader import resolve_config
    from experiments.costmodel import AllReduceCost
    from experiments.profiled_costmodel import ProfiledCostModel
    from experiments.simulate import shape_of

    shape = shape_of(resolve_config(model))
    allreduce = (AllReduceCost(tp, shape.hidden_size, shape.num_layers, shape.dtype_bytes, DEVICES["h200"])
                 if tp > 1 else None)
    cm = ProfiledCostModel(committed_profile(), shape, model=model, paged=allocator == "paged",
                           block_size=16 if allocator == "paged" else 0, max_graph_batch=128, allocator=allocator,
                           graph_max_tokens=2048, overlapped=overlapped, max_model_len=2048, allreduce=allreduce,
                           prompt_qkv=prompt_qkv)
    assert (cm.attn_prompt is not None) == prompt_qkv
    # its own decode graph table, or composed from the reference model's; the ragged term in both
    assert cm.full_attention and cm.ragged is not None
    assert (cm.decode_graph is not None) == (model != "tiny-llama" and tp == 1)
    rng = random.Random(0)
    for _ in range(300):
        contexts = [rng.randint(2, 2048) for _ in range(rng.randint(1, 128))]  # a decode reads >= 2 keys
        maps, unmaps = (rng.randint(0, 3), rng.randint(0, 2)) if allocator == "virtual" else (0, 0)
        work = [(1, c) for c in contexts]
        host, device = cm.decode_host_device(len(contexts), sum(contexts), max(contexts), maps, unmaps)
        assert device + host == cm.step_time(work, len(work), maps, unmaps)
        assert (host, device) == cm.host_device_time(work, len(work), maps, unmaps)  # asynchronous steps' parts
        prompts = [rng.randint(2, 1024) for _ in range(rng.randint(1, 4))]
        work += [(n, n) for n in prompts]
        host, device = cm.admission_host_device(len(contexts), sum(contexts), prompts, maps, unmaps)
        assert device + host == cm.step_time(work, len(work), maps, unmaps)
        assert (host, device) == cm.host_device_time(work, len(work), maps, unmaps)
        only = [(n, n) for n in prompts]  # a step of whole prompts alone
        assert cm.admission_host_device(0, 0, prompts, maps, unmaps) == cm.host_device_time(only, len(only), maps,
                                                                                              unmaps)
    assert cm.decode_host_device(129, 129 * 100, 100) is None  # beyond the decode graphs: eager, not from sums
    assert cm.admission_host_device(3, 300, [1]) is None  # a one-token prompt: the engine times it
    assert cm.decode_host_device(0, 0, 0) is None


def test_accountant_tail_preemption_path_equals_relive():
    """record_seqs with the last live sequences gone (preempted from the back) takes a short
    path; the table and summary are those of the general one (``record`` always takes it)."""
    rng = random.Random(1)

    class Seq:
        def __init__(self, seq_id, max_len):
            self.seq_id, self.max_len = seq_id, max_len

    fast, general = MemoryAccountant(8, chunk_rows=5, keep_chunks=1), MemoryAccountant(8, chunk_rows=5, keep_chunks=1)
    live, caps, next_id, tails = [], {}, 0, 0
    for _ in range(400):
        r = rng.random()
        if r < 0.15 and len(live) > 1:  # the last ones leave
            gone = live[len(live) - rng.randint(1, min(3, len(live) - 1)):]
            live = live[:len(live) - len(gone)]
            tails += 1
            for s in gone:
                if rng.random() < 0.5:
                    final = rng.randint(1, s.max_len)
                    for acc in (fast, general):
                        acc.finish(s.seq_id, final)
        elif r < 0.3:
            live.append(Seq(next_id, rng.randint(8, 64)))
            next_id += 1
        elif r < 0.35 and live:  # one finishes in the middle
            s = live.pop(rng.randrange(len(live)))
            final = rng.randint(1, s.max_len)
            for acc in (fast, general):
                acc.finish(s.seq_id, final)
        for s in live:
            if rng.random() < 0.3:
                caps[s.seq_id] = caps.get(s.seq_id, 0) + 8
        stats = MemoryStats(capacity=4096, free=rng.randint(0, 4096))
        capacities = [caps.get(s.seq_id, 0) for s in live]
        fast.record_seqs(stats, live, capacities)
        general.record(stats, [(s.seq_id, c, s.max_len) for s, c in zip(live, capacities)])
    assert tails > 20
    np.testing.assert_array_equal(fast.table(), general.table())
    assert fast.summary() == pytest.approx(general.summary(), nan_ok=True)


@pytest.mark.parametrize("case", ["paged", "virtual", "paged-fork-n2"])
def test_simulation_makes_no_reference_cycles(case):
    """The driver pauses the cyclic collector during a simulated run: that is only sound while
    the run leaves nothing for it, however many steps it takes."""
    import gc

    from experiments.driver import drive

    cfg = config(*COMMON, *CASES[case], "workload.num_requests=120")
    e = run.build_engine(cfg)
    specs = tokenize_requests(make_workload(OmegaConf.to_container(cfg.workload, resolve=True),
                                            e.model_config.vocab_size, e.max_model_len), e.tokenizer.encode,
                              e.max_model_len)
    gc.collect()
    gc.disable()
    try:
        drive(e, specs, advance_idle=e.advance_idle)
        assert not gc.isenabled()  # the driver gives back the collector as it found it
        found = gc.collect()
    finally:
        gc.enable()
    assert len(e.step_records) > 400
    assert found < 50, f"{found} objects in reference cycles after {len(e.step_records)} steps"
