"""Decode attention of a ragged batch against a uniform one of the same mean context.

    python -m experiments.bench_ragged --models llama3-8b,qwen3-0.6b --out results/sim_validation/ragged

The profile times decode steps whose sequences all have one context length; a real batch mixes
short and long ones. With split-KV fixed by the CUDA graph's ``max_model_len``, a program's work
is its sequence's keys, so a ragged batch may end on its longest programs rather than at the mean.
This measures that on the device: the engine's decode attention kernel (one layer, the graph's
config) for uniform, lognormal (ShareGPT-like) and two-point context mixes of equal mean, per
batch size and addressing mode, with fixed-width splits (the kernel before even splits), the
default (the engine's launch: with ``KVLAB_SEQ_MAJOR_MIN_SEQS`` set, sequence by sequence and
longest first from that many sequences), and (``--sweep-models``) every even split count. From
``ORDER_MIN_BATCH`` sequences also the batch longest first, launched head by head (``longest-first``)
and sequence by sequence (``seq-major``). Rows (CSV): mode, batch, dist, variant,
splits, mean/max/p90 context, the contexts themselves, and the device time of one call
(``profile_device.Timer``). ``--from-csv`` prints the tables of a run again on any machine;
``--check PROFILE`` compares the profiled cost model's ragged decode steps with the whole steps
the profile measured (its ``decode_graph_ragged`` table).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.atomic import write_csv, write_text
from experiments.ragged_decode import contexts
from kernels.metadata import SEQ_MAJOR_FROM, decode_seq_major, orders_decode

BATCHES = [4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
MEANS = [300, 700]
DISTS = ("uniform", "lognormal", "twopoint")
SWEEP_SPLITS = [1, 2, 3, 4, 6, 8, 12, 16]
ORDER_MIN_BATCH = SEQ_MAJOR_FROM  # the default's first batch of one split (choose_config: 3 at 64, 2 at 96)
ORDER_VARIANTS = ("longest-first", "seq-major")  # longest first, launched head by head / sequence by sequence


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
        out += [(f"even-x{sp}", dataclasses.replace(default, num_splits=sp, even_split=True,
                                                    seq_major=decode_seq_major(b, sp)))
                for sp in SWEEP_SPLITS if sp * 256 <= max_model_len and sp != default.num_splits]
    return out


def run(models: list[str], block_size: int, max_model_len: int, out: Path, reps: int, sweep_models: set[str]):
    import dataclasses

    import torch

    from engine.presets import preset_config
    from experiments.profile_device import Timer, _decode_metas
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
                    for dist in DISTS:
                        ctxs = contexts(dist, b, mean, max_model_len, rng)
                        bs = block_size if mode == "paged" else 0
                        metas = _decode_metas(ctxs, bs, max_model_len, pool, device, gen)
                        q = torch.randn(b, h, d, dtype=torch.bfloat16, device=device)
                        o = torch.empty_like(q)
                        timed = [(variant, cfg, ctxs, metas) for variant, cfg in configs]
                        if b >= ORDER_MIN_BATCH or orders_decode(b):  # the same sequences, longest first
                            ordered = sorted(ctxs, reverse=True)
                            metas_o = _decode_metas(ordered, bs, max_model_len, pool, device, gen)
                            # the engine's order for its launch (the switch's: KVLAB_SEQ_MAJOR_MIN_SEQS)
                            timed = [(v, cfg, *((ordered, metas_o) if orders_decode(b) else (cs, ms)))
                                     for v, cfg, cs, ms in timed]
                            if b >= ORDER_MIN_BATCH:  # longest first: head by head, and sequence by sequence
                                default = dict(configs)["default"]
                                timed += [(v, dataclasses.replace(default, seq_major=v == "seq-major"), ordered,
                                           metas_o) for v in ORDER_VARIANTS]
                        for variant, cfg, cs, ms in timed:
                            t = timer.graph([(lambda m=m, cfg=cfg: attention_into(o, q, k_cache, v_cache, m, d**-0.5,
                                                                                  cfg)) for m in ms])
                            rows.append(dict(model=name, mode=mode, block_size=bs,
                                             batch=b, dist=dist, variant=variant, splits=cfg.num_splits,
                                             even=cfg.even_split, mean_ctx=float(np.mean(cs)), max_ctx=max(cs),
                                             p90_ctx=float(np.percentile(cs, 90)), layers=mc.num_hidden_layers,
                                             seq_major=cfg.seq_major, longest_first=cs is not ctxs,
                                             us=t * 1e6, contexts=json.dumps(cs)))
                        r = {v: x["us"] for v, x in ((x["variant"], x) for x in rows[-len(timed):])}
                        print(f"{name} {mode:6s} b={b:3d} mean={mean:4d} {dist:9s} max={max(ctxs):5d} "
                              + " ".join(f"{v}={u:.1f}" for v, u in r.items()), flush=True)
            save_rows(out, rows)  # what is measured so far, should the call be cut
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return rows


def save_rows(out: Path, rows: list[dict]) -> Path:
    """``rows`` to ``out/ragged_decode.csv``, atomically: the checkpoint is rewritten after each model
    and mode, and a write cut short must leave the previous complete file, not a truncated one."""
    import pandas as pd

    path = out / "ragged_decode.csv"
    write_csv(path, pd.DataFrame(rows))
    return path


def load_rows(df):
    """A run's rows as this version names them: the session of 2026-12-04's first run called the
    ordered sequence-by-sequence launch ``longest-first-seq-major``, and its rows do not say how
    each launch went (``seq_major``, ``longest_first``: from the variant then, every other launch
    head by head as admitted)."""
    if "variant" not in df:
        return df
    df = df.assign(variant=df["variant"].replace({"longest-first-seq-major": "seq-major"}))
    if "seq_major" not in df:
        df = df.assign(seq_major=df["variant"] == "seq-major", longest_first=df["variant"].isin(ORDER_VARIANTS))
    return df


def order_table(df) -> str:
    """From ``ORDER_MIN_BATCH`` sequences: each distribution's time as the engine launches it
    (``default``) and longest first, head by head and sequence by sequence; the lognormal batch's
    extra over a uniform one, a step (all layers)."""
    df = _mean_bins(df[df.batch >= ORDER_MIN_BATCH])
    if not df.variant.isin(ORDER_VARIANTS).any():
        return ""
    variants = ("default",) + ORDER_VARIANTS
    lines = ["Each cell: " + " / ".join(variants) + ".", "",
             "| model | mode | batch | mean ctx | uniform us | lognormal us | twopoint us | lognormal extra ms a step |",
             "|---|---|---|---|---|---|---|---|"]
    for (m, mode, b, _), g in df.groupby(["model", "mode", "batch", "mean_bin"], sort=False):
        t = g.set_index(["variant", "dist"])["us"]
        layers = g["layers"].iloc[0]
        cells = [" / ".join(f"{t[(v, dd)]:.1f}" for v in variants) for dd in DISTS]
        extra = " / ".join(f"{_extra_ms(t, v, layers):.3f}" for v in variants)
        lines.append(f"| {m} | {mode} | {b} | {g[g.dist == 'uniform'].mean_ctx.iloc[0]:.0f} | "
                     + " | ".join(cells) + f" | {extra} |")
    return "\n".join(lines)


def _extra_ms(t, variant: str, layers: int) -> float:
    """What a lognormal batch takes beyond a uniform one of the same mean, a step (all layers), ms;
    ``t``: time in us by (variant, dist)."""
    return (t[(variant, "lognormal")] - t[(variant, "uniform")]) * layers / 1e3


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
        ln = g[(g.dist == "lognormal") & ~g.variant.isin(ORDER_VARIANTS)]  # split counts, not launch orders
        best = ln.loc[ln["us"].idxmin()] if len(ln) else None
        extra = [_extra_ms(t, v, layers) for v in ("fixed", "default")]
        lines.append(
            f"| {m} | {mode} | {b} | {mean:.0f} | {sp['fixed']} / {sp['default']} | "
            + " | ".join(f"{t[('fixed', dd)]:.1f} / {t[('default', dd)]:.1f}" for dd in ("uniform", "lognormal", "twopoint"))
            + f" | {extra[0]:.3f} / {extra[1]:.3f} | "
            + (f"x{best.splits} {'even' if best.even else 'fixed'} {best.us:.1f}" if best is not None else "") + " |")
    return "\n".join(lines)


def critical_path_fit(df, num_sms: int = 132, span: int = 2048) -> str:
    """How well the uniform batch's time predicts a ragged one's, alone and with the critical-path
    term of experiments/ragged_decode.py (fitted to these batches)."""
    from engine.presets import preset_config
    from experiments.ragged_decode import fit, model_programs, paired

    df = _mean_bins(load_rows(df) if "variant" in df else df.assign(variant="fixed"))  # first run: fixed, unlabelled
    rag, u = paired(df, ["model", "mode", "batch", "variant", "mean_bin"], "us")
    progs, keep = [], []
    for r in rag.itertuples():
        mc = preset_config(r.model)
        even = bool(getattr(r, "even", False))
        p = model_programs(mc, json.loads(r.contexts), elem_size=2, num_sms=num_sms, span=span, even_split=even,
                           num_splits=int(getattr(r, "splits", 0)) or None)
        progs.append(p)
        # the term is the critical path of a batch launched as admitted, head by head; longest-first
        # launches (the engine's, switched on: KVLAB_SEQ_MAJOR_MIN_SEQS) take about the uniform time
        keep.append(not (getattr(r, "seq_major", False) or getattr(r, "longest_first", False)))
    keep = np.array(keep, dtype=bool)
    progs = [p for p, k in zip(progs, keep) if k]
    f = fit(u[keep] * 1e-6, rag["us"].to_numpy()[keep] * 1e-6, [p.longest_bytes for p in progs],
            [p.uniform_bytes for p in progs], [p.programs for p in progs], [p.slots for p in progs])
    return f.describe()


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
        swept = g.variant.str.startswith("even-") | (g.variant == "default")  # not the ordered launches
        even = {int(sp): geo(h) for sp, h in g[g.even & swept].groupby("splits")}
        fixed, default = g[g.variant == "fixed"], g[g.variant == "default"]
        best = min(even, key=even.get)
        lines.append(f"| {m} | {mode} | {b} | {g[g.dist == 'uniform'].mean_ctx.iloc[0]:.0f} | "
                     f"x{fixed.splits.iloc[0]}: {geo(fixed):.1f} | x{default.splits.iloc[0]}: {geo(default):.1f} | "
                     + " ".join(f"x{sp}: {t:.1f}" for sp, t in sorted(even.items())) + f" | x{best} |")
    return "\n".join(lines)


def check_profile(path: str) -> str:
    """The profiled cost model's decode steps against the profile's own measured whole steps of
    ragged batches (``decode_graph_ragged``): with the uniform tables alone and with the ragged term."""
    from experiments.device_profile import load_profile
    from experiments.profiled_costmodel import ProfiledCostModel, _shape

    prof = load_profile(path)
    t = prof.table("decode_graph_ragged")
    if t.empty:
        return f"{path} has no decode_graph_ragged table: rerun kvlab profile"
    lines = ["| model | mode | batch | mean ctx | max ctx | measured ms | uniform tables ms (error) | "
             "with ragged term ms (error) |", "|---|---|---|---|---|---|---|---|"]
    errs = {"uniform": [], "ragged": []}
    for (model, mode, bs), g in t.groupby(["model", "mode", "block_size"]):
        cm = ProfiledCostModel(prof, _shape(model), model=model, paged=mode == "paged", block_size=int(bs),
                               calibrate_host=False)
        for r in g.itertuples():
            work = [(1, c) for c in json.loads(r.contexts)]
            with_term = cm.device_time(work, num_sampled=0)
            ragged, cm.ragged = cm.ragged, None
            without = cm.device_time(work, num_sampled=0)
            cm.ragged = ragged
            errs["uniform"].append(without / r.value - 1)
            errs["ragged"].append(with_term / r.value - 1)
            lines.append(f"| {model} | {mode}{int(bs) or ''} | {int(r.batch)} | {r.context:.0f} | {int(r.max_context)} | "
                         f"{r.value * 1e3:.3f} | {without * 1e3:.3f} ({without / r.value - 1:+.1%}) | "
                         f"{with_term * 1e3:.3f} ({with_term / r.value - 1:+.1%}) |")
    lines.append("")
    for k, e in errs.items():
        e = np.abs(e)
        lines.append(f"{k}: mean |error| {e.mean():.1%}, p90 {np.percentile(e, 90):.1%}, max {e.max():.1%} "
                     f"over {len(e)} steps")
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
    ap.add_argument("--check", metavar="PROFILE", help="the profiled cost model's ragged decode steps against the "
                    "profile's measured ones (no GPU)")
    a = ap.parse_args(argv)
    if a.check:
        print(check_profile(a.check))
        return
    if a.from_csv is not None:
        import pandas as pd

        df = load_rows(pd.read_csv(a.from_csv))
        if "variant" not in df:  # the first run timed one config
            print(critical_path_fit(df))
            return
        print(summarize(df.to_dict("records")) + "\n\n" + split_sweep(df) + "\n\n" + order_table(df))
        for v in ("fixed", "default"):
            print(f"{v} splits: " + critical_path_fit(df[df.variant == v]))
        return
    rows = run(a.models.split(","), a.block_size, a.max_model_len, a.out, a.reps, set(a.sweep_models.split(",")))
    import pandas as pd

    text = summarize(rows) + "\n\n" + split_sweep(pd.DataFrame(rows)) + "\n\n" + order_table(pd.DataFrame(rows))
    write_text(a.out / "ragged_decode.md", text + "\n")  # atomic: never a cut-off table
    print(text)


if __name__ == "__main__":
    main()
