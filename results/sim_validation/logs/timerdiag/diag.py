"""Does the profile's launch timer (two CUDA events around each launch) slow a step down?

The synchronous host steps of ``kvlab profile`` were slower than validate-sim's real runs on the
same H200 (qwen3-0.6b paged decode steps of 1-8 sequences: 1.92-2.03 ms against 1.60-1.67 ms,
logs/sync8k), and so were experiments/step_timing's steps, which run validate-sim's workload under
the same timer (logs/syncdiag/compare.md). The real runs have no timer. This runs, on one machine,
the profile's host steps of qwen3-0.6b paged four times, each in a process of its own, without
and with the events alternately (``host_rows_apart(events=...)``), and sets them beside a real
run at 8 req/s made just before (``device_session.sh timerdiag``):

    python3 results/sim_validation/logs/timerdiag/diag.py RUNS_DIR           # on the device
    python3 results/sim_validation/logs/timerdiag/diag.py RUNS_DIR --compare  # the table again, anywhere
    python3 results/sim_validation/logs/timerdiag/diag.py RUNS_DIR --verdict  # exit 0 if no events match the real

RUNS_DIR holds ``real/online-8rps/steps.parquet`` (the real run) and gets ``host-<i>-<events>.parquet``
and ``compare.md`` (median step time, host work and launch CPU time of decode steps by batch bin).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository (a device copy installs nothing)

BINS = ((1, 1), (2, 4), (5, 8), (9, 32))
ORDER = (False, True, False, True)


def measure(runs: Path) -> None:
    from experiments.profile_host import TRICKLE_MAX_PROMPT, host_rows_apart

    # kvlab profile's phases (host_requests 256, max_model_len 2048)
    phases = ((256, 0, 0, 0, 0), (128, 32, 1024, 16, 512), (-64, 16, min(TRICKLE_MAX_PROMPT, 1024), 16, 64))
    for i, events in enumerate(ORDER):
        rows = host_rows_apart("qwen3-0.6b", "paged", {"block_size": 16}, max_model_len=2048, kv_cache_tokens=40000,
                               device="cuda", phases=phases, seed=0, events=events)
        pd.DataFrame(rows).to_parquet(runs / f"host-{i}-{'events' if events else 'none'}.parquet")
        print(f"host steps {i}: events={events}, {len(rows)} rows", flush=True)


def compare(runs: Path) -> str:
    def cells(df, batch, dur, host, launch) -> list[str]:
        out = []
        for lo, hi in BINS:
            d = df[(df[batch] >= lo) & (df[batch] <= hi)]
            out.append(f"{len(d)}: {1e3 * d[dur].median():.3f} ({1e3 * d[host].median():.3f}, "
                       f"{1e3 * d[launch].median():.3f})" if len(d) else "-")
        return out

    real = pd.read_parquet(runs / "real/online-8rps/steps.parquet")
    real = real[(real.prefill_tokens == 0) & (real.num_seqs > 0)]
    lines = ["| decode steps | " + " | ".join(f"{lo}-{hi} sequences" if hi > lo else f"{lo} sequence"
                                             for lo, hi in BINS) + " |",
             "|---" * (len(BINS) + 1) + "|",
             "| real run, 8 req/s | " + " | ".join(cells(real, "num_seqs", "duration", "host_s", "launch_s")) + " |"]
    for path in sorted(runs.glob("host-*.parquet")):
        h = pd.read_parquet(path)
        h = h[h.prefill_tokens == 0]
        lines.append(f"| {path.stem} | " + " | ".join(cells(h, "batch", "duration", "host_s", "launch_cpu")) + " |")
    return ("Each cell: steps: median step ms (median host work ms, median launch CPU ms).\n\n"
            + "\n".join(lines) + "\n")


def verdict(runs: Path, tolerance_s: float = 1e-4) -> bool:
    """Whether the host steps without events match the real run: median decode step of 1-8
    sequences within ``tolerance_s`` (the device call then goes on to the host steps of both
    models, ``device_session.sh syncboth``)."""
    def median(df, batch):
        d = df[(df[batch] >= 1) & (df[batch] <= 8)]
        return float(d["duration"].median())

    real = pd.read_parquet(runs / "real/online-8rps/steps.parquet")
    real = median(real[(real.prefill_tokens == 0) & (real.num_seqs > 0)], "num_seqs")
    gaps = {}
    for events in ("none", "events"):
        hs = [pd.read_parquet(p) for p in sorted(runs.glob(f"host-*-{events}.parquet"))]
        gaps[events] = median(pd.concat([h[h.prefill_tokens == 0] for h in hs]), "batch") - real if hs else float("nan")
    ok = abs(gaps["none"]) <= tolerance_s
    print(f"VERDICT real {1e3 * real:.3f} ms; host steps without events {1e3 * gaps['none']:+.3f} ms, with events "
          f"{1e3 * gaps['events']:+.3f} ms: {'match' if ok else 'differ'}")
    return ok


if __name__ == "__main__":
    runs = Path(sys.argv[1])
    if "--compare" not in sys.argv and "--verdict" not in sys.argv:
        measure(runs)
    if "--verdict" in sys.argv:
        sys.exit(0 if verdict(runs) else 3)
    table = compare(runs)
    (runs / "compare.md").write_text(table)
    print(table)
