#!/usr/bin/env bash
# Simulate (CPU) against the synchronous real runs of one device call and collect the table:
#   bash results/sim_validation/simulate_against.sh RUNS [PROFILE]
#   SCHED=async bash results/sim_validation/simulate_against.sh RUNS [PROFILE]   # asynchronous real runs
#   SIM=h100-sxm SCHED=async bash ... RUNS PROFILE   # another simulated device (conf/sim/), its own profile
# RUNS holds <model>-<allocator>/real/ folders (as device_session.sh leaves them in $KVSV);
# PROFILE (default: the committed one) is the profile to simulate with, e.g. the same machine's
# synchronous host steps merged onto the committed profile (RUNS/nvidia-h200-sync-same.parquet).
# Each configuration gets --sim-only with the profiled model and with the roofline, then
# --collect writes RUNS/validation*.{md,csv,png}.
set -euo pipefail
runs=${1:?the folder of <model>-<allocator>/real/ runs}
profile=${2:-}
B="workload=sharegpt workload.num_requests=300 engine.kv_cache_tokens=40000 engine.max_model_len=2048 engine.max_num_seqs=256 engine.max_num_batched_tokens=8192 device=cuda report=false"
[ "${SCHED:-sync}" = async ] && B="$B engine.async_scheduling=true"
extra=()
[ -n "$profile" ] && extra=("sim.profile=$profile")  # relative to the repository root, as conf/sim names it
for m in qwen3-0.6b llama3-8b; do
    if [ $m = qwen3-0.6b ]; then rates=8,96 n=60; else rates=4,32 n=50; fi
    for a in paged contiguous virtual; do
        d=$runs/$m-$a
        [ -d "$d/real" ] || { echo "$m-$a: no real runs, skipped"; continue; }
        for cm in auto roofline; do
            kvlab validate-sim model=$m $B allocator=$a "${extra[@]}" --rates $rates --online-requests $n --sim-only \
                --sim ${SIM:-h200} --cost-model $cm --label $m-$a --out "$d" > "$d.sim-$cm.log" 2>&1 \
                || { echo "$m-$a ($cm): failed, see $d.sim-$cm.log"; tail -3 "$d.sim-$cm.log"; }
        done
        echo "$m-$a: simulated"
    done
done
kvlab validate-sim --collect --out "$runs" | tail -3
kvlab validate-sim --collect --cost-model roofline --out "$runs" | tail -1
