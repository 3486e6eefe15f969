"""Tables of a report: markdown without extra dependencies, and the mean and 95% confidence
interval of runs repeated over seeds (docs/ARCHITECTURE.md, "Measurement protocol")."""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

# configuration keys that only pick the seed: runs that differ in these alone are repeats
SEED_KEYS = ("cfg.seed", "cfg.workload.seed")
# what else must agree for runs to be repeats (runs recorded before the cfg.* columns had only these)
SAME_RUN_KEYS = ("allocator", "allocator_label", "allocator_args", "model", "workload", "mode", "request_rate",
                 "device")


def markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _two_sided_t_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom: the closed form for integer
    ``df`` (Abramowitz & Stegun 26.7.3-4), so no scipy is needed."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(2, df, 2):  # 1, (1/2)c^2, (1*3)/(2*4)c^4, ...
            term *= c2 * (k - 1) / k
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = math.cos(theta), math.cos(theta)
    for k in range(3, df - 1, 2):  # cos, (2/3)cos^3, (2*4)/(3*5)cos^5, ...
        term *= c2 * (k - 1) / k
        total += term
    return 2 / math.pi * (theta + s * total)


def t_quantile_975(df: int) -> float:
    """The t value of a two-sided 95% interval (Student t, ``df`` >= 1), by bisection."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    lo, hi = 0.0, 100.0  # df=1: 12.71
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _two_sided_t_cdf(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def mean_ci95(values) -> tuple[float, float, int]:
    """Mean, half-width of its 95% confidence interval (Student t) and n, over the finite values;
    the half-width is NaN below two values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.nan, 1
    return float(v.mean()), t_quantile_975(n - 1) * float(v.std(ddof=1)) / math.sqrt(n), n


def repeat_groups(wide: pd.DataFrame) -> list[list[int]]:
    """Row positions of runs that differ only in their seed, in the order of first appearance."""
    keys = [c for c in wide.columns if (c.startswith("cfg.") and c not in SEED_KEYS) or c in SAME_RUN_KEYS]
    if not keys:
        return [[i] for i in range(len(wide))]
    ident = ["\x1f".join(map(str, row)) for row in wide[keys].itertuples(index=False)]
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(ident):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


def _group_id(run_ids: list[str]) -> str:
    """``sweep/3-paged`` for ``sweep/3-paged/rep0`` .. ``rep2``; else the first run's id."""
    if len(run_ids) > 1:
        common = os.path.commonpath(run_ids) if all("/" in r for r in run_ids) else ""
        if common and common not in run_ids:
            return common
    return run_ids[0]


def aggregate_repeats(wide: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per group of repeats (``repeat_groups``): ``metrics`` averaged over the group,
    everything else from its first run, ``n`` its number of runs. Where some group has more than
    one run, each metric gets ``<metric>_ci95`` (95% CI half-width) and ``<metric>_n`` beside it,
    ``runs`` lists the group's run ids and ``seeds`` its seeds; ``_members`` holds the run folders
    (for the plots; not a column to write). Runs that are alone keep their row as it was."""
    groups = repeat_groups(wide)
    repeated = any(len(g) > 1 for g in groups)
    rows = []
    for g in groups:
        part = wide.iloc[g]
        row = part.iloc[0].to_dict()
        row["n"] = len(g)
        for m in metrics:
            mean, half, n = mean_ci95(part[m].to_numpy(float))
            row[m] = mean if len(g) > 1 else row[m]
            if repeated:
                row[f"{m}_ci95"], row[f"{m}_n"] = half, n
        if repeated:
            ids = [str(r) for r in part["run_id"]]
            row["run_id"] = _group_id(ids)
            row["runs"] = ";".join(ids)
            row["seeds"] = ";".join(str(s) for s in part["seed"]) if "seed" in part else ""
        row["_members"] = list(part["run_dir"]) if "run_dir" in part else []
        rows.append(row)
    out = pd.DataFrame(rows)
    order = [c for c in wide.columns] + ["n"]
    if repeated:
        order = [x for c in wide.columns for x in ([c, f"{c}_ci95", f"{c}_n"] if c in metrics else [c])]
        order += ["n", "runs", "seeds"]
    return out[order + ["_members"]]


def with_ci(df: pd.DataFrame, cols: list[str], ci: pd.DataFrame | None = None) -> pd.DataFrame:
    """``cols`` of ``df`` as "mean ± half-width" where ``ci`` (default ``df``) has a finite
    ``<col>_ci95``; other cells as they are."""
    ci = df if ci is None else ci
    out = df.copy()
    for c in cols:
        half = ci.get(f"{c}_ci95")
        if half is None or not np.isfinite(half.astype(float)).any():
            continue
        out[c] = [f"{v:.4g} ± {h:.2g}" if np.isfinite(h) else (f"{v:.4g}" if isinstance(v, float) else str(v))
                  for v, h in zip(df[c], half.astype(float))]
    return out
