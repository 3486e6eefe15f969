"""The README's commands work as written, and `make test` has what the optional tests need."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, requires, version

import pytest
from packaging.requirements import Requirement


# -- extras: `make test` installs the dev extra, so no test skips for a missing optional package --

def extra_requirements(extra: str) -> list[Requirement]:
    """The requirements kvlab's installed metadata lists for ``extra``, self-references expanded."""
    out = []
    for line in requires("kvlab") or []:
        req = Requirement(line)
        if req.marker is None or not req.marker.evaluate({"extra": extra}):
            continue  # a base dependency, another extra's, or another platform's
        if req.name == "kvlab":
            out += [r for e in sorted(req.extras) for r in extra_requirements(e)]
        else:
            out.append(req)
    return out


def test_optional_parts_are_declared_as_extras():
    names = {extra: {r.name for r in extra_requirements(extra)} for extra in ("serve", "gpu", "dev")}
    assert {"fastapi", "uvicorn"} <= names["serve"]
    assert {"openai", "prometheus_client", "schemathesis", "fastapi"} <= names["dev"]
    import sys
    if sys.platform == "linux":
        assert {"cuda-bindings", "triton"} <= names["gpu"]
        assert "triton" in names["dev"]  # the kernel tests run under Triton's interpreter on a CPU


def test_dev_extra_is_installed():
    """The tests that importorskip an optional package run in `make test` (CI) rather than skip."""
    missing = []
    for req in extra_requirements("dev"):
        try:
            version(req.name)
        except PackageNotFoundError:
            missing.append(str(req))
    assert not missing, f"the dev extra is not installed ({missing}): run `make setup`"
