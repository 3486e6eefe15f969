"""``kvlab bench throughput``: offline throughput of kvlab per allocator vs HF transformers.

N requests of random token ids, input lengths uniform in [lo, hi], fixed output length,
ignore_eos; every allocator and HF's continuous batching (``generate_batch``) run on the
same prompts in one process, with a device copy bandwidth measured in the same run for the
decode roofline: (weight bytes + KV bytes read per step) / copy bandwidth, and with a bf16
matmul rate measured in the same run for the per-phase floor (``experiments/floors.py``: the
GEMMs at 256 sequences are compute-bound, which the roofline does not count).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.loader import resolve_config
from experiments.atomic import write_csv, write_text
from experiments.floors import phase_floor_s
from experiments.tables import markdown_table


def copy_bandwidth(device: str, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(iters):
        dst.copy_(src)
    t1.record()
    torch.cuda.synchronize()
    secs = t0.elapsed_time(t1) / 1000 / iters
    del src, dst
    return 2 * nbytes / secs


def add_async_arg(ap: argparse.ArgumentParser) -> None:
    """``--async-scheduling [auto|true|false]`` (bare: true), the engine's default auto."""
    ap.add_argument("--async-scheduling", nargs="?", const="true", default="auto", choices=["auto", "true", "false"],
                    help="overlap host work with the device, a stop seen one step late (auto, the engine's "
                         "default: on for one CUDA device; a bare flag: true)")


def async_value(v: str) -> bool | str:
    """EngineConfig.async_scheduling from ``--async-scheduling``."""
    return v if v == "auto" else v == "true"


def repeat_summary(df: pd.DataFrame, base: str) -> pd.DataFrame:
    """Per model, engine, allocator and GPU count over the rounds of ``--repeats``: mean and 95% CI
    of output tok/s, decode step and its share of the per-phase floor; ``vs_<base>``: the mean of
    each round's tok/s over ``base``'s in the same round (paired: the rounds' drift cancels), - 1."""
    from experiments.tables import mean_ci95

    kv = df[df.engine.str.startswith("kvlab")]
    if "error" in kv:
        kv = kv[kv["error"].isna()]  # a failed run has no figures
    keys = ["model", "engine", "tensor_parallel_size"]
    out = []
    for (model, engine, tp, alloc), g in kv.groupby(keys + ["allocator"], sort=False):
        row = dict(model=model, engine=engine, tensor_parallel_size=tp, allocator=alloc, rounds=len(g))
        for col in ("output_tok_s", "decode_step_ms", "phase_floor_frac"):
            if col in g:
                row[col], row[f"{col}_ci95"], _ = mean_ci95(g[col])
        ref = kv[(kv.model == model) & (kv.engine == engine) & (kv.tensor_parallel_size == tp) & (kv.allocator == base)]
        paired = g.merge(ref[["repeat", "output_tok_s"]], on="repeat", suffixes=("", "_base"))
        if alloc != base and len(paired):
            row[f"vs_{base}"], row[f"vs_{base}_ci95"], _ = mean_ci95(paired.output_tok_s / paired.output_tok_s_base - 1)
        out.append(row)
    return pd.DataFrame(out)


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(4, vocab, size=int(k)).tolist() for k in lens]


