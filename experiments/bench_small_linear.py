"""A decoder layer's linear part at decode batch sizes: cuBLAS + fused elementwise kernels (the
engine's path today) against ``kernels.small_linear`` (norm, SiLU and residual in the GEMM), one run.

    python -m experiments.bench_small_linear --out results/kernels/small_linear [--sweep]

For each model and batch (1, 8, 16 tokens), two sequences over as many layers' distinct weights
as the model has (so the weights stream from HBM, not L2), each in a CUDA graph:

- ``cublas``: add+RMSNorm, QKV GEMM, O GEMM, add+RMSNorm, gate_up GEMM, SiLU-and-mul, down GEMM
  (``kernels.fused_ops`` + ``F.linear``: what ``DecoderLayer.forward_fused`` runs around attention);
- ``fused``: QKV with the norm in its prologue, O adding into the residual, gate_up with norm and
  SiLU, down adding into the residual (``small_linear``: four kernels a layer; the norms take the
  rows' sums of squares from the kernel before them, as the engine's do);
- ``fused_pdl``: the same kernels launched with programmatic dependent launch (``kernels.pdl``,
  Hopper and newer: each kernel launches while the kernel before finishes; with
  ``KVLAB_PDL_PREFETCH_MB`` its programs also pull their weights into L2 before they wait).

Each is checked against ``small_linear_ref`` first. Reported: microseconds a layer, its weight
bytes over that time against the device-to-device copy bandwidth of the same run, and each GEMM
alone (cuBLAS vs small_linear), and the QKV GEMM with its RoPE epilogue (q and k normed and rotated,
k and v into a cache: ``rope=``) against the QKV GEMM then ``fused_ops.qk_norm_rope_`` (``qkv_rope_us`` vs
``qkv_then_rope_us``: the launch the epilogue saves). ``--sweep`` times every tile config of each GEMM shape and prints
the best (the heuristic's choice is ``choose_config``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.presets import preset_config
from experiments.atomic import write_rows, write_text
from experiments.bench_kernels import _median_graph_us, copy_bandwidth_gbps, read_bandwidth_gbps
from kernels import fused_ops, pdl, small_linear_rope
from kernels.small_linear import (LinearConfig, choose_config, choose_rope_config, small_linear,
                                  small_linear_ref)
from kernels.small_linear_rope import RopeEpilogue

BATCHES = (1, 8, 16)
DTYPE = torch.bfloat16


def _weights(cfg, layers: int, dev: str) -> list[dict]:
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    inter = cfg.intermediate_size
    g = torch.Generator(device=dev).manual_seed(0)

    def mat(n, k):
        return (torch.randn(n, k, generator=g, device=dev) / k ** 0.5).to(DTYPE)

    return [dict(qkv=mat(qkv, h), o=mat(h, cfg.num_attention_heads * d), gate_up=mat(2 * inter, h),
                 down=mat(h, inter), n1=1 + 0.1 * torch.randn(h, generator=g, device=dev).to(DTYPE),
                 n2=1 + 0.1 * torch.randn(h, generator=g, device=dev).to(DTYPE)) for _ in range(layers)]


def cublas_layer(w: dict, x: torch.Tensor, res: torch.Tensor, attn: torch.Tensor, eps: float) -> torch.Tensor:
    """The engine's fused path's linear part: (x: the last MLP output, res: the stream)."""
    h = fused_ops.rms_norm(x, w["n1"], eps, res)
    F.linear(h, w["qkv"])  # q, k, v: attention is not part of this benchmark
    o = F.linear(attn, w["o"])
    h = fused_ops.rms_norm(o, w["n2"], eps, res)
    return F.linear(fused_ops.silu_and_mul(F.linear(h, w["gate_up"])), w["down"])


def row_sq_buffers(cfg, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of the stream rows' sums of squares the O and down kernels write (as CausalLM.fuse)."""
    from kernels.small_linear import MAX_TOKENS, num_programs

    h = cfg.hidden_size
    n_attn = num_programs(h, cfg.num_attention_heads * cfg.head_dim, torch.device(dev))
    n_mlp = num_programs(h, cfg.intermediate_size, torch.device(dev))
    return (torch.zeros(n_attn, MAX_TOKENS, device=dev), torch.zeros(n_mlp, MAX_TOKENS, device=dev))


