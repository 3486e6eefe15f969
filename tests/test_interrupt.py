"""Ctrl-C during a sweep: one line (what finished, the command that resumes), then the resume
skips finished runs and completes the sweep."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# run 0 takes a fraction of a second, run 1 about 2 s of wall time (online arrivals at 20 req/s)
SWEEP = ["run", "-m", "mode=online", "workload.request_rate=400,20", "workload.num_requests=40", "progress=false",
         "report=false"]


def kvlab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def interrupt_when(proc: subprocess.Popen, marker: str, delay_s: float, deadline_s: float = 120) -> str:
    """Read the merged output until ``marker``, SIGINT ``delay_s`` later, return everything."""
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(deadline_s), "".join(lines)[-3000:]
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    return "".join(lines)


def test_ctrl_c_during_a_sweep_then_resume(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", *SWEEP, f"hydra.sweep.dir={sweep}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = interrupt_when(proc, "#1 :", delay_s=1.0)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    line = [ln for ln in out.splitlines() if "interrupted;" in ln]
    assert line == [f"kvlab run: interrupted; 1 of 2 runs finished in {sweep}; to resume: "
                    f"kvlab run --resume {sweep}"], out[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2 and (sweep / runs[0] / "summary.json").exists()
    assert not (sweep / runs[1] / "summary.json").exists()
    first = (sweep / runs[0] / "summary.json").stat().st_mtime_ns

    # the interrupted run shows in the report's skip list until it is finished
    rep = kvlab("report", str(sweep))
    assert rep.returncode == 0 and "skipped 1 run folder(s)" in rep.stderr and runs[1] in rep.stderr
    assert "interrupted" in rep.stderr

    done = kvlab("run", "--resume", str(sweep))
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert log.count("skipping") == 1 and runs[0] in log  # the finished run is not run again
    assert (sweep / runs[0] / "summary.json").stat().st_mtime_ns == first
    rates = sorted(json.loads((sweep / r / "summary.json").read_text())["request_rate"] for r in runs)
    assert rates == [20, 400]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report") == runs  # none added

    # the command as typed with the sweep folder resumes too: nothing left to do
    again = kvlab(*SWEEP, f"hydra.sweep.dir={sweep}")
    assert again.returncode == 0 and (again.stdout + again.stderr).count("skipping") == 2


def test_ctrl_c_in_a_single_run_names_the_command(tmp_path):
    run_dir = tmp_path / "one"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "run", "mode=online", "workload.request_rate=10",
                             "workload.num_requests=40", "progress=false", f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = interrupt_when(proc, "KV cache", delay_s=0.5)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    line = [ln for ln in out.splitlines() if "interrupted;" in ln]
    assert line == [f"kvlab run: interrupted; the run did not finish; to resume: kvlab run --resume {run_dir}"]
    assert not (run_dir / "summary.json").exists()
    done = kvlab("run", "--resume", str(run_dir))  # the same command into the same folder
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["request_rate"] == 10 and summary["num_requests"] == 40
