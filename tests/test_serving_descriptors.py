"""The open-file limit against limits.max_concurrency (engine/serving/descriptors.py).

Every connection is a file descriptor: a server must not let in more connections than it may
open files, or it fails with accept() errors before it ever answers its JSON 503. At start the
soft RLIMIT_NOFILE is raised as far as the limits need (within the hard limit); where that is
too few, the default limit is lowered to fit with one warning, a chosen one is refused.

The arithmetic is checked with made-up limits; the start paths (``build_server``, ``main``)
with ``resource.getrlimit``/``setrlimit`` faked; ``kvlab serve`` under a real ``ulimit -n``.
"""
from __future__ import annotations

import logging
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev, which has it)")

from engine.serving import descriptors  # noqa: E402
from engine.serving.descriptors import (  # noqa: E402
    FD_RESERVE,
    DescriptorPlan,
    descriptors_needed,
    fit_to_descriptors,
    plan_descriptors,
)
from engine.serving.limits import (  # noqa: E402
    DEFAULT_MAX_CONCURRENCY,
    LimitsConfigError,
    ServerLimits,
    connection_backstop,
)

ROOT = Path(__file__).resolve().parent.parent
NEEDED = descriptors_needed(DEFAULT_MAX_CONCURRENCY)  # 2 * 2048 + 64 connections + the reserve
FITS_1024 = (1024 - FD_RESERVE - 64) // 2  # the largest limit whose needs fit under ulimit -n 1024
INF = resource.RLIM_INFINITY


# -- the arithmetic --------------------------------------------------------------------------------
def test_the_default_needs_more_than_the_common_soft_limit():
    assert NEEDED == 2 * 2048 + 64 + FD_RESERVE > 1024
    assert descriptors_needed(FITS_1024) <= 1024 < descriptors_needed(FITS_1024 + 1)


