"""Figures of a reproduction page: kvlab's values with their CIs, the paper's marked beside them."""
from __future__ import annotations

import math
from pathlib import Path

from experiments.reproduce.core import LATENCY_LIMIT, Row, _bounds, mean_ci, per_seed, sustainable_rate


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PAPER_MARK = dict(marker="o", mfc="none", mec="black", ms=9, mew=1.5, ls="none", zorder=5)


def finish(fig, ax, path: Path, title: str) -> Path:
    """Title, legend outside the data, written whole or not at all."""
    from experiments.atomic import save_figure

    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    save_figure(path, fig)
    _plt().close(fig)
    return path


def _mark_paper(ax, x, value, label: bool) -> None:
    if value is None:
        return
    lo, hi = _bounds(value)
    if lo == hi:
        ax.plot([x], [lo], **PAPER_MARK, label="paper" if label else None)
    else:
        ax.errorbar([x], [(lo + hi) / 2], yerr=[[(hi - lo) / 2]], fmt="none", ecolor="black", capsize=6,
                    lw=1.5, zorder=5, label="paper (range)" if label else None)


def bars(path: Path, rows: list[Row], labels: list[str], ylabel: str, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(rows) + 3), 3.8))
    xs = range(len(rows))
    ax.bar(xs, [r.kvlab for r in rows], yerr=[0 if not math.isfinite(r.ci95) else r.ci95 for r in rows],
           capsize=4, color="tab:blue", alpha=0.8, label="kvlab (mean, 95% CI)")
    for i, r in enumerate(rows):
        _mark_paper(ax, i + 0.3, r.paper, i == 0)
    ax.set_xticks(list(xs), labels, rotation=15)
    ax.set_ylabel(ylabel)
    return finish(fig, ax, path, title)


def rate_plot(path: Path, data, rates: list[float], title: str, paper_ratio=None, ratio_label: str = "") -> Path:
    """Normalized latency vs rate, one line per strategy with a 95% CI band; the paper's ratio
    drawn as a hollow marker at (paper ratio x the baseline's sustainable rate, the limit)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, by_rate in data.items():
        m, c = zip(*[mean_ci(per_seed(by_rate[r], "normalized_latency"))[:2] for r in rates])
        m, c = [float(v) for v in m], [0.0 if not math.isfinite(v) else float(v) for v in c]
        ax.plot(rates, m, marker=".", label=label)
        ax.fill_between(rates, [max(a - b, a / 3) for a, b in zip(m, c)], [a + b for a, b in zip(m, c)], alpha=0.2)  # log axis
    ax.axhline(LATENCY_LIMIT, color="grey", ls=":", lw=1, label=f"latency limit {LATENCY_LIMIT} s/token")
    if paper_ratio is not None:
        base, value = paper_ratio
        sr = mean_ci([sustainable_rate(rates, [data[base][r][i].get("normalized_latency", math.nan) for r in rates])
                      for i in range(len(data[base][rates[0]]))])[0]
        lo, hi = _bounds(value)
        for j, v in enumerate(sorted({lo, hi})):
            ax.plot([sr * v], [LATENCY_LIMIT], **PAPER_MARK, label=f"paper: {ratio_label}" if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (s/token)")
    return finish(fig, ax, path, title)


def sweep_plot(path: Path, series: dict[str, tuple[list, list[list[float]]]], xlabel: str, ylabel: str, title: str,
               paper_x=None, logx: bool = True) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, (xs, vals) in series.items():
        m, c = zip(*[mean_ci(v)[:2] for v in vals])
        c = [0.0 if not math.isfinite(v) else v for v in c]
        ax.errorbar(xs, m, yerr=c, marker="o", capsize=3, label=label)
    if paper_x is not None:
        ax.axvline(paper_x, color="black", ls="--", lw=1, label=f"paper: {paper_x}")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return finish(fig, ax, path, title)
