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
from importlib import import_module
from pathlib import Path

from experiments.atomic import save_figure, staged_folder, write_csv, write_parquet, write_text


class _Lazy:
    """A module imported on first attribute use: ``kvlab report --help`` (and ``kvlab run``'s
    checks) must not pay for pandas, matplotlib and torch (allocators) before they are needed."""

    def __init__(self, name: str, attr: str | None = None):
        self._name, self._attr, self._value = name, attr, None

    def _load(self):
        if self._value is None:
            if self._name.startswith("matplotlib"):
                import matplotlib

                matplotlib.use("Agg")  # headless: reports are files
            mod = import_module(self._name)
            self._value = getattr(mod, self._attr) if self._attr else mod
        return self._value

    def __getattr__(self, name: str):
        return getattr(self._load(), name)


plt = _Lazy("matplotlib.pyplot")
np = _Lazy("numpy")
pd = _Lazy("pandas")


def _stat_fields() -> tuple[str, ...]:
    from allocators.stats import STAT_FIELDS  # allocators/__init__ imports torch: only when drawing

    return STAT_FIELDS


def _units() -> dict[str, str]:
    from experiments.metrics import UNITS

    return UNITS


def markdown_table(df) -> str:
    from experiments.tables import markdown_table as table

    return table(df)


def _tables():
    from experiments import tables

    return tables

MEMORY_COLORS = {"token_states": "#2a9d8f", "reservation": "#e9c46a", "internal_frag": "#f4a261",
                 "external_frag": "#e76f51", "idle_mapped": "#8fb3d9", "free": "#d9d9d9"}
LABELS = {"token_states": "token states", "reservation": "reservation", "internal_frag": "internal frag.",
          "external_frag": "external frag.", "idle_mapped": "idle mapped", "free": "free"}
# drawn and tabulated only where some run has it (nonzero): kept for reuse, neither use nor waste;
# runs recorded before it existed lack the column
OPTIONAL_FIELDS = ("idle_mapped",)
# configuration keys that follow from others or never define a series
DERIVED = {"cfg.allocator.label", "cfg.workload.seed", "cfg.model.path", "cfg.model.shape"}
SHORT = {"cfg.allocator.name": "", "cfg.allocator.args.policy": "", "cfg.allocator.args.layout": "",
         "cfg.allocator.args.block_size": "B", "cfg.allocator.args.page_size": "page",
         "cfg.workload.request_rate": "rate", "cfg.workload.n": "n", "cfg.workload.prefix_len": "prefix",
         "cfg.engine.enable_prefix_caching": "prefix caching", "cfg.engine.preemption_mode": "preempt",
         "cfg.engine.host_kv_cache_memory": "host GiB", "cfg.engine.host_transfer_blocks": "T",
         "cfg.engine.host_tier_policy": "", "cfg.workload.prefix_hit_rate": "hit",
         "cfg.model.name": "", "cfg.workload.name": "", "cfg.sim.device": "", "cfg.mode": ""}


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


ALLOCATOR_ORDER = {"contiguous": 0, "paged": 1, "virtual": 2}
POLICY_ORDER = {"max": 0, "pow2": 1, "oracle": 2}


def order_runs(wide: pd.DataFrame) -> pd.DataFrame:
    """Contiguous max, pow2, oracle, then paged, then virtual (the paper's order); within
    those, by the numeric values of the other swept keys."""
    keys = pd.DataFrame(index=wide.index)
    keys["_a"] = wide.get("allocator", pd.Series("", index=wide.index)).map(ALLOCATOR_ORDER).fillna(9)
    keys["_p"] = wide.get("cfg.allocator.args.policy", pd.Series(None, index=wide.index)).map(POLICY_ORDER).fillna(9)
    cols = ["_a", "_p"]
    for i, k in enumerate(varying(wide)):
        # numbers by value (numeric or string columns alike: pandas 3 reads text as ``str``, not
        # object), then what is not a number (``auto`` beside page sizes) by its text, after them
        keys[f"_{i}"] = pd.to_numeric(wide[k], errors="coerce")
        keys[f"_{i}t"] = wide[k].astype(str)
        cols += [f"_{i}", f"_{i}t"]
    keys["_label"] = wide.get("label", wide["run_id"]).astype(str)
    order = keys.sort_values(cols + ["_label"], kind="stable").index
    return wide.loc[order].reset_index(drop=True)


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


