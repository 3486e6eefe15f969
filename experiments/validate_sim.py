"""``kvlab validate-sim``: simulate against the real engine on the same workload and config.

For each mode (offline, online at each rate) runs the real engine and then simulate mode
with the same overrides, seed and pool, and writes the error of every simulated figure:

    kvlab validate-sim model=llama3-8b allocator=paged workload=sharegpt workload.num_requests=300 \\
        engine.kv_cache_tokens=40000 engine.max_model_len=2048 engine.max_num_seqs=256 \\
        engine.max_num_batched_tokens=8192 --rates 4,32 --online-requests 50 --sim h200 --out DIR

DIR/real/<mode>/ and DIR/sim/<mode>/ are ordinary run folders (a rerun reuses finished ones,
so ``--sim-only`` re-simulates against runs measured earlier, e.g. on another machine).
DIR/validation.csv holds one row per (mode, metric): real, simulated, error; validation.md the
table with the targets; validation.png a scatter of simulated against measured values.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from experiments.preflight import UserError

# metric -> allowed |error| (issue targets); figures that must match exactly have 0
TIME_METRICS = {"output_throughput": 0.05, "mean_ttft_ms": 0.05, "mean_tpot_ms": 0.05, "p99_tpot_ms": 0.15,
                "p50_tpot_ms": None, "p99_ttft_ms": None, "mean_e2el_ms": None, "normalized_latency": None}
EXACT_OFFLINE = ("token_states", "reservation", "internal_frag", "external_frag", "free", "preemptions",
                 "max_concurrency", "total_output_tokens", "num_steps")


def mode_specs(rates: list[float], offline: bool = True) -> list[tuple[str, list[str]]]:
    specs = [("offline", ["workload.request_rate=inf"])] if offline else []
    specs += [(f"online-{r:g}rps", [f"workload.request_rate={r}"]) for r in rates]
    return specs


def _summary(run_dir: Path) -> dict:
    import json

    import pandas as pd

    s = json.loads((run_dir / "summary.json").read_text())
    s["num_steps"] = len(pd.read_parquet(run_dir / "steps.parquet", columns=["num_seqs"]))
    return s


# recorded where a run was made, not what it measured (the model's files differ between machines)
_NOT_SETTINGS = ("cfg.mode", "cfg.model.path")


def _settings(summary: dict) -> dict:
    """A summary's ``cfg.*`` settings, the graph bound as the engine takes it (capped at the budget)."""
    from experiments.run import summary_graph_tokens

    out = {k: v for k, v in summary.items()
           if k.startswith("cfg.") and k not in _NOT_SETTINGS and not k.startswith("cfg.sim.")}
    if "cfg.engine.cuda_graph_max_tokens" in out:
        out["cfg.engine.cuda_graph_max_tokens"] = summary_graph_tokens(summary)
    return out


def config_mismatch(real: dict, sim: dict) -> tuple[dict[str, tuple], list[str]]:
    """The settings a real run's summary and a simulated one's both record and that differ,
    {key: (real, simulated)}, and the keys only the simulated one records (a real run from before
    they existed). A real run made under an older default (e.g. ``engine.cuda_graph_max_tokens``)
    is another engine."""
    r, s = _settings(real), _settings(sim)
    diff = {k[len("cfg."):]: (r[k], s[k]) for k in sorted(set(r) & set(s)) if r[k] != s[k]}
    return diff, sorted(k[len("cfg."):] for k in set(s) - set(r))


def _hydra_value(v) -> str:
    import json

    return "null" if v is None else json.dumps(v, separators=(",", ":")) if isinstance(v, (bool, list, dict)) else str(v)


def check_same_config(reals: dict[Path, dict], sim: dict) -> None:
    """Refuse to compare a simulated run with real runs of other settings, naming the fix."""
    import logging

    for d, real in reals.items():
        diff, unknown = config_mismatch(real, sim)
        if diff:
            said = ", ".join(f"{k}: real {r!r}, simulated {s!r}" for k, (r, s) in diff.items())
            fix = " ".join(f"{k}={_hydra_value(r)}" for k, (r, _) in diff.items())
            raise UserError(f"{d} was measured with other settings than the simulated run ({said}): add "
                            f"the real run's overrides ({fix}) to simulate its engine, or run the real engine "
                            "again (without --sim-only)")
        if unknown:
            logging.getLogger(__name__).warning(
                "%s does not record %s (a run from before they existed): compared as if equal", d, ", ".join(unknown))


