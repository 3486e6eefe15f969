"""Programmatic dependent launch (PDL, Hopper and newer) for the decode step's Triton kernels.

A decode step of a small batch is a chain of ~7 short kernels a layer, and between two of them the
device idles: the next kernel launches only when the last program of the one before has exited,
and then ramps up. With PDL a kernel launched with ``launch_pdl=True`` may start while the kernel
before it on the stream still runs: it launches and ramps up meanwhile, its programs may do what
depends on nothing of that kernel (optionally: pull their slice of the weights into L2), and they
block in ``wait`` until it has finished and its writes are visible. CUDA graphs keep this
(programmatic edges, CUDA >= 12.3).

The rules every kernel launched through ``launch_kwargs`` keeps, so that any chain of them is as
ordered as without PDL:

- ``wait(PDL)`` in every program, on every path, before its first global load of anything but
  weights and before its first store (each program's own accesses need it; and a kernel none of whose
  programs waited could complete before the one before it), and never inside a software-pipelined loop
  (Triton may issue the loop's first loads ahead of it: triton-lang/triton#11905);
- before ``wait``: only launch arguments and weights that nothing writes once loaded (not the fp8 KV
  scales: a calibrating step writes them), and the L2 prefetch (a hint: L2 is coherent, a line it
  pulls early cannot be stale). ``PDL=on`` and ``**launch_kwargs(on)`` go together: a kernel launched
  with the attribute must wait;
- then ``wait`` returning means the kernel before has completed and its writes are visible; that one
  completed only after its own ``wait`` returned (launched with PDL) or started only once the
  operation before it had completed (launched without: cuBLAS, torch ops, copies, graph launches), so
  by induction every earlier operation on the stream has completed, wherever each kernel called
  ``launch_dependents``. ``tests/pdl_ptx_check.py`` checks the first two rules in each kernel's PTX;
- ``launch_dependents(PDL)`` where ``TRIGGER`` says: ``TRIGGER_END`` (the default) once a program's
  main loop is done (kernels without one: at exit), so the next kernel's programs launch into SMs
  that are free or about to be, as without PDL. Triggering at the start (``early``) or right after
  ``wait`` (``wait``) made llama3-8b's decode step 8-15% slower on an H100 with the 24 MB L2 prefetch
  on (the early trigger without it: 6-12%); our reading: the waiting programs take the first SMs to
  free up, two to an SM (results/engine/session_2026-12-06c);
  ``KVLAB_PDL_TRIGGER=early|wait|end`` is a tuning knob for experiments.

``launches(on)`` turns it on for the kernels launched inside it (``CausalLM.forward`` with
``engine.enable_pdl``); the kernels read ``enabled(device)`` when launched, so a CUDA graph
captured inside keeps it. Under Triton's CPU interpreter ``wait``, ``launch_dependents``,
``prefetch_l2``, ``enter`` and ``trigger_at`` are no-op stubs chosen at import (programs run one after
another there): the CPU tests check that ``PDL`` and the launch arguments reach every launch inside
``launches`` and run the rest of each kernel with them, not the ordering (the PTX check and the GPU
tests do).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_ON = contextvars.ContextVar("kvlab_pdl", default=False)
MIN_CAPABILITY = (9, 0)  # griddepcontrol: sm_90 and newer


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supported(device: torch.device | str) -> bool:
    """Whether kernels on ``device`` can be launched with PDL (a CUDA device of compute capability >= 9.0,
    not under the interpreter; there the kernels still take the PDL path, with no-op waits)."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting() or not torch.cuda.is_available():
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    """(cached: ``enabled`` asks at every launch of an eager step, ~7 a layer)"""
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def check_supported(device: torch.device | str, field: str = "engine.enable_pdl") -> None:
    if not supported(device):
        raise ValueError(f"{field}=true needs a CUDA device of compute capability >= 9.0 (Hopper or newer), "
                         f"got {device}{' under TRITON_INTERPRET=1' if interpreting() else ''}: set {field}=false")


@contextlib.contextmanager
def launches(on: bool = True):
    """Kernels launched inside (this thread or task) use PDL where the device supports it."""
    token = _ON.set(bool(on))
    try:
        yield
    finally:
        _ON.reset(token)


