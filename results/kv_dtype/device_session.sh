#!/usr/bin/env bash
# H200 measurements of the KV axes (issue: FP8 KV caches and sliding-window / hybrid models).
# Run from the repository root, in two device calls:
#   bash results/kv_dtype/device_session.sh tests   # GPU tests (kernels incl. fp8 + windows, engine,
#                                                   # KV axes, serving) + fp8 vs bf16 decode attention
#   bash results/kv_dtype/device_session.sh runs    # llama3-8b offline, bf16 vs fp8 KV at a
#                                                   # 40,000-bf16-token pool, every allocator
# Outputs accumulate in $KVD (default /tmp/kvd) on the machine; each part tars them into $OUT.
set -uo pipefail
part=${1:?tests or runs}
out=${OUT:-/tmp/out}
runs=${KVD:-/tmp/kvd}
mkdir -p "$out" "$runs"
kv() { python3 -m experiments.cli "$@"; }
{ date -u; hostname; nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader; lscpu | grep "Model name"; } \
    | tee -a "$runs/machine.txt"
case $part in
tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8_window.py tests/test_gpu_kv_axes.py \
        2>&1 | tee "$runs/gpu_tests_kv_axes.log" | tail -8
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_triton.py tests/test_vmm_cuda.py \
        tests/test_gpu_engine.py tests/test_gpu_serving.py 2>&1 | tee "$runs/gpu_tests.log" | tail -8
    python3 -m experiments.bench_kernels --fp8 --shapes 1x4096,8x4096,64x4096,256x1024,16x16384 \
        --out "$runs/kernels_fp8" 2>&1 | tee "$runs/bench_kernels_fp8.log" | tail -14
    ;;
runs)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8_window.py -k "fp8" \
        2>&1 | tee "$runs/gpu_tests_fp8_after.log" | tail -3
    python3 -m experiments.bench_kernels --fp8 --shapes 1x4096,8x4096,64x4096,256x1024,16x16384 \
        --out "$runs/kernels_fp8_after" 2>&1 | tee "$runs/bench_kernels_fp8_after.log" | grep "fp8" | tail -10
    kv run +experiment=kv_dtype mode=offline device=cuda workload.num_requests=500 report=false \
        hydra.sweep.dir="$runs/kv_dtype" 2>&1 | grep -E "output tok/s|Error|error" | tee "$runs/kv_dtype.log"
    kv report "$runs/kv_dtype" --out "$runs/kv_dtype_report" 2>&1 | tail -2
    ;;
esac
tar -czf "$out/kvd-$part.tgz" -C "$runs" .
ls -la "$out"
