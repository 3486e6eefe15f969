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
        if _expected == 0:
            name = kwargs.get("repr") or repr(kwargs.get("key"))
            _late.append((time.time(), name))
            log.warning("Triton compiled a kernel variant after warm-up (the step waits for it): %s", name)
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
