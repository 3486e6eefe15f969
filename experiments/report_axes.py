"""Report figures of the KV axes that are not numbers: the cache dtype (bf16 vs fp8) and the
layer grouping (none vs shared), as grouped bars per allocator; plus the derived columns the
sliding-window sweep plots."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

GB = 1e9
# config key -> (file, title, [(metric, y label)])
CATEGORIES = {
    "cfg.engine.kv_cache_dtype": ("kv_dtype.png", "KV cache dtype at one pool of bytes", [
        ("mean_batch_size", "mean batch size (seqs)"),
        ("output_throughput", "output throughput (tok/s)"),
        ("kv_capacity_tokens", "KV pool (tokens)")]),
    "cfg.engine.kv_grouping": ("kv_grouping.png", "Layer grouping: full-length vs window-aware KV", [
        ("mean_batch_size", "mean batch size (seqs)"),
        ("output_throughput", "output throughput (tok/s)"),
        ("kv_windowed_groups_mean_gb", "KV held by windowed layers (GB, mean)")]),
}


def add_axis_columns(wide: pd.DataFrame) -> None:
    """GB columns of the layer-group byte figures (runs without groups: 0 padding)."""
    for col in ("kv_windowed_groups_mean_bytes", "kv_full_groups_mean_bytes", "kv_padding_mean_bytes"):
        for c in (col, f"{col}_ci95"):  # the repeats' interval in the same unit, for the error bars
            if c in wide:
                wide[c.replace("_bytes", "_gb")] = wide[c].astype(float) / GB


def _series_key(wide: pd.DataFrame, axis: str, swept: list[str]) -> pd.Series:
    """What a group of bars stands for: the allocator and every other swept key but ``axis``."""
    others = [k for k in swept if k != axis and k in wide]
    def name(r, keys):
        parts = [str(r.get("allocator_label") or r.get("allocator"))]
        parts += [f"{k.split('.')[-1]}={r[k]}" for k in keys]
        return ", ".join(parts)
    shown = [k for k in others if "strategy" not in k and "allocator" not in k]
    names = wide.apply(name, axis=1, args=(shown,))
    # one bar per group and value: allocator arguments its label leaves out (arena, prefetch, ...) and,
    # failing those, the run folder tell apart runs the names above would merge
    if pd.DataFrame({"g": names, "v": wide[axis].astype(str)}).duplicated().any():
        names = wide.apply(name, axis=1, args=(others,))
    if pd.DataFrame({"g": names, "v": wide[axis].astype(str)}).duplicated().any():
        names = names + " (" + wide["run_id"].astype(str) + ")"
    return names


def plot_axis(wide: pd.DataFrame, axis: str, swept: list[str]):
    fname, title, metrics = CATEGORIES[axis]
    metrics = [(m, y) for m, y in metrics if m in wide and wide[m].notna().any()]
    if not metrics:
        return None
    data = wide.assign(_group=_series_key(wide, axis, swept), _value=wide[axis].astype(str))
    groups = list(dict.fromkeys(data["_group"]))
    values = list(dict.fromkeys(data["_value"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
    width = 0.8 / len(values)
    x = np.arange(len(groups))
    for ax, (metric, ylabel) in zip(axes[0], metrics):
        for i, v in enumerate(values):
            rows = data[data["_value"] == v].set_index("_group").reindex(groups)
            # rows of repeats: each bar its 95% CI, as every other figure of the report draws it
            ci = f"{metric}_ci95"
            err = rows[ci].astype(float).fillna(0).to_numpy() if ci in rows and rows[ci].notna().any() else None
            bars = ax.bar(x + (i - (len(values) - 1) / 2) * width, rows[metric].astype(float), width, label=v,
                          yerr=err, capsize=3 if err is not None else 0, error_kw=dict(lw=1, ecolor="black"))
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
        ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(title=axis.split(".")[-1], fontsize=7, title_fontsize=7,
                       loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_categories(wide: pd.DataFrame, swept: list[str]) -> dict[str, tuple[str, object]]:
    """The figures of the categorical axes this report's runs vary along."""
    out = {}
    for axis, (fname, title, _) in CATEGORIES.items():
        if axis in swept:
            fig = plot_axis(wide, axis, swept)
            if fig is not None:
                out[fname] = (title, fig)
    return out
