"""The vAttention paper's results (ASPLOS'25): page size and fragmentation, allocation latency."""
from __future__ import annotations

import math

from experiments.reproduce.core import Ctx, ROOT, mean_ci, per_seed, row, run
from experiments.reproduce.plots import PAPER_MARK, _plt, finish, sweep_plot
from experiments.reproduce.pagedattention import Section, _kernel_table


V = "vattention"
PAGE_SIZE = ["+experiment=page_size", "engine.kv_cache_tokens=null", "engine.gpu_memory_utilization=0.9"]
BASES = [PAGE_SIZE]  # every study's preset (its model and device): checked before any run


def page_size_study(ctx: Ctx) -> list[Section]:
    sizes = [131072, 2097152] if ctx.quick else [131072, 262144, 524288, 1048576, 2097152]
    nreq, rate = ctx.n(500, 40), ctx.n(8, 8)
    base = PAGE_SIZE
    series, res = {}, {}
    waste = lambda s: [100 * (a + b) for a, b in zip(per_seed(s, "reservation_tw"), per_seed(s, "internal_frag_tw"))]  # noqa: E731
    for layout in ("per_layer", "shared"):
        res[layout] = {p: run(ctx, f"page_size/{layout}", f"p{p}", [*base, f"allocator.args.layout={layout}",
                                                                    f"allocator.args.page_size={p}"],
                              rate=rate, num_requests=nreq) for p in sizes}
        series[f"virtual, {layout}"] = ([p // 1024 for p in sizes], [waste(res[layout][p]) for p in sizes])
    paged = run(ctx, "page_size", "paged-b16", [*base, "allocator=paged", "allocator.args.block_size=16"],
                rate=rate, num_requests=nreq)
    series["paged, block 16"] = ([p // 1024 for p in sizes], [waste(paged)] * len(sizes))
    # per request: (reservation + internal) bytes per running sequence, 2 MiB per_layer pages
    two = res["per_layer"][2097152]
    per_req = []
    for s in two:
        cap_bytes = s.get("kv_capacity_tokens", 0) * 2 * 32 * 8 * 128 * 2  # Llama-3-8B: K+V x 32 layers x 8 heads x 128 x bf16
        b = s.get("mean_batch_size_tw") or math.nan
        per_req.append(((s.get("reservation_tw") or 0) + (s.get("internal_frag_tw") or 0)) * cap_bytes / b / 2**20)
    r = row(V, "page size", "KV mapped beyond tokens per request, at most 1 page per K/V per layer", per_req)
    if r.verdict == "differs":
        r.why = "a sequence holds more than one partly filled page per range: see the allocator's prefetch lead"
    else:
        r.why = ("the mean is above the half page per range (64 MiB) that uniform filling would give because most "
                 "ShareGPT-like requests are shorter than one 2 MiB per-layer page (1024 tokens of Llama-3-8B): "
                 "their only page stays mostly empty")
    setting = (f"virtual allocator, Llama-3-8B, simulated A100-80GB with the KV pool the weights leave "
               f"(engine.kv_cache_tokens=null, 90% of memory), ShareGPT-like, {nreq} requests at {rate:g} req/s, "
               f"page sizes {', '.join(f'{p // 1024} KiB' for p in sizes)} x layout per_layer/shared, {ctx.repeats} seeds; "
               "waste = reservation + internal fragmentation, time-weighted over the steady-state window")
    tab = "\n".join(f"| {layout} | " + " | ".join(
        "{:.1f} ± {:.1f}".format(*[(v if math.isfinite(v) else 0.0) for v in mean_ci(waste(res[layout][p]))[:2]])
        for p in sizes) + " |" for layout in ("per_layer", "shared"))
    note = ("Waste (% of the pool) by page size; paged with 16-token blocks: {:.1f}%.\n\n| layout | ".format(mean_ci(waste(paged))[0])
            + " | ".join(f"{p // 1024} KiB" for p in sizes) + " |\n|---|" + "---|" * len(sizes) + "\n" + tab)
    s = Section("Page size and fragmentation", setting, [r], note=note)
    s.plot = sweep_plot(ctx.out / "page_size_waste.png", series, "page size (KiB)", "reservation + internal frag. (% of pool)",
                        "vAttention: waste vs page size (paper default: 2 MiB)", paper_x=2048)
    return [s]


def _vmm_table() -> dict[str, dict[str, float]]:
    path = ROOT / "results" / "vmm" / "vmm.md"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 7 and cells[0].startswith("cuMem"):
                try:
                    out[cells[0]] = dict(zip(("n", "median", "p10", "p90", "mean", "max"), map(float, cells[1:])))
                except ValueError:
                    pass
    return out


def allocation_latency(ctx: Ctx) -> list[Section]:
    vmm = _vmm_table()
    m = vmm.get("cuMemMap+cuMemSetAccess")
    r = row(V, "allocation latency", "map one 2 MiB page",
            kvlab=(m["median"], math.nan, int(m["n"])) if m else None)
    if not m:
        r.forced, r.why = "not measured", "results/vmm/vmm.md (a GPU run) is missing"
    kern = _kernel_table()
    worst = max((v for _, v in kern), default=math.nan)
    rk = row(V, "decode kernel", "decode speedup of a contiguous kernel over the paged one, up to",
             kvlab=(1 + worst / 100, math.nan, len(kern)) if kern else None,
             why=("kvlab runs one Triton kernel for both addressing modes, so contiguous (LINEAR) gains at most "
                  f"{worst:.1f}% over PAGED (results/kernels/README.md, H200); vAttention's 1.97x compares "
                  "FlashAttention-2 over contiguous memory with vLLM's 2023 paged kernel, i.e. two kernels."))
    if not kern:
        rk.forced, rk.why = "not measured", "results/kernels/README.md (a GPU run) is missing"
    setting = ("quoted from kvlab's measurements on an NVIDIA H200 (`python -m experiments.bench_vmm`, "
               "results/vmm/vmm.md: 256 pages of 2 MiB, host wall time per driver call, median; the kernel "
               "benchmark results/kernels/README.md), not re-measured by this command")
    note = ""
    if m:
        note = (f"cuMemMap + cuMemSetAccess per 2 MiB page: median {m['median']:g} us (p10 {m['p10']:g}, p90 "
                f"{m['p90']:g}, n={m['n']:g}); nearly all of it is cuMemSetAccess "
                f"({vmm.get('cuMemSetAccess', {}).get('median', math.nan):g} us). With the allocator's prefetch "
                "(mapping ahead of need on a background thread, as vAttention overlaps allocation with compute) a "
                "decode step in which 8 sequences cross a 64-page group costs 76 us instead of 20 ms.")
    s = Section("Allocation latency and the decode kernel", setting, [r, rk], note=note)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ops = [k for k in ("cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemMap+cuMemSetAccess", "cuMemUnmap") if k in vmm]
    if ops:
        ax.bar(range(len(ops)), [vmm[o]["median"] for o in ops],
               yerr=[[vmm[o]["median"] - vmm[o]["p10"] for o in ops], [vmm[o]["p90"] - vmm[o]["median"] for o in ops]],
               capsize=4, color="tab:blue", alpha=0.8, label="kvlab H200 (median, p10-p90)")
        ax.plot([ops.index("cuMemMap+cuMemSetAccess") + 0.3], [40.0], **PAPER_MARK, label="paper: ~40 us per page")
        ax.set_xticks(range(len(ops)), [o.replace("+", "+\n") for o in ops], fontsize=7)
    ax.set_ylabel("host time per 2 MiB page (us)")
    s.plot = finish(fig, ax, ctx.out / "allocation_latency.png", "vAttention: VMM call latency")
    return [s]
