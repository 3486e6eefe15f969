"""Decode attention of a ragged batch against a uniform one of the same mean context.

    python -m experiments.bench_ragged --models llama3-8b,qwen3-0.6b --out results/sim_validation/ragged

The profile times decode steps whose sequences all have one context length; a real batch mixes
short and long ones. With split-KV fixed by the CUDA graph's ``max_model_len``, a program's work
is its sequence's keys, so a ragged batch may end on its longest programs rather than at the mean.
This measures that on the device: the engine's decode attention kernel (one layer, the graph's
config) for uniform, lognormal (ShareGPT-like) and two-point context mixes of equal mean, per
batch size and addressing mode, with fixed-width splits (the kernel before even splits), the
default, and (``--sweep-models``) every even split count. Rows (CSV): mode, batch, dist, variant,
splits, mean/max/p90 context, the contexts themselves, and the device time of one call
(``profile_device.Timer``). ``--from-csv`` prints the tables of a run again on any machine.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BATCHES = [4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
MEANS = [300, 700]
SWEEP_SPLITS = [1, 2, 3, 4, 6, 8, 12, 16]


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


def _decode_config(mc, batch: int, span: int, num_sms: int, even_split: bool = True):
    """The engine's decode attention config for ``batch`` sequences of ``mc``'s heads (bf16) under
    a CUDA graph's bound ``span``."""
    from kernels.triton_attention import choose_config

    return choose_config(num_seqs=batch, max_query_len=1, max_seq_len=span, num_kv_heads=mc.num_key_value_heads,
                         group=mc.num_attention_heads // mc.num_key_value_heads, head_dim=mc.head_dim,
                         elem_size=2, num_sms=num_sms, even_split=even_split)


def _configs(b: int, max_model_len: int, mc, sweep: bool, device) -> list[tuple[str, object]]:
    """(variant, AttnConfig): the kernel's fixed-width splits (``fixed``, what the engine ran
    before even splits), its default now, and with ``sweep`` even splits of every count."""
    import dataclasses

    from kernels.triton_attention import device_sms

    default = _decode_config(mc, b, max_model_len, device_sms(device))
    out = [("fixed", _decode_config(mc, b, max_model_len, device_sms(device), even_split=False)), ("default", default)]
    if sweep:
        out += [(f"even-x{sp}", dataclasses.replace(default, num_splits=sp, even_split=True))
                for sp in SWEEP_SPLITS if sp * 256 <= max_model_len and sp != default.num_splits]
    return out


def run(models: list[str], block_size: int, max_model_len: int, out: Path, reps: int, sweep_models: set[str]):
    import pandas as pd
    import torch

    from engine.presets import preset_config
    from experiments.profile_device import Timer
    from kernels.metadata import Addressing, contiguous_metadata
    from kernels.triton_attention import attention_into

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
                configs = _configs(b, max_model_len, mc, name in sweep_models, device)
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
                        o = torch.empty_like(q)
                        for variant, cfg in configs:
                            t = timer.graph([(lambda m=m, cfg=cfg: attention_into(o, q, k_cache, v_cache, m, d**-0.5,
                                                                                  cfg)) for m in metas])
                            rows.append(dict(model=name, mode=mode, block_size=block_size if mode == "paged" else 0,
                                             batch=b, dist=dist, variant=variant, splits=cfg.num_splits,
                                             even=cfg.even_split, mean_ctx=float(np.mean(ctxs)), max_ctx=max(ctxs),
                                             p90_ctx=float(np.percentile(ctxs, 90)), layers=mc.num_hidden_layers,
                                             us=t * 1e6, contexts=json.dumps(ctxs)))
                        r = {v: x["us"] for v, x in ((x["variant"], x) for x in rows[-len(configs):])}
                        print(f"{name} {mode:6s} b={b:3d} mean={mean:4d} {dist:9s} max={max(ctxs):5d} "
                              + " ".join(f"{v}={u:.1f}" for v, u in r.items()), flush=True)
            out.mkdir(parents=True, exist_ok=True)  # what is measured so far, should the call be cut
            pd.DataFrame(rows).to_csv(out / "ragged_decode.csv", index=False)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return rows