@pytest.mark.parametrize("limit,soft,hard,want", [
    (2048, 1024, 1024, DescriptorPlan(1024, FITS_1024)),  # hard limit too low: lowered to fit
    (2048, 1024, 1 << 20, DescriptorPlan(NEEDED, 2048)),  # raised only as far as needed
    (2048, 1024, None, DescriptorPlan(NEEDED, 2048)),  # an unlimited hard limit
    (2048, 1024, 2000, DescriptorPlan(2000, (2000 - FD_RESERVE - 64) // 2)),  # raised to the hard limit, lowered
    (2048, 65536, 65536, DescriptorPlan(65536, 2048)),  # room already: never lowered
    (2048, None, None, DescriptorPlan(None, 2048)),  # unlimited
    (100, 1024, 1024, DescriptorPlan(1024, 100)),  # a small limit fits as it is
    (FITS_1024, 1024, 1024, DescriptorPlan(1024, FITS_1024)),  # exactly
    (None, 1024, 4096, DescriptorPlan(4096, None)),  # no limit on connections: all the room allowed
    (None, 1024, None, DescriptorPlan(1024, None)),  # ... but not "unlimited", which Linux refuses
    (2048, 256, 256, DescriptorPlan(256, (256 - FD_RESERVE - 64) // 2)),  # too few for any: below 1
])
def test_plan(limit, soft, hard, want):
    got = plan_descriptors(limit, soft, hard)
    assert got == want
    if got.soft is not None and got.max_concurrency is not None and got.max_concurrency >= 1:
        assert descriptors_needed(got.max_concurrency) <= got.soft  # what is served fits
    assert got.soft is None or soft is None or got.soft >= soft  # never lowered
    assert got.soft is None or hard is None or got.soft <= max(soft, hard)  # never past the hard limit


def test_plan_is_the_largest_that_fits():
    for soft in range(300, 5000, 37):
        got = plan_descriptors(DEFAULT_MAX_CONCURRENCY, soft, soft).max_concurrency
        if got < DEFAULT_MAX_CONCURRENCY:
            assert descriptors_needed(got) <= soft < descriptors_needed(got + 1), soft


# -- the process's limits, faked -------------------------------------------------------------------
class FakeRlimit:
    """RLIMIT_NOFILE as ``resource`` reports and sets it; ``refuse``: setrlimit fails (macOS past OPEN_MAX)."""

    def __init__(self, soft: int, hard: int, refuse: bool = False):
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.set_calls: list[tuple[int, int]] = []

    def install(self, monkeypatch) -> FakeRlimit:
        monkeypatch.setattr(resource, "getrlimit", self.getrlimit)
        monkeypatch.setattr(resource, "setrlimit", self.setrlimit)
        return self

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.set_calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        assert limits[1] == self.hard and (self.hard == INF or limits[0] <= self.hard)
        self.soft = limits[0]


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "kvlab.serving"]


def test_soft_limit_is_raised_within_the_hard_one_and_the_default_kept(monkeypatch, caplog):
    fake = FakeRlimit(1024, 1 << 20).install(monkeypatch)
    with caplog.at_level(logging.INFO, logger="kvlab.serving"):
        assert fit_to_descriptors(ServerLimits()) == ServerLimits()
    assert fake.set_calls == [(NEEDED, 1 << 20)] and fake.soft == NEEDED
    assert warnings(caplog) == []


def test_unlimited_hard_limit_is_kept_unlimited(monkeypatch):
    fake = FakeRlimit(1024, INF).install(monkeypatch)
    assert fit_to_descriptors(ServerLimits()) == ServerLimits()
    assert fake.set_calls == [(NEEDED, INF)]


def test_default_is_lowered_to_fit_with_one_warning(monkeypatch, caplog):
    fake = FakeRlimit(1024, 1024).install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="kvlab.serving"):
        fitted = fit_to_descriptors(ServerLimits())
        assert fit_to_descriptors(fitted) == fitted  # again (build_server after main): nothing more
    assert fitted == ServerLimits(max_concurrency=FITS_1024)
    assert fitted.uvicorn_settings()["limit_concurrency"] == connection_backstop(FITS_1024)  # the backstop too
    assert fake.set_calls == [] and fake.soft == 1024
    (line,) = warnings(caplog)
    for fragment in ("limits.max_concurrency=2048", "may open 1024", "ulimit -n", "hard limit 1024",
                     f"serving with limits.max_concurrency={FITS_1024}", "LimitNOFILE"):
        assert fragment in line, (fragment, line)


@pytest.mark.parametrize("asked", [4000, DEFAULT_MAX_CONCURRENCY + 1, FITS_1024 + 1])
def test_a_chosen_limit_that_cannot_fit_is_refused_naming_the_fix(monkeypatch, asked):
    FakeRlimit(1024, 1024).install(monkeypatch)
    with pytest.raises(LimitsConfigError) as e:
        fit_to_descriptors(ServerLimits(max_concurrency=asked))
    message = str(e.value)
    assert message.startswith(f"limits.max_concurrency={asked} needs {descriptors_needed(asked)} open files")
    assert f"set limits.max_concurrency={FITS_1024} or less" in message and "ulimit -n" in message
    assert "\n" not in message


def test_a_chosen_limit_that_fits_is_kept(monkeypatch, caplog):
    FakeRlimit(1024, 1024).install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="kvlab.serving"):
        assert fit_to_descriptors(ServerLimits(max_concurrency=FITS_1024)).max_concurrency == FITS_1024
        assert fit_to_descriptors(ServerLimits(max_concurrency=2)).max_concurrency == 2
    assert warnings(caplog) == []


def test_too_few_files_for_any_limit_is_refused_even_for_the_default(monkeypatch):
    FakeRlimit(256, 256).install(monkeypatch)
    with pytest.raises(LimitsConfigError, match=r"limits\.max_concurrency=2048 .*may open 256 .*too few to serve"):
        fit_to_descriptors(ServerLimits())


def test_a_refused_raise_falls_back_to_the_soft_limit(monkeypatch, caplog):
    fake = FakeRlimit(1024, INF, refuse=True).install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="kvlab.serving"):
        assert fit_to_descriptors(ServerLimits()).max_concurrency == FITS_1024
    assert fake.set_calls == [(NEEDED, INF)] and len(warnings(caplog)) == 1


