"""Triton implementations with exactly the reference's names and signatures.

``kernels.ops`` imports this module lazily and dispatches here for CUDA tensors (or
everywhere with ``KVLAB_KERNELS=triton``, e.g. CPU tests under ``TRITON_INTERPRET=1``).
The wrappers check shapes, dtypes and strides and raise ``ValueError`` with a clear message;
the kernels live in ``kernels.triton_attention`` and ``kernels.triton_cache``.
"""
from __future__ import annotations

from kernels.triton_attention import AttnConfig, attention, attention_into, choose_config
from kernels.triton_cache import (copy_blocks, gather_blocks, gather_layers, layer_pointers, scatter_blocks,
                                  scatter_layers, write_kv)

__all__ = [
    "AttnConfig",
    "attention",
    "attention_into",
    "choose_config",
    "copy_blocks",
    "gather_blocks",
    "gather_layers",
    "layer_pointers",
    "scatter_blocks",
    "scatter_layers",
    "write_kv",
]
