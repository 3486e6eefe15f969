"""``kvlab`` ends with ``os._exit`` once its output is flushed (cli._exit_now): what the interpreter
would run first must still run, or a sweep over the joblib launcher (README: hydra/launcher=parallel)
waits for its idle loky workers forever after its last run."""
from __future__ import annotations

import json
import subprocess
import tempfile
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_exit_now_stops_idle_loky_workers():
    code = ("from joblib import Parallel, delayed\n"  # as Hydra's joblib launcher runs a sweep
            "assert Parallel(n_jobs=2, backend='loky')(delayed(int)(s) for s in '12') == [1, 2]\n"
            "from experiments.cli import _exit_now\n"
            "_exit_now(3)\n")
    # before the fix this never ended: the timeout only bounds a hang, it times nothing
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]


def test_a_sweep_over_the_parallel_launcher_ends(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "run", "-m", "mode=simulate", "workload.num_requests=2",
         "allocator.args.block_size=16,32", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
         f"hydra.sweep.dir={sweep}", "progress=false", "report=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = sorted(json.loads(p.read_text())["cfg.allocator.args.block_size"] for p in sweep.glob("*/summary.json"))
    assert sizes == [16, 32]


def test_a_failed_run_of_a_parallel_sweep_is_listed_and_sets_the_exit_code(tmp_path):
    """The runs of hydra/launcher=parallel happen in loky workers: their failures reached neither the
    closing list nor the exit code (0), as they do on the default launcher (2 for a bad setting)."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", "run", "-m", "engine.kv_cache_tokens=4096,3",
         "workload.num_requests=2", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
         f"hydra.sweep.dir={sweep}", "progress=false", "report=false"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "kvlab run: 1 of 2 run(s) failed" in err
    assert "1-paged-b16-tiny-llama-uniform: KV pool of 3 tokens holds no block of 16" in err
    assert [p.parent.name for p in sweep.glob("*/summary.json")] == ["0-paged-b16-tiny-llama-uniform"]
    assert not (Path(tempfile.gettempdir()) / f"kvlab-jobs-{proc.pid}").exists()  # the workers' notes are gone
