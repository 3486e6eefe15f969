"""One-sequence to 8-sequence decode steps of llama3-8b (paged, synchronous) on one machine, three
harnesses: validate-sim's real engine (online, 4 req/s), experiments/step_timing.py on the same
workload (the profile's launch timer around each launch), and kvlab profile's host steps.

    python results/sim_validation/logs/syncdiag/compare.py > results/sim_validation/logs/syncdiag/compare.md
"""
from pathlib import Path

import pandas as pd

here = Path(__file__).parent
real = pd.read_parquet(here / "llama3-8b-paged/real/online-4rps/steps.parquet")
timed = pd.read_csv(here / "step_timing_sync/step_timing.csv.gz")
prof = pd.read_parquet(here / "sync_llama.parquet")
prof = prof[(prof.table == "host") & (prof.allocator == "paged") & (prof.prefill_tokens == 0)]
print("| sequences | validate-sim real: steps, median ms (host) | step_timing: steps, median ms (host, launch CPU) "
      "| kvlab profile: steps, median ms (host, launch CPU) |")
print("|---|---|---|---|")
for b in (1, 2, 4, 8):
    r = real[(real.prefill_tokens == 0) & (real.num_seqs == b)]
    t = timed[(timed.kind == "decode") & (timed.batch == b)]
    p = prof[prof.batch == b]
    print(f"| {b} | {len(r)}: {1e3 * r.duration.median():.3f} ({1e3 * r.host_s.median():.3f}) "
          f"| {len(t)}: {1e3 * t.wall_s.median():.3f} ({1e3 * t.host_s.median():.3f}, {1e3 * t.launch_cpu_s.median():.3f}) "
          f"| {len(p)}: {1e3 * p.duration.median():.3f} ({1e3 * p.host_s.median():.3f}, {1e3 * p.launch_cpu.median():.3f}) |")
