#!/usr/bin/env bash
# The H200 measurements behind results/profiles/nvidia-h200.parquet and results/sim_validation,
# made on ONE machine in consecutive device calls (the profile's host table and the real runs
# must see the same CPU: eager steps are host-bound). Run from the repository root:
#   bash results/sim_validation/device_session.sh profile   # kvlab profile + qwen3-0.6b real runs + GPU tests
#   bash results/sim_validation/device_session.sh llama     # llama3-8b real runs + qwen3-0.6b second real runs
#   bash results/sim_validation/device_session.sh final     # llama3-8b host steps (merged into the profile),
#                                                           # a late-compile diagnosis run, GPU tests
# After piecewise CUDA graphs (prefill/mixed steps), the profile's model and host tables again, then
# the real runs of both models (each part stops starting runs near the call's limit; a later part
# on the same machine resumes where it stopped):
#   bash results/sim_validation/device_session.sh reprofile # model + host tables of both models (merged),
#                                                           # then qwen3-0.6b real runs
#   bash results/sim_validation/device_session.sh virtual   # virtual real runs with premap + qwen3-0.6b paged vs virtual
#   bash results/sim_validation/device_session.sh reruns    # (the model tables, had reprofile stopped there),
#                                                           # llama3-8b real runs
# Prepared (session of 2026-12-02, fifth), not run yet: full graphs for mixed steps
#   bash results/sim_validation/device_session.sh fullgraphs # model tables again (piecewise_forward and the new
#                                                           # full_forward), merged; qwen3-0.6b real runs with
#                                                           # engine.cuda_graph_mode=full
# Session of 2026-12-02 (sixth): full graphs the engine's default (cuda_graph_mode=full); a fresh
# machine may answer each call, so each part stands alone (ALLOCS: the allocators of its real runs)
#   bash results/sim_validation/device_session.sh full1     # model + host tables of both models (merged),
#                                                           # then qwen3-0.6b real runs
#   ALLOCS="..." bash results/sim_validation/device_session.sh full2  # llama3-8b real runs, then qwen3-0.6b
#                                                           # ones full1 left (QWEN_ALLOCS)
#   bash results/sim_validation/device_session.sh repeats   # more real runs of the same configs beside the
#                                                           # committed ones (QWEN_REPS, LLAMA_REPS in all)
# Session of 2026-12-02 (eighth): the asynchronous engine (engine.async_scheduling=true, the engine's
# default on one GPU since the seventh session), its real runs under async/ (SUB)
#   BUDGET_S=430 bash results/sim_validation/device_session.sh async1  # GPU tests of the RoPE + cache-store
#                                                           # kernel (fused ops, engine), the model tables of
#                                                           # both models again (merged), qwen3-0.6b async runs
#   ALLOCS=... QWEN_ALLOCS=... bash results/sim_validation/device_session.sh async2  # llama3-8b async runs,
#                                                           # then the qwen3-0.6b ones async1 left
# Session of 2026-12-03: async1's outputs were lost with the eighth session, so async1 again
# (ENGINE_TESTS=0: the engine's GPU tests passed there and run in the last call instead), then async2
# Session of 2026-12-03: async1 again (its outputs were lost), async2 twice (llama3-8b paged and
# contiguous; then the virtual runs after the unmap fence). Prepared, not run yet: simulate's host
# part of asynchronous steps from the profile's asynchronous steps (--host-scheduling async)
#   BUDGET_S=300 bash results/sim_validation/device_session.sh asynchost  # the engine's async GPU tests,
#                                                           # async host steps of both models (merged),
#                                                           # then qwen3-0.6b async runs
#   ALLOCS=... QWEN_ALLOCS=... bash results/sim_validation/device_session.sh async2  # then as above
# Session of 2026-12-03 (second): `ragged` = experiments.bench_ragged (decode attention of ragged
# batches against uniform ones of the same mean), then async2
# Session of 2026-12-03 (third): the profile's model tables for the even-split kernel, its new ragged
# tables (kernel and whole decode steps), the cost model's check against the latter, then the async runs
#   BUDGET_S=... bash results/sim_validation/device_session.sh ragged1  # model + ragged tables (merged),
#                                                           # bench_ragged --check, qwen3-0.6b async runs
#   ALLOCS=... QWEN_ALLOCS=... bash results/sim_validation/device_session.sh async2  # as above
# Session of 2026-12-03 (fourth): the profile's host steps again, both schedulings (each step's longest
# context recorded now, so that the cost model can take the ragged term out of them), one call each
#   SCHED=async bash results/sim_validation/device_session.sh host   # merged onto the committed profile
#   SCHED=sync bash results/sim_validation/device_session.sh host    # merged onto the first call's
#   HOST_ADD=1 SCHED=async bash results/sim_validation/device_session.sh host  # a second run of the
#                                                           # asynchronous steps, pooled with the first
#   BUDGET_S=420 bash results/sim_validation/device_session.sh sync  # the synchronous real runs of the
#       six configurations for the engine with even splits (replacing the committed ones)
#   MODEL=qwen3-0.6b bash results/sim_validation/device_session.sh syncsame  # sync host steps + real runs on one
#       machine (then MODEL=llama3-8b); simulate with sim.profile=<its merged profile>
#   BUDGET_S=... bash results/sim_validation/device_session.sh syncboth  # syncsame's host steps of both models, then
#       the six configurations' real runs; again on the same machine to finish the runs (session of 2026-12-04)
#   bash results/sim_validation/device_session.sh syncdiag  # the profile's sync host steps against validate-sim's
#       real engine on one machine (llama3-8b)
#   BUDGET_S=330 bash results/sim_validation/device_session.sh asyncrepeats  # a second real run of every
#                                                           # async configuration (real-2/), on another machine
# Session of 2026-12-04 (second), at commit 510eb57 (real runs then started after measure.clock_warmup_s, 0.5 s of
# device work; the key was removed after clockdiag showed it made no difference, so clockdiag no longer runs):
#   bash results/sim_validation/device_session.sh clockdiag  # qwen3-0.6b paged offline async, without and with
#       the clock warm-up, twice each alternately: first steps and mean TTFT; the warm-up's GPU test
#   QWEN_REPS=3 LLAMA_REPS=3 BUDGET_S=420 bash results/sim_validation/device_session.sh asyncrepeats  # real-3/
# Session of 2026-12-04 (third): prefill/mixed graphs up to 8,192 tokens the default (cuda_graph_max_tokens)
#   BUDGET_S=... bash results/sim_validation/device_session.sh graphs8k  # the engine's GPU tests of the warm-up and
#       the graphs, the profile's graph tables (full_forward to 8,192 tokens, merged), then asynchronous real runs
#       of the six configurations in fresh folders (ALLOCS / LLAMA_ALLOCS: which; RUN_MODELS: which models)
#   bash results/sim_validation/device_session.sh graphs8k2  # qwen3-0.6b's asynchronous host steps with the new
#       default (merged onto the graph tables' profile), the llama3-8b async runs graphs8k left, the lazy-load
#       GPU test in the validation's config; each part archived into $OUT as it ends
#   QWEN_REPS=2 LLAMA_REPS=2 BUDGET_S=... bash results/sim_validation/device_session.sh graphs8k3  # a second
#       asynchronous real run of each configuration in the committed async/ folders (graphs to 8,192), then the
#       lazy-load GPU test again (default engine, and graphs to 2048 without and with the warm-up's GEMMs)
# Prepared for the next session (not run yet): the synchronous table for the engine with graphs to 8,192 tokens.
# Real runs of the six configurations in fresh folders, archived into $OUT/runs.tgz after each one
# (ARCHIVE_EACH=1), then the synchronous host steps of both models on the same machine if time is left:
#   ARCHIVE_EACH=1 BUDGET_S=420 bash results/sim_validation/device_session.sh sync
#   SCHED=sync bash results/sim_validation/device_session.sh host  # (a second call, same machine: ~250 s;
#       the profile's trickle of single prompts now reaches 1,024 tokens: TRICKLE_MAX_PROMPT)
# Prepared (session of 2026-12-05, third), not run yet: does the profile's launch timer slow the steps it times?
#   bash results/sim_validation/device_session.sh timerdiag  # qwen3-0.6b paged: a real run at 8 req/s, then the
#       profile's synchronous host steps four times, without and with the timer's CUDA events alternately
#       (logs/timerdiag/diag.py; ~3 min). kvlab profile's host steps run without the events since that session.
# Session of 2026-12-06 (twelfth): the engine with one copy a step into its CUDA graphs (0160c2e), on one machine
# in two consecutive calls: the graph tables and the asynchronous host steps of both models (merged onto the
# committed profile), then the six configurations' asynchronous real runs in fresh folders under async/
#   bash results/sim_validation/device_session.sh onecopy1   # graph tables, qwen3-0.6b's async host steps, then runs
#   bash results/sim_validation/device_session.sh onecopy2   # the runs onecopy1 left (RESUME), then llama3-8b's
#                                                           # async host steps if the call has time
#   bash results/sim_validation/device_session.sh h100qwen   # (no H200 lent) qwen3-0.6b on an H100: profile + runs
# Session of 2026-12-06 (thirteenth): llama3-8b on an H100 beside the committed qwen3-0.6b (one machine, consecutive calls)
#   bash results/sim_validation/device_session.sh h100llama  # llama3-8b's tables + async host steps merged onto
#                                                           # results/profiles/nvidia-h100.parquet, then its runs (RESUME)
#   bash results/sim_validation/device_session.sh h100sync   # qwen3-0.6b's sync host steps (merged), its sync runs (h100/sync/)
# Runs accumulate in $KVSV (default /tmp/kvsv) on the machine; each part tars them into $OUT.
set -uo pipefail
part=${1:?profile or llama}
out=${OUT:-/tmp/out}
runs=${KVSV:-/tmp/kvsv}
mkdir -p "$out" "$runs"
# hydra, fastapi, uvicorn... are not on the device: install the wheels carried in .whl/ (see the
# wheel list in results/serving/README.md; `pip download` them here, gitignored) or stop before any run
if [ -d .whl ] && ! python3 -c "import hydra" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import hydra" 2>/dev/null || echo "WARNING: hydra is missing (carry .whl): kvlab run/validate-sim will fail"
kv() { python3 -m experiments.cli "$@"; }
B="workload=sharegpt workload.num_requests=300 engine.kv_cache_tokens=40000 engine.max_model_len=2048 engine.max_num_seqs=256 engine.max_num_batched_tokens=8192 device=cuda report=false"
{ date -u; hostname; nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader; lscpu | grep "Model name"; } \
    | tee -a "$runs/machine.txt"
