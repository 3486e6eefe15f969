"""Checks of kernel inputs' *values* (``KVLAB_KERNEL_CHECKS=1``): for debugging, off by default.

The Triton wrappers check shapes, dtypes, devices and strides on every call: host-side, free. What
only the values tell (a block id past the cache, a context longer than its block-table row covers,
query bounds past ``q``, a slot past the cache) needs the index tensors on the host: a device sync a
decode step must not pay, and that a CUDA graph capture cannot make. On a GPU such an input reads or
writes out of bounds (garbage, a fault or a corrupted cache), so set ``KVLAB_KERNEL_CHECKS=1`` (read
once, at import; tests set ``ENABLED``) when a run looks wrong: each launch then checks first and
names the field. The engine builds these values on the host, where checking them costs no sync.
"""
from __future__ import annotations

import os

import torch

from kernels.metadata import Addressing, AttentionMetadata

ENABLED = os.environ.get("KVLAB_KERNEL_CHECKS", "0") not in ("", "0")


def active() -> bool:
    """On, and not inside a CUDA graph capture (which cannot read values back)."""
    return ENABLED and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def attention(q: torch.Tensor, num_slots: int, meta: AttentionMetadata, window: int) -> None:
    """Every key the kernel reads lies in the caches (``num_slots`` rows); query rows lie in ``q``."""
    from kernels.reference import token_slots

    num_tokens = q.shape[0]
    qsl = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()
    if qsl[0] < 0 or qsl[-1] > num_tokens or any(b < a for a, b in zip(qsl, qsl[1:])):
        raise ValueError(f"query_start_loc must rise from >= 0 to at most q's {num_tokens} tokens, got {qsl}")
    width = meta.block_table.shape[1] if meta.mode == Addressing.PAGED else 0
    for s, ctx in enumerate(lens):
        q_len = qsl[s + 1] - qsl[s]
        if ctx < 0 or q_len > meta.max_query_len or q_len > ctx:
            raise ValueError(f"sequence {s}: seq_lens {ctx} must be >= its {q_len} queries (query_start_loc) >= 0, "
                             f"and those at most max_query_len {meta.max_query_len}")
        if q_len == 0:
            continue  # no key is read
        if meta.mode == Addressing.PAGED and -(-ctx // meta.block_size) > width:
            raise ValueError(f"sequence {s}: seq_lens {ctx} needs {-(-ctx // meta.block_size)} blocks of "
                             f"{meta.block_size}, block_table has {width} columns")
        first = max(0, ctx - q_len - window + 1) if window > 0 else 0
        slots = token_slots(meta, s, ctx)[first:]
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
            where = "block_table" if meta.mode == Addressing.PAGED else "seq_base"
            raise ValueError(f"sequence {s}: its keys {first}..{ctx - 1} lie at slots {int(slots.min())}.."
                             f"{int(slots.max())} ({where}), outside the cache's {num_slots} slots")


def slots(name: str, values: torch.Tensor, num_slots: int, padding: bool = False,
          rows: str = "the cache's slots") -> None:
    """Every entry one of ``num_slots`` rows (``padding``: < 0 means none)."""
    if values.numel() == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if hi >= num_slots or (lo < 0 and not padding):
        raise ValueError(f"{name} holds {lo}..{hi}: outside {rows} 0..{num_slots - 1}"
                         + (" (< 0: padding)" if padding else ""))


def blocks(name: str, ids: torch.Tensor, num_slots: int, block_size: int) -> None:
    """Every entry a whole block of ``block_size`` rows inside a cache of ``num_slots`` rows."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_slots // block_size:
        raise ValueError(f"{name} holds blocks {lo}..{hi}: the cache holds {num_slots // block_size} blocks "
                         f"of {block_size}")