def test_no_concurrency_limit_raises_to_the_hard_limit_and_keeps_null(monkeypatch):
    fake = FakeRlimit(1024, 8192).install(monkeypatch)
    limits = ServerLimits(max_concurrency=None)
    assert fit_to_descriptors(limits) is limits
    assert fake.set_calls == [(8192, 8192)]


def test_no_resource_module_no_change(monkeypatch):
    monkeypatch.setattr(descriptors, "resource", None)  # Windows
    limits = ServerLimits()
    assert fit_to_descriptors(limits) is limits


# -- the start paths use it -------------------------------------------------------------------------
def test_build_server_configures_uvicorn_and_the_app_with_the_fitted_limit(monkeypatch, caplog):
    from engine import EngineConfig, LLMEngine
    from engine.serving.server import build_server

    FakeRlimit(1024, 1024).install(monkeypatch)
    engine = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256,
                                    record_memory=False))
    with caplog.at_level(logging.WARNING, logger="kvlab.serving"):
        server, async_engine = build_server(engine, "tiny", port=0, log_level="warning", access_log=False)
    try:
        assert server.config.limit_concurrency == connection_backstop(FITS_1024)
        assert server.config.app.state.limits.max_concurrency == FITS_1024  # the app's 503 limit
        (mw,) = [m for m in server.config.app.user_middleware if m.cls.__name__ == "ConcurrencyLimitMiddleware"]
        assert mw.kwargs["max_concurrency"] == FITS_1024
        assert len(warnings(caplog)) == 1
    finally:
        async_engine.shutdown()


def _serve_config(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    from experiments import serve

    base = ["device=cpu", "model=tiny-llama", "log_level=warning", "port=0"]
    return OmegaConf.to_container(serve._compose([*base, *serve.check_overrides(list(overrides))]), resolve=True)


def test_main_fits_the_limits_before_anything_else(monkeypatch):
    from engine.serving import server

    served: list[ServerLimits] = []
    monkeypatch.setattr(server, "check_engine", lambda cfg: None)
    monkeypatch.setattr(server, "serve", lambda *a, limits, **kw: served.append(limits))
    FakeRlimit(1024, 1024).install(monkeypatch)
    server.main(_serve_config())
    assert [s.max_concurrency for s in served] == [FITS_1024]
    with pytest.raises(ValueError, match=rf"limits\.max_concurrency=4000 .*set limits\.max_concurrency={FITS_1024}"):
        server.main(_serve_config("limits.max_concurrency=4000"))
    assert len(served) == 1  # refused before serving (and before the model loads)


def test_kvlab_serve_under_a_real_ulimit_refuses_a_limit_that_cannot_fit():
    """One line naming the setting and the fix, exit 2, as for any setting that cannot work. The
    host is bad too, and checked later: were the limit let through, that would be the line (and
    the server would not start serving here)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = 1024 if hard == INF else min(1024, hard)

    def low_ulimit() -> None:  # ulimit -n 1024 (soft and hard) in the child only
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    fits = (nofile - FD_RESERVE - 64) // 2
    r = subprocess.run([sys.executable, "-m", "experiments.cli", "serve", "device=cpu", "model=tiny-llama",
                        "port=0", "host=256.1.1.1", f"limits.max_concurrency={fits + 1}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180, preexec_fn=low_ulimit)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"kvlab serve: limits.max_concurrency={fits + 1} "), r.stderr
    assert f"set limits.max_concurrency={fits} or less" in lines[0] and "Traceback" not in r.stdout + r.stderr