t_start=$(date +%s); t0_call=$t_start
# the GPU's clocks, temperature and power once a second: a slow run can then be told from a slow GPU
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu \
    --format=csv,noheader -l 1 >>"$runs/clocks.csv" 2>/dev/null &
trap 'kill %1 2>/dev/null' EXIT
budget=${BUDGET_S:-100000}  # start no run after this many seconds of the part
real() {  # model rates online-requests repeats
    local m=$1 rates=$2 n=$3 reps=$4
    for a in ${ALLOCS:-paged contiguous virtual}; do
        if [ -n "${RESUME:-}" ] && [ -d "$runs/${SUB:-}$m-$a/real/online-${rates#*,}rps" ]; then echo "$m $a: done before"; continue; fi
        if (( $(date +%s) - t_start > budget )); then echo "$m $a: skipped (time)"; continue; fi
        kv validate-sim model=$m $B allocator=$a --rates $rates --online-requests $n --real-only \
            --real-repeats $reps --label $m-$a --out "$runs/${SUB:-}$m-$a" >>"$runs/${SUB:-}$m-$a.log" 2>&1
        echo "$m $a: exit $? at $(( $(date +%s) - t_start )) s"; grep -h "^\[" "$runs/${SUB:-}$m-$a.log" | tail -2
        if [ -n "${ARCHIVE_EACH:-}" ]; then  # a call cut off by its time limit still returns what ran
            tar -czf "$out/runs.tgz.part" -C "$runs" --exclude='.*.tmp' $(cd "$runs" && ls -d ${SUB:-}*-*/real* ${SUB:-}*.log machine.txt 2>/dev/null) \
                && mv "$out/runs.tgz.part" "$out/runs.tgz"  # a cut-off tar leaves the last good one
        fi
    done
}
case $part in
profile)
    kv profile --models qwen3-0.6b,llama3-8b --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile.log"
    real qwen3-0.6b 8,96 60 1
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_triton.py tests/test_vmm_cuda.py \
        tests/test_gpu_engine.py tests/test_gpu_serving.py 2>&1 | tee "$runs/gpu_tests.log" | tail -15
    ;;
