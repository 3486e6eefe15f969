"""``kvlab report DIR``: every run under DIR into tidy tables and plots.

Writes, under ``DIR/report`` (or ``--out``):

- ``summary.csv``: one row per run (metadata, metrics, and the run's configuration as
  ``cfg.<key>`` columns) — runs that differ only in their seed (``repeats=N``, or a sweep over
  ``seed``) are one row: each metric's mean, with ``<metric>_ci95`` (half-width of the 95%
  confidence interval, Student t) and ``<metric>_n`` beside it and ``n`` the runs in the row;
  ``summary_long.parquet``: (run_id, metric, value, unit), one row per run and metric;
- ``report.md`` with the tables and the figures below;
- ``memory_breakdown.png``: where the KV pool goes (stacked bars, % of capacity), mean over
  all engine steps and, where requests waited, over those steps (the saturated pool);
- ``throughput.png``: output throughput of each run;
- ``latency_cdf.png``: CDFs of TTFT, e2e latency and normalized latency per request;
- ``kv_usage_over_time.png``: KV pool in use and batch size over (simulated) time;
- sweep curves, each only when runs differ along its axis: ``rate_curves.png`` (throughput
  and normalized latency vs request rate), ``block_size_curves.png``, ``page_size_curves.png``,
  ``sharing_curves.png`` (memory saved by sharing vs samples per request), ``prefix_curves.png``
  (vs shared prefix length), ``window_curves.png`` (sliding window), ``host_tier_curves.png``
  (vs the workload's prefix hit rate), ``max_num_seqs_curves.png``; and bars by category:
  ``kv_dtype.png`` (KV cache dtype), ``kv_grouping.png`` (layer grouping).

Where a row holds more than one run, every figure draws the interval: error bars on bars, bands
around curves, and the CDFs and time series of each run of the row in its colour.

The axes of a sweep are found in the runs' configurations: a ``cfg.*`` column whose value
differs between runs. Runs that differ in other keys too become separate series.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from experiments.atomic import save_figure, staged_folder, write_csv, write_parquet, write_text
from experiments.report_labels import order_runs, pd, plt, run_labels, varying
from experiments.report_plots import (SMALL_MULTIPLES_AFTER, SWEEPS, _has_memory, _styles, memory_fields,
                                      plot_latency_cdfs, plot_memory, plot_sweep, plot_throughput,
                                      plot_usage_over_time, sweep_data, write_run_plots)

# what other code imports from here; the figures (kvlab run's write_run_plots too) are in report_plots
__all__ = ["NoRuns", "ReportInputError", "SMALL_MULTIPLES_AFTER", "Skipped", "_read_runs", "_styles", "collect",
           "find_runs", "group_repeats", "main", "order_runs", "plot_latency_cdfs", "plot_memory", "plot_sweep",
           "plot_throughput", "plot_usage_over_time", "sweep_data", "varying", "write_report", "write_run_plots"]


def _units() -> dict[str, str]:
    from experiments.metrics import UNITS

    return UNITS


def markdown_table(df) -> str:
    from experiments.tables import markdown_table as table

    return table(df)


def _tables():
    from experiments import tables

    return tables


# ---------------------------------------------------------------------------- tables

class ReportInputError(ValueError):
    """A mistake in what ``kvlab report`` was given (no such folder): one line, exit code 2."""


class NoRuns(FileNotFoundError):
    """No run under the folder has results (yet): nothing to report, exit code 1."""


@dataclass(frozen=True)
class Skipped:
    """A run folder the report leaves out, and why; with ``table`` (``requests.parquet``), only
    that damaged table of the run is left out (of the figures that draw it)."""
    run_dir: str
    reason: str
    table: str | None = None


# how to make a damaged run again (kvlab run --resume remakes a run whose summary or tables are gone)
REMAKE = "delete it and rerun that run (its command, or `kvlab run --resume SWEEP_DIR`)"
REMAKE_MISSING = "rerun that run (its command, or `kvlab run --resume SWEEP_DIR`: a run without its tables runs again)"


def _why_unfinished(run_dir: Path) -> str:
    """The reason a run folder has no summary.json, from its log where it says."""
    log = run_dir / "run.log"
    try:
        text = log.read_text(errors="replace") if log.is_file() else ""
    except OSError:  # unreadable: say what the folder lacks
        text = ""
    if "interrupted" in text:
        return "interrupted (no summary.json): rerun its command or `kvlab run --resume SWEEP_DIR` to finish it"
    failed = [ln for ln in text.splitlines() if "failed" in ln or "ERROR" in ln]
    if failed:
        return f"failed (no summary.json): {failed[-1].split(' - ', 1)[-1].strip()}"
    return "no summary.json: still running, or stopped before it finished"


def find_runs(root: str | Path) -> tuple[list[Path], list[Skipped]]:
    """summary.json files under ``root`` that can be read, and the run folders left out (a Hydra
    run folder without summary.json, or a summary.json that is not a JSON object)."""
    root = Path(root)
    if not root.exists():
        raise ReportInputError(f"{root} does not exist: give the folder of a run or a sweep "
                               "(hydra.sweep.dir, e.g. multirun/DATE/TIME)")
    if not root.is_dir():
        raise ReportInputError(f"{root} is not a folder: give the folder of a run or a sweep, not a file in it")
    found, skipped = [], []
    for path in sorted(root.rglob("summary.json")):
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
            found.append(path)
        except (OSError, ValueError) as e:
            skipped.append(Skipped(str(path.parent), f"summary.json unreadable ({_first_line(e)}): {REMAKE}"))
    done = {p.parent for p in found} | {Path(s.run_dir) for s in skipped}
    for cfg in sorted(root.rglob(".hydra/config.yaml")):
        run_dir = cfg.parent.parent
        reps = _repeats(cfg)
        if reps > 1:  # its results are in rep0 .. rep{N-1}
            skipped += [Skipped(str(run_dir / f"rep{i}"), _why_unfinished(run_dir)) for i in range(reps)
                        if run_dir / f"rep{i}" not in done]
        elif run_dir not in done:
            skipped.append(Skipped(str(run_dir), _why_unfinished(run_dir)))
    return found, skipped


def _first_line(e: BaseException, path: Path | None = None) -> str:
    """The first line of an error's message (pyarrow's run on), the file's path in it shortened."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if path is not None:  # pyarrow: "Could not open Parquet input source '<path>': <why>. <advice>."
        text = text.split(f"'{path}': ", 1)[-1].split(". ")[0].replace(str(path), "the file")
    return text


