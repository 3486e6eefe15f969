"""KV memory strategies behind one interface (allocators/base.py), selected by name.

``MemoryStats`` loads at once; the rest (and torch with it) on first use, so that reading
results (``kvlab report``, tables) does not import torch.
"""
import importlib

from allocators.stats import MemoryStats

_LAZY = {"AllocationError": "allocators.base", "KVAllocator": "allocators.base", "KVCacheSpec": "allocators.base",
         "SequenceLike": "allocators.base", "available": "allocators.registry",
         "create_allocator": "allocators.registry", "register": "allocators.registry"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'allocators' has no attribute {name!r}")


__all__ = ["MemoryStats", *_LAZY]