def run_kvlab(model: str, allocator: str, allocator_args: dict, prompts, output_len: int, args, tp: int = 1) -> dict:
    cfg = EngineConfig(model=model, allocator=allocator, allocator_args=allocator_args, tensor_parallel_size=tp,
                       max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                       gpu_memory_utilization=args.gpu_memory_utilization, detokenize=False, stream_outputs=False,
                       async_scheduling=async_value(args.async_scheduling), cuda_graph_max_tokens=args.cuda_graph_max_tokens,
                       cuda_graph_mode=args.cuda_graph_mode, enable_pdl=args.enable_pdl,
                       record_memory=False, seed=args.seed)
    t_init = time.perf_counter()
    engine = LLMEngine(cfg)
    init_s = time.perf_counter() - t_init
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    # warm-up: compiles the prefill kernels of every shape class once
    for i, p in enumerate(prompts[:4]):
        engine.add_request(f"warm-{i}", p, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    engine.step_records.clear()
    vmm0 = _vmm_counters(engine.allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    out_tokens = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = pd.DataFrame([r.__dict__ for r in engine.step_records])
    # one GPU's weights and KV bytes (rank 0's shard under tensor parallelism): the roofline is per GPU
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    bpt = engine.allocator.bytes_per_token
    res = dict(engine="kvlab-async" if engine.config.async_scheduling else "kvlab", allocator=allocator, allocator_args=json.dumps(allocator_args),
               tensor_parallel_size=tp, cuda_graph_max_tokens=args.cuda_graph_max_tokens,
               cuda_graph_mode=args.cuda_graph_mode, enable_pdl=args.enable_pdl,
               kv_pool_bytes_per_gpu=engine.kv_memory_summary()["kv_pool_bytes_per_gpu"],
               wall_s=wall,
               init_s=init_s, output_tokens=out_tokens, output_tok_s=out_tokens / wall,
               kv_capacity_tokens=engine.kv_capacity_tokens, weight_bytes=weight_bytes,
               preemptions=int(steps["preempted"].sum()), steps=len(steps))
    decode = steps[(steps.prefill_tokens == 0) & (steps.decode_tokens > 0)]
    full = decode[decode.num_seqs == decode.num_seqs.max()] if len(decode) else decode
    if len(full):
        ideal = (weight_bytes + full.context_tokens * bpt) / args.copy_bw
        # the floor is linear in the KV read: the weights' part once, not a walk of the model a step
        weights_floor = phase_floor_s(engine.model, int(full.num_seqs.iloc[0]), 0, args.copy_bw, args.matmul_flops)
        phase = weights_floor + full.context_tokens * bpt / args.copy_bw
        res.update(full_batch=int(full.num_seqs.iloc[0]), full_batch_steps=len(full),
                   decode_step_ms=1000 * float(full.duration.median()),
                   roofline_step_ms=1000 * float(ideal.median()),
                   roofline_frac=float((ideal / full.duration).median()),
                   phase_floor_step_ms=1000 * float(phase.median()),
                   phase_floor_frac=float((phase / full.duration).median()),
                   host_ms_per_decode_step=1000 * float(full.host_s.median()))
    vmm1 = _vmm_counters(engine.allocator)
    if vmm1:  # virtual: the driver's map/unmap time of the timed run, on the step's path and behind it
        d = {k: vmm1[k] - vmm0[k] for k in vmm1}
        res.update(vmm_critical_ms=1000 * d["vmm_critical_s"],
                   vmm_critical_ms_per_step=1000 * d["vmm_critical_s"] / max(1, len(steps)),
                   vmm_background_ms=1000 * d["vmm_background_s"], vmm_sync_maps=d["num_sync_maps"],
                   vmm_async_maps=d["num_async_maps"])
    other = steps[steps.prefill_tokens > 0]  # prefill and mixed steps: where piecewise graphs act
    if len(other):
        res.update(prefill_mixed_steps=len(other), prefill_mixed_s=float(other.duration.sum()),
                   prefill_mixed_step_ms=1000 * float(other.duration.median()))
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def _vmm_counters(allocator) -> dict:
    """The virtual allocator's driver-call counters (empty for the others)."""
    keys = ("vmm_critical_s", "vmm_background_s", "num_sync_maps", "num_async_maps")
    return {k: getattr(allocator, k) for k in keys} if hasattr(allocator, "vmm_critical_s") else {}


def hf_config(model: str):
    import transformers

    mc = resolve_config(model)
    common = dict(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
                  num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
                  num_key_value_heads=mc.num_key_value_heads, head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps,
                  max_position_embeddings=mc.max_position_embeddings, tie_word_embeddings=mc.tie_word_embeddings,
                  rope_theta=mc.rope_theta, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    if mc.rope_scaling:
        common["rope_scaling"] = dict(mc.rope_scaling)
    cls = transformers.Qwen3Config if mc.model_type == "qwen3" else transformers.LlamaConfig
    return cls(**common)


def run_hf(model: str, prompts, output_len: int, args) -> dict:
    import transformers

    cfg = hf_config(model)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    gen = transformers.GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
    hf.generation_config.eos_token_id = None
    # warm-up
    hf.generate_batch(inputs=prompts[:4], generation_config=transformers.GenerationConfig(
        max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = hf.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return dict(engine="hf-generate_batch", allocator="hf", wall_s=wall, output_tokens=tokens,
                output_tok_s=tokens / wall, transformers=transformers.__version__)


ALLOCATOR_ARGS = {"paged": {"block_size": 16}, "contiguous": {"policy": "max"},
                  "virtual": {"backend": "cuda"}}


def check_args(args) -> tuple[int, int]:
    """Every flag, one line naming the flag and the fix if one is wrong: before the CUDA check and
    the bandwidth/matmul measurements, not a traceback after them. Returns the input lengths."""
    from allocators.registry import available
    from experiments.preflight import UserError, check_folder, did_you_mean

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)
    lo_hi = args.input_len.split(":")
    try:
        lo, hi = (int(x) for x in lo_hi)
    except ValueError:  # not two whole numbers
        fixed = f"; one length: {args.input_len}:{args.input_len}" if args.input_len.isdigit() else ""
        raise UserError(f"--input-len {args.input_len}: give lo:hi, the prompt lengths in tokens (uniform), "
                        f"e.g. --input-len 100:1024{fixed}") from None
    need(1 <= lo <= hi, f"--input-len {args.input_len}: give lo:hi with 1 <= lo <= hi, e.g. --input-len 100:1024")
    for flag, v, least, what in (("--num-prompts", args.num_prompts, 1, "the number of requests"),
                                 ("--output-len", args.output_len, 1, "the tokens each request generates"),
                                 ("--max-model-len", args.max_model_len, 0, "the tokens a sequence may hold (0: the "
                                  "model's limit, at most 4096)"),
                                 ("--max-num-seqs", args.max_num_seqs, 1, "the sequences of a batch"),
                                 ("--max-num-batched-tokens", args.max_num_batched_tokens, 1, "the tokens of a step"),
                                 ("--seed", args.seed, 0, "the seed"),
                                 ("--repeats", args.repeats, 1, "the rounds of every allocator")):
        need(v >= least, f"{flag} {v}: give {what}, {least} or more")
    need(0 < args.gpu_memory_utilization <= 1, f"--gpu-memory-utilization {args.gpu_memory_utilization}: give the "
         "share of the GPU's memory the engine may use, in (0, 1], e.g. 0.85")
    need(0 <= args.cuda_graph_max_tokens <= 8192, f"--cuda-graph-max-tokens {args.cuda_graph_max_tokens}: give "
         "a token count in [0, 8192] (0: prefill and mixed steps run eagerly)")
    tps = args.tensor_parallel_size.split(",")
    need(all(t.isdigit() and int(t) >= 1 for t in tps), f"--tensor-parallel-size {args.tensor_parallel_size}: "
         "give GPUs per model, whole numbers >= 1, comma-separated (e.g. 1,2)")
    known = available()
    for a in args.allocators.split(","):
        need(a in known, f"--allocators {args.allocators}: no allocator '{a}'; choose from {', '.join(known)}, "
             f"comma-separated{did_you_mean(a, known, '--allocators ')}")
    for m in args.models.split(","):
        need(m != "", f"--models {args.models}: an empty name; give presets or HF directories, comma-separated")
        try:
            mc = resolve_config(m)
        except (ValueError, OSError) as e:  # not a preset, or no readable HF directory
            raise UserError(f"--models {args.models}: {e}") from None
        most = args.max_model_len or min(mc.max_position_embeddings, 4096)  # the engine's resolution of 0
        need(most <= mc.max_position_embeddings, f"--max-model-len {args.max_model_len}: more than {m}'s "
             f"{mc.max_position_embeddings} positions: lower it, or 0 for min(that, 4096)")
        need(hi < most, f"--input-len {args.input_len}: a prompt of {hi} tokens does not fit {m}'s max_model_len "
             f"{most} (room for an output token): lower hi or raise --max-model-len")
    check_folder("--out", Path(args.out))
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import Parser
    from experiments.preflight import UserError

    ap = Parser(prog="kvlab bench throughput", description=__doc__)
    ap.add_argument("what", choices=["throughput"])
    ap.add_argument("--models", default="qwen3-0.6b,llama3-8b")
    ap.add_argument("--allocators", default="paged,virtual,contiguous")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", default="100:1024", help="lo:hi, uniform")
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1536)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--cuda-graph-max-tokens", type=int, default=EngineConfig.cuda_graph_max_tokens,
                    help="prefill/mixed steps up to this many tokens replay CUDA graphs (--cuda-graph-mode; 0: eager)")
    ap.add_argument("--cuda-graph-mode", default=EngineConfig.cuda_graph_mode, choices=["piecewise", "full"],
                    help="prefill/mixed steps: piecewise graphs (attention eager) or full graphs")
    add_async_arg(ap)
    ap.add_argument("--tensor-parallel-size", default="1",
                    help="GPUs per model, comma-separated to compare (e.g. 1,2): each runs every allocator")
    ap.add_argument("--enable-pdl", action="store_true",
                    help="engine.enable_pdl: the step's Triton kernels with programmatic dependent launch (Hopper+)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of every allocator (interleaved): means with 95%% CIs, each allocator against "
                         "the first of --allocators paired round by round")
    ap.add_argument("--out", default="results/engine")
    args = ap.parse_args(argv)
    try:
        lo, hi = check_args(args)
    except UserError as e:
        print(f"kvlab bench throughput: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        raise SystemExit("kvlab bench throughput needs a CUDA device")
    device = torch.cuda.get_device_name()
    args.copy_bw = copy_bandwidth("cuda")
    from experiments.bench_prefill import matmul_tflops

    args.matmul_flops = matmul_tflops() * 1e12
    print(f"device: {device}; copy bandwidth {args.copy_bw / 1e9:.0f} GB/s, bf16 matmul "
          f"{args.matmul_flops / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for model in args.models.split(","):
        mc = resolve_config(model)
        prompts = make_prompts(args.num_prompts, lo, hi, mc.vocab_size, args.seed)
        runs = [(int(t), a) for t in args.tensor_parallel_size.split(",") for a in args.allocators.split(",")]
        for rep in range(args.repeats):  # each round runs every allocator: a slow spell falls on all
            for tp, alloc in runs:
                try:
                    res = run_kvlab(model, alloc, ALLOCATOR_ARGS.get(alloc, {}), prompts, args.output_len, args, tp)
                except Exception as e:  # report (a model that does not fit one GPU, say), keep the other figures
                    import traceback

                    traceback.print_exc()
                    res = dict(engine="kvlab", allocator=alloc, tensor_parallel_size=tp, error=repr(e)[:300])
                    gc.collect()
                    torch.cuda.empty_cache()
                rows.append(dict(model=model, repeat=rep + 1, **res))
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_hf:  # once: the baseline of the ratio, not the comparison
            try:
                rows.append(dict(model=model, repeat=1, **run_hf(model, prompts, args.output_len, args)))
            except Exception as e:  # report, keep the kvlab figures
                rows.append(dict(model=model, repeat=1, engine="hf-generate_batch", error=repr(e)[:300]))
            print(json.dumps(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    df["device"] = device
    df["copy_bw_GBps"] = args.copy_bw / 1e9
    df["matmul_TFLOPs"] = args.matmul_flops / 1e12
    for model in df.model.unique():
        hf_rate = df[(df.model == model) & (df.engine == "hf-generate_batch")]["output_tok_s"]
        if len(hf_rate) and hf_rate.notna().all():
            df.loc[df.model == model, "x_hf"] = df.loc[df.model == model, "output_tok_s"] / float(hf_rate.iloc[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.replace(" ", "_")
    write_csv(out / f"throughput_{tag}.csv", df)
    cols = [c for c in ["model", "engine", "allocator", "tensor_parallel_size", "output_tok_s", "x_hf", "wall_s", "full_batch",
                        "decode_step_ms", "roofline_step_ms", "roofline_frac", "phase_floor_step_ms", "phase_floor_frac",
                        "host_ms_per_decode_step",
                        "vmm_critical_ms_per_step", "vmm_background_ms", "kv_capacity_tokens", "preemptions",
                        "error"] if c in df]
    print(df[cols].to_string(index=False))
    text = (f"# Throughput, {device}\n\ncopy bandwidth {args.copy_bw / 1e9:.0f} GB/s, bf16 matmul "
            f"{args.matmul_flops / 1e12:.0f} TFLOP/s\n\n"
            f"command: `kvlab bench {' '.join(argv or [])}`\n\n" + markdown_table(df[cols]) + "\n")
    if args.repeats > 1:
        summary = repeat_summary(df, args.allocators.split(",")[0])
        write_csv(out / f"throughput_{tag}_summary.csv", summary)
        print(summary.to_string(index=False))
        text += f"\n## Over {args.repeats} rounds (mean, 95% CI half-width)\n\n" + markdown_table(summary) + "\n"
    write_text(out / f"throughput_{tag}.md", text)
    return 0