def _repeats(hydra_config: Path) -> int:
    """``repeats`` of the run whose ``.hydra/config.yaml`` this is (1 where unreadable)."""
    import yaml

    try:
        n = (yaml.safe_load(hydra_config.read_text()) or {}).get("repeats", 1)
    except (OSError, yaml.YAMLError):
        return 1
    return n if isinstance(n, int) and n > 1 else 1


def collect(root: str | Path, skipped: list[Skipped] | None = None) -> pd.DataFrame:
    """One row per run folder under ``root`` that has a summary.json; the folders left out are
    appended to ``skipped`` where given."""
    root = Path(root)
    paths, left_out = find_runs(root)
    rows = []
    units = _units()
    for path in paths:
        rec = json.loads(path.read_text())
        wrong = next((k for k in units if k in rec and not _number(rec[k])), None)
        if wrong is not None or not any(k in rec for k in units):  # edited by hand, or not kvlab's
            what = f"{wrong} is {str(rec[wrong])[:40]!r}, not a number" if wrong else "no metric in it"
            left_out.append(Skipped(str(path.parent), f"summary.json damaged ({what}): {REMAKE}"))
            continue
        for key in RATE_KEYS:  # summary.json holds no infinities: an offline run's rate (inf) is null
            if key in rec and rec[key] is None:
                rec[key] = math.inf
        rec["run_dir"] = str(path.parent)
        rel = path.parent.relative_to(root).as_posix()
        rec["run_id"] = rel if rel != "." else rec.get("run_id", path.parent.name)
        rows.append(rec)
    if skipped is not None:
        skipped.extend(left_out)
    if not rows:
        why = f" ({len(left_out)} run folder(s) without results: {left_out[0].reason})" if left_out else ""
        raise NoRuns(f"no run under {root} has a summary.json{why}: run `kvlab run` first")
    df = pd.DataFrame(rows)
    if "allocator_args" in df:
        df["allocator_args"] = df["allocator_args"].map(lambda a: json.dumps(a, sort_keys=True))
    df["label"] = run_labels(df)
    return df


# a request rate can only be a number > 0 (workloads.check_workload), inf included, which
# write_json stores as null: so null is inf
RATE_KEYS = ("cfg.workload.request_rate", "request_rate")


