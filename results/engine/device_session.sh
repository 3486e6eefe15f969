#!/usr/bin/env bash
# H200 measurements of the engine after piecewise CUDA graphs (prefill/mixed steps), in device calls:
#   bash results/engine/device_session.sh tests       # GPU tests of the engine (graphs vs eager, every allocator)
#                                                     # + step latency vs floors (bench_latency), both models
#   bash results/engine/device_session.sh throughput  # kvlab bench throughput, qwen3-0.6b and llama3-8b,
#                                                     # piecewise graphs off (before) and on (after)
# Session of 2026-12-02 (fifth):
#   bash results/engine/device_session.sh measure     # prefill attention (bench_prefill + config sweep),
#                                                     # decode kernels at batch 1/8 (profile_step), virtual vs
#                                                     # paged end to end (premap 8), step timing of qwen3-0.6b
#                                                     # online-8rps and offline (experiments/step_timing.py)
#   bash results/engine/device_session.sh verify      # GPU tests (engine, kernels, VMM) after the prefill-kernel
#                                                     # and virtual start-up pre-mapping changes + bench_prefill
#   bash results/engine/device_session.sh e2e         # bench throughput paged vs virtual, both models
# Session of 2026-12-02 (seventh):
#   bash results/engine/device_session.sh async7      # GPU engine tests with full graphs as the default; where a
#                                                     # full-batch decode step goes, sync vs async (profile_step);
#                                                     # bench throughput llama3-8b paged sync vs async (phase floor)
#   bash results/engine/device_session.sh latency7    # GPU kernel/VMM/kv-axes tests, bench_latency (full graphs vs
#                                                     # eager, after the attention grid change; decode b1/b8),
#                                                     # bench throughput llama3-8b async, qwen3-0.6b sync vs async
#                                                     # (after greedy sampling on bf16 logits)
#   bash results/engine/device_session.sh auto7       # after async_scheduling=auto became the default and RoPE went
#                                                     # to one program a token: fused-op and GPU engine/serving tests,
#                                                     # bench throughput (default scheduling), profile_step b256
# Session of 2026-12-03 (second):
#   bash results/engine/device_session.sh even        # after even split-KV for decode: bench_ragged (fixed vs even
#                                                     # splits on ragged batches, every split count for llama3-8b),
#                                                     # the kernel tests on the GPU, the engine's GPU tests, and
#                                                     # llama3-8b paged async real runs of the simulate validation
# Session of 2026-12-03 (fifth):
#   bash results/engine/device_session.sh newkv       # (at 0722911, reverted since) after prefill read its own keys
#                                                     # from the step's k, v: kernel + fused-op tests on the GPU,
#                                                     # bench_prefill with a config sweep, the engine's GPU tests
#   bash results/engine/device_session.sh order       # ragged decode batches of >= 128 sequences ordered longest
#                                                     # first, head by head and sequence by sequence (seq_major),
#                                                     # against the batch as admitted (bench_ragged), and the
#                                                     # kernel tests on the GPU
#   bash results/engine/device_session.sh prompt      # bench_prefill: whole prompts through the LINEAR kernel over
#                                                     # the fused QKV output's views (prompt-qkv) against PAGED and
#                                                     # LINEAR from the cache, with a config sweep
# Session of 2026-12-04:
#   bash results/engine/device_session.sh order2      # after decode batches of >= 128 sequences launch sequence by
#                                                     # sequence, longest first (kernels.metadata.SEQ_MAJOR_MIN_SEQS):
#                                                     # the engine's GPU tests of it, bench throughput before
#                                                     # (the default: head by head as admitted) and after
#                                                     # (KVLAB_SEQ_MAJOR_MIN_SEQS=128), llama3-8b then qwen3-0.6b;
#                                                     # logs straight into $OUT
# Session of 2026-12-04 (second):
#   bash results/engine/device_session.sh graphs8k    # an offline wave (the sim validation's offline config, paged,
#                                                     # asynchronous) with graphs up to 2048 tokens (the default)
#                                                     # and up to 8192 (engine.cuda_graph_max_tokens=8192),
#                                                     # alternating, qwen3-0.6b twice each, llama3-8b once each
#   bash results/engine/device_session.sh warmgemm    # after ModelRunner.warm_gemms: its GPU test and the engine's
#                                                     # graphs/async GPU tests; the first prefill wave (profile_wave,
#                                                     # qwen3-0.6b paged async) without (--no-warm-gemms) and with it;
#                                                     # llama3-8b with graphs up to 8192 tokens, with it
# Prepared in the session of 2026-12-04 (fourth), not run yet:
#   bash results/engine/device_session.sh tma         # the TMA prefill kernel's tests on the GPU, then bench_prefill
#                                                     # (linear-tma beside PAGED, LINEAR, prompt-qkv, SDPA) with a
#                                                     # sweep of its tiles; outputs into $OUT as each ends (~4 min)
# Session of 2026-12-05 (second): engine.prompt_attention=qkv (a step of whole prompts reads its own K/V
# projection, LINEAR) beside the TMA candidate:
#   bash results/engine/device_session.sh prefill2    # GPU tests (prompt_attention in eager/piecewise/full
#                                                     # graphs, the TMA kernel), bench_prompt_attention (llama3-8b:
#                                                     # PAGED from the cache / own K,V / contiguous, one step of
#                                                     # whole prompts), decode splits under 256 keys
#                                                     # at 1x4096 (bench_kernels sweep), then bench_prefill with
#                                                     # a tile sweep in the time left; each into $OUT as it ends
# Session of 2026-12-05 (seventh), on an H100 (the device lent one): prefill2 as above, then
#   bash results/engine/device_session.sh regress     # every gpu-marked test but tensor parallelism (one GPU),
#                                                     # then the kernel test files on the GPU (their reference
#                                                     # checks), one log each into $OUT
# Session of 2026-12-06:
#   bash results/engine/device_session.sh regress2    # the issue's no-regression benchmarks: the decode table of
#                                                     # results/kernels/ (bench_kernels, no sweep), then kvlab against
#                                                     # HF generate_batch (bench throughput, TPUT_MODELS), into $OUT
# Session of 2026-12-06 (ninth):
#   bash results/engine/device_session.sh gemv        # kernels.small_linear on this device: its tests and the engine's
#                                                     # GPU tests (parity with HF through it), the layer table
#                                                     # (bench_small_linear), decode per token with fused_gemv_max_tokens
#                                                     # 0 and 16, three interleaved engines a model (bench_latency)
# Session of 2026-12-06 (tenth):
#   bash results/engine/device_session.sh pdl         # programmatic dependent launch (kernels/pdl.py): its GPU tests,
#                                                     # small_linear's and the engine's parity tests (with PDL),
#                                                     # the layer table with a PDL column, decode per token with
#                                                     # (gemv, pdl) = (0,0) (16,0) (16,1) twice interleaved, both
#                                                     # models, then PDL without the L2 prefetch and with the late
#                                                     # trigger (KVLAB_PDL_PREFETCH_MB=0, KVLAB_PDL_TRIGGER=wait, 'late' at 584dea4)
#   bash results/engine/device_session.sh pdl2        # after the trigger moved to the end of each kernel's main loop:
#                                                     # the PDL tests on the GPU, the layer table, decode per token
#                                                     # with (gemv, pdl) = (0,0) (16,0) (16,1) (0,1) twice interleaved,
#                                                     # both models, then (16,1) without the L2 prefetch
#   bash results/engine/device_session.sh pdl3        # with the L2 prefetch off by default: the chain test and the
#                                                     # small_linear + PDL parity tests, decode per token (16,0) vs
#                                                     # (16,1) three times interleaved, both models
#   bash results/engine/device_session.sh pdl4        # on an H200: the small_linear/PDL GPU tests and decode per token
#                                                     # with (gemv, pdl) = (0,0) (16,0) (16,1) twice, both models; on
#                                                     # an H100: full-batch throughput (llama3-8b, paged) PDL off / on
# Next, on an H200 (not lent this session):
#   bash results/engine/device_session.sh h200pdl     # small_linear and PDL on the issue's device: their GPU tests and
#                                                     # parity, decode per token (gemv, pdl) = (0,0) (16,0) (16,1)
#                                                     # twice, both models, and the 1x4096 / 8x4096 decode kernels
#                                                     # with and without PDL (bench_kernels --pdl); then the profile's
#                                                     # models part (small_linear + PDL decode-graph rows):
#   kvlab profile --models qwen3-0.6b,llama3-8b --skip host,gemm,graphs,ragged,copy,vmm \
#       --merge results/profiles/nvidia-h200.parquet
# Session of 2026-12-06 (eleventh): a step's graph inputs packed into one copy, logits inside the full graphs.
# BASE: a tree of the commit before (git archive | tar into build/base, carried), run from there as "before":
#   bash results/engine/device_session.sh packed      # the engine's GPU tests, then profile_launch (qwen3-0.6b,
#                                                     # paged, synchronous: launch CPU time by step kind) before /
#                                                     # after / before / after, each in its own process
#   bash results/engine/device_session.sh packed2     # bench_latency (decode b1/b8, prefill and mixed steps with
#                                                     # and without graphs) before / after, qwen3-0.6b then llama3-8b
# The full graphs' tile map (KVLAB_TILE_MAP=1), run in the session of 2026-12-06 (fourteenth) at commit d13fa33 on an
# H100 (session_2026-12-06e/): no gain, removed after (this part needs that commit):
#   bash results/engine/device_session.sh tilemap     # its kernel tests and the engine's full-graph GPU tests with it
#                                                     # on, then kvlab profile's graphs part (a lone prompt through
#                                                     # full and piecewise graphs, both models) off / on / off / on
# Session of 2026-12-06 (fourteenth), after the tile map's removal (any GPU; ~400 s):
#   bash results/engine/device_session.sh pdlkernels  # decode attention at 1x4096 / 8x4096 / 64x4096 with and without
#                                                     # PDL (bench_kernels --pdl: never timed before) and the sweep's
#                                                     # decode tiles (E: 32-128 keys a loop step, 4-8 warps, 2-6 stages),
#                                                     # then every kernel test and the engine's full-graph/parity GPU tests
# Session of 2026-12-06 (fifteenth): candidate small_linear tiles from a sweep over every layer's weights, run at commit
# da6fe9e (the candidate; not adopted after, so this part needs that commit; session_2026-12-06f/):
#   bash results/engine/device_session.sh tiles       # small_linear + engine small-linear parity + sliding-window GPU
#                                                     # tests, then decode a token at batch 1 / 8 (small_linear + PDL),
#                                                     # new tiles / old tiles (build/small_linear_before.py) twice
# Session of 2026-12-07 (seventeenth): RoPE, the per-head norm and the K/V store in the qkv small_linear's epilogue
# (one kernel a layer fewer at batch 1-16). BASE: a tree of the commit before (git archive into build/base, carried):
#   bash results/engine/device_session.sh rope17      # small_linear/PDL/engine-parity GPU tests, bench_small_linear,
#                                                     # decode per token (small_linear + PDL) after / before twice,
#                                                     # then profile_step at batch 1 (small_linear + PDL), both models
# Outputs accumulate in $KVE (default /tmp/kve) on the machine; each part tars them into $OUT.
set -uo pipefail
part=${1:?tests or throughput}
out=${OUT:-/tmp/out}
runs=${KVE:-/tmp/kve}
mkdir -p "$out" "$runs"
# hydra, fastapi, uvicorn... are not on the device: install the wheels carried in .whl/ (see the
# wheel list in results/serving/README.md; `pip download` them here, gitignored) or stop before any run
if [ -d .whl ] && ! python3 -c "import hydra" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import hydra" 2>/dev/null || echo "WARNING: hydra is missing (carry .whl): kvlab run/validate-sim will fail"
{ date -u; hostname; nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader; lscpu | grep "Model name"; } \
    | tee -a "$runs/machine.txt"
