"""``kvlab report``'s figures (memory, throughput, latency, KV usage, sweep curves) and a run's own plot."""
from __future__ import annotations

import json
from pathlib import Path

from experiments.atomic import save_figure
from experiments.report_labels import _fmt, np, pd, plt, run_labels, varying


def _stat_fields() -> tuple[str, ...]:
    from allocators.stats import STAT_FIELDS  # allocators/__init__ imports torch: only when drawing

    return STAT_FIELDS


MEMORY_COLORS = {"token_states": "#2a9d8f", "reservation": "#e9c46a", "internal_frag": "#f4a261",
                 "external_frag": "#e76f51", "idle_mapped": "#8fb3d9", "free": "#d9d9d9"}
LABELS = {"token_states": "token states", "reservation": "reservation", "internal_frag": "internal frag.",
          "external_frag": "external frag.", "idle_mapped": "idle mapped", "free": "free"}
# drawn and tabulated only where some run has it (nonzero): kept for reuse, neither use nor waste;
# runs recorded before it existed lack the column
OPTIONAL_FIELDS = ("idle_mapped",)


def _ci(wide: pd.DataFrame, metric: str, scale: float = 1.0):
    """The 95% CI half-widths of ``metric`` (NaN -> 0), or None where no row has one."""
    col = wide.get(f"{metric}_ci95")
    if col is None or not np.isfinite(col.astype(float)).any():
        return None
    return scale * col.astype(float).fillna(0).to_numpy()


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
