"""Atomic result writes: a file is either complete or absent, even after a crash or Ctrl-C."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` to write a set of files into; if the block succeeds
    they are moved into ``out`` (the folder renamed whole where ``out`` is new, else file by file:
    ``out`` may hold other things), else removed with any parent of ``out`` made for them, so a
    failure (or Ctrl-C) leaves no part behind and what ``out`` held as it was."""
    out = Path(out)
    made = [p for p in out.absolute().parents if not p.exists()]  # deepest first
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            os.chmod(out, 0o777 & ~_umask())  # mkdtemp makes 0700; results are meant to be shared
        else:
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
            tmp.rmdir()
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def write_json(path: str | Path, obj) -> None:
    """Strict JSON: NaN and infinities become null."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True, default=_jsonable, allow_nan=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_rows(path: str | Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Dict rows as a CSV (``csv`` module formatting); columns ``fieldnames``, else the first row's keys."""
    import csv

    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames if fieldnames is not None else list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# zstd: about 30% smaller than the default snappy for step and request tables (committed run folders)
PARQUET_COMPRESSION = "zstd"


def write_parquet(path: str | Path, df) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, compression=PARQUET_COMPRESSION)


def write_csv(path: str | Path, df) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def save_figure(path: str | Path, fig) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_written(obj):
    """``obj`` as ``write_json`` stores it and a reader gets it back (non-finite floats: None)."""
    return json.loads(json.dumps(_finite(obj), default=_jsonable, allow_nan=False))


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return _finite(obj.item())
    return obj


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)