tput() {  # MODEL TIMEOUT NAME [bench flags]: one paged bench throughput run into $runs/NAME, its table shown
    local m=$1 t=$2 name=$3
    shift 3
    timeout "$t" python3 -m experiments.cli bench throughput --models "$m" --no-hf --allocators paged "$@" \
        --out "$runs/$name" 2>&1 | tee "$runs/$name.log" | grep -v "^{" | tail -3
}
decode_rounds() {  # BEFORE_DIR ROUND2_BY LAT_S: decode a token at batch 1 / 8 (small_linear + PDL), after (this tree) /
    # before (BEFORE_DIR) alternately, two rounds (the second only if started by ROUND2_BY s), into $runs/latency_<side>_<r>
    local before=$1 by=${ROUND2_BY_S:-$2} lat=${LAT_S:-$3} r side dir
    for r in 1 2; do
        if (( r > 1 && SECONDS > by )); then echo "round $r: skipped (time)"; break; fi
        for side in after before; do
            dir=.; [ $side = before ] && dir=$before
            (cd "$dir" && timeout "$lat" python3 -m experiments.bench_latency --models llama3-8b,qwen3-0.6b --batches 1,8 \
                --prefill-tokens "" --fused-gemv-max-tokens 16 --enable-pdl 1 --steps 150 --out "$runs/latency_${side}_$r") \
                > "$runs/bench_latency_${side}_$r.log" 2>&1
            echo "== $side $r"; grep "| decode" "$runs/bench_latency_${side}_$r.log"
        done
    done
}
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
verify)
    timeout 370 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py tests/test_gpu_kv_axes.py \
        tests/test_kernels_triton.py tests/test_vmm_cuda.py 2>&1 | tee "$runs/gpu_tests.log" | tail -8
    timeout 170 python3 -m experiments.bench_prefill --out "$runs" --sweep --sweep-budget-s 75 \
        2>&1 | tee "$runs/bench_prefill.log" | grep -v "^sweep" | tail -16
    ;;
