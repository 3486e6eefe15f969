"""The README's commands work as written, and `make test` has what the optional tests need.

The README marks each fenced block and each table of commands:

- ``<!-- cpu-test -->`` before a block: every command in it runs here, on a CPU, in order (a
  ``bash`` block line by line in one shell, a ``python`` block as one script); before a table:
  every ``kvlab ...`` in its cells runs.
- ``<!-- not cpu-tested: REASON -->``: needs a GPU, a server, a cluster or a download.

Substitution rules, so that CI runs them at small sizes and leaves the checkout clean:

- commands run in a fresh temporary folder (``runs/`` lands there), in which ``.venv`` links to
  the project's environment, whose ``bin`` comes first on PATH;
- ``kvlab run`` gets ``workload.num_requests=8 progress=false`` (replacing a
  ``workload.num_requests`` it has);
- ``make TARGET`` is not run (each target installs and runs everything): the target must exist
  in the Makefile.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SMALL = ["workload.num_requests=8", "progress=false"]
MARK = re.compile(r"<!--\s*(cpu-test|not cpu-tested:[^>]*?)\s*-->")


@dataclass
class Block:
    line: int  # where it starts in README.md (1-based)
    kind: str  # "bash", "python" or "table"
    mark: str | None  # "cpu-test", "not cpu-tested: why", or None
    commands: list[str]


def readme_blocks(text: str) -> list[Block]:
    """Fenced code blocks and tables of inline commands, each with the mark just above it."""
    lines, blocks, mark, i = text.splitlines(), [], None, 0
    while i < len(lines):
        line = lines[i]
        m = MARK.search(line)
        if m:
            mark = m.group(1).strip()
        elif line.startswith("```"):
            kind, body, start = line[3:].strip() or "text", [], i + 1
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            commands = join_continuations(body) if kind == "bash" else ["\n".join(body)]
            blocks.append(Block(start, kind, mark, commands))
            mark = None
        elif line.startswith("|"):
            start, cells = i + 1, []
            while i < len(lines) and lines[i].startswith("|"):
                cells += re.findall(r"`(kvlab [^`]+)`", lines[i])
                i += 1
            if cells or mark:
                blocks.append(Block(start, "table", mark, cells))
            mark = None
            continue
        elif line.strip():
            mark = None if not line.lstrip().startswith("<!--") else mark
        i += 1
    return blocks


def join_continuations(lines: list[str]) -> list[str]:
    out, cur = [], ""
    for line in lines:
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


def small(command: str) -> str:
    """A README command at CI size (the module's substitution rules); comments dropped."""
    words = shlex.split(command, comments=True)
    if words[:2] == ["kvlab", "run"]:
        words = [w for w in words if not w.startswith("workload.num_requests=")] + SMALL
    return shlex.join(words)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


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


# -- the README's commands ------------------------------------------------------------------------

BLOCKS = readme_blocks(README.read_text())
CPU = [b for b in BLOCKS if b.mark == "cpu-test"]


def test_every_command_block_is_marked():
    """A new block of commands must say whether CI runs it, so the README cannot rot unnoticed."""
    commands = [b for b in BLOCKS if b.kind in ("bash", "python", "table") and b.commands]
    unmarked = [f"README.md:{b.line} ({b.kind})" for b in commands if b.mark is None]
    assert not unmarked, f"mark these <!-- cpu-test --> or <!-- not cpu-tested: why -->: {unmarked}"
    assert len(CPU) >= 4


def test_the_quickstart_is_two_make_targets_that_exist():
    quick = next(b for b in BLOCKS if b.kind == "bash" and any(c.startswith("make ") for c in b.commands))
    assert [shlex.split(c, comments=True) for c in quick.commands] == [["make", "demo"], ["make", "test"]]
    assert {"demo", "test", "setup"} <= makefile_targets()


def test_the_substitution_rules():
    assert small("kvlab run allocator=contiguous workload.num_requests=64   # a comment") == \
        "kvlab run allocator=contiguous workload.num_requests=8 progress=false"
    assert small("kvlab report runs/x  # tables") == "kvlab report runs/x"
    blocks = readme_blocks("<!-- cpu-test -->\n```bash\nkvlab run \\\n  a=1   # c\n```\n\n"
                           "<!-- not cpu-tested: GPU -->\n| a | b |\n|---|---|\n| `kvlab run x=1` | y |\n")
    assert [(b.kind, b.mark, b.commands) for b in blocks] == [
        ("bash", "cpu-test", ["kvlab run    a=1   # c"]), ("table", "not cpu-tested: GPU", ["kvlab run x=1"])]


def run_block(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    venv = Path(sys.executable).parent.parent
    (cwd / ".venv").symlink_to(venv)
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("VIRTUAL_ENV", None)
    if block.kind == "python":
        return subprocess.run([sys.executable, "-c", block.commands[0]], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
    script = ["set -euo pipefail"]
    for c in block.commands:
        words = shlex.split(c, comments=True)
        if words[:1] == ["make"]:
            missing = set(words[1:]) - makefile_targets()
            assert not missing, f"README.md:{block.line}: `{c}`: no Makefile target {missing}"
            continue
        script += [f"echo '$ {small(c)}' >&2", small(c)]
    return subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("block", CPU, ids=[f"line{b.line}-{b.kind}" for b in CPU])
def test_readme_commands_run_as_written(block, tmp_path):
    proc = run_block(block, tmp_path)
    assert proc.returncode == 0, f"README.md:{block.line}: {proc.stderr[-4000:]}"
    if any(shlex.split(c, comments=True)[:2] == ["kvlab", "run"] for c in block.commands):
        assert list(tmp_path.glob("runs/**/summary.json")), "the runs wrote no summary.json under runs/"
    assert not (ROOT / "outputs").exists() and not (ROOT / "multirun").exists()
