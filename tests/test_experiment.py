"""`kvlab run` and `kvlab report` end to end on CPU, as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent

SUMMARY_KEYS = [
    "request_throughput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "mean_e2el_ms", "p99_e2el_ms", "normalized_latency",
    "token_states", "reservation", "internal_frag", "external_frag", "free",
    "token_states_peak", "kv_capacity_tokens", "max_concurrency", "mean_batch_size", "preemptions",
    "prefix_cache_hit_rate", "allocator", "model", "workload", "mode", "device", "git_commit", "time",
]


def kvlab(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    return proc


def test_default_run_writes_results(tmp_path):
    run_dir = tmp_path / "default"
    proc = kvlab("run", f"hydra.run.dir={run_dir}", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    assert not missing, f"summary.json lacks {missing}"
    assert summary["num_requests"] == 32 and summary["output_throughput"] > 0
    fractions = sum(summary[k] for k in ("token_states", "reservation", "internal_frag", "external_frag", "free"))
    assert fractions == pytest.approx(1.0)
    requests = pd.read_parquet(run_dir / "requests.parquet")
    steps = pd.read_parquet(run_dir / "steps.parquet")
    assert len(requests) == 32 and (requests["ttft"] > 0).all() and (requests["e2el"] >= requests["ttft"]).all()
    assert {"time", "running", "waiting", "prefill_tokens", "decode_tokens", "token_states", "free"} <= set(steps)
    total = steps[["token_states", "reservation", "internal_frag", "external_frag", "free"]].sum(axis=1)
    assert (total == steps["capacity"]).all()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "kv_usage_over_time.png").stat().st_size > 1000


def test_sweep_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = kvlab("run", "-m", "allocator=paged,contiguous", "workload.num_requests=8", "progress=false",
                 f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = kvlab("report", str(sweep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = sweep / "report"
    wide = pd.read_csv(out / "summary.csv")
    assert sorted(wide["allocator"]) == ["contiguous", "paged"]
    long = pd.read_parquet(out / "summary_long.parquet")
    assert list(long.columns) == ["run_id", "metric", "value", "unit"]
    assert set(long["run_id"]) == set(wide["run_id"])
    assert (long.loc[long.metric == "output_throughput", "unit"] == "tok/s").all()
    for png in ("throughput.png", "memory_breakdown.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "throughput.png" in md and "contiguous" in md
    # contiguous-max reserves max_model_len per request: most of what it holds is never filled
    by = wide.set_index("allocator")
    assert by.loc["contiguous", "internal_frag"] > 10 * by.loc["paged", "internal_frag"]
    # resume: a second sweep into the same folder skips finished runs
    proc = kvlab("run", "-m", "allocator=paged,contiguous", "workload.num_requests=8", "progress=false",
                 f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0
    assert proc.stderr.count("skipping") + proc.stdout.count("skipping") == 2


def test_bad_override_names_the_key(tmp_path):
    proc = kvlab("run", "allocator=nope", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "allocator/nope" in proc.stderr and "paged" in proc.stderr
    proc = kvlab("run", "workload.input_len_mx=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "input_len_mx" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_report_on_empty_dir_is_clear(tmp_path):
    proc = kvlab("report", str(tmp_path))
    assert proc.returncode != 0 and "no run under" in proc.stderr


# --------------------------------------------------------------------------- resume and interrupts

def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from experiments.run import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["mode=simulate", "progress=false", "report=false",
                                            "workload.num_requests=8", *overrides])


def test_resume_skips_only_the_same_configuration(tmp_path):
    from experiments.run import run_experiment

    first = run_experiment(_compose(), tmp_path)
    stamp = (tmp_path / "summary.json").stat().st_mtime_ns
    again = run_experiment(_compose("progress=true"), tmp_path)  # display keys do not count
    assert again["config_hash"] == first["config_hash"] and again["time"] == first["time"]
    assert (tmp_path / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="different configuration"):
        run_experiment(_compose("workload.num_requests=9"), tmp_path)
    redo = run_experiment(_compose("workload.num_requests=9", "resume=false"), tmp_path)
    assert redo["num_requests"] == 9
    assert json.loads((tmp_path / "summary.json").read_text())["num_requests"] == 9


def test_resume_runs_again_where_the_tables_are_missing(tmp_path):
    """summary.json alone (simulate's tables are not committed) is not a finished run: it runs
    again and writes its tables."""
    from experiments.run import run_experiment

    from experiments.run import _resume, config_hash

    first = run_experiment(_compose(), tmp_path)
    (tmp_path / "steps.parquet").unlink()
    assert _resume(tmp_path / "summary.json", config_hash(_compose())) is None
    assert not (tmp_path / "summary.json").exists()  # an interrupted rerun leaves no old summary beside new tables
    again = run_experiment(_compose(), tmp_path)
    assert (tmp_path / "steps.parquet").exists() and again["wall_time_s"] != first["wall_time_s"]


def test_interrupted_run_leaves_no_partial_files(tmp_path):
    """Ctrl-C in the middle of a run: the folder holds Hydra's config and nothing else."""
    import signal
    import time

    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", "run", "mode=simulate", "model=opt-13b", "workload=sharegpt",
         "workload.num_requests=5000", "allocator=contiguous", "engine.max_model_len=2048",
         "engine.kv_cache_tokens=null", "engine.max_num_seqs=256", "engine.max_num_batched_tokens=2048",
         "progress=false", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run_dir / ".hydra" / "config.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.5)  # into the run
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    assert "KeyboardInterrupt" in err or proc.returncode in (130, -2)
    left = sorted(p.name for p in run_dir.iterdir() if p.name not in (".hydra", "run.log"))
    assert left == [], f"partial files after Ctrl-C: {left}"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from experiments.atomic import write_parquet

    class Boom(pd.DataFrame):
        def to_parquet(self, *a, **k):
            with open(a[0], "w") as f:
                f.write("half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_parquet(tmp_path / "steps.parquet", Boom({"a": [1]}))
    assert list(tmp_path.iterdir()) == []


def test_graph_bound_default_keeps_the_hash_of_runs_it_does_not_change():
    """``engine.cuda_graph_max_tokens`` went from 2048 to 8192. The engine caps it at the token budget,
    so under a budget of 2048 or less the two are one engine and hash alike (their runs resume);
    above, they are two."""
    from experiments.run import config_hash

    assert config_hash(_compose()) == config_hash(_compose("engine.cuda_graph_max_tokens=2048"))  # budget 1024
    big = "engine.max_num_batched_tokens=8192"
    assert config_hash(_compose(big)) != config_hash(_compose(big, "engine.cuda_graph_max_tokens=2048"))
    assert config_hash(_compose(big, "engine.cuda_graph_max_tokens=1024")) != config_hash(_compose(big))


def test_async_scheduling_is_a_config_key_that_keeps_older_hashes():
    """``engine.async_scheduling`` is in the engine config (no ``++`` needed); false, its default,
    hashes as the configs made before the key existed did, so their runs still resume."""
    from omegaconf import OmegaConf, open_dict

    from experiments.run import config_hash, engine_config

    cfg = _compose()
    assert cfg.engine.async_scheduling is False and engine_config(cfg).async_scheduling is False
    older = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(older):
        del older.engine["async_scheduling"]
    assert config_hash(cfg) == config_hash(older)
    on = _compose("engine.async_scheduling=true")
    assert engine_config(on).async_scheduling is True and config_hash(on) != config_hash(cfg)