llama)
    real llama3-8b 4,32 50 1
    real qwen3-0.6b 8,96 60 2   # resumes run 1, adds run 2
    ;;
final)
    kv validate-sim model=qwen3-0.6b $B allocator=paged --rates 8 --online-requests 60 --no-offline --real-only \
        --label diag --out "$runs/diag" >"$runs/diag.log" 2>&1; echo "diag: exit $?"
    kv profile --models qwen3-0.6b,llama3-8b --host-model llama3-8b --skip gemm,models,graphs,copy,vmm \
        --merge results/profiles/nvidia-h200.parquet --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_host_llama.log"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_triton.py tests/test_vmm_cuda.py \
        tests/test_gpu_engine.py tests/test_gpu_serving.py 2>&1 | tee "$runs/gpu_tests_final.log" | tail -15
    ;;
reprofile)
    kv profile --models qwen3-0.6b,llama3-8b --host-model qwen3-0.6b,llama3-8b --skip gemm,copy,vmm \
        --merge results/profiles/nvidia-h200.parquet --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile.log"
    real qwen3-0.6b 8,96 60 1
    ;;
reruns)  # after a reprofile cut short: the model tables merged onto its partial profile
    if [ -f results/profiles/nvidia-h200.partial.parquet ]; then
        kv profile --models qwen3-0.6b,llama3-8b --skip host,gemm,copy,vmm \
            --merge results/profiles/nvidia-h200.partial.parquet --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_models.log"
    fi
    real llama3-8b 4,32 50 1
    ;;
