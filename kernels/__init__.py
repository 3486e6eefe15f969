"""Shared kernels: one implementation per operation, addressing mode as a constant."""
from kernels.metadata import Addressing, AttentionMetadata
from kernels.ops import (attention, copy_blocks, gather_blocks, gather_layers, scatter_blocks, scatter_layers,
                         write_kv)

__all__ = [
    "Addressing",
    "AttentionMetadata",
    "attention",
    "copy_blocks",
    "gather_blocks",
    "gather_layers",
    "scatter_blocks",
    "scatter_layers",
    "write_kv",
]

# Hugging Face's `kernels` distribution (which transformers >= 5.25 requires and imports) has the
# same import name: transformers then finds this package. Say so, instead of a bare ImportError.
_HUB_KERNELS_NAMES = frozenset({"CUDAProperties", "Device", "KernelizeFallback", "LayerRepository",
                                "LocalLayerRepository", "LockedLayerRepository", "Mode", "get_kernel", "kernelize",
                                "register_kernel_mapping", "use_kernel_forward_from_hub"})


def __getattr__(name: str):
    if name in _HUB_KERNELS_NAMES:
        raise ImportError(
            f"cannot import {name!r} from Hugging Face's `kernels`: kvlab's own `kernels` package has that import "
            "name. transformers >= 5.25 imports Hugging Face's; kvlab needs transformers < 5.25 "
            "(pip install 'transformers<5.25'), as its pyproject.toml says")
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
