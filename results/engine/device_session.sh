#!/usr/bin/env bash
# H200 measurements of the engine after piecewise CUDA graphs (prefill/mixed steps), in device calls:
#   bash results/engine/device_session.sh tests       # GPU tests of the engine (graphs vs eager, every allocator)
#                                                     # + step latency vs floors (bench_latency), both models
#   bash results/engine/device_session.sh throughput  # kvlab bench throughput, qwen3-0.6b and llama3-8b,
#                                                     # piecewise graphs off (before) and on (after)
# Outputs accumulate in $KVE (default /tmp/kve) on the machine; each part tars them into $OUT.
set -uo pipefail
part=${1:?tests or throughput}
out=${OUT:-/tmp/out}
runs=${KVE:-/tmp/kve}
mkdir -p "$out" "$runs"
{ date -u; hostname; nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader; lscpu | grep "Model name"; } \
    | tee -a "$runs/machine.txt"
case $part in
tests)
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py tests/test_gpu_kv_axes.py \
        2>&1 | tee "$runs/gpu_tests_engine.log" | tail -8
    timeout 250 python3 -m experiments.bench_latency --models qwen3-0.6b,llama3-8b --out "$runs" \
        2>&1 | tee "$runs/bench_latency.log" | grep -v "^{" | tail -40
    ;;
throughput)
    for m in qwen3-0.6b llama3-8b; do
        for g in 0 2048; do
            timeout 280 python3 -m experiments.cli bench throughput --models $m --no-hf --cuda-graph-max-tokens $g \
                --out "$runs/throughput_${m}_graphs$g" 2>&1 | tee "$runs/throughput_${m}_graphs$g.log" | grep "^|" | tail -5
        done
    done
    ;;
esac
tar -czf "$out/kve-$part.tgz" -C "$runs" .
ls -la "$out"