virtual)  # after pre-mapping empty slots (allocator.args.premap): the virtual real runs again, and
          # qwen3-0.6b's offline throughput, paged against virtual
    for m in ${VIRTUAL_MODELS:-qwen3-0.6b llama3-8b}; do
        if [ "$m" = qwen3-0.6b ]; then set -- $m 8,96 60; else set -- $m 4,32 50; fi
        kv validate-sim model=$1 $B allocator=virtual --rates $2 --online-requests $3 --real-only \
            --label $1-virtual --out "$runs/$1-virtual" >>"$runs/$1-virtual.log" 2>&1
        echo "$1 virtual: exit $?"
    done
    timeout 150 python3 -m experiments.cli bench throughput --models qwen3-0.6b --allocators paged,virtual --no-hf \
        --out "$runs/throughput" 2>&1 | tee "$runs/throughput_qwen3-0.6b.log" | grep "^|" | tail -4
    ;;
fullgraphs)
    kv profile --models qwen3-0.6b,llama3-8b --skip host,gemm,copy,vmm \
        --merge results/profiles/nvidia-h200.parquet --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_models.log"
    B="$B engine.cuda_graph_mode=full"
    real qwen3-0.6b 8,96 60 1
    ;;
full1)
    kv profile --models qwen3-0.6b,llama3-8b --host-model qwen3-0.6b,llama3-8b --skip gemm,copy,vmm \
        --host-repeats ${HOST_REPEATS:-1} \
        --merge results/profiles/nvidia-h200.parquet --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile.log"
    real qwen3-0.6b 8,96 60 1
    ;;
repeats)  # in the committed folders: validate-sim keeps run 1 (same config) and adds the others
    meta=$runs runs=results/sim_validation
    B="$B engine.cuda_graph_max_tokens=2048"  # the committed synchronous runs' engine (the default until 2026-12-04)
    real qwen3-0.6b 8,96 60 ${QWEN_REPS:-3}
    real llama3-8b 4,32 50 ${LLAMA_REPS:-2}
    # every run folder: real/ and the repeats' real-2/, real-3/ ... (a listing of */real lost them once)
    kill %1 2>/dev/null; wait 2>/dev/null  # clocks.csv complete before it is archived
    cp "$meta/machine.txt" "$meta/clocks.csv" "$runs/" 2>/dev/null
    tar -czf "$out/repeats.tgz" -C "$runs" $(cd "$runs" && ls -d */real* *.log machine.txt clocks.csv 2>/dev/null)
    tar -tzf "$out/repeats.tgz" | grep -c "summary.json" | sed 's/^/summaries archived: /'
    exit 0
    ;;
async1)
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_fused_ops.py 2>&1 | tee "$runs/fused_ops_tests.log" | tail -3
    if [ "${ENGINE_TESTS:-1}" = 1 ]; then
        timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=6 tests/test_gpu_engine.py \
            2>&1 | tee "$runs/gpu_tests_engine.log" | tail -10
    fi
    t_start=$(date +%s)  # the budget counts from here
    kv profile --models qwen3-0.6b,llama3-8b --skip host,gemm,copy,vmm \
        --merge results/profiles/nvidia-h200.parquet --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_models.log"
    mkdir -p "$runs/async"; B="$B engine.async_scheduling=true" SUB=async/ real qwen3-0.6b 8,96 60 1
    ;;
