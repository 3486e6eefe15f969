"""The papers' values, verdicts, and running a study's configurations (shared by every figure)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
PAPERS = ("pagedattention", "vattention")
TITLES = {"pagedattention": "PagedAttention (Kwon et al., SOSP'23)",
          "vattention": "vAttention (Prabhu et al., ASPLOS'25)"}
LATENCY_LIMIT = 0.2  # s/token: "equal latency" = the highest rate whose normalized latency stays below this

# ---------------------------------------------------------------------------- the papers' values
# (paper, figure, setting, quantity, value: a number or a (low, high) range, unit)
PAPER_VALUES: list[dict] = [
    dict(paper="pagedattention", figure="Fig. 2", setting="OPT-13B, A100-40GB, ShareGPT", quantity="token states, Orca-Max", value=20.4, unit="% of KV pool"),
    dict(paper="pagedattention", figure="Fig. 2", setting="OPT-13B, A100-40GB, ShareGPT", quantity="token states, Orca-Pow2", value=26.8, unit="% of KV pool"),
    dict(paper="pagedattention", figure="Fig. 2", setting="OPT-13B, A100-40GB, ShareGPT", quantity="token states, Orca-Oracle", value=38.2, unit="% of KV pool"),
    dict(paper="pagedattention", figure="Fig. 2", setting="OPT-13B, A100-40GB, ShareGPT", quantity="token states, vLLM", value=96.3, unit="% of KV pool"),
    dict(paper="pagedattention", figure="Fig. 12", setting="OPT-13B, ShareGPT, rate sweep", quantity="vLLM / Orca-Oracle rate at equal latency", value=(2.0, 4.0), unit="x"),
    dict(paper="pagedattention", figure="Fig. 12", setting="OPT-13B, ShareGPT, rate sweep", quantity="vLLM / Orca-Max rate at equal latency", value=(2.0, 4.0), unit="x"),
    dict(paper="pagedattention", figure="Fig. 13", setting="OPT-13B, ShareGPT, 2 req/s", quantity="batched requests, Orca-Max", value=7.00, unit="requests"),
    dict(paper="pagedattention", figure="Fig. 13", setting="OPT-13B, ShareGPT, 2 req/s", quantity="batched requests, Orca-Pow2", value=9.81, unit="requests"),
    dict(paper="pagedattention", figure="Fig. 13", setting="OPT-13B, ShareGPT, 2 req/s", quantity="batched requests, Orca-Oracle", value=13.62, unit="requests"),
    dict(paper="pagedattention", figure="Fig. 13", setting="OPT-13B, ShareGPT, 2 req/s", quantity="batched requests, vLLM", value=30.42, unit="requests"),
    dict(paper="pagedattention", figure="Fig. 14", setting="OPT-13B, Alpaca, parallel n=2..6", quantity="vLLM / Orca-Oracle, normalized latency (no single number in the paper)", value=None, unit="x"),
    *[dict(paper="pagedattention", figure="Fig. 15a", setting=f"OPT-13B, Alpaca, parallel n={n}", quantity=f"memory saving, parallel sampling n={n}", value=(6.1, 9.8), unit="%") for n in (2, 4, 6)],
    dict(paper="pagedattention", figure="Fig. 15b", setting="OPT-13B, Alpaca, beam width 2..6", quantity="memory saving, beam search, Alpaca", value=(37.6, 55.2), unit="%"),
    dict(paper="pagedattention", figure="Fig. 15b", setting="OPT-13B, ShareGPT, beam width 2..6", quantity="memory saving, beam search, ShareGPT", value=(44.3, 66.3), unit="%"),
    dict(paper="pagedattention", figure="Fig. 16", setting="LLaMA-13B, WMT16-like, 1-shot prefix (80 tok)", quantity="vLLM / Orca-Oracle rate at equal latency, 1-shot", value=1.67, unit="x"),
    dict(paper="pagedattention", figure="Fig. 16", setting="LLaMA-13B, WMT16-like, 5-shot prefix (341 tok)", quantity="vLLM / Orca-Oracle rate at equal latency, 5-shot", value=3.58, unit="x"),
    dict(paper="pagedattention", figure="Fig. 17", setting="OPT-13B, chatbot (history 1024)", quantity="vLLM / Orca-Oracle rate at equal latency", value=2.0, unit="x"),
    dict(paper="pagedattention", figure="Fig. 18a", setting="decode attention kernel", quantity="paged kernel slower than contiguous", value=(20.0, 26.0), unit="%"),
    dict(paper="pagedattention", figure="Fig. 18b", setting="OPT-13B, ShareGPT, fixed rate", quantity="best block size", value=16, unit="tokens"),
    dict(paper="pagedattention", figure="Fig. 18b", setting="OPT-13B, Alpaca, fixed rate", quantity="best block size", value=16, unit="tokens"),
    dict(paper="pagedattention", figure="Fig. 19", setting="OPT-13B, ShareGPT, block 16", quantity="swap / recompute normalized latency (comparable at 16-64)", value=1.0, unit="x"),
    dict(paper="vattention", figure="page size", setting="Llama-3-8B, A100-80GB, ShareGPT, 2 MiB pages", quantity="KV mapped beyond tokens per request, at most 1 page per K/V per layer", value=(0.0, 128.0), unit="MiB"),
    dict(paper="vattention", figure="allocation latency", setting="cuMemMap + cuMemSetAccess", quantity="map one 2 MiB page", value=40.0, unit="us"),
    dict(paper="vattention", figure="decode kernel", setting="contiguous (FA2) vs vLLM paged kernel", quantity="decode speedup of a contiguous kernel over the paged one, up to", value=1.97, unit="x"),
]


def paper_value(paper: str, figure: str, quantity: str):
    for row in PAPER_VALUES:
        if row["paper"] == paper and row["figure"] == figure and row["quantity"] == quantity:
            return row
    raise KeyError((paper, figure, quantity))


# ---------------------------------------------------------------------------- verdicts

def _bounds(paper) -> tuple[float, float]:
    return (float(paper[0]), float(paper[1])) if isinstance(paper, (tuple, list)) else (float(paper), float(paper))


def ratio(kvlab: float, paper) -> float:
    """kvlab / the paper's value (a range: its midpoint)."""
    if paper is None or not math.isfinite(kvlab):
        return math.nan
    lo, hi = _bounds(paper)
    mid = (lo + hi) / 2
    return kvlab / mid if mid else math.nan


