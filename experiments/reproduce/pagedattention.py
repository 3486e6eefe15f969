"""The PagedAttention paper's figures (Kwon et al., SOSP'23), one study each."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from experiments.reproduce.core import (LATENCY_LIMIT, ROOT, Ctx, Row, curves, mean_ci, paper_value, per_seed,
                                        ratio_row, row, run)
from experiments.reproduce.plots import bars, rate_plot, sweep_plot


OPT = ["+experiment=rate_sweep"]  # OPT-13B, simulated A100-40GB, pool left by the weights, Poisson arrivals
SHARED_PREFIX = ["+experiment=shared_prefix"]  # LLaMA-13B, simulated A100-40GB (Fig. 16)
BASES = [OPT, SHARED_PREFIX]  # every study's preset (its model and device): checked before any run
STRATS = {"Orca-Max": ["+strategy=contiguous-max"], "Orca-Pow2": ["+strategy=contiguous-pow2"],
          "Orca-Oracle": ["+strategy=contiguous-oracle"], "vLLM": ["+strategy=paged"]}
P = "pagedattention"


@dataclass
class Section:
    title: str
    setting: str
    rows: list[Row]
    plot: Path | None = None
    note: str = ""


def fig2_12_13(ctx: Ctx) -> list[Section]:
    rates = [1.0, 2.0, 4.0] if ctx.quick else [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
    nreq = ctx.n(1000, 60)
    data = curves(ctx, "rate_sweep", STRATS, rates, OPT, nreq)
    top = rates[-1]
    setting = (f"OPT-13B, simulated A100-40GB (the KV pool the weights leave), ShareGPT-like, {nreq} requests per run, "
               f"Poisson arrivals at {', '.join(f'{r:g}' for r in rates)} req/s, {ctx.repeats} seeds")
    # Fig. 2: time-weighted token states over the steady-state window at the highest rate (pool saturated)
    r2 = [row(P, "Fig. 2", f"token states, {k}", per_seed(data[k][top], "token_states_tw", 100)) for k in STRATS]
    why2 = {"Orca-Pow2": "", "Orca-Oracle": ""}
    for k in why2:
        why2[k] = ("kvlab's contiguous regions come from a first-fit arena over one pool, which packs more "
                   "reservations into it (external fragmentation measured at about 10%); the paper does not say "
                   "how its Orca reimplementation places regions, and its Orca-Pow2/Oracle left more of the pool "
                   "unused. Orca-Max and vLLM, whose waste is set by max_model_len and by the last block, match.")
    why2["Orca-Max"] = ("Orca-Max's share depends on how many 2048-token regions fit the pool (7 at a time "
                        "here): a seed-to-seed spread, not a bias.")
    why2["vLLM"] = "paged memory at saturation is token states but for the last partly filled block of each request."
    for k, r in zip(STRATS, r2):
        if r.verdict == "differs":
            r.why = why2[k]
    s2 = Section("Fig. 2: KV memory used by token states", setting + f"; time-weighted over the steady-state "
                 f"window (after the first tenth of the arrivals, to the last) at {top:g} req/s, where every "
                 "strategy's pool is full", r2)
    s2.plot = bars(ctx.out / "fig2_token_states.png", r2, list(STRATS), "token states (% of KV pool)",
                   f"Fig. 2: token states, {top:g} req/s (kvlab bars, paper o)")
    # Fig. 12: sustainable rate at equal latency
    r12 = [ratio_row(P, "Fig. 12", f"vLLM / {b} rate at equal latency", data, rates, den=b)
           for b in ("Orca-Oracle", "Orca-Max")]
    for r in r12:
        if r.verdict == "differs":
            r.why += ("The 2-4x of the paper's abstract spans its systems, models and workloads; for OPT-13B on "
                     "ShareGPT its Sec. 6.2 reports 1.7-2.7x over Orca-Oracle and 2.7-8x over Orca-Max, the "
                     "ranges to hold kvlab's two ratios against. kvlab's Orca-Oracle and Orca-Pow2 keep more "
                     "requests in the pool than the paper's (Fig. 2), which narrows the gap to paging.")
    s12 = Section("Fig. 12: throughput at equal latency (rate sweep)", setting + f"; a strategy's rate at equal "
                  f"latency is the highest rate whose normalized latency stays below {LATENCY_LIMIT} s/token "
                  "(interpolated), per seed", r12)
    s12.plot = rate_plot(ctx.out / "fig12_rate_sweep.png", data, rates, "Fig. 12: normalized latency vs rate",
                         ("Orca-Oracle", paper_value(P, "Fig. 12", "vLLM / Orca-Oracle rate at equal latency")["value"]),
                         "vLLM's rate = 2-4x Orca-Oracle's")
    # Fig. 13: batch size at 2 req/s
    r13r = 2.0 if 2.0 in rates else rates[len(rates) // 2]
    r13 = [row(P, "Fig. 13", f"batched requests, {k}", per_seed(data[k][r13r], "mean_batch_size_tw")) for k in STRATS]
    for k, r in zip(STRATS, r13):
        if r.verdict != "differs":
            continue
        if k == "vLLM":
            r.why = (f"At {r13r:g} req/s kvlab's simulated paged system is not memory-bound: it batches what "
                     "arrives (rate x time in the system), and its simulated steps (roofline cost model, no "
                     "scheduler or Python overheads) are shorter than the paper's, so fewer requests are in "
                     "flight. The paper's vLLM batched up to what its memory allowed.")
        else:
            r.why = ("kvlab's contiguous arena packs more reservations into the pool than the paper's Orca "
                     "(Fig. 2), so more requests run at once.")
    s13 = Section(f"Fig. 13: average batch size at {r13r:g} req/s", setting + "; mean number of running requests, "
                  "time-weighted over the steady-state window", r13)
    s13.plot = bars(ctx.out / "fig13_batch_size.png", r13, list(STRATS), "batched requests",
                    f"Fig. 13: mean batch, ShareGPT {r13r:g} req/s")
    return [s2, s12, s13]


def beam_supported() -> bool:
    src = (ROOT / "experiments" / "workloads.py").read_text()
    return "beam_width" in src


def fig14_15(ctx: Ctx) -> list[Section]:
    ns = [2, 6] if ctx.quick else [2, 4, 6]
    nreq, rate = ctx.n(500, 40), 8.0
    base = [*OPT, "workload=alpaca"]
    runs = {(k, n): run(ctx, "parallel", f"{k}-n{n}", [*base, *STRATS[k], f"workload.n={n}"], rate=rate, num_requests=nreq)
            for k in ("vLLM", "Orca-Oracle") for n in ns}
    setting = (f"OPT-13B, simulated A100-40GB, Alpaca-like prompts, {nreq} requests at {rate:g} req/s, n samples "
               f"per request, {ctx.repeats} seeds; saving = 1 - token-state bytes / bytes of all live tokens "
               "unshared, time-weighted over the steady-state window (the first tenth of the arrivals to the last)")
    r15 = []
    for n in ns:
        r = row(P, "Fig. 15a", f"memory saving, parallel sampling n={n}", per_seed(runs[("vLLM", n)], "sharing_saving_tw", 100))
        if r.verdict == "differs":
            r.why = ("kvlab's saving counts every live token; Alpaca's prompts (mean 19 tokens) are short, so "
                     "the shared prompt blocks are a small part of each request's KV. The paper's saving is "
                     "over its own (unstated) accounting window and tokenizer; kvlab's sampled outputs have the "
                     "Alpaca-like lengths of the workload generator, not the dataset's.")
        r15.append(r)
    beams, beam_series = [], {}
    if not beam_supported():
        why = "beam search is not a workload option in this tree yet (no workload.beam_width): kvlab cannot run the study"
        beams = [row(P, "Fig. 15b", f"memory saving, beam search, {wl}", forced="not yet measurable", why=why)
                 for wl in ("Alpaca", "ShareGPT")]
    else:
        widths = [2, 6] if ctx.quick else [2, 4, 6]
        for wl, brate, bn in (("alpaca", rate, nreq), ("sharegpt", 1.0, ctx.n(300, 30))):
            name = {"alpaca": "Alpaca", "sharegpt": "ShareGPT"}[wl]
            vals = []
            for k in widths:
                res = run(ctx, "beam", f"{wl}-k{k}", [*OPT, "+strategy=paged", f"workload={wl}", f"++workload.beam_width={k}"],
                          rate=brate, num_requests=bn)
                v = per_seed(res, "sharing_saving_tw", 100)
                vals.append(v)
                r = row(P, "Fig. 15b", f"memory saving, beam search, {name}", v)
                r.quantity = f"memory saving, beam search k={k}, {name}"
                r.setting = f"OPT-13B, {name}, beam width {k}, {brate:g} req/s, {bn} requests"
                if r.verdict == "differs":
                    r.why = ("the paper gives one range over widths 2-6; kvlab's saving grows with the width (more beams "
                             "share the prompt and the common part of their outputs): width 2 falls in the range, "
                             "wider beams above it. Simulate picks beams by a fixed rule (every 4th token the best "
                             "beam takes all places), not a model's log-probabilities; that rule sets how much of the "
                             "outputs the beams share, here more than the paper's model did.")
                beams.append(r)
            beam_series[f"beam search, {name}, {brate:g} req/s"] = (widths, vals)
    # Fig. 14: the rate each strategy sustains at equal latency, per n
    rates = [8.0, 32.0] if ctx.quick else [8.0, 16.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0, 256.0]
    ratios, plots = [], {}
    for n in ns:
        data = curves(ctx, f"parallel_rates/n{n}", {k: STRATS[k] for k in ("Orca-Oracle", "vLLM")}, rates,
                      [*base, f"workload.n={n}"], nreq)
        r = ratio_row(P, "Fig. 14", "vLLM / Orca-Oracle, normalized latency (no single number in the paper)",
                      data, rates)
        r.quantity = f"vLLM / Orca-Oracle rate at equal latency, parallel n={n}"
        r.setting = f"OPT-13B, Alpaca, parallel n={n}"
        ratios.append(r)
        plots[n] = rate_plot(ctx.out / f"fig14_parallel_n{n}.png", data, rates, f"Fig. 14: parallel sampling n={n}, Alpaca")
    s14 = Section("Fig. 14: parallel sampling, throughput at equal latency", setting.split("; saving")[0].replace(
                  f"at {rate:g} req/s", f"per run at {', '.join(f'{r:g}' for r in rates)} req/s"), ratios,
                  plot=plots[ns[-1]],
                  note="The paper's Fig. 14 gives curves without a single number; its text says vLLM's advantage "
                       "over Orca grows with the number of samples (more blocks shared). Plots per n: "
                       + ", ".join(f"[n={n}]({p.name})" for n, p in plots.items()) + ".")
    s15 = Section("Fig. 15: memory saving by sharing (parallel sampling, beam search)", setting
                  + ("; beam search: paged, ShareGPT-like at 1 req/s and Alpaca-like as above, k beams per request"
                     if beam_series else ""), [*r15, *beams])
    s15.plot = bars(ctx.out / "fig15_sharing.png", [*r15, *[b for b in beams if math.isfinite(b.kvlab)]],
                    [f"n={n}" for n in ns] + [b.quantity.split("search ")[1] for b in beams if math.isfinite(b.kvlab)],
                    "memory saving (%)", "Fig. 15: sharing saving, parallel n and beam k (paper range: black bar)")
    return [s14, s15]


def fig16(ctx: Ctx) -> list[Section]:
    rates = [4.0, 16.0, 64.0] if ctx.quick else [4.0, 8.0, 16.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0, 256.0, 384.0]
    nreq = ctx.n(1000, 60)
    base = SHARED_PREFIX
    rows, plots = [], []
    strategies = {"Orca-Oracle": ["+strategy=contiguous-oracle", "engine.enable_prefix_caching=false"],
                  "vLLM": ["+strategy=paged", "engine.enable_prefix_caching=true"]}
    for shots, plen in (("1-shot", 80), ("5-shot", 341)):
        data = curves(ctx, f"shared_prefix/{shots}", strategies, rates, [*base, f"workload.prefix_len={plen}"], nreq)
        r = ratio_row(P, "Fig. 16", f"vLLM / Orca-Oracle rate at equal latency, {shots}", data, rates)
        if r.verdict == "differs":
            batch = {k: mean_ci(per_seed(data[k][rates[-1]], "mean_batch_size_tw"))[0] for k in data}
            r.why += (f"At the top rate kvlab's Orca-Oracle runs {batch['Orca-Oracle']:.0f} requests at a time, each "
                      f"holding its own copy of the {plen}-token prefix (a large part of a request whose own sentence "
                      f"and output are 20-60 tokens each), against vLLM's {batch['vLLM']:.0f} (prefix stored once, "
                      "max_num_seqs 256): in simulate memory is the only limit, so the ratio follows the number of "
                      "requests each fits. The paper's smaller ratio is likely bounded by costs simulate does not "
                      "model (per-step scheduling and sampling that grow with the batch); kvlab's translation "
                      "workload is synthetic, not WMT16.")
        rows.append(r)
        plots.append(rate_plot(ctx.out / f"fig16_{shots}.png", data, rates, f"Fig. 16: shared prefix, {shots} ({plen} tokens)",
                               ("Orca-Oracle", r.paper), f"vLLM's rate = {r.paper}x Orca-Oracle's"))
    setting = (f"LLaMA-13B, simulated A100-40GB, one shared prefix (1-shot 80, 5-shot 341 tokens) + 20-60 token "
               f"sentence, 20-60 output tokens, {nreq} requests per run at {', '.join(f'{r:g}' for r in rates)} req/s, "
               f"{ctx.repeats} seeds; vLLM with prefix caching vs Orca-Oracle; latency limit {LATENCY_LIMIT} s/token")
    s = Section("Fig. 16: shared prefix (translation, k-shot)", setting, rows, plot=plots[0],
                note="5-shot plot: ![](fig16_5-shot.png)")
    return [s]


def fig17(ctx: Ctx) -> list[Section]:
    rates = [0.5, 1.0, 2.0] if ctx.quick else [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]
    nreq = ctx.n(400, 40)
    strategies = {"Orca-Oracle": STRATS["Orca-Oracle"], "Orca-Max": STRATS["Orca-Max"], "vLLM": STRATS["vLLM"]}
    data = curves(ctx, "chatbot", strategies, rates, [*OPT, "workload=chatbot"], nreq)
    r = ratio_row(P, "Fig. 17", "vLLM / Orca-Oracle rate at equal latency", data, rates)
    if r.verdict == "differs":
        pre = mean_ci(per_seed(data["vLLM"][rates[-1]], "preemptions"))[0]
        r.why += ("kvlab's conversations are synthetic (ShareGPT-like turns carrying their history, cut to 1024 "
                  "tokens); the paper replays ShareGPT conversations. Near Orca-Oracle's limit kvlab's vLLM already "
                  f"preempts by recompute ({pre:.0f} preemptions per run at {rates[-1]:g} req/s), each recomputing "
                  "up to 1024 tokens of history, which costs it latency the paper's measurement may not have had.")
    setting = (f"OPT-13B, simulated A100-40GB, chatbot workload (4 turns, history cut to 1024 tokens), {nreq} "
               f"requests per run at {', '.join(f'{r:g}' for r in rates)} req/s, {ctx.repeats} seeds")
    s = Section("Fig. 17: chatbot", setting, [r])
    s.plot = rate_plot(ctx.out / "fig17_chatbot.png", data, rates, "Fig. 17: chatbot", ("Orca-Oracle", r.paper),
                       "vLLM's rate = 2x Orca-Oracle's")
    return [s]


def _kernel_table() -> list[tuple[str, float]]:
    """(shape, PAGED time / LINEAR time - 1 in %) from results/kernels/README.md (NVIDIA H200)."""
    path = ROOT / "results" / "kernels" / "README.md"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            m = re.match(r"\|\s*(\d+x\d+)\s*\|.*\|\s*([+-]\d+\.\d+)%\s*\|\s*[\d.]+x\s*\|\s*\d+\s*\|$", line)
            if m:
                out.append((m.group(1), float(m.group(2))))
    return out


def fig18(ctx: Ctx) -> list[Section]:
    kern = _kernel_table()
    ra = row(P, "Fig. 18a", "paged kernel slower than contiguous",
             kvlab=(max(v for _, v in kern), math.nan, len(kern)) if kern else None,
             why=("kvlab's PAGED and LINEAR attention are one Triton kernel that differs only in addressing (a "
                  "block-table load per tile), so paging costs 0-8% here (worst of 7 shapes quoted; "
                  "results/kernels/README.md, NVIDIA H200); the paper compared its 2023 paged kernel with "
                  "FasterTransformer's contiguous one on an A100."))
    if not kern:
        ra.forced, ra.why = "not measured", "results/kernels/README.md (a GPU run) is missing"
    blocks = [4, 16, 64] if ctx.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    nreq = ctx.n(500, 40)
    series, rows = {}, [ra]
    for wl, rate in (("sharegpt", 3.0), ("alpaca", 30.0)):
        res = {b: run(ctx, f"block_size/{wl}", f"b{b}", [*OPT, "+strategy=paged", f"workload={wl}",
                                                         f"allocator.args.block_size={b}"], rate=rate, num_requests=nreq)
               for b in blocks}
        vals = [per_seed(res[b], "normalized_latency") for b in blocks]
        series[f"{wl}, {rate:g} req/s"] = (blocks, vals)
        means = [mean_ci(v) for v in vals]
        best = min(range(len(blocks)), key=lambda i: means[i][0])
        # the best block size and whether 16 is within the best one's CI
        r = row(P, "Fig. 18b", "best block size", kvlab=(float(blocks[best]), math.nan, means[best][2]))
        r.setting = f"OPT-13B, {wl}, {rate:g} req/s"
        i16 = blocks.index(16) if 16 in blocks else None
        if i16 is not None and means[i16][0] - (means[i16][1] if math.isfinite(means[i16][1]) else 0) <= \
                means[best][0] + (means[best][1] if math.isfinite(means[best][1]) else 0):
            r.forced = "within CI"
            r.why = "block 16's normalized latency is within the CI of the best block size's"
        if r.verdict == "differs" or (r.forced and blocks[best] != 16):
            r.why = ((r.why + "; ") if r.why else "") + (
                "simulate's roofline cost model charges no kernel time for block-table lookups, so small blocks "
                "lose nothing in it and the curve is flat to falling towards small blocks; the paper's "
                "optimum comes from its kernel's cost at small blocks (Fig. 18a)")
        rows.append(r)
    setting = (f"paged allocator, OPT-13B, simulated A100-40GB, block sizes {', '.join(map(str, blocks))}, {nreq} "
               f"requests per run (ShareGPT-like at 3 req/s, Alpaca-like at 30 req/s), {ctx.repeats} seeds; the "
               "kernel figure is quoted from kvlab's kernel benchmark on an NVIDIA H200")
    s = Section("Fig. 18: block size", setting, rows)
    s.plot = sweep_plot(ctx.out / "fig18_block_size.png", series, "block size (tokens)", "normalized latency (s/token)",
                        "Fig. 18b: block size (paper: 16 best)", paper_x=16)
    return [s]


def fig19(ctx: Ctx) -> list[Section]:
    blocks = [4, 16, 64] if ctx.quick else [4, 8, 16, 32, 64, 128, 256]
    nreq, rate = ctx.n(500, 40), 4.0
    series, res = {}, {}
    for mode in ("recompute", "swap"):
        res[mode] = {b: run(ctx, "preemption", f"{mode}-b{b}", [*OPT, "+strategy=paged", f"engine.preemption_mode={mode}",
                                                                 "engine.swap_space=4", f"allocator.args.block_size={b}"],
                            rate=rate, num_requests=nreq) for b in blocks}
        series[mode] = (blocks, [per_seed(res[mode][b], "normalized_latency") for b in blocks])
    r = row(P, "Fig. 19", "swap / recompute normalized latency (comparable at 16-64)",
            [s / c for s, c in zip(per_seed(res["swap"][16], "normalized_latency"),
                                   per_seed(res["recompute"][16], "normalized_latency"))])
    if r.verdict == "differs":
        r.why = ("Simulate charges swapped KV to the clock at the simulated PCIe bandwidth (25 GB/s) and recompute "
                 "as the prefill it repeats, with no per-block transfer overhead: the paper's small-block swap "
                 "penalty (many small cudaMemcpy calls) is not modelled.")
    pre = [mean_ci(per_seed(res["recompute"][b], "preemptions"))[0] for b in blocks]
    setting = (f"paged allocator, OPT-13B, simulated A100-40GB, ShareGPT-like, {nreq} requests at {rate:g} req/s, "
               f"block sizes {', '.join(map(str, blocks))}, recompute vs swap (4 GiB host), {ctx.repeats} seeds")
    s = Section("Fig. 19: recompute vs swap", setting, [r],
                note="Preemptions per run with recompute (mean): " + ", ".join(f"block {b}: {p:.0f}" for b, p in zip(blocks, pre)))
    s.plot = sweep_plot(ctx.out / "fig19_preemption.png", series, "block size (tokens)", "normalized latency (s/token)",
                        f"Fig. 19: recompute vs swap, ShareGPT {rate:g} req/s")
    return [s]