ragged1)
    t_start=$(date +%s)
    kv profile --models qwen3-0.6b,llama3-8b --skip host,gemm,copy,vmm \
        --merge results/profiles/nvidia-h200.parquet --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_models.log"
    python3 -m experiments.bench_ragged --check "$runs/nvidia-h200.parquet" > "$runs/ragged_check.md" 2>&1
    tail -3 "$runs/ragged_check.md"
    t_start=$(date +%s)  # the budget counts from here
    mkdir -p "$runs/async"; B="$B engine.async_scheduling=true" SUB=async/ real qwen3-0.6b 8,96 60 1
    ;;
asynchost)
    # the fence's GPU path after review (events of steps that sample nothing, undo, staging)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py -k async \
        2>&1 | tee "$runs/gpu_tests_async.log" | tail -4
    t_start=$(date +%s)  # the budget counts from here
    kv profile --models qwen3-0.6b,llama3-8b --host-model qwen3-0.6b,llama3-8b --host-scheduling async \
        --skip gemm,models,graphs,copy,vmm --merge results/profiles/nvidia-h200.parquet \
        --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_host_async.log"
    mkdir -p "$runs/async"; B="$B engine.async_scheduling=true" SUB=async/ real qwen3-0.6b 8,96 60 1
    ;;
clockdiag)
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_protocol.py -k clock 2>&1 | tail -2
    for i in 1 2; do
        for w in 0 0.5; do
            kv run model=qwen3-0.6b $B allocator=paged engine.async_scheduling=true mode=offline workload.request_rate=inf \
                measure.clock_warmup_s=$w progress=false hydra.run.dir="$runs/clockdiag/w$w-$i" >"$runs/clockdiag-w$w-$i.log" 2>&1
            echo "warm-up $w s, run $i: exit $?"
        done
    done
    python3 - "$runs/clockdiag" <<'PY' | tee "$runs/clockdiag.txt"
import sys, json, pathlib
import pandas as pd
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    q, s = pd.read_parquet(d / "requests.parquet"), pd.read_parquet(d / "steps.parquet")
    print(d.name, "mean TTFT %.1f ms" % (q.ttft.mean() * 1e3), "first 6 steps ms", (s.duration.head(6) * 1e3).round(1).tolist(),
          "decode median %.3f ms" % (s[s.prefill_tokens == 0].duration.median() * 1e3),
          "clock_warmup_s", json.loads((d / "summary.json").read_text()).get("clock_warmup_s"))
PY
    kill %1 2>/dev/null; wait 2>/dev/null
    cp "$runs/clocks.csv" "$runs/machine.txt" "$runs/clockdiag/" 2>/dev/null; cp "$runs"/clockdiag*.txt "$runs/clockdiag/"
    tar -czf "$out/clockdiag.tgz" -C "$runs" clockdiag
    exit 0
    ;;
graphs8k)
    if [ "${GPU_TESTS:-1}" = 1 ]; then
        timeout 220 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py \
            -k "lazily or graphs_equal or async_scheduling_equals_sync" 2>&1 | tee "$runs/gpu_tests_graphs8k.log" | tail -4
    fi
    if [ "${GRAPH_TABLES:-1}" = 1 ]; then
        kv profile --models qwen3-0.6b,llama3-8b --skip host,gemm,models,ragged,copy,vmm \
            --merge results/profiles/nvidia-h200.parquet --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_graphs.log"
    fi
    t_start=$(date +%s)  # the budget counts from here
    mkdir -p "$runs/async"; B="$B engine.async_scheduling=true"
    for m in ${RUN_MODELS:-qwen3-0.6b llama3-8b}; do
        if [ $m = qwen3-0.6b ]; then SUB=async/ real $m 8,96 60 ${REPS:-1}
        else ALLOCS=${LLAMA_ALLOCS:-${ALLOCS:-paged contiguous virtual}} SUB=async/ real $m 4,32 50 ${REPS:-1}; fi
    done
    ;;