def verdict(kvlab: float, ci95: float, paper) -> str:
    """``within CI``: kvlab's 95% interval meets the paper's value (or range); ``within 10%``: the
    mean is within 10% of it (of the nearest end of a range); else ``differs``."""
    if paper is None:
        return "no paper number"
    if kvlab is None or not math.isfinite(kvlab):
        return "not measured"
    ci = ci95 if ci95 is not None and math.isfinite(ci95) else 0.0
    lo, hi = _bounds(paper)
    if kvlab - ci <= hi and kvlab + ci >= lo:
        return "within CI"
    nearest = lo if kvlab < lo else hi
    if abs(kvlab - nearest) <= 0.1 * abs(nearest):
        return "within 10%"
    return "differs"


def mean_ci(values) -> tuple[float, float, int]:
    from experiments.tables import mean_ci95

    return mean_ci95(list(values))


@dataclass
class Row:
    figure: str
    quantity: str
    setting: str
    paper: object
    unit: str
    kvlab: float = math.nan
    ci95: float = math.nan
    n: int = 0
    why: str = ""  # why it differs (or why not measurable)
    forced: str = ""  # a verdict that is not computed (e.g. "not yet measurable")
    bound: str = ""  # ">= " where kvlab's value is a lower bound

    @property
    def verdict(self) -> str:
        return self.forced or verdict(self.kvlab, self.ci95, self.paper)

    @property
    def ratio(self) -> float:
        return ratio(self.kvlab, self.paper)


def row(paper: str, figure: str, quantity: str, values=(), why: str = "", forced: str = "", kvlab=None) -> Row:
    pv = paper_value(paper, figure, quantity)
    r = Row(figure, quantity, pv["setting"], pv["value"], pv["unit"], why=why, forced=forced)
    if kvlab is not None:
        r.kvlab, r.ci95, r.n = kvlab
    elif values:
        r.kvlab, r.ci95, r.n = mean_ci(values)
    return r


# ---------------------------------------------------------------------------- running

@dataclass
class Ctx:
    paper: str
    runs: Path
    out: Path
    repeats: int
    quick: bool
    mode: str
    log: list[str] = field(default_factory=list)
    ran: int = 0  # runs made by this invocation
    resumed: int = 0  # finished runs found (skipped)
    run_seconds: float = 0.0  # wall time of every run's own measurement (summary.json wall_time_s)

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def run_overrides(ctx: Ctx, overrides: list[str], rate: float | None = None,
                  num_requests: int | None = None) -> list[str]:
    """A study's configuration in ``ctx.mode``: offline sends every request at t=0, so a study's
    rate (and the steady-state window it sets) does not apply there."""
    ov = [*overrides, f"repeats={ctx.repeats}", "progress=false", "report=false"]
    if ctx.mode != "simulate":
        ov.append(f"mode={ctx.mode}")
    if num_requests is not None:
        ov.append(f"workload.num_requests={num_requests}")
    if ctx.mode == "offline":
        ov.append("workload.request_rate=inf")  # presets set a rate: offline has none
    elif rate is not None:
        ov.append(f"workload.request_rate={rate}")
        if num_requests:  # the steady-state window: after the first tenth of the arrivals
            ov.append(f"measure.warmup_s={0.1 * num_requests / rate:.6g}")
    return ov


