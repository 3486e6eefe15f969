"""The committed H100 validation (results/sim_validation/h100/, synchronous runs in h100/sync/): simulate,
with the committed H100 profile, against the committed real runs of this engine stays within the issue's
targets, and makes the committed table."""
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "results" / "sim_validation" / "h100"
B = ("workload=sharegpt workload.num_requests=300 engine.kv_cache_tokens=40000 engine.max_model_len=2048 "
     "engine.max_num_seqs=256 engine.max_num_batched_tokens=8192 device=cuda report=false").split()


@pytest.mark.parametrize("model,allocator,rate,requests,sync", [
    ("qwen3-0.6b", "paged", 8, 60, False), ("qwen3-0.6b", "virtual", 8, 60, False),
    ("llama3-8b", "contiguous", 4, 50, False),  # the profile's llama3-8b tables: merged onto the qwen3-0.6b ones
    ("qwen3-0.6b", "paged", 8, 60, True),  # synchronous steps: the profile's synchronous host steps (h100/sync/)
])
def test_h100_profile_simulates_the_committed_real_runs_within_target(tmp_path, model, allocator, rate, requests, sync):
    from experiments.validate_sim import main

    runs = RUNS / "sync" if sync else RUNS
    label = f"{model}-{allocator}"
    mode = f"online-{rate}rps"
    shutil.copytree(runs / label / "real" / mode, tmp_path / "real" / mode)
    code = main([f"model={model}", *B, f"engine.async_scheduling={str(not sync).lower()}", f"allocator={allocator}",
                 "sim.profile=results/profiles/nvidia-h100.parquet", "--sim", "h100-sxm", "--rates", str(rate),
                 "--no-offline", "--online-requests", str(requests), "--sim-only", "--label", label,
                 "--out", str(tmp_path)])
    assert code == 0
    table = pd.read_csv(tmp_path / "validation.csv").set_index("metric")
    timed = table.loc[["output_throughput", "mean_ttft_ms", "mean_tpot_ms", "p99_tpot_ms"]]
    assert timed["ok"].all(), timed[["real", "sim", "error"]].to_string()
    committed = pd.read_csv(runs / label / "validation.csv")
    committed = committed[committed["mode"] == mode].set_index("metric")
    # the same simulate on the same runs and profile: the committed table is what it makes
    assert timed["sim"].to_numpy() == pytest.approx(committed.loc[timed.index, "sim"].to_numpy(), rel=1e-6)
