"""Run labels and order for ``kvlab report`` (from the config keys that vary); the report modules' lazy imports."""
from __future__ import annotations

import math
from importlib import import_module


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


# configuration keys that follow from others or never define a series
DERIVED = {"cfg.allocator.label", "cfg.workload.seed", "cfg.model.path", "cfg.model.shape"}
SHORT = {"cfg.allocator.name": "", "cfg.allocator.args.policy": "", "cfg.allocator.args.layout": "",
         "cfg.allocator.args.block_size": "B", "cfg.allocator.args.page_size": "page",
         "cfg.workload.request_rate": "rate", "cfg.workload.n": "n", "cfg.workload.prefix_len": "prefix",
         "cfg.engine.enable_prefix_caching": "prefix caching", "cfg.engine.preemption_mode": "preempt",
         "cfg.engine.host_kv_cache_memory": "host GiB", "cfg.engine.host_transfer_blocks": "T",
         "cfg.engine.host_tier_policy": "", "cfg.workload.prefix_hit_rate": "hit",
         "cfg.model.name": "", "cfg.workload.name": "", "cfg.sim.device": "", "cfg.mode": ""}


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