def _number(v) -> bool:
    """A metric's value as summary.json holds it: a number, or null (not measured, or not finite)."""
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def metric_columns(wide: pd.DataFrame) -> list[str]:
    """The numeric metric columns (those with a unit)."""
    units = _units()
    return [c for c in wide.columns if c in units and pd.api.types.is_numeric_dtype(wide[c])]


def group_repeats(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group of runs that differ only in seed (mean, ``_ci95``, ``_n``, ``n``:
    experiments/tables.py), labelled and ordered afresh (the seed no longer names a row)."""
    wide = _tables().aggregate_repeats(runs, metric_columns(runs))
    wide["label"] = run_labels(wide)
    return order_runs(wide)


def long_table(wide: pd.DataFrame) -> pd.DataFrame:
    """(run_id, metric, value, unit) for every numeric metric a run has: a metric that does not apply to a
    run (an online figure of an offline run, a steady-state one where the window is empty) is null in the
    wide table and no row here (tidy data: a row is a measurement)."""
    units = _units()
    numeric = metric_columns(wide)
    long = wide.melt(id_vars=["run_id"], value_vars=numeric, var_name="metric", value_name="value")
    long = long.dropna(subset=["value"])
    long["unit"] = long["metric"].map(units)
    return long.sort_values(["run_id", "metric"]).reset_index(drop=True)


STEP_COLUMNS = ("time", "capacity", "free", "token_states", "num_seqs")  # what the usage plots draw


def _read_runs(wide: pd.DataFrame, name: str, columns: list[str] | None = None,
               damaged: list[Skipped] | None = None) -> dict[str, list[pd.DataFrame]]:
    """Each row's table ``name``: one per run of the row (its repeats), empty ones left out, and
    damaged ones (not parquet, truncated, without the columns drawn) and missing ones too, each
    appended to ``damaged`` where given: a run's figures leave out what is gone."""
    import pyarrow as pa

    out = {}
    for _, r in wide.iterrows():
        members = r.get("_members")
        dirs = members if isinstance(members, list) and members else [r["run_dir"]]
        tables = []
        for d in dirs:
            path = Path(d) / name
            if not path.exists():  # removed since the run (a finished run writes it before summary.json):
                if damaged is not None:  # said, not silently a run short in the figures
                    damaged.append(Skipped(str(d), f"missing: left out of the figures; {REMAKE_MISSING}", table=name))
                continue
            try:
                table = pd.read_parquet(path, columns=columns)
                lacking = [c for c in STEP_COLUMNS if c not in table] if "capacity" in table else []
                if lacking:
                    raise ValueError(f"no column {', '.join(lacking)}")
            except (OSError, ValueError, KeyError, pa.ArrowException) as e:
                if damaged is not None:
                    damaged.append(Skipped(str(d), f"unreadable ({_first_line(e, path)}): left out of the figures; "
                                                   f"{REMAKE}", table=name))
                continue
            tables.append(table)
        tables = [t for t in tables if not t.empty]
        if tables:
            out[r["run_id"]] = tables
    return out


# ---------------------------------------------------------------------------- report.md

def _percent(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    df = df.copy()
    for c in cols:
        df[c] = (100 * df[c].astype(float)).round(1)
    return df


def _percent_table(wide: pd.DataFrame, lead: list[str], cols: list[str], plain: tuple[str, ...] = ()) -> str:
    """Markdown of ``cols`` in percent (``plain`` as they are), with their 95% CIs where rows repeat."""
    plain = [c for c in plain if c in wide]
    lead = [c for c in lead if c in wide]
    ci = pd.DataFrame({f"{c}_ci95": wide[f"{c}_ci95"].astype(float) * (100 if c in cols else 1)
                       for c in [*cols, *plain] if f"{c}_ci95" in wide}, index=wide.index)
    table = _percent(wide[lead + cols + plain], cols)
    return markdown_table(_tables().with_ci(table, cols + plain, ci))


def write_report(root: str | Path, out: str | Path | None = None, skipped: list[Skipped] | None = None) -> Path:
    """The report of every run under ``root``; folders left out (and damaged tables left out of
    the figures) are listed in report.md and appended to ``skipped`` where given.

    All or nothing: the report is written into a temporary folder beside ``out`` and its files
    moved into ``out`` at the end, so a report that fails (or is interrupted) leaves no part of
    itself behind, and an earlier report in ``out`` as it was."""
    root = Path(root)
    out = Path(out) if out else root / "report"
    left_out: list[Skipped] = []
    runs = order_runs(collect(root, left_out))  # before anything is written: no runs, no folder
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"{out} is a file, not a folder: give --out a folder (it is made where missing)")
    drawn = set(plt.get_fignums())
    try:
        with staged_folder(out) as tmp:
            _write_report(root, tmp, runs, left_out)
    except BaseException:
        for n in set(plt.get_fignums()) - drawn:  # the figures it drew before it failed
            plt.close(n)
        raise
    if skipped is not None:
        skipped.extend(left_out)
    return out


def _write_report(root: Path, out: Path, runs: pd.DataFrame, left_out: list[Skipped]) -> None:
    """The report's files, into ``out`` (a fresh folder); damaged tables appended to ``left_out``."""
    wide = group_repeats(runs)
    write_csv(out / "summary.csv", wide.drop(columns=["_members"]))
    write_parquet(out / "summary_long.parquet", long_table(runs))
    figures: dict[str, tuple[str, object]] = {}
    if "output_throughput" in wide:
        figures["throughput.png"] = ("Output throughput", plot_throughput(wide))
    if _has_memory(wide):
        figures["memory_breakdown.png"] = ("Where the KV memory goes", plot_memory(wide))
    requests = _read_runs(wide, "requests.parquet", ["ttft", "e2el", "output_len"], left_out)
    if requests:
        figures["latency_cdf.png"] = ("Latency CDFs", plot_latency_cdfs(wide, requests))
    steps = _read_runs(wide, "steps.parquet", damaged=left_out)
    if any("capacity" in t for tables in steps.values() for t in tables):
        figures["kv_usage_over_time.png"] = ("KV usage and batch size over time", plot_usage_over_time(wide, steps))
    swept = varying(wide)
    from experiments.report_axes import add_axis_columns, plot_categories

    add_axis_columns(wide)
    figures.update(plot_categories(wide, swept))
    for axis in SWEEPS:
        if axis in swept:
            fig = plot_sweep(wide, axis)
            if fig is not None:
                figures[SWEEPS[axis][0]] = (f"Sweep: {SWEEPS[axis][1]}", fig)
    for name, (_, fig) in figures.items():
        save_figure(out / name, fig)
        plt.close(fig)

    key = [c for c in ["label", "model", "workload", "mode", "device"] if c in wide]
    perf = [c for c in ["request_rate", "request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
                        "mean_tpot_ms", "p99_itl_ms", "normalized_latency", "mean_batch_size", "max_concurrency",
                        "preemptions"] if c in wide]
    mem = [c for c in memory_fields(wide) if c in wide]
    sat = [f"{c}_saturated" for c in memory_fields(wide, "_saturated") if f"{c}_saturated" in wide]
    repeated = len(runs) > len(wide)
    if repeated:
        key.append("n")
    md = [f"# kvlab report: {root}", "", f"{len(wide)} runs"
          + (f"; they differ in {', '.join(f'`{k[4:]}`' for k in swept)}." if swept else "."), "",
          *([f"Runs that differ only in their seed are one row ({len(runs)} runs in all): the mean ± the "
             "half-width of its 95% confidence interval (Student t) over the `n` runs.", ""] if repeated else []),
          "Memory figures are percentages of the KV pool capacity (they sum to 100 with `free`)."
          + (" `idle_mapped` is held by no live sequence but kept mapped for reuse (idle virtual slots): "
             "neither use nor waste until a request waits for memory." if "idle_mapped" in mem else ""), "",
          "## Throughput and latency", "", markdown_table(_tables().with_ci(wide[key + perf], perf, wide)), ""]
    md += ["## Memory", "", "Mean over all engine steps (% of KV pool):", "",
           _percent_table(wide, ["label", "kv_capacity_tokens"], mem), ""]
    tw = [f"{c}_tw" for c in memory_fields(wide, "_tw") if f"{c}_tw" in wide]
    if tw and wide[tw].notna().any().any():
        window = [c for c in ("steady_state_start_s", "steady_state_end_s", "steady_state_end_rule") if c in wide]
        md += ["Time-weighted mean over the steady-state window (% of KV pool; from the first step where the "
               "pool or the batch saturates, or `measure.warmup_s`, to the last arrival; offline: to the last "
               "step where requests waited):", "",
               _percent_table(wide, ["label"], tw, ["mean_batch_size_tw", *window]), ""]
    if sat and wide[sat].notna().any().any():
        md += ["Mean over the steps where requests wait, i.e. the pool is saturated (% of KV pool; "
               "`saturated_steps` is the share of such steps):", "",
               _percent_table(wide, ["label"], sat + ["saturated_steps"]), ""]
    extra = [c for c in ("sharing_saving", "prefix_cache_hit_rate") if c in wide and wide[c].fillna(0).any()]
    if extra:
        md += ["Sharing (% of the KV the live tokens would take unshared; prefix-cache hit rate):", "",
               _percent_table(wide, ["label"], extra), ""]
    tier = [c for c in ("gpu_prefix_hit_rate", "host_prefix_hit_rate", "mean_recomputed_tokens",
                        "host_tier_stored_bytes", "host_tier_loaded_bytes", "host_tier_transfers",
                        "host_tier_transfer_s", "host_tier_exposed_s", "host_tier_hidden_fraction") if c in wide]
    if "host_tier_enabled" in wide and wide["host_tier_enabled"].fillna(False).astype(bool).any():
        md += ["Host KV tier: prompt tokens found on the device / loaded from the host (shares of those looked "
               "up), prompt tokens recomputed only because their KV was evicted, bytes moved, and the copy time "
               "hidden behind compute (`host_tier_hidden_fraction`):", "", markdown_table(wide[["label", *tier]]), ""]
    md += ["## Figures", ""]
    for name, (caption, _) in figures.items():
        md += [f"### {caption}", "", f"![{caption}]({name})", ""]
    md += ["## Runs", "", markdown_table(wide[["label", "run_id"]]), "",
           "Each run folder holds `summary.json`, `requests.parquet`, `steps.parquet` and "
           "`kv_usage_over_time.png`.", ""]
    runs_out = [s for s in left_out if s.table is None]
    tables_out = [s for s in left_out if s.table is not None]
    if runs_out:
        md += ["## Skipped", "", f"{len(runs_out)} run folder(s) without results are not in this report:", "",
               *[f"- `{_rel(s.run_dir, root)}`: {s.reason}" for s in runs_out], ""]
    if tables_out:
        md += ["## Damaged tables", "", f"{len(tables_out)} table(s) of runs above are missing or could not be read: their runs "
               "are in the tables but not in the figures drawn from them:", "",
               *[f"- `{_rel(s.run_dir, root)}/{s.table}`: {s.reason}" for s in tables_out], ""]
    write_text(out / "report.md", "\n".join(md))


def _rel(run_dir: str, root: Path) -> str:
    return str(Path(run_dir).relative_to(root)) if Path(run_dir).is_relative_to(root) else run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvlab report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="folder holding run folders (each with summary.json)")
    ap.add_argument("--out", default=None, help="where to write the report (default DIR/report)")
    args = ap.parse_args(argv)
    import sys

    skipped: list[Skipped] = []
    try:
        out = write_report(args.dir, args.out, skipped)
    except ReportInputError as e:
        print(f"kvlab report: {e}", file=sys.stderr)
        return 2
    except NoRuns as e:  # no run has results (yet): nothing to report
        print(f"kvlab report: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvlab report: interrupted; no report written (an earlier one is as it was)", file=sys.stderr)
        return 130
    except OSError as e:  # the report's folder cannot be written
        where = args.out or str(Path(args.dir) / "report")
        print(f"kvlab report: cannot write the report to {where} ({e.strerror or e}): "
              "give --out a folder you can write to", file=sys.stderr)
        return 2
    runs_out = [s for s in skipped if s.table is None]
    tables_out = [s for s in skipped if s.table is not None]
    if runs_out:
        print(f"kvlab report: skipped {len(runs_out)} run folder(s) without results:", file=sys.stderr)
        for s in runs_out:
            print(f"  {s.run_dir}: {s.reason}", file=sys.stderr)
    if tables_out:
        print(f"kvlab report: left {len(tables_out)} damaged table(s) out of the figures (missing or unreadable):",
              file=sys.stderr)
        for s in tables_out:
            print(f"  {Path(s.run_dir) / s.table}: {s.reason}", file=sys.stderr)
    print(f"report written to {out}/report.md")
    return 0