def check_studies(ctx: Ctx, bases: list[list[str]]) -> None:
    """Each study preset of a paper (``bases``) in ``ctx.mode`` through kvlab run's checks before
    any run: a mode its models cannot run in is one line, not a traceback from the first run."""
    from experiments.preflight import UserError
    from experiments.run import check_config, compose

    for base in bases:
        cfg = compose(run_overrides(ctx, base, rate=1.0, num_requests=10))
        if ctx.mode != "simulate" and cfg.model.get("shape"):
            raise UserError(f"--mode {ctx.mode}: {ctx.paper}'s studies use model={cfg.model.name}, a "
                            "simulate-only shape (no weights): use --mode simulate (the default)")
        try:
            check_config(cfg)
        except UserError as e:
            raise UserError(f"{e} (a study of {ctx.paper}, --mode {ctx.mode}); nothing has run") from None


def run(ctx: Ctx, study: str, name: str, overrides: list[str], rate: float | None = None,
        num_requests: int | None = None) -> list[dict]:
    """One configuration, ``ctx.repeats`` seeds, into runs/<study>/<name>/: the summaries (resumed
    where finished)."""
    from experiments.run import compose, missing_tables, run_experiment

    ov = run_overrides(ctx, overrides, rate, num_requests)
    t = time.perf_counter()
    folder = ctx.runs / study / name
    done = sum(not missing_tables(p.parent) for p in folder.glob("**/summary.json")) if folder.is_dir() else 0
    res = run_experiment(compose(ov), folder)
    ctx.log.append(f"{study}/{name}: {time.perf_counter() - t:.1f} s")
    summaries = res["repeats"] if "repeats" in res else [res]
    ctx.resumed += min(done, len(summaries))
    ctx.ran += len(summaries) - min(done, len(summaries))
    ctx.run_seconds += sum(float(x.get("wall_time_s", 0.0)) for x in summaries)
    return summaries


def per_seed(summaries: list[dict], key: str, scale: float = 1.0) -> list[float]:
    return [scale * float(s.get(key, math.nan) if s.get(key) is not None else math.nan) for s in summaries]


def sustainable_rate(rates: list[float], latencies: list[float], limit: float = LATENCY_LIMIT) -> float:
    """The highest request rate whose normalized latency stays below ``limit`` (linear between the
    last rate below and the first above; the top rate if none is above, the lowest if none below)."""
    pts = sorted(zip(rates, latencies))
    prev = None
    for r, lat in pts:
        if not (lat <= limit):
            if prev is None:
                return r
            r0, l0 = prev
            return r0 + (r - r0) * (limit - l0) / (lat - l0) if math.isfinite(lat) else r0
        prev = (r, lat)
    return pts[-1][0]


def curves(ctx: Ctx, study: str, strategies: dict[str, list[str]], rates: list[float], base: list[str],
           num_requests: int) -> dict[str, dict[float, list[dict]]]:
    return {label: {r: run(ctx, study, f"{label}-r{r:g}", [*base, *ov], rate=r, num_requests=num_requests)
                    for r in rates} for label, ov in strategies.items()}


def rate_ratio(data, num: str, den: str, rates: list[float]) -> list[float]:
    """Per seed: sustainable rate of ``num`` / that of ``den``."""
    out = []
    for i in range(min(len(data[num][rates[0]]), len(data[den][rates[0]]))):
        a = sustainable_rate(rates, [data[num][r][i].get("normalized_latency", math.nan) for r in rates])
        b = sustainable_rate(rates, [data[den][r][i].get("normalized_latency", math.nan) for r in rates])
        out.append(a / b if b else math.nan)
    return out


def stays_below(data, label: str, rates: list[float]) -> bool:
    """Some seed of ``label`` stays below the latency limit at the top rate of the sweep."""
    return any(s.get("normalized_latency", math.inf) <= LATENCY_LIMIT for s in data[label][rates[-1]])


def ratio_row(paper: str, figure: str, quantity: str, data, rates: list[float], num: str = "vLLM",
              den: str = "Orca-Oracle") -> Row:
    """A row of ``num``'s rate at equal latency over ``den``'s; a lower bound where ``num`` never
    reaches the limit, not measured where ``den`` does not either."""
    r = row(paper, figure, quantity, rate_ratio(data, num, den, rates))
    if stays_below(data, den, rates):
        r.kvlab = r.ci95 = math.nan
        r.forced = "not measured"
        r.why = (f"{den} stays below the latency limit at the sweep's top rate ({rates[-1]:g} req/s): "
                 "no rate at equal latency to compare. ")
    elif stays_below(data, num, rates):
        r.bound = ">= "
        if r.paper is not None and r.kvlab + (r.ci95 if math.isfinite(r.ci95) else 0) < _bounds(r.paper)[0]:
            r.forced = "inconclusive"  # a lower bound below the paper's value says nothing
        r.why = (f"{num} stays below the latency limit at the sweep's top rate ({rates[-1]:g} req/s) in some "
                 "seed: the ratio is a lower bound. ")
    return r