def real_dirs(out: Path, mode: str, repeats: int | None = None) -> list[Path]:
    """The real runs of a mode: real/<mode>, then real-2/<mode>, real-3/<mode>... (repeats of the
    same seed and config: what differs between them is the machine's own noise). ``None``: the
    ones that exist."""
    if repeats is not None:
        return [out / ("real" if i == 1 else f"real-{i}") / mode for i in range(1, repeats + 1)]
    found = [out / "real" / mode]
    i = 2
    while (out / f"real-{i}" / mode / "summary.json").exists():
        found.append(out / f"real-{i}" / mode)
        i += 1
    return found


def _mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the 95% half-width relative to it (None for one run)."""
    from experiments.tables import mean_ci95

    m, half, n = mean_ci95(values)
    return m, (abs(half / m) if n > 1 and m else None)


def compare(reals: dict | list[dict], sim: dict, mode: str) -> list[dict]:
    """Error of each simulated figure against the real runs' mean (``real_ci``: the 95% interval
    of that mean over repeated real runs, relative; ``real_spread``: their range over the mean;
    the measurement's own noise)."""
    reals = [reals] if isinstance(reals, dict) else reals
    real = reals[0]
    rows = []
    for metric, target in TIME_METRICS.items():
        vals, s = [x.get(metric) for x in reals], sim.get(metric)
        if any(v is None or not math.isfinite(v) for v in vals) or s is None or not math.isfinite(s):
            continue
        r, ci = _mean_ci(vals)
        if r == 0:
            continue
        rows.append(dict(mode=mode, metric=metric, real=r, sim=s, error=(s - r) / r, target=target,
                         ok=None if target is None else abs(s - r) / r <= target, real_ci=ci, real_n=len(vals),
                         real_spread=(max(vals) - min(vals)) / r))
    if mode == "offline":  # no arrivals: every decision and memory figure is the real one
        for metric in EXACT_OFFLINE:
            r, s = real.get(metric), sim.get(metric)
            if r is None or s is None:
                continue
            rows.append(dict(mode=mode, metric=metric, real=r, sim=s, error=(s - r) / r if r else float(s != r),
                             target=0.0, ok=s == r))
    return rows


def step_compare(real_dir: Path, sim_dir: Path):
    """Offline runs take the same steps: their times side by side, by step kind and batch size
    (where the cost model is off, and on which steps)."""
    import numpy as np
    import pandas as pd

    cols = ["num_seqs", "prefill_tokens", "duration"]
    real = pd.read_parquet(real_dir / "steps.parquet", columns=[*cols, "time"])
    sim = pd.read_parquet(sim_dir / "steps.parquet", columns=cols)
    if len(real) != len(sim):
        return None
    # a simulated step's time holds the driver's time until the next step (profiled host time
    # includes it): so does the real one's here (offline: no idle waits between steps)
    gap = (real["time"].shift(-1) - real["time"] - real["duration"]).fillna(0.0).clip(lower=0.0)
    real = real.assign(duration=real["duration"] + gap)[cols]
    df = real.assign(sim=sim["duration"].to_numpy(),
                     kind=np.where(real["prefill_tokens"] > 0, "prefill/mixed", "decode"),
                     batch=pd.cut(real["num_seqs"], [0, 1, 4, 16, 32, 64, 128, 256, 1 << 20]).astype(str))
    df = df[df["num_seqs"] > 0]
    g = df.groupby(["kind", "batch"], sort=False).agg(
        steps=("duration", "size"), real_ms=("duration", "median"), sim_ms=("sim", "median"),
        real_s=("duration", "sum"), sim_s=("sim", "sum")).reset_index()
    g[["real_ms", "sim_ms"]] *= 1e3
    g["error"] = g["sim_s"] / g["real_s"] - 1
    return g


