#!/usr/bin/env bash
# The H200 run behind results/host_tier: the multi-turn workload on llama3-8b (random weights of
# its shape), host KV tier off / on, synchronous and asynchronous scheduling, one `kvlab run -m`
# (one process: CUDA start-up and kernel compilation once), then the report and the GPU tests
# of the tier. About 4 minutes on one H200. Run from the repository root:
#   bash results/host_tier/device_session.sh
# Needs hydra-core / omegaconf on the device: carry their wheels in .whl/ (see results/serving/README.md).
# Results land in $OUT (default /tmp/out): host_tier-runs.tgz (run folders, report, logs).
set -uo pipefail
out=${OUT:-/tmp/out}
runs=${KVHT:-/tmp/kvht}
mkdir -p "$out" "$runs"
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export KVLAB_COMMIT=${KVLAB_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
kv() { python3 -m experiments.cli "$@"; }
{ date -u; hostname; nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader; lscpu | grep "Model name"; \
  echo "commit $KVLAB_COMMIT"; } | tee -a "$runs/machine.txt"

# 32 conversations x 3 turns of 1024-token prompts (a follow-up repeats 75% of the previous
# prompt), 8 req/s: a conversation's next turn comes 4 s (32 requests) later. The device pool of
# 12,288 tokens (1.5 GiB) holds about 12 conversations, so its prefix has usually been evicted by
# then: recomputed with the tier off, loaded from the 8 GiB host tier with it on.
W="model=llama3-8b workload=multi_turn workload.num_requests=96 workload.turns=3 workload.input_len=1024 \
workload.output_len=32 workload.prefix_hit_rate=0.75 workload.request_rate=8 mode=online device=cuda \
engine.max_model_len=2048 engine.max_num_seqs=64 engine.max_num_batched_tokens=4096 engine.kv_cache_tokens=12288 \
engine.enable_prefix_caching=true engine.host_transfer_blocks=4 progress=false"
# shellcheck disable=SC2086
kv run -m $W engine.host_kv_cache_memory=0,8 ++engine.async_scheduling=false,true \
    hydra.sweep.dir="$runs/runs" 'hydra.sweep.subdir=host${engine.host_kv_cache_memory}GiB-async_${engine.async_scheduling}' 2>&1 | tee "$runs/run.log" \
    | grep -E "tok/s|rror|no such|fail" | cut -c1-300
kv report "$runs/runs" --out "$runs/report" 2>&1 | tail -2
python3 - "$runs/runs" <<'PY' | tee "$runs/summary.md"
import json, pathlib, sys
keys = ["mean_ttft_ms", "p99_ttft_ms", "output_throughput", "request_throughput", "prefix_cache_hit_rate",
        "host_prefix_hit_rate", "recomputed_tokens", "host_tier_loaded_bytes", "host_tier_stored_bytes",
        "host_tier_transfer_s", "host_tier_exposed_s", "host_tier_hidden_fraction"]
print("| run | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(f.read_text())
    print(f"| {f.parent.name} | " + " | ".join(f"{s.get(k, float('nan')):.4g}" if isinstance(s.get(k), (int, float))
                                             else str(s.get(k)) for k in keys) + " |")
PY
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_host_tier.py 2>&1 | tee "$runs/gpu_tests.log" | tail -5
tar -czf "$out/host_tier-runs.tgz" -C "$runs" .
ls -la "$out"