e2e)
    timeout 140 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_vmm_cuda.py tests/test_kernels_triton.py \
        "tests/test_gpu_kv_axes.py::test_fp8_kv_on_gpu_stays_close_to_bf16" -k "vmm or llama3 or graph or e5m2" \
        2>&1 | tee "$runs/gpu_tests_rest.log" | tail -4
    B="workload=sharegpt workload.num_requests=300 engine.kv_cache_tokens=40000 engine.max_model_len=2048 engine.max_num_seqs=256 engine.max_num_batched_tokens=8192 device=cuda report=false"
    timeout 70 python3 -m experiments.step_timing model=qwen3-0.6b allocator=paged $B mode=online \
        workload.request_rate=8 workload.num_requests=60 engine.cuda_graph_mode=full \
        --out "$runs/step_timing_qwen3-0.6b_paged_online8_full" 2>&1 | tail -6
    timeout 80 python3 -m experiments.cli bench throughput --models qwen3-0.6b --no-hf --allocators paged \
        --cuda-graph-mode full --out "$runs/throughput_qwen3-0.6b_full" 2>&1 | grep -v "^{" | tail -3
    for m in qwen3-0.6b llama3-8b; do
        timeout 100 python3 -m experiments.cli bench throughput --models $m --no-hf --allocators paged,virtual \
            --out "$runs/throughput_$m" 2>&1 | tee "$runs/throughput_$m.log" | grep -v "^{" | tail -4
    done
    ;;
