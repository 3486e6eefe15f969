"""Prefill attention over a LINEAR cache with tensor descriptors (TMA on Hopper): a candidate kernel.

``triton_attention`` gathers every K/V tile row by row through pointers, so one kernel serves
PAGED and LINEAR caches, split-KV, windows, rings and fp8. A LINEAR sequence's keys are one
strided 2-D block of the cache (rows ``seq_base + t``, the KV head's ``head_dim`` columns), which
is what a tensor descriptor describes: on Hopper each tile is then one bulk copy issued by the
TMA unit instead of ``BLOCK_N`` row loads computed by every thread, leaving the warps to the
two matmuls (issue 14: prefill attention at 60% of the matmul rate; FlashAttention-3 gets there
with TMA and warp specialisation).

This is the same algorithm as ``triton_attention``'s prefill path (query tiles packing a KV
head's query heads, the tiles below the diagonal in an unmasked loop, then the masked diagonal
ones), for LINEAR caches of 16/32-bit floats, no window, ring, split or fp8. It is not wired into
the engine: ``experiments.bench_prefill`` times it beside the pointer kernel (``linear-tma``),
and the engine takes it only where that measurement says it is faster.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import value_checks
from kernels.metadata import Addressing, AttentionMetadata
from kernels.triton_attention import (_LOG2E, AttnConfig, _find_seq, _pow2, _tile_rows, check_query_bound,
                                      choose_config, device_sms)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tile(q, k_desc, v_desc, row, col, start, hi, q_pos, m_i, l_i, acc, qk_scale,
          MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """One K/V tile (cache rows ``row ..``, keys ``start ..``) into the running softmax."""
    k = k_desc.load([row, col])
    v = v_desc.load([row, col])
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = qk * qk_scale
    if MASKED:
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        qk = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), qk, float("-inf"))
        # rows past the sequence's keys hold another sequence's (or never written) values: a
        # weight of 0 times a NaN there would still be NaN
        v = tl.where(n_ok[:, None], v, 0.0)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row: no NaN
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _prefill_tma_kernel(
    q_ptr, k_desc, v_desc, o_ptr,
    qsl_ptr, seq_lens_ptr, base_ptr,
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_F32: tl.constexpr,  # exact fp32 dots (fp32 inputs; bf16 under the interpreter)
    WARP_SPEC: tl.constexpr,  # Triton's automatic warp specialisation of the key loop
):
    qblk = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = _find_seq(qsl_ptr, qblk, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    ctx = tl.load(seq_lens_ptr + seq)
    q0 = (qblk - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    prefix = ctx - q_len  # query j sits at absolute position prefix + j
    hi = prefix + tl.minimum(q_len, q0 + BLOCK_Q)  # causal bound of the tile's last query
    hi = tl.where(q0 < q_len, hi, 0)  # a spare tile (the grid is an upper bound): no keys
    row0 = tl.load(base_ptr + seq).to(tl.int32)  # the sequence's first cache row
    col = kvh * HEAD_DIM  # the KV head's columns of a cache row

    row_ok, tok, head, q_pos = _tile_rows(q_start, q0, q_len, prefix, kvh, GROUP, GROUP_P, BLOCK_Q, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # keys up to the tile's first query are seen by every row: those whole tiles take no mask
    mid = tl.maximum(tl.minimum(prefix + q0 + 1, hi), 0) // BLOCK_N * BLOCK_N
    for phase in tl.static_range(2):
        if phase == 0:
            start_at = 0
            stop_at = mid
        else:
            start_at = mid
            stop_at = hi
        if WARP_SPEC:  # loads and math in warp groups of their own (only this branch names the option)
            for start in tl.range(start_at, stop_at, BLOCK_N, warp_specialize=True):
                m_i, l_i, acc = _tile(q, k_desc, v_desc, row0 + start, col, start, hi, q_pos, m_i, l_i, acc,
                                      qk_scale, phase == 1, BLOCK_N, DOT_F32)
        else:
            for start in range(start_at, stop_at, BLOCK_N):
                m_i, l_i, acc = _tile(q, k_desc, v_desc, row0 + start, col, start, hi, q_pos, m_i, l_i, acc,
                                      qk_scale, phase == 1, BLOCK_N, DOT_F32)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _descriptor(cache: torch.Tensor, block_n: int) -> TensorDescriptor:
    """The cache as a 2-D ``[slots, kv_heads * head_dim]`` block (its slot stride may be wider)."""
    s, h, d = cache.shape
    return TensorDescriptor(cache, shape=[s, h * d], strides=[cache.stride(0), 1], block_shape=[block_n, d])


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """What this kernel takes (``triton_attention`` takes everything else)."""
    if meta.mode != Addressing.LINEAR or meta.ring:
        raise ValueError("the TMA prefill kernel reads LINEAR caches without a ring (PAGED: triton_attention)")
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.dim() != 3:
        raise ValueError("q and the caches must be [tokens or slots, heads, head_dim]")
    d = q.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim {d} must be a power of two >= 16")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in _DTYPES or t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype}: the TMA kernel takes fp16, bf16 or fp32, all alike")
        if t.device != q.device or t.stride(2) != 1:
            raise ValueError(f"{name} must be on {q.device}, contiguous along head_dim")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.shape[1:] != (k_cache.shape[1], d) or c.stride(1) != d:
            raise ValueError(f"{name} must be [slots, {k_cache.shape[1]}, {d}] with a slot's heads side by side")
        # a tensor descriptor's base and row stride are 16-byte aligned
        if c.data_ptr() % 16 or (c.stride(0) * c.element_size()) % 16:
            raise ValueError(f"{name}: its base and slot stride must be 16-byte aligned for a tensor descriptor")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of KV heads {k_cache.shape[1]}")
    if meta.seq_base is None or meta.seq_base.shape != meta.seq_lens.shape:
        raise ValueError("LINEAR metadata needs seq_base, one per sequence")
    if meta.query_start_loc.shape != (meta.seq_lens.shape[0] + 1,):
        raise ValueError("query_start_loc must be [num_seqs + 1]")
    if k_cache.shape[0] != v_cache.shape[0]:
        raise ValueError(f"k_cache and v_cache must hold as many slots, got {k_cache.shape[0]} and {v_cache.shape[0]}")
    for name in ("query_start_loc", "seq_lens", "seq_base"):
        t = getattr(meta, name)
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64) or t.device != q.device \
                or (t.shape[0] > 1 and t.stride(0) != 1):  # the kernel reads element i at ptr + i
            raise ValueError(f"{name} must be a contiguous 1-D int32/int64 tensor on {q.device}, "
                             f"got {tuple(t.shape)} {t.dtype} strides {t.stride()} on {t.device}")
    check_query_bound(q, meta)


def prefill_tma_into(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float | None = None,
                     config: AttnConfig | None = None, warp_specialize: bool = False) -> torch.Tensor:
    """Causal GQA attention of ``q [T, Hq, D]`` over a LINEAR cache into ``out``: the contract of
    ``triton_attention.attention_into`` for what ``check_inputs`` takes. ``config``: tile sizes,
    warps and stages (``block_q > 1``; the default is the pointer kernel's prefill choice);
    ``warp_specialize``: Triton's warp specialisation of the key loop (where Triton has it)."""
    check_inputs(q, k_cache, v_cache, meta)
    if out.shape != q.shape or out.stride(2) != 1 or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} on {q.device}, contiguous along head_dim")
    if value_checks.active():  # KVLAB_KERNEL_CHECKS=1: reads the metadata back (a sync)
        value_checks.attention(q, k_cache.shape[0], meta, 0)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_seqs = k_cache.shape[1], meta.seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    cfg = config or choose_config(num_seqs=num_seqs, max_query_len=max(2, meta.max_query_len),
                                  max_seq_len=meta.max_seq_len, num_kv_heads=num_kv_heads, group=group,
                                  head_dim=head_dim, elem_size=k_cache.element_size(), num_sms=device_sms(q.device))
    if cfg.block_q < 2 or cfg.num_splits != 1:
        raise ValueError(f"config {cfg}: the TMA kernel takes query tiles of 2 or more tokens, no split-KV")
    group_p = _pow2(group)
    scale = head_dim**-0.5 if scale is None else float(scale)
    # fp32 caches: exact dots; bf16 under the CPU interpreter too (its bf16 dot is broken)
    dot_f32 = q.dtype == torch.float32 or (not q.is_cuda and q.dtype == torch.bfloat16)
    grid = (num_tokens // cfg.block_q + num_seqs, num_kv_heads)  # see _find_seq: an upper bound
    _prefill_tma_kernel[grid](
        q, _descriptor(k_cache, cfg.block_n), _descriptor(v_cache, cfg.block_n), out,
        meta.query_start_loc, meta.seq_lens, meta.seq_base,
        scale * _LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        GROUP=group, GROUP_P=group_p, BLOCK_Q=cfg.block_q, BLOCK_M=max(16, cfg.block_q * group_p),
        BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, DOT_F32=dot_f32, WARP_SPEC=warp_specialize,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


__all__ = ["check_inputs", "prefill_tma_into"]
