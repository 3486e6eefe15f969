"""A device profile written by ``kvlab profile``: its tables, read as step-time functions.

``DeviceProfile`` holds the tables (one parquet file, its metadata: device, versions, commit);
``Grid1D`` and ``Grid2D`` interpolate a table linearly between its measured points (clamped
below the first, in proportion above the last, or along the last segment: ``above="linear"``);
``HostTable`` is a step's host time by batch size (a trimmed mean per bin). The cost model built
from them is ``ProfiledCostModel`` (experiments/profiled_costmodel.py).
"""
from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Grid1D", "Grid2D", "HostTable", "DeviceProfile", "load_profile", "check_profile", "resolve_profile_path",
           "host_model_of", "host_scheduling_of"]


class Grid1D:
    """y(x) through measured points: linear between them, clamped below, proportional above
    (or clamped: ``above="clamp"``; or along the last segment, never falling: ``above="linear"``,
    for a time with a fixed part, such as a decode step's weights, that does not grow with x)."""

    def __init__(self, xs, ys, above: str = "proportional"):
        self.proportional = above == "proportional"
        self.linear = above == "linear"
        order = np.argsort(xs)
        self.xs = np.asarray(xs, dtype=float)[order]
        self.ys = np.asarray(ys, dtype=float)[order]
        if len(self.xs) == 0:
            raise ValueError("an empty profile table")
        self._xl, self._yl = self.xs.tolist(), self.ys.tolist()  # for scalars: np.interp costs ~2 us a call
        xl, yl = self._xl, self._yl
        # above="linear": the last segment's slope, or ``min_slope`` where that is steeper (Grid2D: a
        # larger batch's step grows with the context at least as fast as a smaller one's)
        self.last_slope = (yl[-1] - yl[-2]) / (xl[-1] - xl[-2]) if len(xl) > 1 and xl[-1] > xl[-2] else 0.0
        self.min_slope = 0.0
        # values at integer points (batch sizes, token counts: a few thousand at most), kept: a
        # simulated run asks for the same ones millions of times, and np.interp on a scalar is slow
        self._at: dict[int, float] = {}

    def __call__(self, x: float) -> float:
        if type(x) is int:
            y = self._at.get(x)
            if y is None:
                y = self._at[x] = self._value(x)
            return y
        return self._value(x)

    def _value(self, x: float) -> float:
        """``np.interp(x, xs, ys)`` (clamped) to the bit, in Python floats: the same search (the
        last point at or below x) and the same arithmetic."""
        xs, ys = self._xl, self._yl
        if x > xs[-1] and self.proportional:
            return ys[-1] * x / xs[-1]
        if x > xs[-1] and self.linear:
            return ys[-1] + max(0.0, self.min_slope, self.last_slope) * (x - xs[-1])
        j = bisect_right(xs, x) - 1
        if j < 0:
            return ys[0]
        if j >= len(xs) - 1 or xs[j] == x:
            return ys[j]
        return (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j]) * (x - xs[j]) + ys[j]


class Grid2D:
    """z(a, b) on rows of a (each its own b points): 1-D in b within the two rows around a,
    then linear in a (clamped below the first row, proportional above the last). ``above``: each
    row's extension above its last b point (``Grid1D``); with ``"linear"`` a row grows there at
    least as steeply as the rows of smaller a (its own last segment, or a single point, may not)."""

    def __init__(self, a, b, z, above: str = "proportional"):
        df = pd.DataFrame({"a": a, "b": b, "z": z})
        self.rows = {float(k): Grid1D(g["b"].to_numpy(), g["z"].to_numpy(), above=above) for k, g in df.groupby("a")}
        self.keys = np.array(sorted(self.rows))
        if len(self.keys) == 0:
            raise ValueError("an empty profile table")
        self._kl = self.keys.tolist()
        if above == "linear":  # each row's extension at least as steep as a smaller a's: with its own last
            steepest = 0.0     # segment only (or a single point) z could fall in a above the grid
            for k in self._kl:
                row = self.rows[k]
                row.min_slope = steepest = max(steepest, row.last_slope)
                row._at.clear()

    def __call__(self, a: float, b: float) -> float:
        k = self._kl
        if a <= k[0]:
            return self.rows[k[0]](b)
        if a >= k[-1]:
            return self.rows[k[-1]](b) * a / k[-1]
        i = bisect_left(k, a)  # np.searchsorted's side="left"
        lo, hi = k[i - 1], k[i]
        w = (a - lo) / (hi - lo)
        return (1 - w) * self.rows[lo](b) + w * self.rows[hi](b)


HOST_BINS = [0, 1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 1 << 20]


def _trimmed_mean(x: pd.Series) -> float:
    """Mean without the top and bottom 1%: host time is skewed (a step's time adds up to the
    run's, so the mean, not the median, is what a simulated run must get right), and a rare
    stall (a collection, a page fault) says nothing about the next run."""
    lo, hi = np.quantile(x, [TRIM, 1 - TRIM])
    kept = x[(x >= lo) & (x <= hi)]
    return float(kept.mean()) if len(kept) else float(np.median(x))


TRIM = 0.01