def _mean_bins(df):
    """``df`` with ``mean_bin``: which of MEANS a row's batch was drawn for (rows come in MEANS order)."""
    return df.assign(mean_bin=df.groupby(["model", "mode", "batch", "dist", "variant"]).cumcount())


def summarize(rows: list[dict]) -> str:
    """Per model, mode, batch and mean: uniform, lognormal and two-point batches under the fixed
    splits and the default; the step's extra (all layers) of a lognormal batch over a uniform one."""
    import pandas as pd

    df = _mean_bins(pd.DataFrame(rows))
    lines = ["| model | mode | batch | mean ctx | splits fixed / default | uniform us fixed / default | "
             "lognormal us fixed / default | twopoint us fixed / default | lognormal extra ms a step, "
             "fixed / default | best even split (lognormal) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (m, mode, b, mb), g in df.groupby(["model", "mode", "batch", "mean_bin"], sort=False):
        t = g.set_index(["variant", "dist"])["us"]
        sp = g.groupby("variant")["splits"].first()
        layers = g["layers"].iloc[0]
        mean = g[g.dist == "uniform"]["mean_ctx"].iloc[0]
        ln = g[g.dist == "lognormal"]
        best = ln.loc[ln["us"].idxmin()] if len(ln) else None
        extra = [(t[(v, "lognormal")] - t[(v, "uniform")]) * layers / 1e3 for v in ("fixed", "default")]
        lines.append(
            f"| {m} | {mode} | {b} | {mean:.0f} | {sp['fixed']} / {sp['default']} | "
            + " | ".join(f"{t[('fixed', dd)]:.1f} / {t[('default', dd)]:.1f}" for dd in ("uniform", "lognormal", "twopoint"))
            + f" | {extra[0]:.3f} / {extra[1]:.3f} | "
            + (f"x{best.splits} {'even' if best.even else 'fixed'} {best.us:.1f}" if best is not None else "") + " |")
    return "\n".join(lines)


def program_keys(ctxs: list[int], splits: int, even: bool, block_n: int, span: int) -> np.ndarray:
    """Keys each program of one KV head streams: the kernel's split rule (even: each sequence's own
    keys in ``splits`` tile-aligned parts; fixed: parts of ``span``, the last taking the rest)."""
    c = np.asarray(ctxs, dtype=np.int64)[:, None]
    j = np.arange(splits)[None, :]
    if even:
        chunk = -(-c // (splits * block_n)) * block_n
        return np.clip(c - j * chunk, 0, chunk).ravel()
    from kernels.triton_attention import fixed_split_chunk

    chunk = fixed_split_chunk(span, splits, block_n)
    k = np.clip(c - j * chunk, 0, chunk)
    k[:, -1] = np.maximum(c[:, 0] - (splits - 1) * chunk, 0)
    return k.ravel()


def critical_path_fit(df, num_sms: int = 132, span: int = 2048) -> str:
    """How well the uniform batch's time predicts a ragged one's, alone and with a critical-path
    term: one program streams at ``rate``; if every program fits the resident slots, the batch
    takes max(uniform, c0 + longest program), else uniform + k x longest program (the longest may
    start in the last wave). Least mean |relative error| over a grid of (rate, c0, k)."""
    import pandas as pd

    from engine.presets import preset_config
    from kernels.triton_attention import decode_wave

    rows = []
    for r in df.itertuples():
        mc = preset_config(r.model)
        even = bool(getattr(r, "even", False))  # the first run timed fixed splits only, unlabelled
        cfg = _decode_config(mc, r.batch, span, num_sms, even)
        keys = program_keys(json.loads(r.contexts), int(getattr(r, "splits", cfg.num_splits)), even, cfg.block_n, span)
        row_bytes = mc.head_dim * 2
        rows.append(dict(key=(r.model, r.mode, r.batch, getattr(r, "variant", "fixed"), round(r.mean_ctx, -2)),
                         dist=r.dist, us=r.us, longest_mb=keys.max() * 2 * row_bytes / 1e6,
                         programs=len(keys) * mc.num_key_value_heads,
                         slots=decode_wave(cfg.block_n, cfg.num_stages, row_bytes, num_sms)))
    d = pd.DataFrame(rows)
    uni = d[d.dist == "uniform"].set_index("key")["us"]
    rag = d[d.dist != "uniform"].copy()
    rag["uni"] = [uni.get(k, np.nan) for k in rag.key]
    rag = rag.dropna(subset=["uni"])
    base = np.abs(rag.uni / rag.us - 1)
    best = None
    for rate in np.arange(10.0, 40.0, 1.0):  # GB/s a program
        t = rag.longest_mb * 1e3 / rate  # us
        for c0 in np.arange(0.0, 8.0, 0.5):
            for k in np.arange(0.0, 1.01, 0.05):
                pred = np.where(rag.programs <= rag.slots, np.maximum(rag.uni, c0 + t), rag.uni + k * t)
                err = np.abs(pred / rag.us - 1)
                if best is None or err.mean() < best[0]:
                    best = (err.mean(), np.percentile(err, 90), rate, c0, k)
    return (f"ragged batches ({len(rag)}): the uniform batch's time alone is off by {base.mean():.1%} on average "
            f"(p90 {np.percentile(base, 90):.1%}); with the critical-path term (a program at {best[2]:.0f} GB/s, "
            f"c0 {best[3]:.1f} us, tail k {best[4]:.2f}) by {best[0]:.1%} (p90 {best[1]:.1%})")


DIST_WEIGHTS = {"uniform": 1, "lognormal": 2, "twopoint": 1}  # real batches are ragged: lognormal counts twice


def split_sweep(df) -> str:
    """Swept models: per batch, mode and mean, each even split count's weighted geometric mean time
    over the three distributions, against the fixed splits' and the default's; the best count."""
    import pandas as pd

    df = _mean_bins(df[df.model.isin(df[df.variant.str.startswith("even-")].model.unique())])
    wsum = sum(DIST_WEIGHTS.values())

    def geo(g: pd.DataFrame) -> float:
        t = g.set_index("dist")["us"]
        return float(np.exp(sum(w * np.log(t[d]) for d, w in DIST_WEIGHTS.items()) / wsum))

    lines = ["| model | mode | batch | mean ctx | fixed splits: us | default splits: us | even splits: us | best |",
             "|---|---|---|---|---|---|---|---|"]
    for (m, mode, b, _), g in df.groupby(["model", "mode", "batch", "mean_bin"], sort=False):
        even = {int(sp): geo(h) for sp, h in g[g.even].groupby("splits")}
        fixed, default = g[g.variant == "fixed"], g[g.variant == "default"]
        best = min(even, key=even.get)
        lines.append(f"| {m} | {mode} | {b} | {g[g.dist == 'uniform'].mean_ctx.iloc[0]:.0f} | "
                     f"x{fixed.splits.iloc[0]}: {geo(fixed):.1f} | x{default.splits.iloc[0]}: {geo(default):.1f} | "
                     + " ".join(f"x{sp}: {t:.1f}" for sp, t in sorted(even.items())) + f" | x{best} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama3-8b,qwen3-0.6b")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep-models", default="llama3-8b", help="models also timed at every even split count")
    ap.add_argument("--out", type=Path, default=Path("results/sim_validation/ragged"))
    ap.add_argument("--from-csv", type=Path, help="summarize a run's ragged_decode.csv again (no GPU)")
    a = ap.parse_args(argv)
    if a.from_csv is not None:
        import pandas as pd

        df = pd.read_csv(a.from_csv)
        if "variant" not in df:  # the first run timed one config
            print(critical_path_fit(df))
            return
        print(summarize(df.to_dict("records")) + "\n\n" + split_sweep(df))
        for v in ("fixed", "default"):
            print(f"{v} splits: " + critical_path_fit(df[df.variant == v]))
        return
    rows = run(a.models.split(","), a.block_size, a.max_model_len, a.out, a.reps, set(a.sweep_models.split(",")))
    import pandas as pd

    text = summarize(rows) + "\n\n" + split_sweep(pd.DataFrame(rows))
    (a.out / "ragged_decode.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
