"""The open-file limit (RLIMIT_NOFILE) against the server's connection limits.

Every connection is a file descriptor. Under the common soft limit of 1024, a server that lets
``limits.max_concurrency`` (default 2048) requests in and uvicorn's backstop of twice that plus 64
connections open would run out of descriptors first: accept() failing in a loop, and the
process's own files failing to open, before any client gets the clean JSON 503. So when a server
starts, the soft limit is raised as far as its limits need, within the hard limit (which an
unprivileged process cannot pass); where that is still too few, the default limit is lowered to
fit, with one warning, and a limit the user chose is refused, as any setting that cannot work is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

try:
    import resource
except ImportError:  # Windows: no such limit to raise or fit
    resource = None  # type: ignore[assignment]

from engine.serving.limits import (
    BACKSTOP_SPARE,
    DEFAULT_MAX_CONCURRENCY,
    LimitsConfigError,
    ServerLimits,
    connection_backstop,
)

log = logging.getLogger("kvlab.serving")

# descriptors kept for the process's own files besides connections: listening sockets, the event
# loop, the pipes to the engine process, logs; an engine in this process (tests, embedding) adds
# its model files and devices
FD_RESERVE = 256


def descriptors_needed(max_concurrency: int) -> int:
    """Open files a server with this limit may need: its connection backstop plus ``FD_RESERVE``."""
    return connection_backstop(max_concurrency) + FD_RESERVE


def largest_fitting(open_files: int) -> int:
    """The largest ``max_concurrency`` whose needs fit in ``open_files`` (below 1: none does)."""
    return (open_files - FD_RESERVE - BACKSTOP_SPARE) // 2


@dataclass(frozen=True)
class DescriptorPlan:
    soft: int | None  # the soft RLIMIT_NOFILE to run with (None: unlimited)
    max_concurrency: int | None  # the limit asked for, or the largest below it that fits in ``soft``


def plan_descriptors(max_concurrency: int | None, soft: int | None, hard: int | None) -> DescriptorPlan:
    """The soft limit to set and the ``max_concurrency`` that fits in it, from the current soft and
    hard RLIMIT_NOFILE (None: unlimited). The soft limit is raised only as far as needed (never
    lowered); without a concurrency limit nothing bounds the connections, so to the hard limit."""
    if soft is None:
        return DescriptorPlan(None, max_concurrency)
    if max_concurrency is None:
        return DescriptorPlan(soft if hard is None else max(soft, hard), None)
    want = descriptors_needed(max_concurrency)
    if want <= soft:
        return DescriptorPlan(soft, max_concurrency)
    target = want if hard is None else min(want, hard)
    return DescriptorPlan(target, max_concurrency if want <= target else largest_fitting(target))


def _unlimited(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


def fit_to_descriptors(limits: ServerLimits) -> ServerLimits:
    """``limits`` once the soft RLIMIT_NOFILE is raised for them (``plan_descriptors``); where the
    hard limit cannot hold them, the default ``max_concurrency`` lowered to fit (one warning), any
    other refused (LimitsConfigError naming the setting and the fix). Calling it again is a no-op."""
    if resource is None:
        return limits
    raw_soft, raw_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = _unlimited(raw_soft), _unlimited(raw_hard)
    plan = plan_descriptors(limits.max_concurrency, soft, hard)
    if plan.soft != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan.soft, raw_hard))
            log.info("raised the open-file limit (ulimit -n) from %d to %d for the connections", soft, plan.soft)
        except (ValueError, OSError) as e:  # e.g. macOS: at most OPEN_MAX under an unlimited hard limit
            log.debug("could not raise the open-file limit from %s to %s: %s", soft, plan.soft, e)
            plan = plan_descriptors(limits.max_concurrency, soft, soft)
    asked, fit = limits.max_concurrency, plan.max_concurrency
    if fit == asked or asked is None or fit is None:
        return limits
    need = descriptors_needed(asked)
    problem = (f"limits.max_concurrency={asked} needs {need} open files (uvicorn's backstop of "
               f"{connection_backstop(asked)} connections, plus {FD_RESERVE} for the server's own files) but this "
               f"process may open {plan.soft} (ulimit -n; hard limit {'unlimited' if hard is None else hard})")
    raise_it = (f"raise the limit (ulimit -n {need}; past the hard limit as root, LimitNOFILE={need} in a systemd "
                f"unit or docker run --ulimit nofile={need})")
    if fit < 1:
        raise LimitsConfigError(f"{problem}, too few to serve: {raise_it}")
    if asked != DEFAULT_MAX_CONCURRENCY:
        raise LimitsConfigError(f"{problem}: set limits.max_concurrency={fit} or less, or {raise_it}")
    log.warning("%s: serving with limits.max_concurrency=%d instead; %s, or set limits.max_concurrency=%d to "
                "silence this", problem, fit, raise_it, fit)
    return limits.replace(max_concurrency=fit)
