"""``kvlab report DIR``: every run under DIR into tidy tables and plots."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are files
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from allocators.stats import STAT_FIELDS  # noqa: E402
from experiments.atomic import save_figure, write_csv, write_parquet, write_text  # noqa: E402
from experiments.metrics import UNITS  # noqa: E402

MEMORY_COLORS = {"token_states": "#2a9d8f", "reservation": "#e9c46a", "internal_frag": "#f4a261",
                 "external_frag": "#e76f51", "free": "#d9d9d9"}
LABELS = {"token_states": "token states", "reservation": "reservation", "internal_frag": "internal frag.",
          "external_frag": "external frag.", "free": "free"}


def collect(root: str | Path) -> pd.DataFrame:
    """One row per run folder under ``root`` that has a summary.json."""
    rows = []
    for path in sorted(Path(root).rglob("summary.json")):
        rec = json.loads(path.read_text())
        rec["run_dir"] = str(path.parent)
        rec.setdefault("run_id", path.parent.name)
        rows.append(rec)
    if not rows:
        raise FileNotFoundError(f"no run under {root} has a summary.json: run `kvlab run` first")
    df = pd.DataFrame(rows)
    if "allocator_args" in df:
        df["allocator_args"] = df["allocator_args"].map(lambda a: json.dumps(a, sort_keys=True))
    return df


def long_table(wide: pd.DataFrame) -> pd.DataFrame:
    """(run_id, metric, value, unit) for every numeric metric."""
    numeric = [c for c in wide.columns if c in UNITS and pd.api.types.is_numeric_dtype(wide[c])]
    long = wide.melt(id_vars=["run_id"], value_vars=numeric, var_name="metric", value_name="value")
    long["unit"] = long["metric"].map(UNITS)
    return long.sort_values(["run_id", "metric"]).reset_index(drop=True)


def run_label(row: pd.Series) -> str:
    return str(row.get("allocator_label") or row.get("allocator") or row["run_id"])


def plot_throughput(wide: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(wide)), 3.5))
    labels = [run_label(r) for _, r in wide.iterrows()]
    bars = ax.bar(labels, wide["output_throughput"], color="#264653")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel("output throughput (tok/s)")
    ax.set_title(f"Output throughput — {wide['model'].iloc[0]}, {wide['workload'].iloc[0]}, {wide['device'].iloc[0]}",
                 fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    return fig


def plot_memory(wide: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(wide)), 3.8))
    labels = [run_label(r) for _, r in wide.iterrows()]
    bottom = pd.Series(0.0, index=wide.index)
    for f in STAT_FIELDS:
        vals = 100 * wide[f].fillna(0)
        ax.bar(labels, vals, bottom=bottom, color=MEMORY_COLORS[f], label=LABELS[f])
        bottom += vals
    ax.set_ylabel("KV pool (% of capacity, mean over steps)")
    ax.set_ylim(0, 100)
    ax.set_title("Where the KV memory goes", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", rotation=30)
    return fig


def plot_memory_over_time(steps: pd.DataFrame, title: str):
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True, height_ratios=[2, 1])
    cap = steps["capacity"].iloc[0]
    ax.stackplot(steps["time"], *[100 * steps[f] / cap for f in STAT_FIELDS],
                 colors=[MEMORY_COLORS[f] for f in STAT_FIELDS], labels=[LABELS[f] for f in STAT_FIELDS])
    ax.set_ylabel("KV pool (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax2.plot(steps["time"], steps["num_seqs"], color="#264653", label="batch size")
    ax2.plot(steps["time"], steps["waiting"], color="#e76f51", label="waiting")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("sequences")
    ax2.legend(fontsize=7)
    return fig


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """Plots of one run, in its own folder."""
    run_dir = Path(run_dir)
    steps = pd.read_parquet(run_dir / "steps.parquet")
    if steps.empty or "capacity" not in steps:
        return []
    summary = json.loads((run_dir / "summary.json").read_text())
    fig = plot_memory_over_time(steps, f"{summary.get('allocator_label')} — {summary.get('model')}, "
                                       f"{summary.get('workload')}")
    path = run_dir / "kv_usage_over_time.png"
    save_figure(path, fig)
    plt.close(fig)
    return [path]


def _markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    out = Path(out) if out else Path(root) / "report"
    wide = collect(root)
    write_csv(out / "summary.csv", wide)
    write_parquet(out / "summary_long.parquet", long_table(wide))
    figures = {"throughput.png": plot_throughput(wide), "memory_breakdown.png": plot_memory(wide)}
    for name, fig in figures.items():
        save_figure(out / name, fig)
        plt.close(fig)
    key = ["run_id", "allocator_label", "model", "workload", "mode", "device"]
    perf = [c for c in ["request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                        "normalized_latency", "mean_batch_size", "max_concurrency", "preemptions"] if c in wide]
    mem = [c for c in ["kv_capacity_tokens", *STAT_FIELDS] if c in wide]
    md = [f"# kvlab report: {Path(root)}", "", f"{len(wide)} runs.", "", "## Throughput and latency", "",
          _markdown_table(wide[[c for c in key if c in wide] + perf]), "", "![throughput](throughput.png)", "",
          "## Memory (fraction of KV pool capacity, mean over engine steps)", "",
          _markdown_table(wide[["run_id", "allocator_label"] + mem]), "", "![memory](memory_breakdown.png)", ""]
    write_text(out / "report.md", "\n".join(md))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvlab report", description=__doc__)
    ap.add_argument("dir", help="folder holding run folders (each with summary.json)")
    ap.add_argument("--out", default=None, help="where to write the report (default DIR/report)")
    args = ap.parse_args(argv)
    out = write_report(args.dir, args.out)
    print(f"report written to {out}/report.md")
    return 0
