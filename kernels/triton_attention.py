"""Triton attention over the KV cache: one kernel for every strategy and every batch shape.

One launch serves a mixed batch of prefill chunks and decode tokens. A program owns one
*query tile* (``BLOCK_Q`` consecutive query tokens of one sequence) for one KV head and
packs all ``GROUP`` query heads of that KV head into the tile's rows (row = token * GROUP_P
+ head), so every K/V element is read once per tile instead of once per query head.

The cache addressing (PAGED block table or LINEAR base offset) is a ``tl.constexpr``: the
only place strategies differ. Tiles of ``BLOCK_N`` keys are gathered row by row, each row
looking up its own block, so a tile may span several small blocks.

Split-KV (flash-decoding): when a batch has too few (sequence, KV head) pairs to fill the
GPU, the key range of each tile is cut into ``NUM_SPLITS`` chunks handled by separate
programs that write partial outputs plus their log-sum-exp; a small kernel merges them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.metadata import Addressing, AttentionMetadata

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# Split-KV heuristic knobs (see choose_config).
SPLIT_TARGET_PROGRAMS_PER_SM = 4  # programs per SM we want in flight for decode
SPLIT_MIN_TOKENS = 256  # never give a split fewer keys than this
SPLIT_MAX = 64


def _pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(n)


def _prev_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@triton.jit
def _find_seq(qsl_ptr, qblk, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence owning query tile ``qblk``. Sequence i owns tiles starting at
    ``qsl[i] // BLOCK_Q + i`` (BLOCK_Q > 1; the ``+ i`` leaves room for a ragged last tile)
    or at ``qsl[i]`` (BLOCK_Q == 1): a monotone array, so binary search, no host sync."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs  # annotated: an int arg equal to 1 arrives as a constexpr
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid)
        if BLOCK_Q > 1:
            start = start // BLOCK_Q + mid
        if start <= qblk:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, plse_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr, base_ptr,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_ks, stride_kh, stride_vs, stride_vh,
    stride_bt,
    stride_pos, stride_pot, stride_poh,
    stride_pls, stride_plt,
    MODE: tl.constexpr,  # Addressing.PAGED (0) or Addressing.LINEAR (1)
    BLOCK_SIZE: tl.constexpr,  # cache block size (PAGED)
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr,  # exact fp32 dots (fp32 inputs; bf16 under the interpreter)
):
    qblk = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(qsl_ptr, qblk, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if BLOCK_Q > 1:
        q0 = (qblk - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    else:
        q0 = qblk - q_start
    if q0 >= q_len:  # spare tile (grid is an upper bound)
        return
    ctx = tl.load(seq_lens_ptr + seq)
    prefix = ctx - q_len  # query j of the sequence sits at absolute position prefix + j

    rows = tl.arange(0, BLOCK_M)
    qi = rows // GROUP_P
    hg = rows % GROUP_P
    row_ok = (qi < BLOCK_Q) & (q0 + qi < q_len) & (hg < GROUP)
    tok = (q_start + q0 + qi).to(tl.int64)
    head = kvh * GROUP + hg
    q_pos = prefix + q0 + qi
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q = q.to(k_ptr.dtype.element_ty)

    # keys this tile needs: [0, kv_end), causal bound of its last query row
    kv_end = prefix + tl.minimum(q_len, q0 + BLOCK_Q)
    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N  # BLOCK_N-aligned
        lo = split * chunk
        hi = tl.minimum(lo + chunk, kv_end)
    else:
        lo = 0
        hi = kv_end

    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    if MODE == 0:
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    else:
        seq_base = tl.load(base_ptr + seq).to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < hi
        if MODE == 0:
            if BLOCK_SIZE % BLOCK_N == 0:
                # tiles are BLOCK_N-aligned, so the whole tile sits in one block
                blk = tl.load(bt_row + start // BLOCK_SIZE).to(tl.int64)
                slot = blk * BLOCK_SIZE + offs_n % BLOCK_SIZE
            else:
                # gather: each key row looks up its own block (tile spans several blocks)
                blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
                slot = blk * BLOCK_SIZE + offs_n % BLOCK_SIZE
        else:
            slot = seq_base + offs_n
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)

        if DOT_F32:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale
        causal = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        qk = tl.where(causal, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row: no NaN
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        if DOT_F32:
            pv = tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    st_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(
            o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=st_mask,
        )
    else:
        # partial result of this split; an empty split writes lse = -inf (weight 0)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        split64 = split.to(tl.int64)
        tl.store(
            po_ptr + split64 * stride_pos + tok[:, None] * stride_pot + head[:, None] * stride_poh
            + offs_d[None, :],
            out,
            mask=st_mask,
        )
        tl.store(plse_ptr + split64 * stride_pls + tok * stride_plt + head, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    po_ptr, plse_ptr, o_ptr,
    stride_pos, stride_pot, stride_poh,
    stride_pls, stride_plt,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, h] = sum_j w_j * o_j / sum_j w_j with w_j = 2^(lse_j - max lse)."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(plse_ptr + offs_s * stride_pls + tok * stride_plt + head, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - m)  # empty splits: 0
    used = s_ok & (lse > float("-inf"))
    po = tl.load(
        po_ptr + offs_s[:, None] * stride_pos + tok * stride_pot + head * stride_poh + offs_d[None, :],
        mask=used[:, None] & d_ok[None, :],
        other=0.0,
    )
    out = tl.sum(po * w[:, None], 0) / tl.sum(w, 0)
    tl.store(o_ptr + tok * stride_ot + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


@dataclass(frozen=True)
class AttnConfig:
    block_q: int  # query tokens per tile (rows = block_q * group, padded)
    block_n: int  # keys per inner-loop tile
    num_splits: int  # split-KV factor (1 = single pass)
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; a small stand-in on CPU (interpreter)."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def choose_config(
    *,
    num_seqs: int,
    max_query_len: int,
    max_seq_len: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    elem_size: int,
    num_sms: int,
) -> AttnConfig:
    """Tile sizes and split count from host-side integers only (no device sync, so the
    call is CUDA-graph safe)."""
    group_p = _pow2(group)
    row_bytes = max(16, _pow2(head_dim)) * elem_size
    if max_query_len <= 1:
        # decode: memory bound. Large key tiles, all heads of a KV head in one tile.
        block_n = 64 if row_bytes <= 256 else 32
        programs = max(1, num_seqs * num_kv_heads)
        target = SPLIT_TARGET_PROGRAMS_PER_SM * num_sms
        splits = 1
        if programs < target:
            by_len = _prev_pow2(max(1, max_seq_len // SPLIT_MIN_TOKENS))
            splits = max(1, min(_pow2(triton.cdiv(target, programs)), by_len, SPLIT_MAX))
        return AttnConfig(block_q=1, block_n=block_n, num_splits=splits, num_warps=4, num_stages=3)
    # prefill / mixed: ~64 query rows per tile, compute bound
    block_q = max(1, min(_pow2(max_query_len), 64 // group_p))
    block_n = 64 if row_bytes <= 256 else 32
    return AttnConfig(block_q=block_q, block_n=block_n, num_splits=1, num_warps=4, num_stages=2)


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3:
            raise ValueError(f"{name} must be [num_slots, num_kv_heads, head_dim], got {tuple(c.shape)}")
        if c.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim, got strides {c.stride()}")
        if c.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} dtype {c.dtype} not supported (fp16, bf16, fp32)")
        if c.device != q.device:
            raise ValueError(f"{name} is on {c.device}, q on {q.device}")
    if k_cache.shape[1:] != v_cache.shape[1:] or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must agree on heads, head_dim and dtype")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported (fp16, bf16, fp32)")
    if q.stride(2) != 1:
        raise ValueError(f"q must be contiguous along head_dim, got strides {q.stride()}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and cache ({k_cache.shape[2]}) differ")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    meta.check()
    num_seqs = meta.seq_lens.shape[0]
    if meta.query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"query_start_loc must be [num_seqs + 1] = [{num_seqs + 1}], got {tuple(meta.query_start_loc.shape)}"
        )
    ints = [("query_start_loc", meta.query_start_loc), ("seq_lens", meta.seq_lens)]
    if meta.mode == Addressing.PAGED:
        if meta.block_table.dim() != 2 or meta.block_table.shape[0] != num_seqs:
            raise ValueError(f"block_table must be [{num_seqs}, max_blocks], got {tuple(meta.block_table.shape)}")
        if meta.block_table.stride(1) != 1:
            raise ValueError("block_table rows must be contiguous")
        ints.append(("block_table", meta.block_table))
    else:
        if meta.seq_base.shape != (num_seqs,):
            raise ValueError(f"seq_base must be [{num_seqs}], got {tuple(meta.seq_base.shape)}")
        ints.append(("seq_base", meta.seq_base))
    for name, t in ints:
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def _workspace(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Split-KV scratch (fp32). A module-level hook so tests can poison it."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def attention_into(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
    config: AttnConfig | None = None,
) -> torch.Tensor:
    """Causal GQA attention of ``q [T, Hq, D]`` over the cache, written into ``out [T, Hq, D]``.

    ``config`` overrides the heuristic (tests and tuning)."""
    _check_inputs(q, k_cache, v_cache, meta)
    if out.shape != q.shape or out.stride(2) != 1 or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} on {q.device}, contiguous along head_dim")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    num_seqs = meta.seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    cfg = config or choose_config(
        num_seqs=num_seqs,
        max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        elem_size=k_cache.element_size(),
        num_sms=device_sms(q.device),
    )
    group_p = _pow2(group)
    block_m = max(16, cfg.block_q * group_p)
    block_d = max(16, _pow2(head_dim))
    # upper bound on query tiles: see _find_seq
    num_qblocks = num_tokens if cfg.block_q == 1 else num_tokens // cfg.block_q + num_seqs
    # fp32 caches: exact dots. bf16 under the CPU interpreter: its bf16 dot is broken
    # (Triton 3.9), so dot in fp32 there; on the GPU bf16/fp16 use the tensor cores.
    dot_f32 = k_cache.dtype == torch.float32 or (not q.is_cuda and k_cache.dtype == torch.bfloat16)

    if cfg.num_splits > 1:
        po = _workspace((cfg.num_splits, num_tokens, num_heads, head_dim), q.device)
        plse = _workspace((cfg.num_splits, num_tokens, num_heads), q.device)
        o_arg = out
    else:
        po = plse = out  # unused
        o_arg = out
    paged = meta.mode == Addressing.PAGED
    bt = meta.block_table if paged else meta.seq_lens  # unused pointer in the other mode
    base = meta.seq_base if not paged else meta.seq_lens
    grid = (num_qblocks, num_kv_heads, cfg.num_splits)
    _attn_kernel[grid](
        q, k_cache, v_cache, o_arg, po, plse,
        meta.query_start_loc, meta.seq_lens, bt, base,
        scale * _LOG2E,
        num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        meta.block_table.stride(0) if paged else 0,
        po.stride(0) if cfg.num_splits > 1 else 0,
        po.stride(1) if cfg.num_splits > 1 else 0,
        po.stride(2) if cfg.num_splits > 1 else 0,
        plse.stride(0) if cfg.num_splits > 1 else 0,
        plse.stride(1) if cfg.num_splits > 1 else 0,
        MODE=int(meta.mode),
        BLOCK_SIZE=int(meta.block_size) if paged else 1,
        GROUP=group, GROUP_P=group_p,
        BLOCK_Q=cfg.block_q, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        NUM_SPLITS=cfg.num_splits,
        DOT_F32=dot_f32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.num_splits > 1:
        _merge_kernel[(num_tokens, num_heads)](
            po, plse, out,
            po.stride(0), po.stride(1), po.stride(2),
            plse.stride(0), plse.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=cfg.num_splits, SPLITS_P=_pow2(cfg.num_splits),
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=1 if block_d <= 64 else 2,
        )
    return out


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as ``kernels.reference.attention``."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return attention_into(out, q, k_cache, v_cache, meta, scale)


__all__ = ["AttnConfig", "attention", "attention_into", "choose_config", "device_sms"]
