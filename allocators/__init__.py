"""KV memory strategies behind one interface (allocators/base.py), selected by name.

``MemoryStats`` loads at once; the rest (and torch with it) on first use, so that reading
results (``kvlab report``, tables) does not import torch.
"""
import importlib

from allocators.stats import MemoryStats

# allocator arguments the engine passes from its own settings (given in allocator.args they would
# skip the engine's checks and accounting): where each is set instead
ENGINE_SETS = {"enable_prefix_caching": "engine.enable_prefix_caching", "swap_space_tokens": "engine.swap_space (GiB)",
               "host_tier_tokens": "engine.host_kv_cache_memory (GiB) or engine.host_kv_cache_tokens",
               "host_tier_policy": "engine.host_tier_policy", "host_transfer_blocks": "engine.host_transfer_blocks"}

_LAZY = {"AllocationError": "allocators.base", "KVAllocator": "allocators.base", "KVCacheSpec": "allocators.base",
         "SequenceLike": "allocators.base", "available": "allocators.registry",
         "create_allocator": "allocators.registry", "register": "allocators.registry"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'allocators' has no attribute {name!r}")


__all__ = ["ENGINE_SETS", "MemoryStats", *_LAZY]