measure)
    timeout 200 python3 -m experiments.bench_prefill --out "$runs" --sweep --sweep-budget-s 110 \
        2>&1 | tee "$runs/bench_prefill.log" | grep -v "^sweep" | tail -16
    B="workload=sharegpt workload.num_requests=300 engine.kv_cache_tokens=40000 engine.max_model_len=2048 engine.max_num_seqs=256 engine.max_num_batched_tokens=8192 device=cuda report=false"
    for mode in online8 offline; do
        extra=""
        [ $mode = online8 ] && extra="mode=online workload.request_rate=8 workload.num_requests=60"
        timeout 120 python3 -m experiments.step_timing model=qwen3-0.6b allocator=paged $B $extra \
            --out "$runs/step_timing_qwen3-0.6b_paged_$mode" 2>&1 | tail -6
    done
    for m in llama3-8b qwen3-0.6b; do
        for b in 1; do
            timeout 90 python3 -m experiments.profile_step --model $m --batch $b --prompt-len 512 \
                2>&1 | tee "$runs/profile_step_${m}_b$b.log" | head -22
        done
    done
    timeout 200 python3 -m experiments.cli bench throughput --models qwen3-0.6b --no-hf \
        --out "$runs/throughput_qwen3-0.6b_premap8" 2>&1 | tee "$runs/throughput_qwen3-0.6b_premap8.log" | grep "^|" | tail -5
    ;;
async7)  # (sched false: synchronous; the scripts' default was synchronous then)
    timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests/test_gpu_engine.py \
        2>&1 | tee "$runs/gpu_tests_engine.log" | tail -22
    for sched in false true; do
        sfx=$([ $sched = true ] && echo _async)
        timeout 90 python3 -m experiments.profile_step --model llama3-8b --batch 256 --prompt-len 800 \
            --async-scheduling $sched 2>&1 | tee "$runs/profile_step_llama3-8b_b256$sfx.log" | grep -v "^ " \
            | grep -iv "^-\|^name" | tail -12
    done
    for sched in false true; do tput llama3-8b 110 throughput_llama3-8b$([ $sched = true ] && echo _async) \
        --async-scheduling $sched; done
    ;;
latency7)
    timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=10 tests/test_gpu_kv_axes.py \
        tests/test_kernels_triton.py tests/test_vmm_cuda.py 2>&1 | tee "$runs/gpu_tests_rest.log" | tail -16
    timeout 170 python3 -m experiments.bench_latency --models qwen3-0.6b,llama3-8b --out "$runs" \
        2>&1 | tee "$runs/bench_latency.log" | grep -v "^{" | tail -40
    tput llama3-8b 110 throughput_llama3-8b_async --async-scheduling true
    for sched in false true; do tput qwen3-0.6b 60 throughput_qwen3-0.6b$([ $sched = true ] && echo _async) \
        --async-scheduling $sched; done
    ;;
auto7)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fused_ops.py 2>&1 | tee "$runs/fused_ops_tests.log" | tail -3
    timeout 250 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 tests/test_gpu_engine.py \
        tests/test_gpu_serving.py 2>&1 | tee "$runs/gpu_tests_engine_serving.log" | tail -12
    for m in llama3-8b qwen3-0.6b; do tput $m 110 throughput_$m; done  # default scheduling: auto (async)
    timeout 60 python3 -m experiments.profile_step --model llama3-8b --batch 256 --prompt-len 800 \
        2>&1 | tee "$runs/profile_step_llama3-8b_b256_auto.log" | grep -v "^ " | grep -iv "^-\|^name" | tail -8
    ;;
even)
    timeout 170 python3 -m experiments.bench_ragged --out "$runs/ragged" > "$runs/ragged.log" 2>&1
    echo "bench_ragged: exit $?"; tail -2 "$runs/ragged.log"
    timeout 120 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels_triton.py \
        tests/test_kernels_fp8_window.py 2>&1 | tee "$runs/gpu_tests_kernels.log" | tail -3
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 tests/test_gpu_engine.py \
        2>&1 | tee "$runs/gpu_tests_engine.log" | tail -8
    B="workload=sharegpt workload.num_requests=300 engine.kv_cache_tokens=40000 engine.max_model_len=2048"
    B="$B engine.max_num_seqs=256 engine.max_num_batched_tokens=8192 device=cuda report=false engine.async_scheduling=true"
    timeout 120 python3 -m experiments.cli validate-sim model=llama3-8b $B allocator=paged --rates 4,32 \
        --online-requests 50 --real-only --label llama3-8b-paged --out "$runs/llama3-8b-paged" \
        > "$runs/llama3-8b-paged.log" 2>&1; echo "llama3-8b paged real: exit $?"
    ;;
tma)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_prefill_tma.py 2>&1 \
        | tee "$runs/gpu_tests_tma.log" | tail -3
    cp -f "$runs/gpu_tests_tma.log" "$out/"
    timeout 300 python3 -m experiments.bench_prefill --out "$runs/prefill_tma" --sweep --sweep-budget-s ${SWEEP_S:-120} \
        2>&1 | tee "$runs/bench_prefill_tma.log" | grep -v "^sweep" | tail -30
    tar -czf "$out/prefill_tma.tgz" -C "$runs" prefill_tma bench_prefill_tma.log machine.txt
    ;;
