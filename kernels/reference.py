"""Plain-torch reference of every kernel: the CPU path of the engine and the test oracle.

Caches are per-layer tensors ``[num_slots, num_kv_heads, head_dim]`` indexed by flat token
slot; the slot stride may be larger than ``num_kv_heads * head_dim`` (layouts that
interleave layers), only ``head_dim`` must be contiguous.
"""
from __future__ import annotations

import torch

from kernels.metadata import Addressing, AttentionMetadata


def token_slots(meta: AttentionMetadata, seq: int, length: int) -> torch.Tensor:
    """Flat cache slots of tokens ``[0, length)`` of sequence ``seq``."""
    pos = torch.arange(length, device=meta.seq_lens.device, dtype=torch.int64)
    if meta.mode == Addressing.PAGED:
        blocks = meta.block_table[seq, pos // meta.block_size].to(torch.int64)
        return blocks * meta.block_size + pos % meta.block_size
    if meta.ring:
        pos = pos % meta.ring
    return meta.seq_base[seq].to(torch.int64) + pos


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """``x [T, H, D]`` in the cache's dtype; fp8: ``x / scale[h]``, saturated to the format's
    range (a plain cast turns values beyond it into NaN or inf)."""
    if not is_fp8(dtype):
        return x.to(dtype)
    m = torch.finfo(dtype).max
    return (x.float() / scale.float()[None, :, None]).clamp(-m, m).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache rows ``[T, H, D]`` as fp32 values (fp8: times the head's scale)."""
    if not is_fp8(x.dtype):
        return x.float()
    return x.float() * scale.float()[None, :, None]


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter new keys/values ``[num_tokens, H, D]`` into the caches at ``slot_mapping``.

    fp8 caches store ``value / scale`` (``k_scale``, ``v_scale``: fp32 ``[H]``)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache[slots] = quantize(k[valid], k_cache.dtype, k_scale)
    v_cache[slots] = quantize(v[valid], v_cache.dtype, v_scale)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Causal GQA attention of ``q [num_tokens, Hq, D]`` over the cached context.

    ``window > 0``: query at position i sees keys j with ``i - window < j <= i`` (sliding
    window, as HF transformers masks it); keys before the window may be gone (freed blocks,
    unmapped pages, a ring overwritten), so they are never read."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    qsl = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()
    for s, ctx in enumerate(lens):
        q0, q1 = qsl[s], qsl[s + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        first = max(0, ctx - q_len - window + 1) if window > 0 else 0  # oldest key any query sees
        slots = token_slots(meta, s, ctx)[first:]
        keys = dequantize(k_cache[slots], k_scale).repeat_interleave(group, dim=1)  # [keys, Hq, D]
        vals = dequantize(v_cache[slots], v_scale).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), keys) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        k_pos = torch.arange(first, ctx, device=q.device)
        hidden = k_pos[None, None, :] > q_pos[None, :, None]
        if window > 0:
            hidden |= k_pos[None, None, :] <= q_pos[None, :, None] - window
        scores.masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, vals).to(q.dtype)
    return out


def _block_slots(block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    offs = torch.arange(block_size, device=block_ids.device, dtype=torch.int64)
    return (block_ids.to(torch.int64)[:, None] * block_size + offs[None, :]).reshape(-1)


def copy_blocks(
    cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_size: int
) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` inside one cache (copy-on-write)."""
    cache[_block_slots(dst, block_size)] = cache[_block_slots(src, block_size)]


def gather_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, block_size: int, out: torch.Tensor
) -> None:
    """Gather blocks into a dense buffer ``out [n * block_size, H, D]`` (swap-out staging)."""
    out.copy_(cache[_block_slots(block_ids, block_size)])


def scatter_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, block_size: int, src: torch.Tensor
) -> None:
    """Scatter a dense buffer ``src [n * block_size, H, D]`` into blocks (swap-in)."""
    cache[_block_slots(block_ids, block_size)] = src.to(cache.dtype)


def gather_layers(caches, slots: torch.Tensor, block_size: int, out: torch.Tensor, ptrs=None) -> None:
    """``out [n, layers, 2, block_size, H, D]`` = every layer's K and V rows at ``slots``
    (``n * block_size`` flat slots, block by block); ``ptrs`` is the Triton version's."""
    n = slots.shape[0] // block_size
    for layer, (k, v) in enumerate(caches):
        out[:, layer, 0] = k[slots].view(n, block_size, *k.shape[1:])
        out[:, layer, 1] = v[slots].view(n, block_size, *v.shape[1:])


def scatter_layers(caches, slots: torch.Tensor, block_size: int, src: torch.Tensor, ptrs=None) -> None:
    """The inverse of gather_layers: ``src`` rows into every layer's K and V at ``slots``."""
    for layer, (k, v) in enumerate(caches):
        k[slots] = src[:, layer, 0].reshape(-1, *k.shape[1:]).to(k.device)
        v[slots] = src[:, layer, 1].reshape(-1, *v.shape[1:]).to(v.device)