graphs8k2)
    kv profile --models qwen3-0.6b,llama3-8b --host-model qwen3-0.6b --host-scheduling async \
        --skip gemm,models,graphs,ragged,copy,vmm --merge results/profiles/nvidia-h200.parquet \
        --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_host_async.log" | tail -4
    tar -czf "$out/host.tgz" -C "$runs" nvidia-h200.parquet profile_host_async.log machine.txt
    t_start=$(date +%s)
    mkdir -p "$runs/async"; B="$B engine.async_scheduling=true"
    ALLOCS=${LLAMA_ALLOCS:-contiguous virtual} SUB=async/ real llama3-8b 4,32 50 1
    tar -czf "$out/llama.tgz" -C "$runs" async
    timeout ${TEST_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py -k lazily \
        2>&1 | tee "$out/gpu_test_lazily.log" | tail -4
    exit 0
    ;;
graphs8k3)
    meta=$runs runs=results/sim_validation
    B="$B engine.async_scheduling=true"
    SUB=async/ real qwen3-0.6b 8,96 60 ${QWEN_REPS:-2}
    tar -czf "$out/qwen.tgz" -C "$runs/async" $(cd "$runs/async" && ls -d qwen*/real-* qwen*.log 2>/dev/null)
    SUB=async/ real llama3-8b 4,32 50 ${LLAMA_REPS:-2}
    tar -czf "$out/llama.tgz" -C "$runs/async" $(cd "$runs/async" && ls -d llama*/real-* llama*.log 2>/dev/null)
    cp "$meta/machine.txt" "$out/"
    left=$(( ${CALL_S:-570} - ($(date +%s) - t0_call) ))
    if (( left > 60 )); then
        timeout $left python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py -k lazily \
            2>&1 | tee "$out/gpu_test_lazily.log" | tail -4
    fi
    exit 0
    ;;
asyncrepeats)  # in the committed async/ folders: validate-sim keeps run 1 and adds run 2
    meta=$runs runs=results/sim_validation
    B="$B engine.async_scheduling=true"
    SUB=async/ real qwen3-0.6b 8,96 60 ${QWEN_REPS:-2}
    SUB=async/ real llama3-8b 4,32 50 ${LLAMA_REPS:-2}
    kill %1 2>/dev/null; wait 2>/dev/null
    cp "$meta/machine.txt" "$meta/clocks.csv" "$runs/async/" 2>/dev/null
    tar -czf "$out/asyncrepeats.tgz" -C "$runs/async" $(cd "$runs/async" && ls -d */real-* *.log machine.txt clocks.csv 2>/dev/null)
    tar -tzf "$out/asyncrepeats.tgz" | grep -c "summary.json" | sed 's/^/summaries archived: /'
    exit 0
    ;;
host)
    kv profile --models qwen3-0.6b,llama3-8b --host-model qwen3-0.6b,llama3-8b --host-scheduling ${SCHED:-async} \
        --skip gemm,models,graphs,ragged,copy,vmm --merge results/profiles/nvidia-h200.parquet ${HOST_ADD:+--host-add} \
        --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_host_${SCHED:-async}.log"
    # into $OUT at once (the runs' archive does not hold it); a cut-off profile keeps its partial file there
    cp -f "$runs/nvidia-h200.parquet" "$runs/profile_host_${SCHED:-async}.log" "$out/" 2>/dev/null
    ls -l "$out"
    ;;
ragged)  # decode attention of ragged batches (bench_ragged), then as async2
    timeout 150 python3 -m experiments.bench_ragged --out "$runs/ragged" > "$runs/ragged.log" 2>&1
    tail -5 "$runs/ragged.log"
    ;&
async2)
    mkdir -p "$runs/async"; B="$B engine.async_scheduling=true"
    SUB=async/ real llama3-8b 4,32 50 1
    if [ -n "${QWEN_ALLOCS:-}" ]; then ALLOCS=$QWEN_ALLOCS SUB=async/ real qwen3-0.6b 8,96 60 1; fi
    ;;
sync)  # the synchronous real runs of the six configurations for the current engine (even splits),
      # in fresh folders ($runs/<model>-<allocator>/real): they replace the committed ones
    real qwen3-0.6b 8,96 60 1
    real llama3-8b 4,32 50 1
    ;;
