"""Name the Triton compiles that happen after a runner's warm-up.

A kernel variant compiled inside a measured run stalls that step 0.1-0.6 s (a compile, or a
load from Triton's disk cache), which no cost model can know. The runner's warm-up compiles
the variants eager steps need; this hook logs any that it missed, with the kernel's
specialisation (``late_compiles()`` returns them), so the warm-up's shapes can be completed.
"""
from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger(__name__)

_installed = False
_expected = 0  # > 0 while a warm-up or graph capture compiles on purpose
_late: list[tuple[float, str]] = []
_seen: dict[str, list[dict]] = {}  # kernel -> specialisations compiled in this process


def _flat(spec: str) -> dict:
    """A compile's specialisation (Triton's serialized form) as one flat dict."""
    import json

    try:
        o = json.loads(spec)
    except (TypeError, ValueError):
        return {}
    flat = {f"sig.{k}": v for k, v in (o.get("signature") or {}).items()}
    flat.update({f"const.{k}": repr(v) for k, v in zip(o.get("constant_keys", []), o.get("constant_vals", []))})
    flat.update({f"attr.{k}": repr(v) for k, v in zip(o.get("attrs_keys", []), o.get("attrs_vals", []))})
    flat.update({f"opt.{k}": repr(v) for k, v in (o.get("options") or {}).items()})
    return flat


def _nearest_difference(name: str, flat: dict) -> str:
    """What sets this specialisation apart from the closest one compiled before."""
    best = None
    for other in _seen.get(name, []):
        diff = {k for k in flat.keys() | other.keys() if flat.get(k) != other.get(k)}
        if best is None or len(diff) < len(best[0]):
            best = (diff, other)
    if best is None:
        return "no earlier variant of this kernel"
    diff, other = best
    return "; ".join(f"{k}: {other.get(k)} -> {flat.get(k)}" for k in sorted(diff)) or "identical (a reload)"


def install() -> bool:
    """Hook Triton's post-compile callback once per process; False where Triton has none."""
    global _installed
    if _installed:
        return True
    try:
        from triton import knobs
    except ImportError:
        return False
    rt = getattr(knobs, "runtime", None)
    if rt is None or not hasattr(rt, "jit_post_compile_hook"):
        return False
    previous = rt.jit_post_compile_hook

    def hook(*args, **kwargs):
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or str(kwargs.get("repr", "?")).split("[")[0]
        flat = _flat((kwargs.get("compile") or {}).get("specialization_data", ""))
        if _expected == 0:
            what = f"{name}: {_nearest_difference(name, flat)}"
            _late.append((time.time(), what))
            log.warning("Triton compiled a kernel variant after warm-up (the step waits for it): %s", what)
        _seen.setdefault(name, []).append(flat)
        return previous(*args, **kwargs) if previous else None

    rt.jit_post_compile_hook = hook
    _installed = True
    return True


@contextlib.contextmanager
def expected():
    """Compiles inside this block are intended (warm-up, graph capture)."""
    global _expected
    _expected += 1
    try:
        yield
    finally:
        _expected -= 1


def late_compiles() -> list[tuple[float, str]]:
    return list(_late)