def _steps_markdown(g) -> str:
    lines = ["| step kind | batch | steps | real median ms | sim median ms | real total s | sim total s | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in g.itertuples():
        lines.append(f"| {r.kind} | {r.batch} | {r.steps} | {r.real_ms:.2f} | {r.sim_ms:.2f} | {r.real_s:.2f} | "
                     f"{r.sim_s:.2f} | {100 * r.error:+.1f}% |")
    return "\n".join(lines) + "\n"


def plot(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.atomic import save_figure

    import pandas as pd
    from matplotlib.ticker import NullFormatter

    metrics = [m for m in TIME_METRICS if m in set(df["metric"])]
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        d = df[df["metric"] == metric]
        for label, g in d.groupby("label"):
            # horizontal bars: the 95% CI of the measurement over repeated real runs
            xerr = (g["real"] * pd.to_numeric(g["real_ci"], errors="coerce").fillna(0)).to_numpy() \
                if "real_ci" in g else None
            ax.errorbar(g["real"], g["sim"], xerr=xerr, label=label, fmt="o", ms=4, elinewidth=0.8)
        lo, hi = min(d["real"].min(), d["sim"].min()), max(d["real"].max(), d["sim"].max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        target = TIME_METRICS[metric]
        if target:
            ax.fill_between([lo, hi], [lo * (1 - target), hi * (1 - target)], [lo * (1 + target), hi * (1 + target)],
                            color="grey", alpha=0.15, lw=0)
        worst = d["error"].abs().max()
        ax.set_title(f"{metric}\nworst |error| {100 * worst:.1f}%", fontsize=9)
        ax.set_xlabel("measured")
        ax.set_ylabel("simulated")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(path, fig)


def markdown(df) -> str:
    lines = ["| label | mode | metric | measured (mean ±95% CI, range over repeats) | simulated | error | target | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        target = "" if not _given(r.target) else \
            ("exact" if r.target == 0 else f"{100 * r.target:.0f}%")
        ok = "" if not _given(r.ok) else ("yes" if r.ok else "**no**")
        ci, spread = getattr(r, "real_ci", None), getattr(r, "real_spread", None)
        measured = f"{r.real:.4g}" + (f" ±{100 * ci:.1f}%, range {100 * spread:.1f}% (n={int(r.real_n)})"
                                      if _given(ci) else "")
        lines.append(f"| {r.label} | {r.mode} | {r.metric} | {measured} | {r.sim:.4g} | {100 * r.error:+.1f}% | "
                     f"{target} | {ok} |")
    return "\n".join(lines) + "\n"


def _given(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def validate(overrides: list[str], out: Path, rates: list[float], sim: str, label: str,
             sim_only: bool = False, real_only: bool = False, offline: bool = True,
             online_requests: int | None = None, warmup: int = 0, cost_model: str = "auto",
             real_repeats: int = 1) -> list[dict]:
    from experiments.run import compose, run_experiment

    warm = [*overrides, "mode=offline", "workload.request_rate=inf", f"workload.num_requests={warmup}",
            "resume=false", "report=false"] if warmup and not sim_only else None
    plan = []  # (mode, the real runs' overrides, the simulated run's)
    for mode, extra in mode_specs(rates, offline):
        run_mode = "offline" if mode == "offline" else "online"
        if run_mode == "online" and online_requests:
            extra = [*extra, f"workload.num_requests={online_requests}"]
        simulated = [*overrides, "mode=simulate", f"sim={sim}", f"sim.cost_model={cost_model}", "resume=false", *extra]
        plan.append((mode, [*overrides, f"mode={run_mode}", *extra], simulated))
    # every run checked before the first starts: a bad value found later wastes the real runs before it
    check_runs(([("the warm-up run", warm)] if warm else [])
               + [(f"the real engine, {mode}", real) for mode, real, _ in plan if not sim_only]
               + [(f"simulate, {mode}", simulated) for mode, _, simulated in plan if not real_only])
    if sim_only:  # every mode's real runs there, of the same settings, before simulating any
        for mode, _, simulated in plan:
            _real_summaries(out, mode, compose(simulated))

    rows = []
    if warm:  # the first run on a machine compiles kernels: not in any figure
        print(f"[{label}] warm-up run ({warmup} requests, discarded)", flush=True)
        run_experiment(compose(warm), out / "warmup")
    for mode, real, simulated in plan:
        sim_dir = out / _suffixed("sim", cost_model) / mode
        if not sim_only:
            for i, d in enumerate(real_dirs(out, mode, real_repeats), 1):
                print(f"[{label}] real engine, {mode}" + (f", run {i} of {real_repeats}" if real_repeats > 1 else ""),
                      flush=True)
                run_experiment(compose(real), d)
        if real_only:
            continue
        print(f"[{label}] simulate, {mode}", flush=True)
        sim_cfg = compose(simulated)
        # before simulating: a refused run leaves the committed simulated one as it was
        real_summaries = _real_summaries(out, mode, sim_cfg)
        # always re-simulated (cheap): the profile or the cost model may have changed since
        run_experiment(sim_cfg, sim_dir)
        for r in compare(list(real_summaries.values()), _summary(sim_dir), mode):
            rows.append(dict(label=label, **r))
        steps = step_compare(real_dirs(out, mode)[0], sim_dir) if mode == "offline" else None
        if steps is not None:
            from experiments.atomic import write_text

            write_text(out / (_suffixed("steps_compare", cost_model) + ".md"), _steps_markdown(steps))
    return rows


def _real_summaries(out: Path, mode: str, sim_cfg) -> dict[Path, dict]:
    """The real runs of a mode, refused where there are none or their settings are not the
    simulated run's."""
    from experiments.atomic import as_written
    from experiments.run import applicable_config, flat_config

    reals = real_dirs(out, mode)
    if not (reals[0] / "summary.json").exists():
        raise UserError(f"{reals[0]}/summary.json: no real run there; run without --sim-only first")
    summaries = {d: _summary(d) for d in reals}
    check_same_config(summaries, as_written(flat_config(applicable_config(sim_cfg)[0])))
    return summaries


# keys validate-sim sets for every run itself (given as an override, one would be replaced unsaid): the fix
SETS_ITSELF = {"mode": "drop it (the real engine runs offline and online, then simulate)",
               "workload.request_rate": "give --rates {} instead (the offline run is at inf)",
               "sim": "give --sim {} instead", "sim.cost_model": "give --cost-model {} instead"}


def check_args(a) -> list[float]:
    """The flags and overrides, one line naming the flag and the fix if one is wrong (before any
    run); the online rates."""
    from experiments.preflight import check_folder, did_you_mean, group_choices

    rates = []
    for r in filter(None, a.rates.split(",")):
        try:
            rate = float(r)
        except ValueError:
            rate = math.nan
        if not 0 < rate < math.inf:  # nan too
            raise UserError(f"--rates {a.rates}: {r} is not a request rate: give rates in req/s > 0, "
                            "comma-separated (e.g. --rates 4,16)")
        rates.append(rate)
    if a.sim_only and a.real_only:
        raise UserError("--sim-only and --real-only exclude each other: give one, or neither for both")
    if a.no_offline and not rates:
        raise UserError("nothing to validate: give --rates or drop --no-offline")
    for flag, v, least, what in (("--online-requests", a.online_requests, 1, "the online runs' number of requests"),
                                 ("--real-repeats", a.real_repeats, 1, "the number of real runs per mode"),
                                 ("--warmup", a.warmup, 0, "the warm-up run's requests (0: none)")):
        if v is not None and v < least:
            raise UserError(f"{flag} {v}: give {what}, {least} or more")
    sims = group_choices("sim")
    if a.sim not in sims:
        raise UserError(f"--sim {a.sim}: no such simulated device (conf/sim/{a.sim}.yaml); choose one of "
                        f"{', '.join(sims)}{did_you_mean(a.sim, sims, '--sim ')}")
    for line in a.overrides:
        key, _, value = line.partition("=")
        key = key.lstrip("+~")
        if key in SETS_ITSELF:
            raise UserError(f"{line}: validate-sim sets {key} itself: {SETS_ITSELF[key].format(value)}")
    check_folder("--out", Path(a.out))
    return rates


def check_runs(runs: list[tuple[str, list[str]]]) -> None:
    """Each run's configuration through kvlab run's checks (keys, choices, values, mode and rate,
    the engine, allocator and workload) before the first run starts: a bad value is one line, not
    a traceback after the real runs. A run that fails for another reason still surfaces."""
    from experiments import preflight
    from experiments.run import check_config, check_ranges

    for what, overrides in runs:
        try:
            preflight.prepare(overrides)  # named as kvlab run names them (did you mean ...)
            cfg = preflight.compose(overrides)  # as the run composes them
            check_config(cfg)
            check_ranges(cfg)
        except ValueError as e:  # UserError too
            raise UserError(f"{e} ({what}); nothing has run") from None


def _suffixed(name: str, cost_model: str) -> str:
    """Results of a forced cost model sit beside the default's: sim-roofline/, validation-roofline.csv."""
    return name if cost_model == "auto" else f"{name}-{cost_model}"


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    ap = argparse.ArgumentParser(prog="kvlab validate-sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the runs (model, allocator, workload, engine)")
    ap.add_argument("--rates", default="", help="online request rates (req/s), comma-separated")
    ap.add_argument("--no-offline", action="store_true", help="online modes only")
    ap.add_argument("--online-requests", type=int, default=None, help="workload.num_requests of the online runs")
    ap.add_argument("--real-repeats", type=int, default=1,
                    help="run the real engine this many times per mode (same seed): the measurement's own 95%% CI")
    ap.add_argument("--warmup", type=int, default=0, help="requests of a discarded first run (kernel compiles)")
    ap.add_argument("--sim", default="h200", help="the simulated device (conf/sim/)")
    ap.add_argument("--label", default=None, help="name of this configuration in the tables (default: overrides)")
    ap.add_argument("--sim-only", action="store_true", help="simulate against real runs already in OUT")
    ap.add_argument("--real-only", action="store_true", help="only the real runs (on the device)")
    ap.add_argument("--cost-model", default="auto", choices=("auto", "profiled", "roofline"),
                    help="the simulated runs' cost model (a forced one writes beside the default's)")
    ap.add_argument("--collect", action="store_true",
                    help="merge every validation.csv under OUT into one table and plot (no runs)")
    ap.add_argument("--out", required=True)
    # overrides before, between or after the flags (parse_args took only those before the first flag)
    a = ap.parse_intermixed_args(argv)
    out = Path(a.out)
    name = _suffixed("validation", a.cost_model)
    if a.collect:
        # each configuration's table; a folder that is itself a collection (async/ here) is not one
        try:
            parts = [_read_table(p) for p in sorted(out.glob(f"*/{name}.csv"))
                     if not any(p.parent.glob(f"*/{name}.csv"))]
        except UserError as e:
            print(f"kvlab validate-sim: --collect: {e}", file=sys.stderr)
            return 2
        if not parts:
            print(f"kvlab validate-sim: --collect: no */{name}.csv under {out}", file=sys.stderr)
            return 2
        return _write(pd.concat(parts, ignore_index=True), out, name)
    label = a.label or " ".join(a.overrides) or "default"
    overrides = ["progress=false", *a.overrides]
    from experiments.run import ResumeConflict

    try:
        rates = check_args(a)
        rows = validate(overrides, out, rates, a.sim, label, a.sim_only, a.real_only, not a.no_offline,
                        a.online_requests, a.warmup, a.cost_model, a.real_repeats)
    except (UserError, ResumeConflict) as e:  # a real run's folder holding other settings (e.g. an older default)
        print(f"kvlab validate-sim: {e}", file=sys.stderr)
        return 2
    if a.real_only:
        return 0
    return _write(pd.DataFrame(rows), out, name)


COLUMNS = ("label", "mode", "metric", "real", "sim", "error", "target", "ok")


def _read_table(path: Path):
    """One configuration's validation.csv for --collect, or UserError naming it: a damaged or
    foreign file was a pandas traceback (or, with text where a number belongs, a merged .csv
    written beside no .md)."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (ValueError, OSError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise UserError(f"{path}: not a readable table ({type(e).__name__}: {' '.join(str(e).split())}): rerun "
                        "validate-sim for that configuration (--sim-only re-simulates) or remove it") from None
    missing = [c for c in COLUMNS if c not in df]
    numbers = [c for c in ("real", "sim", "error") if c in df and not pd.api.types.is_numeric_dtype(df[c])]
    if missing or numbers:
        why = f"no {', '.join(missing)} column(s)" if missing else f"{', '.join(numbers)} not numbers"
        raise UserError(f"{path}: not a validate-sim table ({why}): rerun validate-sim for that configuration "
                        "(--sim-only re-simulates) or remove it")
    return df


def _tally(df) -> str:
    """How many checked figures are within target: time figures (by tolerance) and the ones that
    must be exact, apart."""
    checked = df[df["ok"].notna()]
    exact = checked["target"].astype(float) == 0
    parts = []
    for what, rows in (("time figures", checked[~exact]), ("exact figures", checked[exact])):
        if len(rows):
            parts.append(f"{int((rows['ok'] == True).sum())} of {len(rows)} {what}")  # noqa: E712
    return ", ".join(parts) + " within target" if parts else "no checked figures"


def _write(df, out: Path, name: str = "validation") -> int:
    from experiments.atomic import write_csv, write_text

    df = df.astype({"ok": object, "target": object}).where(df.notna(), None)
    write_csv(out / f"{name}.csv", df)
    write_text(out / f"{name}.md", markdown(df))
    plot(df, out / f"{name}.png")
    print(markdown(df))
    print(f"{_tally(df)} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