syncsame)  # host steps and real runs on one machine, synchronous, one model a call (MODEL=qwen3-0.6b | llama3-8b):
           # simulate then has the host time of the machine the runs ran on (host time differs 2-3x between
           # machines: README, session of 2026-12-03 fifth); the profile is merged into $runs, not committed as is
    m=${MODEL:?MODEL=qwen3-0.6b or llama3-8b}
    kv profile --models qwen3-0.6b,llama3-8b --host-model $m --host-scheduling sync --skip gemm,models,graphs,ragged,copy,vmm \
        --merge results/profiles/nvidia-h200.parquet --out "$runs/nvidia-h200-$m-sync.parquet" 2>&1 | tail -3
    t_start=$(date +%s)
    if [ $m = qwen3-0.6b ]; then real $m 8,96 60 1; else real $m 4,32 50 1; fi
    ;;
syncboth)  # syncsame for both models in one or two calls on ONE machine: the synchronous host steps of both
           # (merged into $runs/nvidia-h200-sync-same.parquet), then the six configurations' real runs; a
           # second call on the same machine (machine.txt shows it) resumes the runs the first left (RESUME=1)
    if [ ! -f "$runs/nvidia-h200-sync-same.parquet" ]; then
        kv profile --models qwen3-0.6b,llama3-8b --host-model qwen3-0.6b,llama3-8b --host-scheduling sync \
            --skip gemm,models,graphs,ragged,copy,vmm --merge results/profiles/nvidia-h200.parquet \
            --out "$runs/nvidia-h200-sync-same.parquet" 2>&1 | tee "$runs/profile_host_sync.log" | tail -3
    fi
    t_start=$(date +%s)
    RESUME=1 real qwen3-0.6b 8,96 60 1
    RESUME=1 real llama3-8b 4,32 50 1
    ;;
syncdiag)  # the profile's synchronous host steps (llama3-8b, one sequence: 5.35 ms a step) against
           # validate-sim's real engine (4.88 ms, on other machines): both harnesses on one machine, and
           # validate-sim's light-load workload under the profile's launch timer (experiments/step_timing.py)
    ALLOCS=paged real llama3-8b 4 50 1
    timeout 100 python3 -m experiments.step_timing model=llama3-8b $B allocator=paged mode=online \
        workload.request_rate=4 workload.num_requests=50 --out "$runs/step_timing_sync" 2>&1 | tail -6
    timeout 220 python3 -m experiments.cli profile --models llama3-8b --host-model llama3-8b --host-scheduling sync \
        --skip gemm,models,graphs,ragged,copy,vmm --out "$runs/sync_llama.parquet" 2>&1 | tail -3
    ;;
timerdiag)
    mkdir -p "$runs/timerdiag"
    kv validate-sim model=qwen3-0.6b $B allocator=paged --rates 8 --online-requests 60 --no-offline --real-only \
        --label timerdiag --out "$runs/timerdiag" >"$runs/timerdiag.log" 2>&1; echo "real run: exit $?"
    timeout 300 python3 results/sim_validation/logs/timerdiag/diag.py "$runs/timerdiag" 2>&1 | tee -a "$runs/timerdiag.log"
    ;;
h100qwen)  # no H200 lent: an H100 profile of qwen3-0.6b (every table, asynchronous host steps) and the
           # qwen3-0.6b asynchronous real runs on the same machine, under h100/ (simulate: --sim h100-sxm)
    kv profile --models qwen3-0.6b --host-model qwen3-0.6b --host-scheduling async \
        --out "$runs/nvidia-h100.parquet" 2>&1 | tee "$runs/profile_h100.log"
    cp -f "$runs/nvidia-h100.parquet" "$runs/profile_h100.log" "$out/" 2>/dev/null
    t_start=$t0_call; budget=${BUDGET_S:-470}
    mkdir -p "$runs/h100"; B="$B engine.async_scheduling=true"
    ARCHIVE_EACH=1 SUB=h100/ real qwen3-0.6b 8,96 60 1
    ;;
h100llama)  # (no H200 lent) llama3-8b on an H100: its model, graph, ragged and GEMM tables and its asynchronous host
            # steps merged onto the committed qwen3-0.6b H100 profile, then its asynchronous real runs under h100/ on
            # the same machine; a second call on that machine resumes the runs (the profile is not redone)
    if [ ! -f "$runs/nvidia-h100.parquet" ]; then
        kv profile --models llama3-8b --host-model llama3-8b --host-scheduling async --skip copy,vmm \
            --merge results/profiles/nvidia-h100.parquet --out "$runs/nvidia-h100.parquet" 2>&1 | tee "$runs/profile_h100_llama.log"
        cp -f "$runs/nvidia-h100.parquet" "$runs/profile_h100_llama.log" "$out/" 2>/dev/null
    fi
    t_start=$t0_call; budget=${BUDGET_S:-440}
    mkdir -p "$runs/h100"; B="$B engine.async_scheduling=true"
    RESUME=1 ARCHIVE_EACH=1 SUB=h100/ real llama3-8b 4,32 50 1
    ;;
