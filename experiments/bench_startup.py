"""Startup benchmark: wall time of short ``kvlab`` commands, each run N times in a fresh process.

    python experiments/bench_startup.py                       # 5 runs of each command, a table
    python experiments/bench_startup.py -n 9 --out results/startup/after.json
    python experiments/bench_startup.py --cwd /tmp/old-checkout   # another checkout, same venv

Commands run as ``python -m experiments.cli ...`` from ``--cwd`` (so a checkout of an older
commit can be measured with this venv). ``kvlab run`` gets a fresh ``hydra.run.dir`` each time,
so that no run is skipped as already done. Not a test: the figures depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.atomic import write_text

ROOT = Path(__file__).resolve().parent.parent
# name -> kvlab arguments; {run_dir} is a fresh folder per repetition
COMMANDS: dict[str, list[str]] = {
    "kvlab --help": ["--help"],
    "kvlab report --help": ["report", "--help"],
    "kvlab run mode=ofline (a user error)": ["run", "mode=ofline", "hydra.run.dir={run_dir}"],
    "kvlab run (default)": ["run", "hydra.run.dir={run_dir}"],
}


@dataclass
class Timing:
    command: str
    runs: int
    median_s: float
    min_s: float
    max_s: float
    exit_codes: list[int]


def time_command(args: list[str], n: int, python: str, cwd: Path) -> list[tuple[float, int]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="kvlab-bench-startup-") as tmp:
        for i in range(n):
            argv = [a.replace("{run_dir}", str(Path(tmp) / f"r{i}")) for a in args]
            t0 = time.perf_counter()
            proc = subprocess.run([python, "-m", "experiments.cli", *argv], cwd=cwd, capture_output=True,
                                  env={**os.environ, "PYTHONPATH": str(cwd)})
            out.append((time.perf_counter() - t0, proc.returncode))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="runs of each command (the median is reported)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--cwd", type=Path, default=ROOT, help="the checkout to measure")
    ap.add_argument("--only", default=None, help="substring: measure only the commands that contain it")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    rows = []
    for name, cmd in COMMANDS.items():
        if args.only and args.only not in name:
            continue
        res = time_command(cmd, args.n, args.python, args.cwd.resolve())
        secs = [t for t, _ in res]
        rows.append(Timing(name, args.n, statistics.median(secs), min(secs), max(secs), sorted({c for _, c in res})))
        r = rows[-1]
        print(f"{r.command:<40} median {r.median_s:6.2f} s  (min {r.min_s:.2f}, max {r.max_s:.2f}, "
              f"exit {r.exit_codes})", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, json.dumps({"cwd": str(args.cwd), "cpus": os.cpu_count(),
                                         "timings": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