prefill2)
    t0=$(date +%s)
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_kernels_prefill_tma.py \
        "tests/test_gpu_engine.py::test_prompt_attention_qkv_equals_cache_on_gpu" 2>&1 | tee "$out/gpu_tests_prefill2.log" | tail -4
    timeout 200 python3 -m experiments.bench_prompt_attention --models llama3-8b --out "$out/prompt_attention" \
        2>&1 | tee "$out/bench_prompt_attention.log" | grep -v "^{" | tail -16
    # decode at 1x4096 (latency-bound, 32.5% of copy): splits of fewer than 256 keys
    timeout 80 python3 -m experiments.bench_kernels --shapes 1x4096,8x4096 --sweep --sweep-budget-s 30 \
        --out "$runs/kernels_splits" > "$out/bench_kernels_splits.log" 2>&1
    grep -E "^sweep +1x4096|^\| 1x4096|^\| 8x4096" "$out/bench_kernels_splits.log" | tail -24
    left=$(( ${CALL_S:-580} - ($(date +%s) - t0) ))
    if (( left > 60 )); then
        timeout $left python3 -m experiments.bench_prefill --out "$runs/prefill_tma" --sweep \
            --sweep-budget-s $(( left > 200 ? 90 : left / 3 )) 2>&1 | tee "$out/bench_prefill.log" | grep -v "^sweep" | tail -30
    fi
    cp -f "$runs"/prefill_tma/*.csv "$runs"/kernels_splits/*.csv "$runs/machine.txt" "$out/" 2>/dev/null
    exit 0
    ;;
regress)  # most telling first: each file's log is in $OUT even if a timeout cuts the rest
    timeout ${MARKED_S:-330} python3 -m pytest -q -m gpu -p no:cacheprovider --durations=12 tests/test_penalties.py \
        tests/test_gpu_engine.py tests/test_gpu_serving.py tests/test_gpu_kv_axes.py tests/test_vmm_cuda.py \
        tests/test_gpu_host_tier.py 2>&1 | tee "$out/gpu_tests_marked.log" | tail -25
    timeout ${KERNELS_S:-150} python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels_triton.py \
        tests/test_kernels_prefill_tma.py tests/test_kernels_fp8_window.py tests/test_kernels_layers_copy.py \
        tests/test_fused_ops.py 2>&1 | tee "$out/gpu_tests_kernels.log" | tail -6
    exit 0
    ;;
gemv)
    timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider tests/test_small_linear.py tests/test_gpu_engine.py \
        -m "gpu or not gpu" -k "small_linear or parity" -rfE --tb=short 2>&1 | tee "$out/gpu_tests_gemv.log" | tail -4
    timeout ${LAYER_S:-90} python3 -m experiments.bench_small_linear --out "$out/small_linear" 2>&1 \
        | tee "$out/bench_small_linear.log"
    timeout ${LAT_S:-300} python3 -m experiments.bench_latency --models ${LAT_MODELS:-llama3-8b,qwen3-0.6b} --batches 1,8 \
        --prefill-tokens "" --fused-gemv-max-tokens 0,16,0,16,0,16 --steps 150 --out "$out/latency" 2>&1 \
        | tee "$out/bench_latency.log" | grep "| decode"
    exit 0
    ;;
pdl)
    timeout ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_small_linear.py \
        tests/test_gpu_engine.py -m "gpu or not gpu" -k "pdl or small_linear or parity" -rfE --tb=short 2>&1 \
        | tee "$out/gpu_tests_pdl.log" | tail -6
    timeout ${LAYER_S:-100} python3 -m experiments.bench_small_linear --batches 1,8 --out "$out/small_linear" 2>&1 \
        | tee "$out/bench_small_linear.log"
    timeout ${LAT_S:-240} python3 -m experiments.bench_latency --models ${LAT_MODELS:-llama3-8b,qwen3-0.6b} --batches 1,8 \
        --prefill-tokens "" --fused-gemv-max-tokens 0,16,16,0,16,16 --enable-pdl 0,0,1,0,0,1 --steps 150 \
        --out "$out/latency" 2>&1 | tee "$out/bench_latency.log" | grep "| decode"
    for knob in KVLAB_PDL_PREFETCH_MB=0 KVLAB_PDL_TRIGGER=wait; do
        env $knob timeout ${KNOB_S:-90} python3 -m experiments.bench_latency --models ${LAT_MODELS:-llama3-8b,qwen3-0.6b} \
            --batches 1,8 --prefill-tokens "" --fused-gemv-max-tokens 16 --enable-pdl 1 --steps 150 \
            --out "$out/latency_${knob%%=*}" 2>&1 | tee "$out/bench_latency_${knob%%=*}.log" | grep "| decode"
    done
    exit 0
    ;;
pdl2)
    timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_gpu_engine.py \
        -m "gpu or not gpu" -k "pdl" -rfE --tb=short 2>&1 | tee "$out/gpu_tests_pdl.log" | tail -4
    timeout ${LAYER_S:-100} python3 -m experiments.bench_small_linear --batches 1,8 --out "$out/small_linear" 2>&1 \
        | tee "$out/bench_small_linear.log"
    timeout ${LAT_S:-240} python3 -m experiments.bench_latency --models ${LAT_MODELS:-llama3-8b,qwen3-0.6b} --batches 1,8 \
        --prefill-tokens "" --fused-gemv-max-tokens 0,16,16,0,0,16,16,0 --enable-pdl 0,0,1,1,0,0,1,1 --steps 150 \
        --out "$out/latency" 2>&1 | tee "$out/bench_latency.log" | grep "| decode"
    KVLAB_PDL_PREFETCH_MB=0 timeout ${KNOB_S:-90} python3 -m experiments.bench_latency --models ${LAT_MODELS:-llama3-8b,qwen3-0.6b} \
        --batches 1,8 --prefill-tokens "" --fused-gemv-max-tokens 16 --enable-pdl 1 --steps 150 \
        --out "$out/latency_no_prefetch" 2>&1 | tee "$out/bench_latency_no_prefetch.log" | grep "| decode"
    exit 0
    ;;
pdl3)
    timeout ${TESTS_S:-120} python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_gpu_engine.py \
        -m gpu -k "chain or small-linear-pdl" -rfE --tb=short 2>&1 | tee "$out/gpu_tests_pdl.log" | tail -4
    timeout ${LAT_S:-240} python3 -m experiments.bench_latency --models ${LAT_MODELS:-llama3-8b,qwen3-0.6b} --batches 1,8 \
        --prefill-tokens "" --fused-gemv-max-tokens 16,16,16,16,16,16 --enable-pdl 0,1,0,1,0,1 --steps 150 \
        --out "$out/latency" 2>&1 | tee "$out/bench_latency.log" | grep "| decode"
    exit 0
    ;;
pdl4)
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
        timeout ${TESTS_S:-120} python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_gpu_engine.py \
            -m gpu -k "chain or small-linear" -rfE --tb=short 2>&1 | tee "$out/gpu_tests_pdl_h200.log" | tail -4
        timeout ${LAT_S:-240} python3 -m experiments.bench_latency --models llama3-8b,qwen3-0.6b --batches 1,8 \
            --prefill-tokens "" --fused-gemv-max-tokens 0,16,16,0,16,16 --enable-pdl 0,0,1,0,0,1 --steps 150 \
            --out "$out/latency_h200" 2>&1 | tee "$out/bench_latency_h200.log" | grep "| decode"
    else
        for v in off on; do
            timeout ${TPUT_S:-170} python3 -m experiments.cli bench throughput --models llama3-8b --no-hf \
                --allocators paged $([ $v = on ] && echo --enable-pdl) --out "$out/throughput_pdl_$v" 2>&1 \
                | tee "$out/throughput_pdl_$v.log" | grep -v "^{" | tail -3
        done
    fi
    exit 0
    ;;
h200pdl)
    timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_gpu_engine.py \
        -m gpu -k "chain or small-linear or pdl" -rfE --tb=short 2>&1 | tee "$out/gpu_tests_pdl.log" | tail -4
    timeout ${LAT_S:-240} python3 -m experiments.bench_latency --models llama3-8b,qwen3-0.6b --batches 1,8 \
        --prefill-tokens "" --fused-gemv-max-tokens 0,16,16,0,16,16 --enable-pdl 0,0,1,0,0,1 --steps 150 \
        --out "$out/latency" 2>&1 | tee "$out/bench_latency.log" | grep "| decode"
    timeout ${KERNELS_S:-120} python3 -m experiments.bench_kernels --pdl --shapes 1x4096,8x4096 --out "$out/kernels_pdl" \
        2>&1 | tee "$out/bench_kernels_pdl.log" | grep "x4096"
    exit 0
    ;;
regress2)
    timeout ${KERNELS_S:-150} python3 -m experiments.bench_kernels --out "$out/kernels" 2>&1 \
        | tee "$out/bench_kernels.log" | tail -12
    timeout ${TPUT_S:-420} python3 -m experiments.cli bench throughput --models ${TPUT_MODELS:-llama3-8b} \
        --out "$out/throughput" 2>&1 | tee "$out/throughput.log" | grep -v "^{" | tail -14
    exit 0
    ;;
packed)
    timeout ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_engine.py -rfE --tb=short \
        2>&1 | tee "$out/gpu_tests_engine.log" | tail -6
    for r in 1 2; do
        for side in before after; do
            dir=.; [ $side = before ] && dir=${BASE:-build/base}
            (cd "$dir" && timeout ${LAUNCH_S:-150} python3 -m experiments.profile_launch model=qwen3-0.6b allocator=paged \
                --steps ${STEPS:-300}) > "$out/profile_launch_${side}_$r.log" 2>&1
            echo "== $side $r"; grep -A3 "^median ms" "$out/profile_launch_${side}_$r.log"
        done
    done
    exit 0
    ;;
packed2)
    for m in ${LAT_MODELS:-qwen3-0.6b llama3-8b}; do
        for side in before after; do
            dir=.; [ $side = before ] && dir=${BASE:-build/base}
            (cd "$dir" && timeout ${LAT_S:-150} python3 -m experiments.bench_latency --models $m --out "$out/latency_$side") \
                > "$out/bench_latency_${m}_$side.log" 2>&1
            echo "== $m $side"; grep "^|" "$out/bench_latency_${m}_$side.log" | tail -16
        done
    done
    exit 0
    ;;
tilemap)
    timeout ${TESTS_S:-90} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
        -k "tile_map or tile_owners or trailing" -rfE --tb=short 2>&1 | tee "$out/gpu_tests_tilemap.log" | tail -2
    KVLAB_TILE_MAP=1 timeout ${ENGINE_S:-200} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_engine.py \
        -k "full" -rfE --tb=short 2>&1 | tee -a "$out/gpu_tests_tilemap.log" | tail -2
    for r in 1 2; do
        for on in 0 1; do
            KVLAB_TILE_MAP=$on timeout ${PROFILE_S:-120} python3 -m experiments.cli profile --models qwen3-0.6b,llama3-8b \
                --skip host,gemm,models,ragged,copy,vmm --out "$out/graphs_tilemap${on}_$r.parquet" \
                > "$out/profile_graphs_tilemap${on}_$r.log" 2>&1
            python3 -c "
import pandas as pd; d = pd.read_parquet('$out/graphs_tilemap${on}_$r.parquet')
print('KVLAB_TILE_MAP=$on run $r'); print(d[d.table.str.endswith('forward')].pivot_table(index='query', columns=['model', 'table'], values='value').mul(1e3).round(3).to_string())"
        done
    done
    exit 0
    ;;
prompt)
    timeout 240 python3 -m experiments.bench_prefill --out "$runs/prefill_prompt" --sweep --sweep-budget-s ${SWEEP_S:-90} \
        2>&1 | tee "$runs/bench_prefill.log" | grep -v "^sweep" | tail -30
    ;;
order)
    timeout 150 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels_triton.py \
        2>&1 | tee "$runs/gpu_tests_kernels.log" | tail -3
    timeout 360 python3 -m experiments.bench_ragged --sweep-models none --out "$runs/ragged_order" \
        > "$runs/ragged_order.log" 2>&1
    echo "bench_ragged: exit $?"; sed -n '/^Each cell: default/,$p' "$runs/ragged_order.log"
    ;;
order2)
    t0=$(date +%s)
    timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 tests/test_gpu_engine.py \
        -k "longest_first or async_scheduling_equals" 2>&1 | tee "$out/gpu_tests_engine.log" | tail -6
    for m in llama3-8b qwen3-0.6b; do
        for v in before after; do
            if (( $(date +%s) - t0 > ${BUDGET_S:-480} )); then echo "$m $v: skipped (time)"; continue; fi
            env=$([ $v = after ] && echo KVLAB_SEQ_MAJOR_MIN_SEQS=128)
            env $env timeout 110 python3 -m experiments.cli bench throughput --models $m --no-hf --allocators paged \
                --out "$out/throughput_${m}_$v" > "$out/throughput_${m}_$v.log" 2>&1
            echo "$m $v: exit $? at $(( $(date +%s) - t0 )) s"; grep -v "^{" "$out/throughput_${m}_$v.log" | tail -2 | cut -c1-260
        done
    done
    ;;
graphs8k)
    B="workload=sharegpt workload.num_requests=300 engine.kv_cache_tokens=40000 engine.max_model_len=2048 engine.max_num_seqs=256 engine.max_num_batched_tokens=8192 device=cuda report=false progress=false mode=offline workload.request_rate=inf allocator=paged engine.async_scheduling=true"
    mkdir -p "$runs/g8k"
    for m in qwen3-0.6b qwen3-0.6b llama3-8b; do
        for g in 2048 8192; do
            i=$(ls -d "$runs"/g8k/$m-g$g-* 2>/dev/null | wc -l)
            d="$runs/g8k/$m-g$g-$i"
            timeout 200 python3 -m experiments.cli run model=$m $B engine.cuda_graph_max_tokens=$g hydra.run.dir="$d" >"$d.log" 2>&1
            echo "$m graphs up to $g (run $i): exit $?"; grep -h "captured\|graphs" "$d.log" "$d/run.log" 2>/dev/null | tail -2
        done
    done
    python3 - "$runs/g8k" <<'PY' | tee "$runs/g8k/summary.txt"
import sys, json, pathlib
import pandas as pd
for d in sorted(p for p in pathlib.Path(sys.argv[1]).iterdir() if p.is_dir()):
    if not (d / "summary.json").exists():
        print(d.name, "no summary"); continue
    sm = json.loads((d / "summary.json").read_text())
    s = pd.read_parquet(d / "steps.parquet")
    big = s[s.prefill_tokens > 2048]
    print(f"{d.name}: output tok/s {sm['output_throughput']:.0f}, mean TTFT {sm['mean_ttft_ms']:.1f} ms, mean TPOT "
          f"{sm['mean_tpot_ms']:.3f} ms, wall {sm['wall_time_s']:.1f} s; steps > 2048 tokens: {len(big)}, "
          f"duration {big.duration.mean() * 1e3:.2f} ms, launch {big.launch_s.mean() * 1e3:.2f} ms, "
          f"host {big.host_s.mean() * 1e3:.2f} ms")
PY
    nvidia-smi --query-gpu=uuid --format=csv,noheader >"$runs/g8k/machine.txt"
    tar -czf "$out/graphs8k.tgz" -C "$runs" g8k
    ;;
warmgemm)
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py -k "lazily or graphs_equal or async_scheduling_equals" \
        2>&1 | tee "$out/gpu_tests_warmgemm.log" | tail -3
    for x in "qwen3-0.6b 2048 --no-warm-gemms" "qwen3-0.6b 2048" "llama3-8b 8192"; do
        set -- $x
        timeout 150 python3 -m experiments.profile_wave model=$1 allocator=paged engine.async_scheduling=true \
            engine.cuda_graph_max_tokens=$2 progress=false ${3:-} 2>&1 | grep -v USDT >"$out/wave_$1_g$2${3:+_cold}.log"
        echo "== $1 graphs up to $2 ${3:-(warm GEMMs)}: exit $?"
        grep -h -A7 "^wave1\|^wave3" "$out/wave_$1_g$2${3:+_cold}.log"; grep -h "lazy loading" "$out/wave_$1_g$2${3:+_cold}.log"
    done
    ;;
newkv)
    timeout 150 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels_triton.py \
        tests/test_kernels_fp8_window.py tests/test_fused_ops.py 2>&1 | tee "$runs/gpu_tests_kernels.log" | tail -3
    timeout 200 python3 -m experiments.bench_prefill --out "$runs/prefill" --sweep --sweep-budget-s ${SWEEP_S:-60} \
        2>&1 | tee "$runs/bench_prefill.log" | grep -v "^sweep" | tail -30
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 tests/test_gpu_engine.py \
        2>&1 | tee "$runs/gpu_tests_engine.log" | tail -8
    ;;
pdlkernels)
    timeout ${BENCH_S:-200} python3 -m experiments.bench_kernels --pdl --shapes 1x4096,8x4096,64x4096 --sweep --sweep-budget-s ${SWEEP_S:-80} \
        --out "$runs/kernels_pdl" 2>&1 | tee "$runs/bench_kernels_pdl.log" | tail -45
    timeout ${TESTS_S:-200} python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels_triton.py -rfE \
        --tb=short 2>&1 | tee "$runs/gpu_tests_kernels.log" | tail -3
    timeout ${ENGINE_S:-180} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py -k "full or parity" -rfE \
        --tb=short 2>&1 | tee "$runs/gpu_tests_engine.log" | tail -3
    ;;
tiles)  # small_linear's tiles from the fifteenth session's sweep: before (build/small_linear_before.py, carried) / after
    timeout ${TESTS_S:-60} python3 -m pytest -q -p no:cacheprovider tests/test_small_linear.py -rfE --tb=short 2>&1 \
        | tee "$runs/gpu_tests_small_linear.log" | tail -2
    timeout ${ENGINE_S:-120} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py tests/test_gpu_kv_axes.py -m gpu \
        -k "small-linear or sliding_window" -rfE --tb=short 2>&1 | tee "$runs/gpu_tests_tiles.log" | tail -2
    rm -rf /tmp/before && mkdir -p /tmp/before && cp -r engine kernels experiments conf allocators /tmp/before/
    cp build/small_linear_before.py /tmp/before/kernels/small_linear.py
    decode_rounds /tmp/before 330 130
    ;;
rope17)  # RoPE + KV store in the qkv small_linear's epilogue: its tests on the GPU, the layer table, then decode a
    # token at batch 1 / 8 (small_linear + PDL) after / before (BASE: the commit before, git archive'd, carried) twice
    timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/test_small_linear.py tests/test_small_linear_rope.py tests/test_pdl.py \
        tests/test_gpu_engine.py tests/test_gpu_kv_axes.py -m gpu -k "small or pdl or chain or parity or sliding_window" \
        -rfE --tb=short 2>&1 | tee "$runs/gpu_tests_rope17.log" | tail -3
    timeout ${LAYER_S:-90} python3 -m experiments.bench_small_linear --out "$runs/small_linear" 2>&1 \
        | tee "$runs/bench_small_linear.log" | tail -8
    decode_rounds "${BASE:-build/base}" 380 110
    for m in qwen3-0.6b llama3-8b; do  # where a batch-1 step goes now (the last profile is 2026-12-02's, cuBLAS, no PDL)
        if (( SECONDS > ${PROFILE_BY_S:-470} )); then echo "profile $m: skipped (time)"; continue; fi
        timeout ${PROF_S:-70} python3 -m experiments.profile_step --model $m --batch 1 --fused-gemv-max-tokens 16 --enable-pdl \
            > "$runs/profile_step_${m}_b1.log" 2>&1
        grep -E "step|_kernel|nvjet" "$runs/profile_step_${m}_b1.log" | cut -c1-60,100-200 | head -14
    done
    ;;
esac
tar -czf "$out/kve-$part.tgz" -C "$runs" .
ls -la "$out"