def enabled(device: torch.device) -> bool:
    """Whether a kernel launched now on ``device`` takes the PDL path (``PDL`` constexpr)."""
    return _ON.get() and (device.type == "cuda" and supported(device) or device.type == "cpu" and interpreting())


def launch_kwargs(on: bool) -> dict:
    """Extra launch keyword arguments: ``launch_pdl`` only on a real device (the interpreter rejects it)."""
    return {"launch_pdl": True} if on and not interpreting() else {}


LINE = 128  # bytes: one L2 prefetch a cache line
TRIGGER_EARLY, TRIGGER_WAIT, TRIGGER_END = 0, 1, 2
TRIGGERS = {"early": TRIGGER_EARLY, "wait": TRIGGER_WAIT, "end": TRIGGER_END}


def _trigger(value: str) -> int:
    """``KVLAB_PDL_TRIGGER``'s placement; an unknown value is refused (not silently the default: a run
    labelled with another placement would measure this one)."""
    if value not in TRIGGERS:
        raise ValueError(f"KVLAB_PDL_TRIGGER={value!r}: choose one of {', '.join(TRIGGERS)}")
    return TRIGGERS[value]


TRIGGER = _trigger(os.environ.get("KVLAB_PDL_TRIGGER", "end"))
# of a launch's weights, at most this many bytes pulled into L2 before ``wait`` (a tuning knob:
# KVLAB_PDL_PREFETCH_MB, e.g. 24: half of an H100/H200's 50 MB L2). Off by default: with the end
# trigger a kernel's programs start only as the one before ends, and the prefetch cost more than it
# hid (H100: llama3-8b 86.0% of the memory floor at batch 1 without, 85.0% with 24 MB;
# results/engine/session_2026-12-06c/end_trigger)
PREFETCH_BYTES = int(float(os.environ.get("KVLAB_PDL_PREFETCH_MB", "0")) * 2**20)


def prefetch_lines(rows: int, row_bytes: int, budget: int | None = None) -> int:
    """Lines of each of ``rows`` weight rows of ``row_bytes`` to prefetch: a power of two (0: none), the
    launch's total within ``budget`` bytes (``PREFETCH_BYTES``), no more lines than the row has."""
    budget = PREFETCH_BYTES if budget is None else budget
    per_row = min(row_bytes, budget // max(rows, 1)) // LINE
    if per_row < 1:
        return 0
    return 1 << (per_row.bit_length() - 1)


if triton is not None:
    if interpreting():  # programs run one after another: nothing to wait for, no L2 to fill

        @triton.jit
        def wait(PDL: tl.constexpr):
            pass

        @triton.jit
        def launch_dependents(PDL: tl.constexpr):
            pass

        @triton.jit
        def prefetch_l2(ptrs):
            pass

        @triton.jit
        def enter(PDL: tl.constexpr, TRIGGER: tl.constexpr):
            pass

        @triton.jit
        def trigger_at(PDL: tl.constexpr, TRIGGER: tl.constexpr, HERE: tl.constexpr):
            pass

    else:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        @triton.jit
        def wait(PDL: tl.constexpr):
            """Until the kernel before has finished and its writes are visible (PDL launches only)."""
            if PDL:
                gdc_wait()

        @triton.jit
        def launch_dependents(PDL: tl.constexpr):
            """Let the next kernel launch once every program here has called this (or exited)."""
            if PDL:
                gdc_launch_dependents()

        @triton.jit
        def prefetch_l2(ptrs):
            """Ask L2 for the lines at ``ptrs`` (one pointer a line); nothing waits for them."""
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)

        @triton.jit
        def trigger_at(PDL: tl.constexpr, TRIGGER: tl.constexpr, HERE: tl.constexpr):
            """``launch_dependents`` if this is the place (``HERE``) the launch's ``TRIGGER`` names."""
            if TRIGGER == HERE:
                launch_dependents(PDL)

        @triton.jit
        def enter(PDL: tl.constexpr, TRIGGER: tl.constexpr):
            """The start of a kernel with no work before ``wait``: ``wait``, and the early or wait
            trigger (the end one: where the kernel calls ``trigger_at(..., TRIGGER_END)``, else at exit)."""
            trigger_at(PDL, TRIGGER, 0)
            wait(PDL)
            trigger_at(PDL, TRIGGER, 1)
