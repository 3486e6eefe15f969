"""``kvlab reproduce PAPER``: run every study of a paper and write its page."""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

from experiments.reproduce import pagedattention, vattention
from experiments.atomic import staged_folder
from experiments.preflight import check_folder
from experiments.reproduce.core import Ctx, PAPERS, TITLES, _bounds, check_studies
from experiments.reproduce.pagedattention import Section, fig14_15, fig16, fig17, fig18, fig19, fig2_12_13
from experiments.reproduce.vattention import allocation_latency, page_size_study

STUDIES = {"pagedattention": [fig2_12_13, fig14_15, fig16, fig17, fig18, fig19],
           "vattention": [page_size_study, allocation_latency]}
BASES = {"pagedattention": pagedattention.BASES, "vattention": vattention.BASES}



def _num(v, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, (tuple, list)):
        return f"{_num(v[0])}-{_num(v[1])}"
    v = float(v)
    if not math.isfinite(v):
        return "—"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def write_page(ctx: Ctx, sections: list[Section], seconds: float, argv: list[str]) -> Path:
    lines = [f"# Reproduction: {TITLES[ctx.paper]}", "",
             f"Made by `kvlab reproduce {' '.join(argv)}` ({'quick sizes' if ctx.quick else 'full sizes'}, "
             f"mode {ctx.mode}, {ctx.repeats} seeds per configuration): {ctx.ran + ctx.resumed} runs into `{ctx.runs}` "
             f"({ctx.ran} made by this invocation, {ctx.resumed} resumed: rerunning skips finished runs); the runs "
             f"took {ctx.run_seconds / 60:.1f} min of wall time in all, this invocation {seconds / 60:.1f} min. "
             "Simulate uses the roofline cost model (kvlab has a measured device profile for the H200 only, and "
             "the papers' devices are A100s).", "",
             "Verdicts: **within CI** (kvlab's 95% interval over seeds meets the paper's value or range), "
             "**within 10%** (the mean is within 10% of it), **differs** (**inconclusive**: a lower bound below the paper's value); ratio = kvlab / paper (a range: its "
             "midpoint). In the plots the paper's values are hollow black markers (a range: a black bar). "
             "Figures quoted from a GPU run have no CI (one measurement, n = samples).", "",
             "| figure | setting | quantity | paper | kvlab ± 95% CI | n | ratio | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [r for s in sections for r in s.rows]
    for r in rows:
        k = r.bound + _num(r.kvlab) + (f" ± {_num(r.ci95)}" if math.isfinite(r.ci95) else "")
        lines.append(f"| {r.figure} | {r.setting} | {r.quantity} | {_num(r.paper)} {r.unit} | {k} | {r.n} | "
                     f"{_num(r.ratio)} | {r.verdict} |")
    for s in sections:
        lines += ["", f"## {s.title}", "", f"Setting: {s.setting}.", ""]
        lines += ["| quantity | paper | kvlab ± 95% CI | ratio | verdict |", "|---|---|---|---|---|"]
        for r in s.rows:
            k = r.bound + _num(r.kvlab) + (f" ± {_num(r.ci95)}" if math.isfinite(r.ci95) else "")
            lines.append(f"| {r.quantity} ({r.setting}) | {_num(r.paper)} {r.unit} | {k} | {_num(r.ratio)} | {r.verdict} |")
        whys: dict[str, list[str]] = {}
        for r in s.rows:
            if r.why:
                whys.setdefault(r.why.strip(), []).append(r.quantity)
        if whys:
            lines += ["", "Why (and notes):", *[f"- {'; '.join(qs)}: {w}" for w, qs in whys.items()]]
        if s.note:
            lines += ["", s.note]
        if s.plot:
            lines += ["", f"![{s.title}]({s.plot.name})"]
    (ctx.out / "README.md").write_text("\n".join(lines) + "\n")
    with open(ctx.out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["figure", "setting", "quantity", "unit", "paper_low", "paper_high", "kvlab", "ci95", "n", "ratio", "verdict"])
        for r in rows:
            lo, hi = _bounds(r.paper) if r.paper is not None else (math.nan, math.nan)
            w.writerow([r.figure, r.setting, r.quantity, r.unit, lo, hi, r.kvlab, r.ci95, r.n, r.ratio, r.verdict])
    return ctx.out / "README.md"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvlab reproduce", description="every figure of a paper, with the paper's values")
    ap.add_argument("paper", choices=PAPERS)
    ap.add_argument("--quick", action="store_true", help="small sizes (CI, tests)")
    ap.add_argument("--repeats", type=int, default=3, help="seeds per configuration (default 3)")
    ap.add_argument("--mode", choices=("simulate", "offline", "online"), default="simulate",
                    help="simulate (default) or the real engine on a GPU, where the paper's models have weights "
                         "(offline: every request at t=0, the studies' rates unused)")
    ap.add_argument("--runs", default=None, help="run folders (default runs/reproduce/<paper>)")
    ap.add_argument("--out", default=None, help="the page's folder (default results/reproduction/<paper>)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        print("kvlab reproduce: --repeats must be >= 1", file=sys.stderr)
        return 2
    import logging

    from experiments.preflight import UserError
    from experiments.run import ResumeConflict

    logging.getLogger("kvlab.run").setLevel(logging.WARNING)
    logging.getLogger("kvlab.sim").setLevel(logging.ERROR)  # no profile for the A100s: roofline, said on the page
    out = Path(args.out or f"results/reproduction/{args.paper}")
    runs = Path(args.runs or f"runs/reproduce/{args.paper}")
    # the page and plots are made in a folder of their own and moved into OUT at the end: a study
    # that fails leaves OUT as it was
    try:
        check_folder("--out", out)
        check_folder("--runs", runs)
        ctx = Ctx(args.paper, runs, out, args.repeats, args.quick, args.mode)
        check_studies(ctx, BASES[args.paper])
        with staged_folder(out) as stage:
            ctx.out = stage
            t0 = time.perf_counter()
            sections = []
            for study in STUDIES[args.paper]:
                t = time.perf_counter()
                sections += study(ctx)
                print(f"kvlab reproduce {args.paper}: {study.__name__} done ({time.perf_counter() - t:.0f} s)",
                      flush=True)
            write_page(ctx, sections, time.perf_counter() - t0, [args.paper, *[a for a in argv if a != args.paper]])
    except (UserError, ResumeConflict) as e:  # ResumeConflict: a run folder under --runs holds other settings
        print(f"kvlab reproduce: {e}", file=sys.stderr)
        return 2
    print(f"kvlab reproduce {args.paper}: {out / 'README.md'}")
    return 0
