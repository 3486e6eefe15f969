"""Decode attention of a ragged batch against a uniform one of the same mean context.

    python -m experiments.bench_ragged --models llama3-8b,qwen3-0.6b --out results/sim_validation/ragged

The profile times decode steps whose sequences all have one context length; a real batch mixes
short and long ones. With split-KV fixed by the CUDA graph's ``max_model_len``, a program's work
is its sequence's keys, so a ragged batch may end on its longest programs rather than at the mean.
This measures that on the device: the engine's decode attention kernel (one layer, the graph's
config) for uniform, lognormal (ShareGPT-like) and two-point context mixes of equal mean, per
batch size and addressing mode. Rows (CSV): mode, batch, dist, mean/max/p90 context, the
contexts themselves, and the device time of one call (``profile_device.Timer``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BATCHES = [4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
MEANS = [300, 700]


def contexts(dist: str, batch: int, mean: int, max_len: int, rng: np.random.Generator) -> list[int]:
    """``batch`` context lengths in [16, max_len] of mean ~``mean``."""
    if dist == "uniform":
        c = np.full(batch, float(mean))
    elif dist == "lognormal":  # ShareGPT-like spread
        c = rng.lognormal(0.0, 0.8, batch)
    elif dist == "twopoint":  # most short, a few near the limit
        long = max(1, batch // 8)
        c = np.concatenate([np.full(batch - long, 1.0), np.full(long, 6.0)])
    else:
        raise ValueError(dist)
    for _ in range(20):  # rescale to the mean through the clipping
        c = np.clip(c * mean / c.mean(), 16, max_len)
    return [int(x) for x in np.round(c)]


def _ragged_paged(ctxs: list[int], bs: int, width: int, num_blocks: int, device, gen):
    import torch

    from kernels.metadata import Addressing, AttentionMetadata

    nbs = [-(-c // bs) for c in ctxs]
    perm = torch.randperm(num_blocks, generator=gen)[: sum(nbs)].tolist()
    table, at = [], 0
    for nb in nbs:
        table.append(perm[at:at + nb] + [0] * (width - nb))
        at += nb
    t = torch.tensor(table, dtype=torch.int32, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    last = torch.tensor([c - 1 for c in ctxs], device=device)
    slots = t[torch.arange(len(ctxs), device=device), last // bs].long() * bs + last % bs
    return AttentionMetadata(Addressing.PAGED, torch.arange(len(ctxs) + 1, **i32), torch.tensor(ctxs, **i32),
                             1, max(ctxs), slots, block_table=t, block_size=bs)


def run(models: list[str], block_size: int, max_model_len: int, out: Path, reps: int) -> list[dict]:
    import pandas as pd
    import torch

    from engine.presets import preset_config
    from experiments.profile_device import Timer
    from kernels import ops
    from kernels.metadata import Addressing, contiguous_metadata

    device = torch.device("cuda")
    timer = Timer(device, reps=reps)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in models:
        mc = preset_config(name)
        kvh, d, h = mc.num_key_value_heads, mc.head_dim, mc.num_attention_heads
        pool = max(BATCHES) * max_model_len * 2
        k_cache = torch.randn(pool, kvh, d, dtype=torch.bfloat16, device=device)
        v_cache = torch.randn_like(k_cache)
        for mode in ("paged", "linear"):
            for b in BATCHES:
                for mean in MEANS:
                    for dist in ("uniform", "lognormal", "twopoint"):
                        ctxs = contexts(dist, b, mean, max_model_len, rng)
                        copies = max(1, min(4, pool // (2 * sum(ctxs))))
                        metas = []
                        for c in range(copies):
                            if mode == "paged":
                                m = _ragged_paged(ctxs, block_size, -(-max_model_len // block_size),
                                                  pool // block_size, device, gen)
                            else:
                                m = contiguous_metadata(Addressing.LINEAR, [1] * b, ctxs, device)
                                m.seq_base += c * sum(ctxs)
                            m.max_seq_len = max_model_len  # the decode graph's split config
                            metas.append(m)
                        q = torch.randn(b, h, d, dtype=torch.bfloat16, device=device)
                        t = timer.graph([(lambda m=m: ops.attention(q, k_cache, v_cache, m, d**-0.5))
                                         for m in metas])
                        rows.append(dict(model=name, mode=mode, block_size=block_size if mode == "paged" else 0,
                                         batch=b, dist=dist, mean_ctx=float(np.mean(ctxs)), max_ctx=max(ctxs),
                                         p90_ctx=float(np.percentile(ctxs, 90)), layers=mc.num_hidden_layers,
                                         us=t * 1e6, contexts=json.dumps(ctxs)))
                        r = rows[-1]
                        print(f"{name} {mode:6s} b={b:3d} mean={mean:4d} {dist:9s} max={r['max_ctx']:5d} "
                              f"{r['us']:8.2f} us", flush=True)
            out.mkdir(parents=True, exist_ok=True)  # what is measured so far, should the call be cut
            pd.DataFrame(rows).to_csv(out / "ragged_decode.csv", index=False)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict]) -> str:
    """Ragged over uniform, per model, mode, batch and mean: the step's extra (all layers)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    lines = ["| model | mode | batch | mean ctx | uniform us | lognormal us (x) | twopoint us (x) | "
             "lognormal extra ms a step |", "|---|---|---|---|---|---|---|---|"]
    for (m, mode, b), g in df.groupby(["model", "mode", "batch"], sort=False):
        for i in range(0, len(g), 3):
            u, ln, tp = g.iloc[i], g.iloc[i + 1], g.iloc[i + 2]
            lines.append(f"| {m} | {mode} | {b} | {u.mean_ctx:.0f} | {u.us:.1f} | {ln.us:.1f} ({ln.us / u.us:.2f}) | "
                         f"{tp.us:.1f} ({tp.us / u.us:.2f}) | {(ln.us - u.us) * u.layers / 1e3:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama3-8b,qwen3-0.6b")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("results/sim_validation/ragged"))
    a = ap.parse_args(argv)
    rows = run(a.models.split(","), a.block_size, a.max_model_len, a.out, a.reps)
    text = summarize(rows)
    (a.out / "ragged_decode.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
