"""Simulate at scale: step records and memory rows in chunks (spilled to disk) give exactly the
tables and figures of the whole in memory, and memory held stays at a few chunks."""
from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import engine.chunked_rows as chunked_rows
import experiments.run as run
from allocators.stats import STAT_FIELDS, MemoryStats
from engine.accounting import MemoryAccountant, StepLog, StepRecord
from experiments.metrics import memory_summary, steps_frame, summarize, write_steps

# 48 requests of up to 176 tokens in a 1024-token pool: preemption happens (as in test_simulate)
UNIFORM = ["workload=uniform", "workload.num_requests=48", "workload.input_len_min=32", "workload.input_len_max=96",
           "workload.output_len_min=16", "workload.output_len_max=80"]
COMMON = ["mode=simulate", "model=tiny-llama", "engine.kv_cache_tokens=1024", "engine.max_model_len=256",
          "engine.max_num_batched_tokens=256", "engine.max_num_seqs=16"]
CASES = {
    "paged": ["allocator=paged", "allocator.args.block_size=8", *UNIFORM],
    "paged-fork-n2": ["allocator=paged", "workload=parallel", "workload.n=2", "workload.input_len=40",
                      "workload.output_len=40", "workload.num_requests=24"],
    "paged-swap": ["allocator=paged", "++engine.preemption_mode=swap", "++engine.swap_space=0.001", *UNIFORM],
    "paged-prefix": ["allocator=paged", "workload=shared_prefix", "workload.num_requests=24",
                     "engine.enable_prefix_caching=true"],
    "contiguous-pow2": ["allocator=contiguous", "allocator.args.policy=pow2", *UNIFORM],
}


def config(*overrides: str):
    with initialize_config_dir(run.CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["progress=false", "report=false", "resume=false", *overrides])


class AllocatorCounts:
    """Wraps a runner that has no device: at each executed step, the tokens the allocator holds
    for the running sequences (after scheduling, before compute), by accountant step."""

    def __init__(self, runner, engine):
        self._runner, self._engine = runner, engine
        self.counts: dict[int, int] = {}

    def execute(self, batch):
        e = self._engine
        self.counts[e.accountant.num_steps - 1] = sum(e.allocator.num_tokens(s) for s in e.scheduler.running)
        return self._runner.execute(batch)

    def __getattr__(self, name):
        return getattr(self._runner, name)


