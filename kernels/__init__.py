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