class HostTable:
    """Host seconds of a step by its number of sequences: the mean (1% trimmed each side), per
    batch-size bin, of what the real engine's steps took beyond the modelled device time (scheduling, allocation,
    accounting, input preparation, graph launch, read-back, output handling); interpolated
    between bins, clamped outside them."""

    MIN_STEPS = 20  # a bin with fewer steps says more about its outliers than about the bin

    def __init__(self, batch, host, signed: bool = False):
        """``signed``: keep bins whose mean is negative (a correction, not a time)."""
        df = pd.DataFrame({"batch": np.asarray(batch, float), "host": np.asarray(host, float)})
        df["bin"] = pd.cut(df["batch"], HOST_BINS)
        g = df.groupby("bin", observed=True).agg(batch=("batch", "median"), host=("host", _trimmed_mean),
                                                 n=("host", "size"))
        g = g[g["n"] >= self.MIN_STEPS]
        self.grid = (Grid1D(g["batch"], g["host"] if signed else g["host"].clip(lower=0), above="clamp")
                     if not g.empty else None)

    @property
    def empty(self) -> bool:
        return self.grid is None

    def __call__(self, seqs: int) -> float:
        return self.grid(seqs) if self.grid is not None else 0.0


class DeviceProfile:
    """A profile written by ``kvlab profile``: its tables and metadata."""

    def __init__(self, df: pd.DataFrame, meta: dict, path: str = ""):
        self.df, self.meta, self.path = df, meta, path
        self.ragged_fits: dict = {}  # (model, mode, block size) -> ragged_fit's answer
        self.host_device: dict = {}  # calibration settings -> modelled device time of each host step

    @property
    def device(self) -> str:
        return self.meta.get("device", "?")

    def table(self, name: str, **where) -> pd.DataFrame:
        t = self.df[self.df["table"] == name]
        for k, v in where.items():
            t = t[t[k] == v]
        return t

    def models(self) -> set[str]:
        return set(self.table("decode_graph")["model"].dropna()) | set(self.table("eager_forward")["model"].dropna())


def resolve_profile_path(path: str | None) -> Path | None:
    """The profile file, relative paths from the working directory or else the repository."""
    if not path:
        return None
    for p in (Path(path), ROOT / path):
        if p.is_file():
            return p
    return None


@lru_cache(maxsize=8)
def load_profile(path: str) -> DeviceProfile:
    import pyarrow.parquet as pq

    p = resolve_profile_path(path)
    if p is None:
        raise FileNotFoundError(f"no device profile at {path}")
    table = pq.read_table(p)
    meta = json.loads((table.schema.metadata or {}).get(b"kvlab_profile", b"{}"))
    df = table.to_pandas()
    check_profile(df)
    return DeviceProfile(df, meta, str(path))


def check_profile(df: pd.DataFrame) -> None:
    """A profile's rows hold times a step can be built from, else ValueError naming the table: a
    parquet file of another tool (no ``table``/``value`` columns) was a KeyError deep in the cost
    model, and a NaN, zero or negative time a silently wrong run (the virtual clock skips a step
    time that is not positive: a NaN decode graph made llama3-8b 9x faster)."""
    missing = [c for c in ("table", "value") if c not in df]
    if missing:
        raise ValueError(f"no {' or '.join(repr(c) for c in missing)} column (a parquet file of another tool?)")
    if df.empty:
        raise ValueError("no rows")
    host = (df["table"] == "host").to_numpy()
    value = pd.to_numeric(df["value"], errors="coerce").to_numpy(float)
    # host rows: a residual may be 0 (or absent where the step's device time was not measured);
    # every other table is a measured time
    bad = np.where(host, ~np.isnan(value) & ~(np.isfinite(value) & (value >= 0)), ~(np.isfinite(value) & (value > 0)))
    if host.any():
        duration = (pd.to_numeric(df["duration"], errors="coerce").to_numpy(float) if "duration" in df
                    else np.full(len(df), np.nan))
        bad |= host & ~(np.isfinite(duration) & (duration >= 0))
    if bad.any():
        counts = df.loc[bad, "table"].astype(str).value_counts()
        which = (", ".join(f"{n} of table {t!r}" for t, n in list(counts.items())[:3])
                 + (", ..." if len(counts) > 3 else ""))
        raise ValueError(f"{int(bad.sum())} rows with a NaN, infinite, zero or negative time ({which}): rerun "
                         "kvlab profile")


# -- what the profile's host steps recorded ----------------------------------------------
def default_host_model(profile: DeviceProfile) -> str:
    return profile.meta.get("host_model") or str(profile.meta.get("models", "")).split(",")[0]


def host_scheduling_of(df: pd.DataFrame) -> pd.Series:
    """How each row's host steps were scheduled, sync or async (rows made before they named it:
    sync)."""
    if "scheduling" not in df:
        return pd.Series("sync", index=df.index, dtype=object)
    return df["scheduling"].fillna("sync")


def host_model_of(profile: DeviceProfile, host: pd.DataFrame | None = None) -> pd.Series:
    """The model of each host-table row (profiles made before rows named it: the profile's host model)."""
    host = profile.table("host") if host is None else host
    default = default_host_model(profile)
    if "model" not in host:
        return pd.Series([default] * len(host), index=host.index, dtype=object)
    return host["model"].where(host["model"].notna(), default).astype(object)


def recorded_setting(host: pd.DataFrame, column: str, default: int) -> int:
    """An engine setting the host steps recorded (profiles made before they did: ``default``)."""
    if column not in host or host[column].isna().all():
        return default
    return int(host[column].max())


def recorded_graph_mode(host: pd.DataFrame) -> str:
    """The CUDA graph mode the host steps' engine ran prefill/mixed steps with (profiles made
    before rows named it: piecewise, the default then); a table mixing modes takes the latest."""
    if "graph_mode" not in host or host["graph_mode"].isna().all():
        return "piecewise"
    return str(host["graph_mode"].dropna().iloc[-1])
