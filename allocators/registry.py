"""Allocators by name, so that Hydra selects them with ``allocator=NAME``."""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Callable

from allocators import ENGINE_SETS
from allocators.base import KVAllocator
from allocators.checks import is_int, is_real

_REGISTRY: dict[str, type[KVAllocator]] = {}
# constructor arguments the engine passes from its own settings (not allocator.args)
_SET_BY_ENGINE = {"self", "spec", "capacity_tokens", "max_num_seqs", "max_model_len", *ENGINE_SETS}


def register(name: str) -> Callable[[type[KVAllocator]], type[KVAllocator]]:
    def deco(cls: type[KVAllocator]) -> type[KVAllocator]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _builtins() -> None:
    """Importing the strategies registers them (here, not at package import: that needs torch,
    which tables and plots do not)."""
    from allocators import contiguous, paged, virtual  # noqa: F401


def available() -> list[str]:
    _builtins()
    return sorted(_REGISTRY)


def allocator_class(name: str) -> type[KVAllocator]:
    _builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown allocator '{name}': choose one of {available()} (allocator=NAME)")
    return _REGISTRY[name]


def create_allocator(name: str, **kwargs) -> KVAllocator:
    return allocator_class(name)(**kwargs)


def checked_args(cls: type[KVAllocator], args: dict) -> dict:
    """``args`` of the allocator ``cls`` with the types its constructor's defaults have: true or
    false for a switch, a whole number for a count (an integral float is taken), a finite number,
    text (``allocator.args.block_size=16.5`` would fail deep inside it, naming nothing), then the
    ranges it can tell without the model or the pool (``KVAllocator.check_args``)."""
    params = inspect.signature(cls.__init__).parameters
    out = dict(args)
    for name, v in args.items():
        p = params.get(name)
        if p is None:
            takes = [k for k, q in params.items() if k not in _SET_BY_ENGINE and q.default is not inspect.Parameter.empty]
            hint = difflib.get_close_matches(str(name), takes, n=1)
            raise ValueError(f"allocator.args.{name}: allocator '{cls.name}' takes no such argument"
                             + (f" (did you mean allocator.args.{hint[0]}?)" if hint else "")
                             + f"; it takes {', '.join(takes)}")
        if p.default is inspect.Parameter.empty or p.default is None:
            continue
        kind = type(p.default)
        where = f"allocator.args.{name}={v!r} ({cls.name})"
        if kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{where}: give true or false")
        elif kind is int:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not is_int(v):
                raise ValueError(f"{where}: give a whole number (default {p.default})")
            out[name] = int(v)  # a numpy count: a plain int for the allocator and the kernels
        elif kind is float:
            if not is_real(v) or not math.isfinite(v):
                raise ValueError(f"{where}: give a finite number (default {p.default})")
            out[name] = float(v)
        elif kind is str and not isinstance(v, str):
            raise ValueError(f"{where}: give one of the names it takes (default {p.default!r})")
    cls.check_args(out)  # the ranges that need neither the model nor the pool: before anything runs
    return out