def fused_layer(w: dict, stream: torch.Tensor, attn: torch.Tensor, eps: float, sq: tuple, first: bool) -> None:
    """The engine's small_linear path (DecoderLayer.pre_attention / post_attention): the first layer's norm
    reads its input, the others the sums of squares the previous layer's down kernel wrote."""
    after_attn, after_mlp = sq
    small_linear(stream, w["qkv"], norm_weight=w["n1"], eps=eps, row_sq=None if first else after_mlp)
    small_linear(attn, w["o"], residual=stream, row_sq_out=after_attn)
    act = small_linear(stream, w["gate_up"], norm_weight=w["n2"], eps=eps, gated=True, row_sq=after_attn)
    small_linear(act, w["down"], residual=stream, row_sq_out=after_mlp)


def check(w: dict, m: int, h: int, attn_w: int, eps: float, dev: str, sq: tuple) -> float:
    """Largest relative error of the fused layer's stream against the unfused reference."""
    g = torch.Generator(device=dev).manual_seed(m)
    stream = torch.randn(m, h, generator=g, device=dev).to(DTYPE)
    attn = torch.randn(m, attn_w, generator=g, device=dev).to(DTYPE)
    ref = stream.clone()
    want_qkv = small_linear_ref(ref, w["qkv"], norm_weight=w["n1"], eps=eps)
    small_linear_ref(attn, w["o"], residual=ref)
    small_linear_ref(small_linear_ref(ref, w["gate_up"], norm_weight=w["n2"], eps=eps, gated=True), w["down"],
                     residual=ref)
    got_qkv = small_linear(stream, w["qkv"], norm_weight=w["n1"], eps=eps)
    fused_layer(w, stream, attn, eps, sq, first=True)
    err = [((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in ((got_qkv, want_qkv), (stream, ref))]
    return max(err)


def rope_epilogue(cfg, m: int, dev: str) -> RopeEpilogue:
    """A decode step's RoPE epilogue: qk_norm where the model has it, one cache of 4096 slots shared by the
    timed layers (the stores are what is timed, not where they land)."""
    from engine.rope import RotaryEmbedding

    d, hq, hk = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    rope = RotaryEmbedding(d, 4096, cfg.rope_theta, cfg.rope_scaling).to(dev)
    g = torch.Generator(device=dev).manual_seed(m)
    norm = [1 + 0.1 * torch.randn(d, generator=g, device=dev).to(DTYPE) for _ in range(2)] if cfg.qk_norm else [None] * 2
    cache = torch.zeros(4096, hk, d, device=dev, dtype=DTYPE)
    slots = torch.randperm(4096, device=dev)[:m]
    pos = torch.randint(0, 4096, (m,), device=dev)
    return RopeEpilogue(rope.cos, rope.sin, pos, d, hq, hk, *norm, cfg.rms_norm_eps, cache=(cache, cache.clone(), slots))


def qkv_then_rope(x: torch.Tensor, w: dict, eps: float, epi: RopeEpilogue) -> None:
    """The engine's gemv path before the epilogue: the QKV GEMM, then qk_norm_rope_ storing k and v."""
    qkv = small_linear(x, w["qkv"], norm_weight=w["n1"], eps=eps)
    m, d = x.shape[0], epi.head_dim
    q, k, v = qkv.split([epi.num_q_heads * d, epi.num_kv_heads * d, epi.num_kv_heads * d], dim=-1)
    fused_ops.qk_norm_rope_(q.view(m, -1, d), k.view(m, -1, d), epi.cos, epi.sin, epi.positions, epi.q_norm_w,
                            epi.k_norm_w, epi.eps, cache=(v.view(m, -1, d), *epi.cache))


def time_qkv_rope(layers: list[dict], x: torch.Tensor, eps: float, epi: RopeEpilogue) -> dict:
    """QKV + RoPE (+ per-head norm) + cache store: one kernel (``rope=``) vs two, over all layers' weights;
    the fused one's relative error against the reference composition first."""
    ref_cache = tuple(c.clone() for c in epi.cache[:2]) + (epi.cache[2],)
    want = small_linear_ref(x, layers[0]["qkv"], norm_weight=layers[0]["n1"], eps=eps,
                            rope=RopeEpilogue(**{**epi.__dict__, "cache": ref_cache}))
    got = small_linear(x, layers[0]["qkv"], norm_weight=layers[0]["n1"], eps=eps, rope=epi)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    n = len(layers)
    fused = _median_graph_us(lambda: [small_linear(x, w["qkv"], norm_weight=w["n1"], eps=eps, rope=epi)
                                      for w in layers], n, target_ms=10, trials=7)
    apart = _median_graph_us(lambda: [qkv_then_rope(x, w, eps, epi) for w in layers], n, target_ms=10, trials=7)
    return dict(qkv_rope_rel_err=err, qkv_rope_us=fused, qkv_then_rope_us=apart)


def sweep(wts: list[torch.Tensor], m: int, kind: str, dev: str, budget_s: float,
          rope: RopeEpilogue | None = None) -> list[tuple[float, LinearConfig]]:
    """Every tile config on one GEMM a layer, all layers' weights in turn (one layer's o_proj, 32 MiB,
    would stay in a 50 MiB L2 when timed alone): microseconds a layer, fastest first. ``rope``: the QKV
    GEMM with that RoPE epilogue (kind ``qkv_rope``; its tiles count pairs, within a head)."""
    wt = wts[0]
    x = torch.randn(m, wt.shape[1], device=dev).to(DTYPE)
    nw = torch.ones(wt.shape[1], device=dev, dtype=DTYPE)
    out = []
    t_end = time.time() + budget_s
    for bn, bk, warps, stages in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 5)):
        if warps == 8 and bn < 64:
            continue
        if time.time() > t_end:
            break
        cfg = LinearConfig(bn, bk, warps, stages)
        kw = dict(norm_weight=nw) if kind in ("qkv", "gate_up", "qkv_rope") else {}
        if rope is not None:
            try:
                small_linear_rope.check_tiles(rope, bn)
            except ValueError:  # pairs across a head (or not the whole head the per-head norm needs)
                continue
            kw["rope"] = rope
        try:
            us = _median_graph_us(lambda: [small_linear(x, w, gated=kind == "gate_up", config=cfg, **kw) for w in wts],
                                  len(wts), target_ms=4.0, trials=7)
        except Exception as e:  # noqa: BLE001  (a config that does not compile or fit: skipped, said)
            print(f"  {kind} {cfg}: {type(e).__name__}")
            continue
        out.append((us, cfg))
    return sorted(out, key=lambda t: t[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama3-8b,qwen3-0.6b")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--sweep", action="store_true", help="time every tile config of each GEMM (batch 1 and 8)")
    ap.add_argument("--sweep-models", default="llama3-8b", help="the models --sweep sweeps")
    ap.add_argument("--sweep-budget-s", type=float, default=25.0, help="seconds of sweep per GEMM shape and batch")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_small_linear needs a CUDA device (the kernels run under the interpreter only in tests)")
    dev = "cuda"
    copy = copy_bandwidth_gbps()
    copy_gbps = max(copy.values())
    read_gbps = max(read_bandwidth_gbps().values())  # what a kernel that only reads could reach
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s, read alone {read_gbps:.0f} GB/s")
    rows = []
    for name in args.models.split(","):
        cfg = preset_config(name)
        eps = cfg.rms_norm_eps
        layers = _weights(cfg, cfg.num_hidden_layers, dev)
        h, attn_w = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        layer_bytes = sum(layers[0][k].numel() * 2 for k in ("qkv", "o", "gate_up", "down"))
        for m in map(int, args.batches.split(",")):
            sq = row_sq_buffers(cfg, dev)
            err = check(layers[0], m, h, attn_w, eps, dev, sq)
            x = torch.randn(m, h, device=dev).to(DTYPE)
            res = torch.randn(m, h, device=dev).to(DTYPE)
            attn = torch.randn(m, attn_w, device=dev).to(DTYPE)
            stream = res.clone()

            def run_cublas():
                for w in layers:
                    cublas_layer(w, x, res, attn, eps)

            def run_fused():
                for i, w in enumerate(layers):
                    fused_layer(w, stream, attn, eps, sq, first=i == 0)

            def run_fused_pdl():  # the same kernels launched with PDL (engine.enable_pdl)
                with pdl.launches():
                    run_fused()

            n = len(layers)
            t_cublas = _median_graph_us(run_cublas, n, target_ms=20, trials=9)
            t_fused = _median_graph_us(run_fused, n, target_ms=20, trials=9)
            t_pdl = _median_graph_us(run_fused_pdl, n, target_ms=20, trials=9) if pdl.supported(dev) else float("nan")
            row = dict(model=name, batch=m, rel_err=err, layer_mb=layer_bytes / 1e6, cublas_us=t_cublas, fused_us=t_fused,
                       fused_pdl_us=t_pdl,
                       cublas_pct_copy=100 * layer_bytes / (t_cublas * 1e-6) / 1e9 / copy_gbps,
                       fused_pct_copy=100 * layer_bytes / (t_fused * 1e-6) / 1e9 / copy_gbps,
                       fused_pdl_pct_copy=100 * layer_bytes / (t_pdl * 1e-6) / 1e9 / copy_gbps,
                       fused_pdl_pct_read=100 * layer_bytes / (t_pdl * 1e-6) / 1e9 / read_gbps)
            for kind in ("qkv", "o", "gate_up", "down"):  # each GEMM alone, over all layers' weights
                a = x if kind in ("qkv", "gate_up") else (attn if kind == "o" else
                                                          torch.randn(m, cfg.intermediate_size, device=dev).to(DTYPE))
                row[f"{kind}_cublas_us"] = _median_graph_us(lambda: [F.linear(a, w[kind]) for w in layers], n,
                                                            target_ms=10, trials=7)
                row[f"{kind}_small_us"] = _median_graph_us(
                    lambda: [small_linear(a, w[kind], gated=kind == "gate_up") for w in layers], n, target_ms=10, trials=7)
            row.update(time_qkv_rope(layers, x, eps, rope_epilogue(cfg, m, dev)))
            rows.append(row)
            print(f"{name} batch {m}: qkv+rope one kernel {row['qkv_rope_us']:.1f} us vs qkv then qk_norm_rope_ "
                  f"{row['qkv_then_rope_us']:.1f} us (rel err {row['qkv_rope_rel_err']:.1e})", flush=True)
            print(f"{name} batch {m}: rel err {err:.1e}; a layer {t_cublas:.1f} us cuBLAS path "
                  f"({row['cublas_pct_copy']:.1f}% of copy) vs {t_fused:.1f} us fused ({row['fused_pct_copy']:.1f}%), "
                  f"{t_pdl:.1f} us with PDL ({row['fused_pdl_pct_copy']:.1f}%; {row['fused_pdl_pct_read']:.1f}% of read); "
                  + ", ".join(f"{k} {row[k + '_cublas_us']:.1f}/{row[k + '_small_us']:.1f}" for k in
                              ("qkv", "o", "gate_up", "down")), flush=True)
            if args.sweep and m in (1, 8) and name in args.sweep_models.split(","):
                sms = torch.cuda.get_device_properties(0).multi_processor_count
                for kind in ("qkv", "o", "gate_up", "down", "qkv_rope"):
                    rope = rope_epilogue(cfg, m, dev) if kind == "qkv_rope" else None
                    wt = layers[0]["qkv" if rope else kind]
                    best = sweep([w["qkv" if rope else kind] for w in layers], m, kind, dev, args.sweep_budget_s, rope)
                    heur = (choose_rope_config(wt.shape[0], wt.shape[1], sms, rope.head_dim, rope.norm) if rope else
                            choose_config(wt.shape[0] // (2 if kind == "gate_up" else 1), wt.shape[1], sms,
                                          kind == "gate_up"))
                    print(f"  sweep {name} b{m} {kind} {tuple(wt.shape)}: heuristic {heur}; best "
                          + "; ".join(f"{us:.2f} us {c}" for us, c in best[:3]), flush=True)
                    rows.append(dict(model=name, batch=m, sweep=kind, heuristic=str(heur),
                                     best=[(us, str(c)) for us, c in best[:5]]))
        layers = None  # noqa: F841  (frees the weights before the next model)
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table = [r for r in rows if "sweep" not in r]
        write_rows(args.out / "small_linear.csv", table)  # atomic: no partial file
        write_text(args.out / "small_linear.json", json.dumps(dict(device=torch.cuda.get_device_name(),
                                                                   copy_gbps=copy, read_gbps=read_gbps, rows=rows), indent=1))


if __name__ == "__main__":
    main()
