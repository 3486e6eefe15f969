"""The measurement protocol (docs/ARCHITECTURE.md, "Measurement protocol"): the steady-state window and
time-weighted means on hand-made step traces, the 95% CI over repeats, and `kvlab run repeats=N`
then `kvlab report` end to end."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from allocators.stats import STAT_FIELDS
from engine.accounting import StepRecord
from experiments import report
from experiments.metrics import SteadyState, WindowRule, write_steps
from experiments.tables import aggregate_repeats, mean_ci95, t_quantile_975

ROOT = Path(__file__).resolve().parent.parent
CAPACITY = 100
MAX_SEQS, MAX_TOKENS = 4, 100
TS = STAT_FIELDS.index("token_states")


def trace(rows: list[tuple]) -> tuple[pd.DataFrame, np.ndarray]:
    """Steps of (time, duration, waiting, num_seqs, tokens, token_states) and their memory rows
    (token states; the rest of the pool free)."""
    df = pd.DataFrame(rows, columns=["time", "duration", "waiting", "num_seqs", "prefill_tokens", "ts"])
    df["decode_tokens"] = 0
    df["preempted"] = 0
    mem = np.zeros((len(df), len(STAT_FIELDS)), dtype=np.int64)
    mem[:, TS] = df.pop("ts")
    mem[:, STAT_FIELDS.index("free")] = CAPACITY - mem[:, TS]
    return df, mem


def steady(rule: WindowRule, df: pd.DataFrame, mem: np.ndarray, cuts: tuple[int, ...] = ()) -> dict:
    """The window figures, fed in chunks split at ``cuts`` (as write_steps streams them)."""
    s = SteadyState(rule, MAX_TOKENS, MAX_SEQS)
    bounds = [0, *cuts, len(df)]
    for a, b in zip(bounds, bounds[1:]):
        s.add(df.iloc[a:b].reset_index(drop=True), mem[a:b], CAPACITY)
    return s.result()


# online: arrivals until 5 s; the batch is first full (num_seqs == max_num_seqs) at step 1 (t=1)
ONLINE = [(0, 1, 0, 1, 10, 10), (1, 1, 0, 4, 40, 40), (2, 2, 0, 4, 40, 60), (4, 2, 0, 2, 20, 80),
          (6, 1, 0, 1, 10, 20)]


@pytest.mark.parametrize("cuts", [(), (2,), (1, 3, 4)])
def test_window_from_saturation_to_last_arrival_weighted_by_time(cuts):
    # window [1, 5]: step 1 weighs 1 s, step 2 2 s, step 3 1 s (of its 2 s, 4..6), step 4 nothing
    out = steady(WindowRule(last_arrival_s=5.0), *trace(ONLINE), cuts=cuts)
    assert out["steady_state_start_s"] == 1.0 and out["steady_state_end_s"] == 5.0
    assert out["steady_state_start_rule"] == "saturated" and out["steady_state_end_rule"] == "last_arrival"
    assert out["steady_state_steps"] == 3 and out["steady_state_reason"] is None
    assert out["token_states_tw"] == pytest.approx((40 * 1 + 60 * 2 + 80 * 1) / 4 / CAPACITY)  # 0.6
    assert out["free_tw"] == pytest.approx(0.4)
    assert out["mean_batch_size_tw"] == pytest.approx((4 * 1 + 4 * 2 + 2 * 1) / 4)  # 3.5; per step: 2.4


@pytest.mark.parametrize("cuts", [(), (2,), (1, 3, 4)])
def test_sharing_saving_time_weighted_over_the_window_steps_with_live_tokens(cuts):
    """``sharing_saving_tw`` (the paper comparison's Fig. 15 figure): 1 - token states / live tokens
    unshared, weighted by each step's time in the window, over steps with live tokens only."""
    df, mem = trace(ONLINE)
    df["logical_tokens"] = [10, 50, 100, 0, 20]  # savings 0, 0.2, 0.4, (none), 0; step 3 holds none
    s = SteadyState(WindowRule(last_arrival_s=5.0), MAX_TOKENS, MAX_SEQS, bytes_per_token=1)
    bounds = [0, *cuts, len(df)]
    for a, b in zip(bounds, bounds[1:]):
        s.add(df.iloc[a:b].reset_index(drop=True), mem[a:b], CAPACITY)
    out = s.result()
    # window [1, 5]: step 1 weighs 1 s, step 2 2 s, step 3 (no live tokens) nothing of the saving's weight
    assert out["sharing_saving_tw"] == pytest.approx((0.2 * 1 + 0.4 * 2) / 3)
    assert out["token_states_tw"] == pytest.approx(0.6)  # the other means keep the whole window's weight
    assert "sharing_saving_tw" not in steady(WindowRule(last_arrival_s=5.0), *trace(ONLINE))  # no logical tokens


def test_stated_warmup_starts_the_window():
    # window [1.5, 5]: step 1 weighs 0.5 s
    out = steady(WindowRule(last_arrival_s=5.0, warmup_s=1.5), *trace(ONLINE))
    assert out["steady_state_start_rule"] == "warmup" and out["steady_state_start_s"] == 1.5
    assert out["token_states_tw"] == pytest.approx((40 * 0.5 + 60 * 2 + 80 * 1) / 3.5 / CAPACITY)


# offline: everything arrives at t=0; the token budget is full at step 0; requests wait until step 2
OFFLINE = [(0, 1, 3, 2, 100, 20), (1, 1, 1, 4, 40, 60), (2, 3, 1, 4, 40, 90), (5, 1, 0, 3, 30, 70),
           (6, 1, 0, 1, 10, 30)]


@pytest.mark.parametrize("cuts", [(), (3,), (1,), (2, 4)])
def test_offline_window_ends_when_the_queue_drains(cuts):
    out = steady(WindowRule(last_arrival_s=0.0), *trace(OFFLINE), cuts=cuts)
    assert out["steady_state_end_rule"] == "queue_drained"
    assert out["steady_state_start_s"] == 0.0 and out["steady_state_end_s"] == 5.0  # end of step 2
    assert out["steady_state_steps"] == 3
    assert out["token_states_tw"] == pytest.approx((20 + 60 + 90 * 3) / 5 / CAPACITY)  # 0.7
    assert out["mean_batch_size_tw"] == pytest.approx((2 + 4 + 4 * 3) / 5)  # 3.6


def test_empty_window_is_nan_with_a_reason():
    idle = [(0, 1, 0, 1, 10, 10), (1, 1, 0, 2, 20, 20)]  # never saturated
    out = steady(WindowRule(last_arrival_s=1.0), *trace(idle))
    assert math.isnan(out["token_states_tw"]) and math.isnan(out["mean_batch_size_tw"])
    assert "never saturated" in out["steady_state_reason"] and out["steady_state_steps"] == 0
    late = steady(WindowRule(last_arrival_s=0.5), *trace(ONLINE))  # saturates at 1 s, after the last arrival
    assert math.isnan(late["token_states_tw"]) and "not before it ends" in late["steady_state_reason"]


class _Accountant:
    """What write_steps reads of a MemoryAccountant."""

    def __init__(self, mem: np.ndarray):
        self.mem, self.num_steps, self.capacity, self.bpt = mem, len(mem), CAPACITY, None

    def iter_table(self):
        yield from (self.mem[:2], self.mem[2:])


def test_write_steps_reports_the_window_beside_the_per_step_means(tmp_path):
    df, mem = trace(ONLINE)
    records = [StepRecord(time=r.time, duration=r.duration, running=r.num_seqs, waiting=r.waiting,
                          num_seqs=r.num_seqs, prefill_tokens=r.prefill_tokens, decode_tokens=0, preempted=0)
               for r in df.itertuples()]
    plain = write_steps(tmp_path / "a.parquet", records, _Accountant(mem), 0.0, None, MAX_TOKENS, MAX_SEQS)
    assert not any(k.endswith("_tw") for k in plain)  # no window asked: the figures of before
    figs = write_steps(tmp_path / "b.parquet", records, _Accountant(mem), 0.0, None, MAX_TOKENS, MAX_SEQS,
                       WindowRule(last_arrival_s=5.0))
    assert figs["mean_batch_size"] == pytest.approx(2.4) and figs["mean_batch_size_tw"] == pytest.approx(3.5)
    assert figs["token_states_tw"] == pytest.approx(0.6)
    assert len(pd.read_parquet(tmp_path / "b.parquet")) == len(ONLINE)


def test_step_and_request_tables_are_written_zstd_compressed(tmp_path):
    """Run folders are committed under results/: their tables use zstd, ~30% smaller than snappy."""
    import pyarrow.parquet as pq

    from experiments.atomic import write_parquet

    df, mem = trace(ONLINE)
    records = [StepRecord(time=r.time, duration=r.duration, running=r.num_seqs, waiting=r.waiting,
                          num_seqs=r.num_seqs, prefill_tokens=r.prefill_tokens, decode_tokens=0, preempted=0)
               for r in df.itertuples()]
    write_steps(tmp_path / "steps.parquet", records, _Accountant(mem), 0.0, None, MAX_TOKENS, MAX_SEQS)
    write_parquet(tmp_path / "requests.parquet", pd.DataFrame({"ttft": [0.1, 0.2], "request_id": ["a", "b"]}))
    for name in ("steps.parquet", "requests.parquet"):
        meta = pq.ParquetFile(tmp_path / name).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD", name


def test_t_values_and_ci_of_hand_made_repeats():
    assert t_quantile_975(1) == pytest.approx(12.7062047, rel=1e-7)
    assert t_quantile_975(2) == pytest.approx(4.3026527, rel=1e-7)
    assert t_quantile_975(4) == pytest.approx(2.7764451, rel=1e-7)
    assert t_quantile_975(30) == pytest.approx(2.0422725, rel=1e-7)
    mean, half, n = mean_ci95([1.0, 2.0, 3.0])  # sd 1: 4.3027 / sqrt(3)
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.3026527 / math.sqrt(3), rel=1e-7)
    mean, half, n = mean_ci95([5.0, math.nan])
    assert (mean, n) == (5.0, 1) and math.isnan(half)