def run_keeping_engine(monkeypatch, cfg, out):
    """run_experiment, and the engine it ran; ``engine.allocator_counts`` as AllocatorCounts reads them."""
    held = {}
    build = run.build_engine

    def keep(c):
        e = held["engine"] = build(c)
        e.runner = e.allocator_counts = AllocatorCounts(e.runner, e)
        return e

    monkeypatch.setattr(run, "build_engine", keep)
    summary = run.run_experiment(cfg, out)
    monkeypatch.setattr(run, "build_engine", build)
    return summary, held["engine"]


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_and_spilled_steps_equal_the_whole_table(case, tmp_path, monkeypatch):
    cfg = config(*COMMON, *CASES[case])
    whole, e1 = run_keeping_engine(monkeypatch, cfg, tmp_path / "whole")
    # tiny chunks, one kept in memory: almost every chunk goes through the disk
    monkeypatch.setattr(chunked_rows, "CHUNK_ROWS", 7)
    monkeypatch.setattr(chunked_rows, "KEEP_CHUNKS", 1)
    chunked, e2 = run_keeping_engine(monkeypatch, cfg, tmp_path / "chunked")
    assert e2.step_records.rows.num_spilled > 0 and e2.accountant.store.num_spilled > 0
    a = pd.read_parquet(tmp_path / "whole" / "steps.parquet")
    b = pd.read_parquet(tmp_path / "chunked" / "steps.parquet")
    pd.testing.assert_frame_equal(a.drop(columns=["host_s"]), b.drop(columns=["host_s"]))
    for key in (*STAT_FIELDS, *(f"{f}_peak" for f in STAT_FIELDS), "preemptions", "max_concurrency",
                "mean_batch_size", "saturated_steps", "total_output_tokens"):
        assert whole[key] == chunked[key], key
    np.testing.assert_array_equal(e1.accountant.table(), e2.accountant.table())

    # streamed to parquet chunk by chunk: the same file and figures as the whole table
    steps = steps_frame(e2.step_records, e2.accountant.table(), e2.accountant.capacity, 0.0, e2.logical_tokens)
    figs = write_steps(tmp_path / "streamed.parquet", e2.step_records, e2.accountant, 0.0, e2.logical_tokens,
                       e2.config.max_num_batched_tokens, e2.config.max_num_seqs)
    pd.testing.assert_frame_equal(steps, pd.read_parquet(tmp_path / "streamed.parquet"))
    requests = pd.read_parquet(tmp_path / "chunked" / "requests.parquet")
    want = summarize(requests, steps, 1.0)
    want = {k: want[k] for k in ("mean_batch_size", "max_concurrency")}
    want |= memory_summary(steps, e2.accountant.bpt, e2.config.max_num_batched_tokens, e2.config.max_num_seqs)
    assert figs.keys() == want.keys()
    for k, v in want.items():
        assert figs[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k


@pytest.mark.parametrize("case", list(CASES))
def test_engine_logical_tokens_equal_the_allocators_count(case, tmp_path, monkeypatch):
    """The engine's own count of live tokens (computed tokens of the running sequences) is what
    run.py's probe reads from the allocator at each executed step."""
    _, e = run_keeping_engine(monkeypatch, config(*COMMON, *CASES[case]), tmp_path)
    rows = np.concatenate(list(e.logical_tokens.iter_chunks()))
    assert dict(zip(rows[:, 0].tolist(), rows[:, 1].tolist())) == e.allocator_counts.counts


def test_step_store_memory_stays_bounded(tmp_path, monkeypatch):
    """However many steps, the rows held in memory stay within a few chunks."""
    monkeypatch.setattr(chunked_rows, "CHUNK_ROWS", 16)
    monkeypatch.setattr(chunked_rows, "KEEP_CHUNKS", 2)
    held = {"steps": 0, "memory": 0}
    record = MemoryAccountant.record_seqs

    def watch(self, *args):
        record(self, *args)
        held["memory"] = max(held["memory"], self.store.in_memory_rows)

    monkeypatch.setattr(MemoryAccountant, "record_seqs", watch)
    append = StepLog.append

    def watch_steps(self, row):
        append(self, row)
        held["steps"] = max(held["steps"], self.rows.in_memory_rows)

    monkeypatch.setattr(StepLog, "append", watch_steps)
    _, e = run_keeping_engine(monkeypatch, config(*COMMON, *CASES["paged"], "workload.num_requests=300"), tmp_path)
    n = len(e.step_records)
    print(n, held)
    assert n > 60 * 16
    assert held["steps"] <= (2 + 1) * 16  # the kept chunks and the open one
    # the accountant also keeps the chunks a live sequence may still correct (its lifetime:
    # a few hundred steps here, preemptions included), however long the run
    assert held["memory"] <= (2 + 1) * 16 + 512
    assert e.accountant.store.num_spilled > 0


# --------------------------------------------------------------------------- the accountant alone

def reference_table(bpt, steps):
    """The accountant's definition, written plainly over a whole in-memory table."""
    rows, open_, closed, delta = [], {}, {}, {}
    for kind, *args in steps:
        if kind == "record":
            stats, live = args
            step = len(rows)
            rows.append([getattr(stats, f) for f in STAT_FIELDS])
            seen = set()
            for sid, cap, max_len in live:
                seen.add(sid)
                cur = open_.get(sid)
                if cur is not None and cur[1] == cap:
                    continue
                if cur is not None:
                    s0, c, m = open_.pop(sid)
                    closed.setdefault(sid, []).append((s0, step, c, m))
                if cap > 0:
                    open_[sid] = (step, cap, max_len)
            for sid in [s for s in open_ if s not in seen]:
                s0, c, m = open_.pop(sid)
                closed.setdefault(sid, []).append((s0, step, c, m))
        else:
            sid, final = args
            if sid in open_:
                s0, c, m = open_.pop(sid)
                closed.setdefault(sid, []).append((s0, len(rows), c, m))
            for s0, end, c, m in closed.pop(sid, ()):
                d = (max(0, c - final) - max(0, c - m)) * bpt
                for k in range(s0, end):
                    delta[k] = delta.get(k, 0) + d
    t = np.array(rows, dtype=np.int64).reshape(-1, len(STAT_FIELDS))
    for k, d in delta.items():
        t[k, STAT_FIELDS.index("reservation")] -= d
        t[k, STAT_FIELDS.index("internal_frag")] += d
    return t


@pytest.mark.parametrize("chunk_rows,keep", [(1, 0), (3, 1), (5, 0), (64, 4)])
def test_chunked_accountant_equals_the_definition(chunk_rows, keep):
    """Random sequences that grow, get preempted, come back and finish short of max_len: the
    chunked accountant (corrections as a difference array, chunks settled and spilled once no
    live sequence reaches them) gives the definition's table and summary."""
    rng = random.Random(chunk_rows)
    bpt, capacity = 3, 10_000
    script, live, next_id, finished = [], {}, 0, set()
    for step in range(400):
        if rng.random() < 0.3 and len(live) < 12:
            live[next_id] = [rng.randint(1, 40), rng.randint(60, 120), True]  # cap, max_len, running
            next_id += 1
        for sid, st in list(live.items()):
            r = rng.random()
            if r < 0.2:
                st[0] += rng.randint(1, 8)
            elif r < 0.25:
                st[2] = not st[2]  # preempted (not live) / back
            elif r < 0.3:
                script.append(("finish", sid, rng.randint(1, st[1])))
                del live[sid]
                finished.add(sid)
        used = sum(st[0] for st in live.values() if st[2])
        stats = MemoryStats(token_states=used // 2, reservation=used - used // 2, internal_frag=0,
                            external_frag=0, idle_mapped=0, free=capacity - used, capacity=capacity)
        script.append(("record", stats, [(sid, st[0], st[1]) for sid, st in live.items() if st[2]]))
    for sid in list(live):
        script.append(("finish", sid, live[sid][1] - 1))

    acc = MemoryAccountant(bpt, chunk_rows=chunk_rows, keep_chunks=keep)
    for kind, *args in script:
        acc.record(*args) if kind == "record" else acc.finish(*args)
    want = reference_table(bpt, script)
    assert (want[:, STAT_FIELDS.index("internal_frag")] != 0).any(), "corrections should happen"
    np.testing.assert_array_equal(acc.table(), want)
    whole = MemoryAccountant(bpt, chunk_rows=10**6)
    for kind, *args in script:
        whole.record(*args) if kind == "record" else whole.finish(*args)
    assert acc.summary() == whole.summary()
    if chunk_rows < 64:
        assert acc.store.num_spilled > 0 or keep > 0


def test_step_log_reads_like_a_list():
    log = StepLog(chunk_rows=4, keep_chunks=1)
    recs = [StepRecord(0.5 * i, 0.25, i, 2, 3, 4, 5, 0, 1e-3, 7 * i) for i in range(11)]
    for r in recs[:5]:
        log.append(r)
    for r in recs[5:]:
        log.append((r.time, r.duration, r.running, r.waiting, r.num_seqs, r.prefill_tokens, r.decode_tokens,
                    r.preempted, r.host_s, r.context_tokens))
    assert log.rows.num_spilled > 0
    assert len(log) == 11 and log and log == recs and list(log) == recs
    assert log[-1] == recs[-1] and log[0] == recs[0] and log[3:9] == recs[3:9] and log[-3:] == recs[-3:]
    assert isinstance(log[2].running, int) and isinstance(log[2].time, float)
    df = pd.DataFrame([r.__dict__ for r in log])
    assert list(df["context_tokens"]) == [7 * i for i in range(11)]
    log.clear()
    assert len(log) == 0 and not log and log == []