h100sync)  # the experiments' default, synchronous scheduling, of the current engine on an H100: qwen3-0.6b's synchronous
           # host steps merged onto the H100 profile (this machine's own if h100llama ran here), then its synchronous
           # real runs under h100/sync/
    base=results/profiles/nvidia-h100.parquet; [ -f "$runs/nvidia-h100.parquet" ] && base="$runs/nvidia-h100.parquet"
    kv profile --models qwen3-0.6b --host-model qwen3-0.6b --host-scheduling sync --skip gemm,models,graphs,ragged,copy,vmm \
        --merge "$base" --out "$runs/nvidia-h100.parquet" 2>&1 | tee "$runs/profile_h100_sync.log"
    cp -f "$runs/nvidia-h100.parquet" "$runs/profile_h100_sync.log" "$out/" 2>/dev/null
    t_start=$t0_call; budget=${BUDGET_S:-440}
    mkdir -p "$runs/h100/sync"
    RESUME=1 ARCHIVE_EACH=1 SUB=h100/sync/ real qwen3-0.6b 8,96 60 1
    ;;
onecopy1)  # tables first (a fresh machine for call 2 redoes nothing: the runs resume, the tables are in $OUT)
    kv profile --models qwen3-0.6b,llama3-8b --skip host,gemm,models,ragged,copy,vmm \
        --merge results/profiles/nvidia-h200.parquet --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_graphs.log"
    kv profile --models qwen3-0.6b,llama3-8b --host-model qwen3-0.6b --host-scheduling async \
        --skip gemm,models,graphs,ragged,copy,vmm --merge "$runs/nvidia-h200.parquet" \
        --out "$runs/nvidia-h200.parquet" 2>&1 | tee "$runs/profile_host_async.log"
    cp -f "$runs/nvidia-h200.parquet" "$runs/profile_graphs.log" "$runs/profile_host_async.log" "$out/" 2>/dev/null
    ;&
onecopy2)  # the six configurations' real runs, resuming; llama3-8b's host steps last if the call has time
    t_start=$t0_call; budget=${BUDGET_S:-430}  # the call's own clock: no run starts after 430 s of it
    mkdir -p "$runs/async"; B="$B engine.async_scheduling=true"
    for m in ${RUN_MODELS:-qwen3-0.6b llama3-8b}; do  # RUN_MODELS: a fresh machine skips the models done
        if [ $m = qwen3-0.6b ]; then RESUME=1 ARCHIVE_EACH=1 SUB=async/ real $m 8,96 60 1
        else RESUME=1 ARCHIVE_EACH=1 SUB=async/ real $m 4,32 50 1; fi
    done
    left=$(( ${CALL_S:-560} - ($(date +%s) - t0_call) ))
    if (( left > 160 )) && [ -f "$runs/nvidia-h200.parquet" ] && ! grep -q llama "$runs/profile_host_async.log"; then
        timeout $left python3 -m experiments.cli profile --models qwen3-0.6b,llama3-8b --host-model llama3-8b \
            --host-scheduling async --skip gemm,models,graphs,ragged,copy,vmm --merge "$runs/nvidia-h200.parquet" \
            --out "$runs/nvidia-h200.parquet" 2>&1 | tee -a "$runs/profile_host_async.log"
        cp -f "$runs/nvidia-h200.parquet" "$runs/profile_host_async.log" "$out/" 2>/dev/null
    fi
    ;;
full2)
    real llama3-8b 4,32 50 1
    if [ -n "${QWEN_ALLOCS:-}" ]; then ALLOCS=$QWEN_ALLOCS real qwen3-0.6b 8,96 60 1; fi
    ;;
esac
grep -h "compiled a kernel variant after warm-up" -r "$runs" --include=*.log | sort | uniq -c | cut -c1-2000 | head -20
kill %1 2>/dev/null; wait 2>/dev/null
tar -czf "$out/kvsv-$part.tgz" -C "$runs" .
ls -la "$out"