def test_runs_that_differ_only_in_seed_are_one_row():
    wide = pd.DataFrame({
        "run_id": ["a/rep0", "a/rep1", "a/rep2", "b"], "run_dir": ["/a/rep0", "/a/rep1", "/a/rep2", "/b"],
        "seed": [0, 1, 2, 0], "cfg.seed": [0, 1, 2, 0], "cfg.workload.seed": [0, 1, 2, 0],
        "cfg.allocator.name": ["paged", "paged", "paged", "contiguous"],
        "output_throughput": [10.0, 12.0, 14.0, 7.0]})
    out = aggregate_repeats(wide, ["output_throughput"]).set_index("run_id")
    assert list(out.index) == ["a", "b"] and list(out["n"]) == [3, 1]
    assert out.loc["a", "output_throughput"] == 12.0  # sd 2: 4.3027 * 2 / sqrt(3)
    assert out.loc["a", "output_throughput_ci95"] == pytest.approx(4.3026527 * 2 / math.sqrt(3), rel=1e-7)
    assert out.loc["a", "seeds"] == "0;1;2" and out.loc["a", "_members"] == ["/a/rep0", "/a/rep1", "/a/rep2"]
    assert out.loc["b", "output_throughput"] == 7.0 and math.isnan(out.loc["b", "output_throughput_ci95"])
    alone = aggregate_repeats(wide.iloc[3:], ["output_throughput"])
    assert "output_throughput_ci95" not in alone and list(alone["n"]) == [1]  # single runs as before


def kvlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def repeated(tmp_path_factory) -> Path:
    """`kvlab run repeats=3` (CPU, tiny model, 8 requests) then `kvlab report`."""
    root = tmp_path_factory.mktemp("repeats")
    proc = kvlab("run", "repeats=3", "workload.num_requests=8", "progress=false", "report=false",
                 f"hydra.run.dir={root / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = kvlab("report", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_repeats_run_three_seeds_and_report_mean_ci_and_n(repeated):
    seeds = [json.loads((repeated / "run" / f"rep{i}" / "summary.json").read_text())["seed"] for i in range(3)]
    assert seeds == [0, 1, 2]
    wide = pd.read_csv(repeated / "report" / "summary.csv")
    assert len(wide) == 1 and wide.loc[0, "n"] == 3 and wide.loc[0, "run_id"] == "run"
    for m in ("output_throughput", "mean_ttft_ms", "token_states"):
        assert wide.loc[0, f"{m}_n"] == 3 and np.isfinite(wide.loc[0, f"{m}_ci95"]), m
    long = pd.read_parquet(repeated / "report" / "summary_long.parquet")
    assert long["run_id"].nunique() == 3  # the long table keeps one row per run
    assert "±" in (repeated / "report" / "report.md").read_text()


def test_a_repeated_run_resumes_its_finished_repeats(repeated):
    before = [(repeated / "run" / f"rep{i}" / "summary.json").read_text() for i in range(3)]
    proc = kvlab("run", "--resume", str(repeated / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(repeated / "run" / f"rep{i}" / "summary.json").read_text() for i in range(3)] == before


def test_plots_draw_error_bars_over_repeats(repeated):
    runs = report.collect(repeated)
    wide = report.group_repeats(runs)
    fig = report.plot_throughput(wide)
    assert fig.axes[0].containers and any(c.errorbar is not None for c in fig.axes[0].containers
                                          if hasattr(c, "errorbar"))
    figs = [fig, report.plot_memory(wide),
            report.plot_latency_cdfs(wide, report._read_runs(wide, "requests.parquet")),
            report.plot_usage_over_time(wide, report._read_runs(wide, "steps.parquet"))]
    assert len(figs[2].axes[0].lines) == 3  # one CDF per repeat, in the row's colour
    for f in figs:
        plt.close(f)
    assert (repeated / "report" / "throughput.png").stat().st_size > 1000


def test_sweep_curves_draw_a_band_where_rows_repeat():
    wide = pd.DataFrame({"run_id": ["r1", "r2"], "label": ["a", "b"], "cfg.workload.request_rate": [1.0, 2.0],
                         "output_throughput": [10.0, 20.0], "output_throughput_ci95": [1.0, 2.0]})
    fig = report.plot_sweep(wide, "cfg.workload.request_rate")
    assert fig.axes[0].collections, "no CI band"
    plt.close(fig)


def test_repeats_must_be_a_positive_whole_number():
    proc = kvlab("run", "repeats=0", "progress=false")
    assert proc.returncode == 2 and "repeats=0" in proc.stderr


def test_report_lists_the_repeats_that_did_not_finish(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("repeats: 3\nseed: 0\n")
    (run / "rep0").mkdir()
    (run / "rep0" / "summary.json").write_text(json.dumps({"run_id": "rep0", "seed": 0}))
    found, skipped = report.find_runs(tmp_path)
    assert found == [run / "rep0" / "summary.json"]
    assert sorted(Path(s.run_dir).name for s in skipped) == ["rep1", "rep2"]  # not the run folder itself
