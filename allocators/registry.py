"""Allocators by name, so that Hydra selects them with ``allocator=NAME``."""
from __future__ import annotations

from typing import Callable

from allocators.base import KVAllocator

_REGISTRY: dict[str, type[KVAllocator]] = {}


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
