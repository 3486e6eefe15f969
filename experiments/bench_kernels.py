"""Decode-attention benchmark: Triton PAGED vs LINEAR vs PyTorch SDPA (flash), one GPU run.

    python -m experiments.bench_kernels --out results/kernels [--sweep] [--fp8]

Llama-3-8B heads (32 query, 8 KV, head dim 128, bf16), one query token per sequence.
PAGED uses block size 16 with randomly permuted blocks; LINEAR the same cache with each
sequence contiguous; SDPA reads contiguous ``[B, 8, ctx, 128]`` K/V (flash backend, GQA).
Each shape is checked against kernels.reference first, then timed by replaying a CUDA
graph of many calls (device time, no Python launch gaps) and taking the median. Inputs
smaller than a few L2 sizes are rotated among copies so the numbers are HBM, not L2.
Bandwidth counts the K and V bytes a decode step must read; it is reported against the
device-to-device copy bandwidth (bytes read + written) measured in the same run.
``--fp8`` adds ``paged_fp8`` and ``linear_fp8``: the same K/V quantized to fp8 e4m3 with per-head
scales (half the bytes), checked against the reference over the same fp8 values.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import re
import statistics
import time
from pathlib import Path

import torch

from experiments.atomic import write_rows, write_text

SHAPES = [(1, 4096), (8, 4096), (32, 2048), (64, 4096), (128, 1024), (256, 1024), (16, 16384)]
HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
IMPLS = ("paged", "linear", "sdpa_flash")
FP8_IMPLS = ("paged_fp8", "linear_fp8")
DEV = "cuda"  # "cpu" only for --smoke-cpu (Triton interpreter, wall-clock timing, tiny shapes)
FP8 = False  # --fp8
PDL_IMPLS = ("paged_pdl", "linear_pdl")  # --pdl: launched with programmatic dependent launch (kernels.pdl)
# --sweep (E): decode tiles (keys a loop step, warps, stages) besides choose_config's 64 / 4 / 3; 128 keys with
# 3 stages holds 128 KiB of K/V in shared memory (one program an SM on Hopper)
DECODE_TILES = ((128, 4, 2), (128, 4, 3), (128, 8, 3), (64, 8, 3), (64, 4, 4), (32, 4, 6))
PDL = False


def _fp8_copy(k: torch.Tensor, v: torch.Tensor) -> dict:
    """K and V in fp8 e4m3 with per-head scales (empty unless --fp8)."""
    if not FP8:
        return {}
    from kernels import reference

    fp8 = torch.float8_e4m3fn
    ks = (k.float().abs().amax(dim=(0, 2)) / torch.finfo(fp8).max).contiguous()
    vs = (v.float().abs().amax(dim=(0, 2)) / torch.finfo(fp8).max).contiguous()
    return dict(k8=reference.quantize(k, fp8, ks), v8=reference.quantize(v, fp8, vs), ks=ks, vs=vs)


def _median_graph_us(fn, calls_per_fn: int, target_ms: float = 4.0, trials: int = 15) -> float:
    """Median device time of one call, from replays of a CUDA graph of repeated calls."""
    if DEV == "cpu":  # smoke mode: wall clock, no graphs
        fn()
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e6 / calls_per_fn)
        return statistics.median(t)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end) / 3, 1e-3)
    reps = max(1, min(200, math.ceil(target_ms / est_ms)))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm the capture stream (allocator, lazy init)
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * calls_per_fn))
    del graph
    return statistics.median(times)


def _clocks_up(fn, seconds: float = 0.5) -> None:
    """Run ``fn`` for ``seconds`` (on a GPU), so that the clocks are up before it is timed."""
    t_end = time.time() + (seconds if DEV == "cuda" else 0)
    while time.time() < t_end:
        fn()
        if DEV == "cuda":
            torch.cuda.synchronize()


def _rate_gbps(nbytes: int, fn) -> float:
    """GB/s of ``fn`` moving ``nbytes``, from its median time in a CUDA graph (after ``_clocks_up``)."""
    return nbytes / (_median_graph_us(fn, 1, target_ms=20) * 1e-6) / 1e9


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> dict[str, float]:
    """Device-to-device copy of a 1 GiB buffer, counting bytes read plus bytes written:
    ``copy_`` (cudaMemcpy) and an elementwise kernel (``mul(x, 1, out=y)``), after a
    warm-up that brings the clocks up. The denominator of "% of copy" is the better one."""
    if DEV == "cpu":
        nbytes = 1 << 24
    src = torch.randn(nbytes // 4, device=DEV)
    dst = torch.empty_like(src)
    _clocks_up(lambda: dst.copy_(src))
    res = {
        "memcpy": _rate_gbps(2 * nbytes, lambda: dst.copy_(src)),
        "kernel": _rate_gbps(2 * nbytes, lambda: torch.mul(src, 1.0, out=dst)),
    }
    del src, dst
    return res


def read_bandwidth_gbps(nbytes: int = 1 << 30) -> dict[str, float]:
    """Bytes read alone (no writes) of a 1 GiB buffer: ``torch.sum`` and a persistent Triton loop of
    wide loads. A decode GEMM only reads its weights, so this, not copy, is what it could reach:
    the floors stay at copy bandwidth (the issue's definition), this says how far above them a
    kernel could still go. Same warm-up and timing as ``copy_bandwidth_gbps``."""
    if DEV == "cpu":
        nbytes = 1 << 24
    src = torch.randn(nbytes // 4, device=DEV)
    _clocks_up(src.sum)
    res = {"torch_sum": _rate_gbps(nbytes, src.sum)}
    if DEV == "cuda":
        from experiments.read_stream import stream_read

        part = torch.empty(4096, device=DEV)
        res["triton"] = _rate_gbps(nbytes, lambda: stream_read(src, part))
    del src
    return res


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class DecodeCase:
    """One batch x context shape: ``n_rot`` independent copies of every input."""

    def __init__(self, batch: int, ctx: int, l2_bytes: int, seed: int = 0):
        from kernels.metadata import Addressing, AttentionMetadata

        g = torch.Generator(device=DEV).manual_seed(seed + batch * 100003 + ctx)
        self.batch, self.ctx = batch, ctx
        self.kv_bytes = 2 * batch * ctx * HKV * D * DTYPE.itemsize
        self.n_rot = max(1, min(16, math.ceil(4 * l2_bytes / self.kv_bytes)))
        nblocks = batch * ctx // BLOCK
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        common = dict(query_start_loc=qsl, seq_lens=lens, max_query_len=1, max_seq_len=ctx,
                      slot_mapping=torch.arange(batch, device=DEV) * ctx + ctx - 1)
        self.sets = []
        self._refs: dict[str, torch.Tensor] = {}  # error(): the reference output by layout, computed once
        for _ in range(self.n_rot):
            k = torch.randn(batch * ctx, HKV, D, device=DEV, dtype=DTYPE, generator=g)
            v = torch.randn(batch * ctx, HKV, D, device=DEV, dtype=DTYPE, generator=g)
            q = torch.randn(batch, HQ, D, device=DEV, dtype=DTYPE, generator=g)
            table = torch.randperm(nblocks, device=DEV, generator=g).to(torch.int32).view(batch, ctx // BLOCK)
            paged = AttentionMetadata(mode=Addressing.PAGED, block_table=table, block_size=BLOCK, **common)
            linear = AttentionMetadata(mode=Addressing.LINEAR,
                                       seq_base=torch.arange(batch, device=DEV, dtype=torch.int64) * ctx,
                                       **common)
            # the contiguous copy SDPA reads: sequence s of the PAGED cache in order
            slots = (table.long()[:, :, None] * BLOCK + torch.arange(BLOCK, device=DEV)).view(batch, ctx)
            k4 = k[slots].permute(0, 2, 1, 3).contiguous()  # [B, HKV, ctx, D]
            v4 = v[slots].permute(0, 2, 1, 3).contiguous()
            self.sets.append(dict(q=q, k=k, v=v, paged=paged, linear=linear, k4=k4, v4=v4,
                                  q4=q.view(batch, HQ, 1, D), out=torch.empty_like(q), **_fp8_copy(k, v)))

    def run(self, impl: str, i: int, config=None) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        from kernels import triton_ops

        if impl.endswith("_pdl"):  # each call's kernels may start as the previous call's end, as in a step
            from kernels import pdl

            with pdl.launches():
                return self.run(impl[:-4], i, config)
        s = self.sets[i]
        if impl == "sdpa_flash":
            backends = [SDPBackend.FLASH_ATTENTION] if DEV == "cuda" else [SDPBackend.MATH]
            with sdpa_kernel(backends):
                o = scaled_dot_product_attention(s["q4"], s["k4"], s["v4"], enable_gqa=True)
            return o.reshape(self.batch, HQ, D)
        if impl.endswith("_fp8"):
            triton_ops.attention_into(s["out"], s["q"], s["k8"], s["v8"], s[impl[:-4]], None, config,
                                      s["ks"], s["vs"])
            return s["out"]
        triton_ops.attention_into(s["out"], s["q"], s["k"], s["v"], s[impl], config=config)
        return s["out"]

    def check(self) -> dict[str, float]:
        """Relative error of each implementation against the reference (first input set)."""
        return {impl: self.error(impl) for impl in self.impls}

    def error(self, impl: str, config=None) -> float:
        """Relative error of one implementation (under ``config``: a swept one) against the reference on
        the first input set, run into a NaN-poisoned output; fp8 against the reference over the same fp8
        values, SDPA against PAGED's (the same keys in order)."""
        from kernels import reference

        s = self.sets[0]
        s["out"].fill_(float("nan"))
        out = self.run(impl, 0, config).clone()
        layout = impl[:-4] + "_fp8" if impl.endswith("_fp8") else "linear" if impl.startswith("linear") else "paged"
        if layout not in self._refs:  # one reference a layout, however many configs the sweep checks
            fp8 = layout.endswith("_fp8")
            k, v, scales = (s["k8"], s["v8"], (s["ks"], s["vs"])) if fp8 else (s["k"], s["v"], ())
            self._refs[layout] = reference.attention(s["q"], k, v, s[layout.removesuffix("_fp8")], None, *scales)
        return _rel_err(out, self._refs[layout])

    @property
    def impls(self) -> tuple[str, ...]:
        return IMPLS + (FP8_IMPLS if FP8 else ()) + (PDL_IMPLS if PDL else ())

    def kv_bytes_of(self, impl: str) -> int:
        return self.kv_bytes // 2 if impl.endswith("_fp8") else self.kv_bytes

    def time(self, impl: str, config=None) -> float:
        def fn():
            for i in range(self.n_rot):
                self.run(impl, i, config)

        return _median_graph_us(fn, self.n_rot)


def _config_str(case: DecodeCase, impl: str, config=None) -> str:
    from kernels.triton_attention import choose_config, device_sms

    fp8 = impl.endswith("_fp8")
    c = config or choose_config(num_seqs=case.batch, max_query_len=1, max_seq_len=case.ctx, num_kv_heads=HKV,
                                group=HQ // HKV, head_dim=D, elem_size=1 if fp8 else 2,
                                num_sms=device_sms(torch.device(DEV)), fp8=fp8)
    bt = ("/ahead" if c.bt_ahead else "/inline") if impl.startswith("paged") else ""
    return f"n{c.block_n}/w{c.num_warps}/s{c.num_stages}/x{c.num_splits}{bt}"


def sweep(cases: dict, copy_bw: float, out_dir: Path, tag: str, budget_s: float) -> None:
    """Tuning aid, time-boxed: (E) larger key tiles, more warps or stages at the default split, (C) PAGED
    with the other block-id fetch, (D) splits under 256 keys, then (B) split counts, on every shape. Rows go
    to sweep_<device>.csv as they come (not the headline), each with its error against the reference."""
    from kernels.triton_attention import choose_config, device_sms

    sms = device_sms(torch.device(DEV))
    t_end = time.time() + budget_s
    path = out_dir / f"sweep_{tag}.csv"
    fields = ["batch", "ctx", "impl", "config", "time_us", "gbps", "pct_copy", "default", "err"]
    f = path.open("w", newline="")
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()

    def base(b: int, ctx: int):
        return choose_config(num_seqs=b, max_query_len=1, max_seq_len=ctx, num_kv_heads=HKV, group=HQ // HKV,
                             head_dim=D, elem_size=2, num_sms=sms)

    plan = []  # (shape, config, impls)
    for shape in cases:  # (E) a program's keys a loop step, its warps and stages: is a lone sequence's ~1 us a
        # 64-key step (1x4096: ~7 us of fixed cost besides) the loop's own latency or its bytes in flight?
        c = base(*shape)
        plan += [(shape, dataclasses.replace(c, block_n=n, num_warps=w, num_stages=st), ("paged", "linear"))
                 for n, w, st in DECODE_TILES if (n, w, st) != (c.block_n, c.num_warps, c.num_stages)
                 and n * c.num_splits <= shape[1]]
    for shape in cases:  # (C) PAGED block-id fetch: the other way, at the default split
        c = base(*shape)
        alt = dataclasses.replace(c, bt_ahead=not c.bt_ahead, num_stages=c.num_stages + (2 if c.bt_ahead else -2))
        plan.append((shape, alt, ("paged",)))
    for shape in cases:  # (D) splits of fewer than 256 keys (under SPLIT_MIN_TOKENS) where the batch
        # leaves SMs idle (1x4096: 32.5% of copy at 16 splits)
        c = base(*shape)
        plan += [(shape, dataclasses.replace(c, num_splits=sp), ("paged", "linear"))
                 for sp in (24, 32, 48, 64) if sp != c.num_splits and sp * 64 <= shape[1]
                 and shape[0] * HKV * sp <= 8 * sms]
    for shape in cases:  # (B) split counts: a runtime argument, so no recompiles
        c = base(*shape)
        plan += [(shape, dataclasses.replace(c, num_splits=sp), ("paged", "linear"))
                 for sp in (1, 2, 3, 4, 6, 8, 12, 16) if sp != c.num_splits and sp * 256 <= shape[1]]
    done = 0
    for (b, ctx), cfg, impls in plan:
        if time.time() > t_end:
            print(f"sweep: time budget spent after {done}/{len(plan)} configs")
            break
        case = cases[(b, ctx)]
        for impl in impls:
            try:
                us = case.time(impl, cfg)
            except Exception as e:  # e.g. out of shared memory for a large tile
                print(f"sweep {b}x{ctx} {impl} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                continue
            gbps = case.kv_bytes / (us * 1e-6) / 1e9
            row = dict(batch=b, ctx=ctx, impl=impl, config=_config_str(case, impl, cfg), time_us=round(us, 2),
                       gbps=round(gbps, 1), pct_copy=round(100 * gbps / copy_bw, 1),
                       default=cfg == base(b, ctx), err=case.error(impl, cfg))
            writer.writerow(row)
            f.flush()
            print(f"sweep {b:>4}x{ctx:<6} {impl:<7} {row['config']:<16} {us:9.2f} us {row['pct_copy']:6.1f}% copy "
                  f"err {row['err']:.1e}",
                  flush=True)
        done += 1
    f.close()
    print(f"wrote {path}")


def plot(rows: list[dict], copy_bw: float, device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [f"{r['batch']}x{r['ctx']}" for r in rows if r["impl"] == "paged"]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.27
    for j, impl in enumerate(IMPLS):
        vals = [r["gbps"] for r in rows if r["impl"] == impl]
        bars = ax.bar([i + (j - 1) * width for i in range(len(shapes))], vals, width, label=impl)
        ax.bar_label(bars, labels=[f"{100 * v / copy_bw:.0f}%" for v in vals], fontsize=6, padding=1)
    ax.axhline(copy_bw, color="k", ls="--", lw=1, label=f"copy bandwidth {copy_bw:.0f} GB/s")
    ax.axhline(0.8 * copy_bw, color="gray", ls=":", lw=1, label="80% of copy")
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_xlabel("batch x context")
    ax.set_ylabel("K+V bytes read / time (GB/s); labels: % of copy")
    ax.set_title(f"Decode attention, Llama-3-8B heads (32q/8kv/128, bf16) on {device}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _targets(rows: list[dict]) -> list[str]:
    by = {(r["batch"], r["ctx"], r["impl"]): r for r in rows}
    shapes = sorted({(r["batch"], r["ctx"]) for r in rows}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99)
    big = [s for s in shapes if s[0] >= 32]
    t1 = [by[(*s, "paged")]["pct_copy"] for s in big]
    gaps = [(by[(*s, "paged")]["time_us"] / by[(*s, "linear")]["time_us"] - 1) * 100 for s in shapes]
    vs_sdpa = [by[(*s, "sdpa_flash")]["time_us"] / by[(*s, "paged")]["time_us"] for s in shapes]
    lines = [
        f"- PAGED >= 80% of copy bandwidth for batch >= 32: {'MET' if min(t1) >= 80 else 'NOT MET'} "
        f"(min {min(t1):.1f}%, " + ", ".join(f"{b}x{c}: {p:.1f}%" for (b, c), p in zip(big, t1)) + ")",
        f"- PAGED within 5% of LINEAR at every shape: {'MET' if max(gaps) <= 5 else 'NOT MET'} "
        "(PAGED time / LINEAR time - 1: " + ", ".join(f"{b}x{c}: {g:+.1f}%" for (b, c), g in zip(shapes, gaps)) + ")",
        f"- PAGED at least as fast as SDPA-flash at every shape: {'MET' if min(vs_sdpa) >= 1 else 'NOT MET'} "
        "(SDPA time / PAGED time: " + ", ".join(f"{b}x{c}: {x:.2f}x" for (b, c), x in zip(shapes, vs_sdpa)) + ")",
    ]
    return lines


def use_device(smoke_cpu: bool, prog: str) -> None:
    """The device the benchmark runs on: CUDA, or with ``smoke_cpu`` the Triton interpreter on CPU
    (a check that the script runs, timings meaningless); without either, exit saying so."""
    global DEV
    if smoke_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        DEV = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit(f"{prog} needs a CUDA device")


def file_tag(device: str) -> str:
    """A device name as it goes into file names."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/kernels")
    ap.add_argument("--sweep", action="store_true", help="also time alternative kernel configs (tuning)")
    ap.add_argument("--sweep-budget-s", type=float, default=180.0)
    ap.add_argument("--shapes", default="", help="subset, e.g. '1x4096,64x4096'")
    ap.add_argument("--smoke-cpu", action="store_true", help="exercise the script on CPU (interpreter)")
    ap.add_argument("--fp8", action="store_true", help="also time PAGED and LINEAR over fp8 e4m3 caches")
    ap.add_argument("--pdl", action="store_true", help="also time PAGED and LINEAR launched with programmatic "
                    "dependent launch (Hopper+; engine.enable_pdl): repeated calls overlap as a step's kernels do")
    args = ap.parse_args()
    global FP8, PDL
    FP8, PDL = args.fp8, args.pdl
    use_device(args.smoke_cpu, "bench_kernels")
    import triton

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        device, sms, l2 = torch.cuda.get_device_name(0), props.multi_processor_count, props.L2_cache_size
    else:
        device, sms, l2 = "cpu-interpreter-smoke", 0, 1 << 20
    tag = file_tag(device)
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    print(f"device {device}, {sms} SMs, L2 {l2 >> 20} MiB, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    t0 = time.time()
    copies = copy_bandwidth_gbps()
    copy_bw = max(copies.values())
    print(f"copy bandwidth (read+write): {copy_bw:.0f} GB/s (memcpy {copies['memcpy']:.0f}, "
          f"elementwise kernel {copies['kernel']:.0f})", flush=True)
    reads = read_bandwidth_gbps()
    print(f"read bandwidth (no writes): {max(reads.values()):.0f} GB/s, {100 * max(reads.values()) / copy_bw:.0f}% of copy ("
          + ", ".join(f"{k} {v:.0f}" for k, v in reads.items()) + ")", flush=True)

    rows, cases = [], {}
    for b, ctx in shapes:
        case = DecodeCase(b, ctx, l2)
        errs = case.check()
        for impl in case.impls:
            if not errs[impl] < 2e-2:
                raise SystemExit(f"{impl} {b}x{ctx}: relative error {errs[impl]:.3e} vs reference")
        for impl in case.impls:
            us = case.time(impl)
            gbps = case.kv_bytes_of(impl) / (us * 1e-6) / 1e9
            rows.append(dict(device=device, batch=b, ctx=ctx, impl=impl, time_us=round(us, 2), gbps=round(gbps, 1),
                             pct_copy=round(100 * gbps / copy_bw, 1), rel_err=f"{errs[impl]:.1e}",
                             config=_config_str(case, impl) if impl != "sdpa_flash" else "",
                             kv_mb=round(case.kv_bytes_of(impl) / 1e6, 1), copy_gbps=round(copy_bw)))
            r = rows[-1]
            print(f"{b:>4}x{ctx:<6} {impl:<11} {us:9.2f} us {gbps:8.1f} GB/s {r['pct_copy']:6.1f}% copy "
                  f"err {r['rel_err']} {r['config']}", flush=True)
        if args.sweep:
            cases[(b, ctx)] = case
        else:
            del case
            if DEV == "cuda":
                torch.cuda.empty_cache()

    csv_path = out_dir / f"decode_{tag}.csv"
    write_rows(csv_path, rows)  # atomic: no partial file if cut off
    png_path = out_dir / f"decode_{tag}.png"
    plot(rows, copy_bw, device, png_path)
    targets = _targets(rows) if not args.shapes else []

    table = ["| batch x ctx | KV MB | impl | time (us) | GB/s | % of copy | config |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['batch']}x{r['ctx']} | {r['kv_mb']} | {r['impl']} | {r['time_us']} | {r['gbps']} | "
                     f"{r['pct_copy']} | {r['config']} |")
    readme = [
        "# Kernel benchmark: decode attention",
        "",
        f"Device: **{device}** ({sms} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}. Device-to-device copy bandwidth measured in the same run: "
        f"**{copy_bw:.0f} GB/s** (bytes read + written; best of `copy_` = cudaMemcpy "
        f"{copies['memcpy']:.0f} GB/s and an elementwise copy kernel {copies['kernel']:.0f} GB/s, "
        "1 GiB buffers, after a clock warm-up).",
        "",
        f"Command: `python -m experiments.bench_kernels --out {args.out}{' --fp8' if FP8 else ''}"
        f"{' --pdl' if PDL else ''}`",
        "",
        "Llama-3-8B heads (32 query, 8 KV, head dim 128, bf16), one query token per sequence. "
        "PAGED: block size 16, blocks randomly permuted; LINEAR: each sequence contiguous; "
        "SDPA: `scaled_dot_product_attention(enable_gqa=True)` under the flash backend on contiguous "
        "[B, 8, ctx, 128] K/V. Time: median over replays of a CUDA graph of repeated calls (device time); "
        "inputs below 4x L2 are rotated among copies. GB/s counts the K and V bytes read. "
        "Every shape is first checked against `kernels.reference` (rel_err in the CSV). "
        "Config: keys per tile / warps / pipeline stages / KV splits chosen by the heuristic.",
        "",
        *table,
        "",
        "## Targets",
        "",
        *targets,
        "",
        f"Files: `{csv_path.name}`, `{png_path.name}`.",
        "",
    ]
    write_text(out_dir / "README.md", "\n".join(readme))
    print("\n".join(table))
    print("\n".join(targets))
    print(f"wrote {csv_path}, {png_path}, {out_dir / 'README.md'} in {time.time() - t0:.0f}s", flush=True)
    if args.sweep:
        sweep(cases, copy_bw, out_dir, tag, args.sweep_budget_s)


if __name__ == "__main__":
    main()