def _ci(wide: pd.DataFrame, metric: str, scale: float = 1.0):
    """The 95% CI half-widths of ``metric`` (NaN -> 0), or None where no row has one."""
    col = wide.get(f"{metric}_ci95")
    if col is None or not np.isfinite(col.astype(float)).any():
        return None
    return scale * col.astype(float).fillna(0).to_numpy()


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


def varying(wide: pd.DataFrame) -> list[str]:
    """``cfg.*`` columns whose value differs between runs (missing counts as a value)."""
    out = []
    for c in wide.columns:
        if not c.startswith("cfg.") or c in DERIVED:
            continue
        if wide[c].astype(str).nunique(dropna=False) > 1:
            out.append(c)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:g}"
    return str(v)


def _part(key: str, value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    short = SHORT.get(key, key.split(".")[-1])
    if key == "cfg.allocator.args.page_size" and isinstance(value, (int, float)):
        value = _bytes(value)
    if isinstance(value, bool):
        return f"{short} {'on' if value else 'off'}" if short else str(value)
    return f"{short}={_fmt(value)}" if short else _fmt(value)


def _bytes(n: float) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % (size // 16 or 1) == 0:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"


def _implied(wide: pd.DataFrame, keys: list[str]) -> set[str]:
    """Keys whose value follows from their group's varying name (workload=fixed brings its
    input_len, uniform its input_len_min): named once, by the choice."""
    out = set()
    for k in keys:
        name = ".".join(k.split(".")[:2]) + ".name"  # cfg.workload.input_len -> cfg.workload.name
        if k != name and name in keys:
            per_choice = wide.groupby(wide[name].astype(str))[k].agg(lambda v: v.astype(str).nunique(dropna=False))
            if per_choice.max() <= 1:
                out.add(k)
    return out


def run_labels(wide: pd.DataFrame, exclude: tuple[str, ...] = ()) -> pd.Series:
    """Short names of runs: the allocator label plus whatever else varies between runs.

    With ``exclude`` (a sweep axis) the names are those of a series along that axis: the
    axis is left out, and where it is an allocator argument, so is the allocator label
    (which usually contains it) in favour of the other varying allocator keys.
    """
    keys = [k for k in varying(wide) if k not in exclude]
    alloc = [k for k in keys if k.startswith("cfg.allocator.")]
    other = [k for k in keys if k not in alloc and k not in _implied(wide, keys)]
    axis_in_alloc = any(k.startswith("cfg.allocator.") for k in exclude)
    labels = []
    for _, r in wide.iterrows():
        name = str(r.get("allocator_label") or r.get("allocator") or r["run_id"])
        if not exclude or (alloc and not axis_in_alloc):
            parts = [name]
        else:
            parts = [p for p in (_part(k, r.get(k)) for k in alloc) if p]
        parts += [p for p in (_part(k, r.get(k)) for k in other) if p]
        # along an allocator argument the label (paged-b16) names the point, not the series
        fallback = str(r.get("allocator") or name) if axis_in_alloc else name
        labels.append(", ".join(parts) or fallback)
    return pd.Series(labels, index=wide.index)


# ---------------------------------------------------------------------------- figures

def _title(wide: pd.DataFrame, what: str) -> str:
    parts = [str(wide[c].iloc[0]) for c in ("model", "workload", "device") if c in wide and wide[c].nunique() == 1]
    return f"{what} — {', '.join(parts)}" if parts else what


def plot_throughput(wide: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(wide) + 2), 3.5))
    bars = ax.bar(wide["label"], wide["output_throughput"], color="#264653",
                  yerr=_ci(wide, "output_throughput"), capsize=3, error_kw=dict(lw=1, ecolor="black"))
    ax.bar_label(bars, fmt="%.0f", fontsize=8, label_type="center", color="white")
    ax.set_ylabel("output throughput (tok/s)")
    ax.set_title(_title(wide, "Output throughput"), fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    plt.setp(ax.get_xticklabels(), ha="right")
    return fig


def memory_fields(df: pd.DataFrame, suffix: str = "") -> list[str]:
    """The STAT_FIELDS to draw or tabulate for ``df``: all of them, less optional ones that are
    absent or zero throughout."""
    out = []
    for f in _stat_fields():
        col = f"{f}{suffix}"
        if f in OPTIONAL_FIELDS and (col not in df or not df[col].astype(float).fillna(0).any()):
            continue
        out.append(f)
    return out


def _has_memory(wide: pd.DataFrame) -> bool:
    return all(f in wide for f in _stat_fields() if f not in OPTIONAL_FIELDS)


def _memory_panel(ax, wide: pd.DataFrame, suffix: str, title: str) -> None:
    bottom = np.zeros(len(wide))
    for f in memory_fields(wide, suffix):
        vals = 100 * wide[f"{f}{suffix}"].astype(float).fillna(0).to_numpy()
        ax.bar(wide["label"], vals, bottom=bottom, color=MEMORY_COLORS[f], label=LABELS[f])
        err = _ci(wide, f"{f}{suffix}", 100)
        if err is not None and f != "free":  # each segment's own interval, at its top
            ax.errorbar(np.arange(len(wide)), bottom + vals, yerr=err, fmt="none", ecolor="black", lw=0.8,
                        capsize=2)
        bottom += vals
    ts = 100 * wide[f"token_states{suffix}"].astype(float).to_numpy()
    for i, v in enumerate(ts):
        if not v > 0:
            continue  # no such steps in this run
        ax.text(i, v / 2, f"{v:.0f}%" if len(ts) > 8 else f"{v:.1f}%", ha="center", va="center", fontsize=7,
                color="white")
    ax.set_ylabel("KV pool (% of capacity)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    plt.setp(ax.get_xticklabels(), ha="right")


def plot_memory(wide: pd.DataFrame):
    """Stacked bars of the memory fields (the PagedAttention paper's Fig. 2), with an "idle
    mapped" segment where a run keeps memory mapped for reuse (virtual); where runs have a
    steady-state window, its time-weighted means too (what is compared with the paper)."""
    saturated = "token_states_saturated" in wide and wide["token_states_saturated"].notna().any()
    panels = [("", "mean over all engine steps")]
    if "token_states_tw" in wide and wide["token_states_tw"].notna().any():
        panels.append(("_tw", "time-weighted over the steady-state window"))
    if saturated:
        panels.append(("_saturated", "mean over steps where requests wait (saturated pool)"))
    many = len(wide) > 8  # many bars: panels one above the other
    w = max(4, (0.45 if many else 0.9) * len(wide) + 1.5)
    rows, cols = (len(panels), 1) if many else (1, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols + 1.5, 4.2 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, (suffix, title) in zip(axes, panels):
        _memory_panel(ax, wide, suffix, title)
        if many:
            ax.tick_params(axis="x", labelsize=7)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(_title(wide, "Where the KV memory goes"), fontsize=10)
    fig.tight_layout()
    return fig


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


def _once(style: dict, i: int) -> dict:
    """The style of a row's ``i``-th run: labelled once."""
    return style if i == 0 else {k: v for k, v in style.items() if k != "label"}


def _ecdf(ax, values: np.ndarray, style: dict) -> None:
    v = np.sort(values[np.isfinite(values) & (values > 0)])  # no output token: e2el / 0 is no latency
    if len(v):
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", lw=1.2, **style)


def _styles(wide: pd.DataFrame) -> tuple[dict[str, dict], list, str]:
    """Line style of each run, the legend handles and a note for the title.

    Up to 10 runs: a colour each. More, along a swept axis: a colour per series (the other
    swept keys) and darker lines for larger values of the axis, so 30 curves stay readable.
    """
    from matplotlib.lines import Line2D

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    axis = next((a for a in SWEEPS if a in varying(wide)), None)
    if len(wide) <= len(cycle) or axis is None:
        styles = {r["run_id"]: dict(color=cycle[i % len(cycle)], label=r["label"]) for i, (_, r) in
                  enumerate(wide.iterrows())}
        return styles, [], ""
    series = run_labels(wide, exclude=(axis,))
    colors = {s: cycle[i % len(cycle)] for i, s in enumerate(dict.fromkeys(series))}
    x = pd.to_numeric(wide[axis], errors="coerce")
    rank = x.rank(method="dense")  # inf (an offline rate) ranks last, the darkest; NaN has no rank
    top = rank.max() if rank.notna().any() else 1
    # a run without a value on the axis (contiguous in a block-size sweep) is drawn in full
    shade = (rank / top if top > 1 else pd.Series(1.0, index=rank.index)).fillna(1.0)
    styles = {r["run_id"]: dict(color=colors[series[i]], alpha=float(0.25 + 0.75 * shade[i]))
              for i, r in wide.iterrows()}
    handles = [Line2D([], [], color=c, label=s) for s, c in colors.items()]
    lo, hi = x.min(), x.max()
    return styles, handles, f" (darker: larger {SWEEPS[axis][1]}, {_fmt(lo)} to {_fmt(hi)})"


def plot_latency_cdfs(wide: pd.DataFrame, requests: dict[str, pd.DataFrame]):
    cols = [("ttft", "TTFT (s)"), ("e2el", "end-to-end latency (s)"), ("normalized_latency", "normalized latency (s/token)")]
    styles, handles, note = _styles(wide)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for _, r in wide.iterrows():
        for i, req in enumerate(requests.get(r["run_id"], [])):
            for ax, (c, _) in zip(axes, cols):
                vals = (req["e2el"] / req["output_len"]) if c == "normalized_latency" and c not in req else req[c]
                _ecdf(ax, vals.to_numpy(float), _once(styles[r["run_id"]], i))
    for ax, (_, xlabel) in zip(axes, cols):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("requests (cumulative fraction)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(handles=handles or None, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(_title(wide, "Latency CDFs") + note, fontsize=10)
    fig.tight_layout()
    return fig


SMALL_MULTIPLES_AFTER = 10  # more runs than this: one panel per series instead of one crowded plot


def plot_usage_over_time(wide: pd.DataFrame, steps: dict[str, pd.DataFrame]):
    styles, handles, note = _styles(wide)
    axis = next((a for a in SWEEPS if a in varying(wide)), None)
    series = run_labels(wide, exclude=(axis,)) if axis else wide["label"]
    groups = list(dict.fromkeys(series))
    if len(wide) <= SMALL_MULTIPLES_AFTER or len(groups) < 2:
        groups = [None]
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(8 if cols == 1 else 3.6 * cols + 1, 5 * rows),
                             sharex=True, sharey="row", height_ratios=[3, 2] * rows, squeeze=False)
    for k, group in enumerate(groups):
        ax, ax2 = axes[2 * (k // cols)][k % cols], axes[2 * (k // cols) + 1][k % cols]
        for (_, r), s in zip(wide.iterrows(), series):
            if group is not None and s != group:
                continue
            for i, st in enumerate(steps.get(r["run_id"], [])):
                if "capacity" in st:
                    _plot_usage(ax, ax2, st, _once(styles[r["run_id"]], i))
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax2.grid(alpha=0.3)
        if group is not None:
            ax.set_title(group, fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("KV pool in use (%)\n(dotted: token states)")
            ax2.set_ylabel("batch size (seqs)")
        if k // cols == rows - 1:
            sim = "mode" in wide and (wide["mode"] == "simulate").all()  # runs before "mode" was recorded: not said
            ax2.set_xlabel(("simulated " if sim else "") + "time (s)")
    for k in range(len(groups), rows * cols):  # empty cells of the grid
        axes[2 * (k // cols)][k % cols].set_visible(False)
        axes[2 * (k // cols) + 1][k % cols].set_visible(False)
    if groups == [None]:
        axes[0][0].legend(handles=handles or None, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axes[0][0].set_title(_title(wide, "KV usage and batch size over time") + note, fontsize=9)
    else:
        fig.suptitle(_title(wide, "KV usage and batch size over time") + note, fontsize=10)
        fig.tight_layout()
    return fig


def _plot_usage(ax, ax2, st: pd.DataFrame, style: dict) -> None:
    """One run's pool in use and token states (top) and batch size (bottom)."""
    unlabelled = {k: v for k, v in style.items() if k != "label"}
    idle = st["idle_mapped"] if "idle_mapped" in st else 0  # kept for reuse: not in use
    used = 100 * (1 - (st["free"] + idle) / st["capacity"])
    ax.plot(st["time"], used, lw=1, drawstyle="steps-post", **style)
    ax.plot(st["time"], 100 * st["token_states"] / st["capacity"], lw=0.8, ls=":", drawstyle="steps-post",
            **unlabelled)
    ax2.plot(st["time"], st["num_seqs"], lw=1, drawstyle="steps-post", **unlabelled)


# sweep axis -> (file, x label, x scale, [(metric, y label, percent?)])
MEM_CURVES = [("token_states_saturated", "token states, saturated (% of pool)", True),
              ("internal_frag_saturated", "internal frag., saturated (% of pool)", True),
              ("external_frag_saturated", "external frag., saturated (% of pool)", True),
              ("idle_mapped_saturated", "idle mapped, saturated (% of pool)", True)]
SWEEPS = {
    "cfg.workload.request_rate": ("rate_curves.png", "request rate (req/s)", "linear", [
        ("output_throughput", "output throughput (tok/s)", False),
        ("normalized_latency", "normalized latency (s/token)", False),
        ("p99_ttft_ms", "p99 TTFT (ms, log scale)", False)]),
    "cfg.allocator.args.block_size": ("block_size_curves.png", "block size (tokens)", "log2", [
        *MEM_CURVES[:2], ("output_throughput", "output throughput (tok/s)", False),
        ("normalized_latency", "normalized latency (s/token)", False)]),
    "cfg.allocator.args.page_size": ("page_size_curves.png", "page size (KiB)", "log2", [
        *MEM_CURVES, ("output_throughput", "output throughput (tok/s)", False)]),
    "cfg.workload.n": ("sharing_curves.png", "samples per request (n)", "linear", [
        ("sharing_saving", "KV memory saved by sharing (%)", True),
        ("output_throughput", "output throughput (tok/s)", False),
        ("mean_batch_size", "mean batch size (seqs)", False)]),
    "cfg.workload.prefix_len": ("prefix_curves.png", "shared prefix length (tokens)", "linear", [
        ("sharing_saving", "KV memory saved by sharing (%)", True),
        ("output_throughput", "output throughput (tok/s)", False),
        ("prefix_cache_hit_rate", "prefix cache hit rate (%)", True)]),
    "cfg.engine.hf_overrides.sliding_window": ("window_curves.png", "sliding window (tokens)", "log2", [
        ("mean_batch_size", "mean batch size (seqs)", False),
        ("output_throughput", "output throughput (tok/s)", False),
        ("kv_windowed_groups_mean_gb", "KV held by windowed layers (GB, mean)", False),
        ("kv_padding_mean_gb", "KV held by padding layers (GB, mean)", False)]),
    "cfg.workload.prefix_hit_rate": ("host_tier_curves.png", "prefix hit rate of the workload", "linear", [
        ("mean_ttft_ms", "mean TTFT (ms)", False),
        ("output_throughput", "output throughput (tok/s)", False),
        ("host_prefix_hit_rate", "prompt tokens loaded from host (%)", True),
        ("mean_recomputed_tokens", "recomputed prompt tokens / request", False)]),
    "cfg.engine.max_num_seqs": ("max_num_seqs_curves.png", "max_num_seqs (seqs)", "log2", [
        ("output_throughput", "output throughput (tok/s)", False),
        ("token_states_saturated", "token states, saturated (% of pool)", True)]),
}


def sweep_data(wide: pd.DataFrame, axis: str) -> pd.DataFrame | None:
    """The runs a sweep plot draws: ``_x`` (the axis value, in the plot's unit) and ``_series``
    (one line per combination of the other varying keys); None with fewer than two x values.
    Runs without the axis (contiguous in a block-size sweep) are left out."""
    x = pd.to_numeric(wide[axis], errors="coerce")
    if axis == "cfg.workload.request_rate":
        x = x.where(np.isfinite(x))
    if axis == "cfg.allocator.args.page_size":
        x = x / 1024
    data = wide.assign(_x=x).dropna(subset=["_x"])
    if data["_x"].nunique() < 2:
        return None
    return data.assign(_series=run_labels(data, exclude=(axis,)))


def plot_sweep(wide: pd.DataFrame, axis: str):
    """Metrics vs one swept config key; one line per combination of the other varying keys."""
    fname, xlabel, scale, metrics = SWEEPS[axis]
    metrics = [m for m in metrics if m[0] in wide and wide[m[0]].notna().any()
               and (m[0].split("_saturated")[0] not in OPTIONAL_FIELDS or wide[m[0]].fillna(0).any())]
    if not metrics:
        return None
    data = sweep_data(wide, axis)
    if data is None:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 1.5, 3.5), squeeze=False)
    for ax, (metric, ylabel, percent) in zip(axes[0], metrics):
        for i, (series, grp) in enumerate(data.groupby("_series", sort=False)):
            grp = grp.sort_values("_x")
            y = grp[metric].astype(float) * (100 if percent else 1)
            # markers and dashes differ per series, so overlapping curves stay visible
            line, = ax.plot(grp["_x"], y, marker="osD^v<>"[i % 7], ms=5 - (i % 3), ls=("-", "--", ":", "-.")[i % 4],
                            label=series)
            err = _ci(grp, metric, 100 if percent else 1)
            if err is not None:  # the 95% CI over repeats
                ax.fill_between(grp["_x"], y - err, y + err, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if "log scale" in ylabel:
            ax.set_yscale("log")
        if scale == "log2":
            ax.set_xscale("log", base=2)
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap the major ones
        ax.grid(alpha=0.3)
    if data["_series"].nunique() > 1:
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(_title(data, f"Sweep over {xlabel}"), fontsize=10)
    fig.tight_layout()
    return fig


def plot_memory_over_time(steps: pd.DataFrame, title: str, xlabel: str = "time (s)"):
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True, height_ratios=[2, 1])
    cap = steps["capacity"].iloc[0]
    lower = np.zeros(len(steps))
    for f in memory_fields(steps):  # stacked, held constant between steps
        upper = lower + 100 * steps[f].to_numpy(float) / cap
        ax.fill_between(steps["time"], lower, upper, step="post", color=MEMORY_COLORS[f], label=LABELS[f], lw=0)
        lower = upper
    ax.set_ylabel("KV pool (% of capacity)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax2.plot(steps["time"], steps["num_seqs"], color="#264653", label="batch size", drawstyle="steps-post")
    ax2.plot(steps["time"], steps["waiting"], color="#e76f51", label="waiting", drawstyle="steps-post")
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("sequences (count)")
    ax2.legend(fontsize=7)
    return fig


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """Plots of one run, in its own folder."""
    run_dir = Path(run_dir)
    steps = pd.read_parquet(run_dir / "steps.parquet")
    if steps.empty or "capacity" not in steps:
        return []
    summary = json.loads((run_dir / "summary.json").read_text())
    sim = summary.get("mode") == "simulate"
    fig = plot_memory_over_time(steps, f"{summary.get('allocator_label')} — {summary.get('model')}, "
                                       f"{summary.get('workload')}, {summary.get('device')}",
                                "simulated time (s)" if sim else "time (s)")
    path = run_dir / "kv_usage_over_time.png"
    save_figure(path, fig)
    plt.close(fig)
    return [path]


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
