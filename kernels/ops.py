"""Kernel dispatch: Triton on CUDA tensors, the torch reference elsewhere.

``KVLAB_KERNELS=reference`` forces the reference everywhere (debugging);
``KVLAB_KERNELS=triton`` forces Triton (tests under ``TRITON_INTERPRET=1`` on CPU).
The Triton wrappers check shapes, dtypes, devices and strides on every call (host-side, free);
``KVLAB_KERNEL_CHECKS=1`` also checks index values (``kernels.value_checks``: a device sync a launch).
"""
from __future__ import annotations

import os

import torch

from kernels import reference


def _use_triton(t: torch.Tensor) -> bool:
    choice = os.environ.get("KVLAB_KERNELS", "auto")
    if choice == "reference":
        return False
    if choice == "triton":
        return True
    return t.is_cuda


def _triton():
    from kernels import triton_ops  # imported lazily: Triton is optional on CPU

    return triton_ops


def write_kv(k_cache, v_cache, k, v, slot_mapping, k_scale=None, v_scale=None) -> None:
    """``k_scale``/``v_scale`` (fp32 ``[H]``): fp8 caches only, value = stored x scale."""
    impl = _triton() if _use_triton(k) else reference
    impl.write_kv(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)


def attention(q, k_cache, v_cache, meta, scale=None, k_scale=None, v_scale=None, window=0,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``window > 0``: sliding-window attention (keys older than ``window`` are not read);
    ``out`` (``q``'s shape): written there and returned (a CUDA graph reads it at a fixed address)."""
    if _use_triton(q):
        t = _triton()
        if out is None:
            return t.attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale, window)
        return t.attention_into(out, q, k_cache, v_cache, meta, scale, None, k_scale, v_scale, window)
    result = reference.attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale, window)
    return result if out is None else out.copy_(result)


def copy_blocks(cache, src, dst, block_size) -> None:
    impl = _triton() if _use_triton(cache) else reference
    impl.copy_blocks(cache, src, dst, block_size)


def gather_blocks(cache, block_ids, block_size, out) -> None:
    impl = _triton() if _use_triton(cache) else reference
    impl.gather_blocks(cache, block_ids, block_size, out)


def scatter_blocks(cache, block_ids, block_size, src) -> None:
    impl = _triton() if _use_triton(cache) else reference
    impl.scatter_blocks(cache, block_ids, block_size, src)


def gather_layers(caches, slots, block_size, out, ptrs=None) -> None:
    """Every layer's K and V rows at ``slots`` into ``out [n, layers, 2, block_size, H, D]``,
    one launch on CUDA (``ptrs``: ``triton_cache.layer_pointers(caches)``, made once)."""
    impl = _triton() if _use_triton(out) else reference
    impl.gather_layers(caches, slots, block_size, out, ptrs)


def scatter_layers(caches, slots, block_size, src, ptrs=None) -> None:
    impl = _triton() if _use_triton(src) else reference
    impl.scatter_layers(caches, slots, block_size, src, ptrs)
