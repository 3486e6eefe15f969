"""KV memory strategies behind one interface (allocators/base.py), selected by name."""
from allocators.base import AllocationError, KVAllocator, KVCacheSpec, SequenceLike
from allocators.registry import available, create_allocator, register
from allocators.stats import MemoryStats

# importing the strategies registers them
from allocators import contiguous as _contiguous  # noqa: F401,E402
from allocators import paged as _paged  # noqa: F401,E402
from allocators import virtual as _virtual  # noqa: F401,E402

__all__ = [
    "AllocationError",
    "KVAllocator",
    "KVCacheSpec",
    "MemoryStats",
    "SequenceLike",
    "available",
    "create_allocator",
    "register",
]
