"""Triton attention over the KV cache: one kernel for every strategy and every batch shape.

One launch serves a mixed batch of prefill chunks and decode tokens. A program owns one
*query tile* (``BLOCK_Q`` consecutive query tokens of one sequence) for one KV head and
packs all ``GROUP`` query heads of that KV head into the tile's rows (row = token * GROUP_P
+ head), so every K/V element is read once per tile instead of once per query head.

The cache addressing (PAGED block table or LINEAR base offset) is a ``tl.constexpr``: the
only place strategies differ. Tiles of ``BLOCK_N`` keys are gathered row by row, each row
looking up its own block, so a tile may span several small blocks.

Split-KV (flash-decoding): when a batch has too few (sequence, KV head) pairs to fill the
GPU, the key range of each tile is cut into ``num_splits`` chunks handled by separate
programs that write partial outputs plus their log-sum-exp; a small kernel merges them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl, value_checks
from kernels.metadata import Addressing, AttentionMetadata
from kernels.attention_config import (  # noqa: F401  (re-exported: callers import them from here)
    LONG_PROMPT, RAGGED_PROGRAMS_PER_SM, SMEM_PER_SM, SPLIT_MAX, SPLIT_MIN_TOKENS, AttnConfig, _pow2, choose_config,
    decode_wave, device_sms, fixed_split_chunk, query_tiles)

from kernels.pdl import enter as pdl_enter, trigger_at as pdl_trigger_at  # noqa: E402 (jit functions)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_LOG2E = 1.4426950408889634


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
def _tile_rows(q_start, q0, q_len, prefix, kvh, GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """A query tile's rows (row = token * GROUP_P + head of the KV head's group): which are real,
    their token, query head and absolute position."""
    rows = tl.arange(0, BLOCK_M)
    qi = rows // GROUP_P
    hg = rows % GROUP_P
    row_ok = (qi < BLOCK_Q) & (q0 + qi < q_len) & (hg < GROUP)
    return row_ok, (q_start + q0 + qi).to(tl.int64), kvh * GROUP + hg, prefix + q0 + qi


@triton.jit(do_not_specialize=["window", "ring"])
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, plse_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr, base_ptr,
    ks_ptr, vs_ptr,  # fp8 caches (SCALED): fp32 scale per KV head, value = stored x scale
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    window,  # > 0: query at position i sees keys (i - window, i] (sliding window)
    ring,  # LINEAR, RING: token t of a sequence at seq_base + t % ring
    num_seqs,
    max_blocks,  # block_table.shape[1] (PAGED)
    num_splits, split_chunk,  # split-KV: split j covers keys [j*chunk, (j+1)*chunk) (not EVEN_SPLIT)
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
    SPLIT: tl.constexpr,  # write partial results for _merge_kernel (num_splits > 1)
    EVEN_SPLIT: tl.constexpr,  # split j: the j-th of num_splits equal parts of the tile's keys
    DIRECT: tl.constexpr,  # every sequence fits one query tile: program i = sequence i
    BT_AHEAD: tl.constexpr,  # PAGED: block ids fetched one iteration ahead (see loop)
    DOT_F32: tl.constexpr,  # exact fp32 dots (fp32 inputs; bf16 under the interpreter)
    SCALED: tl.constexpr,  # fp8 cache: K/V upcast to q's dtype, scales folded into qk and out
    WINDOWED: tl.constexpr,  # window > 0 (its value stays a runtime argument)
    RING: tl.constexpr,  # ring > 0
    CAUSAL_SPLIT: tl.constexpr,  # unmasked loop over the keys every query row sees (not SPLIT, WINDOWED)
    LONGEST_FIRST: tl.constexpr,  # query tiles in reverse order (not DIRECT)
    SEQ_MAJOR: tl.constexpr,  # DIRECT: grid (KV heads, sequences): a sequence's programs launch together
    PDL: tl.constexpr = False, TRIGGER: tl.constexpr = 2,  # kernels.pdl
):
    pdl_enter(PDL, TRIGGER)  # everything below reads what the kernels before wrote
    tl.static_assert(not (SEQ_MAJOR and LONGEST_FIRST))  # the one reverses axis 0, the other moves it
    if SEQ_MAJOR:
        kvh = tl.program_id(0)
        qblk = tl.program_id(1)
    else:
        qblk = tl.program_id(0)
        kvh = tl.program_id(1)
    if LONGEST_FIRST:  # the last tiles of a prompt see the most keys: start those first, so that
        # the launch ends on short tiles rather than waiting on a long one (tail balance)
        qblk = tl.num_programs(0) - 1 - qblk
    split = tl.program_id(2)

    if DIRECT:  # decode: no search, so no chain of dependent loads before the first K tile
        seq = qblk
    else:
        seq = _find_seq(qsl_ptr, qblk, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    ctx = tl.load(seq_lens_ptr + seq)
    if DIRECT:
        q0 = 0
    elif BLOCK_Q > 1:
        q0 = (qblk - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    else:
        q0 = qblk - q_start
    # Key range of this program, with no early exit. Fixed-width split bounds come from launch
    # constants, so every start-up load (query bounds, length, base or first block ids, q) is
    # issued at once; even splits need the length first (one dependent load before the first
    # block ids, PAGED: included in the H200 figures of choose_config).
    prefix = ctx - q_len  # query j of the sequence sits at absolute position prefix + j
    # sliding window: the tile's first query sees keys from prefix + q0 - window + 1 on, later
    # ones even fewer; keys before that may be freed or overwritten, so they are never loaded
    if WINDOWED:
        lo = tl.maximum(prefix + q0 - window + 1, 0)
    else:  # a constant: no load feeds the first block-id fetch (but EVEN_SPLIT's)
        lo = 0
    # keys this tile needs: [lo, kv_end), causal bound of its last query row
    kv_end = prefix + tl.minimum(q_len, q0 + BLOCK_Q)
    hi = kv_end
    if SPLIT and EVEN_SPLIT:
        # this tile's own keys cut into num_splits equal, tile-aligned parts: a long sequence
        # of a ragged batch spreads over all its programs instead of ending on its longest
        # fixed-width chunk (later splits of a short one are empty)
        span = tl.maximum(kv_end - lo, 0)
        chunk = (span + num_splits * BLOCK_N - 1) // (num_splits * BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(lo + chunk, kv_end)
    elif SPLIT:  # fixed-width splits from the launch's max_seq_len, from the tile's first key;
        # the last one takes whatever is left, so a stale max_seq_len (e.g. a CUDA graph
        # captured earlier) costs balance, never correctness
        lo = lo + split * split_chunk
        hi = tl.where(split == num_splits - 1, kv_end, tl.minimum(lo + split_chunk, kv_end))
    offs_n0 = tl.arange(0, BLOCK_N)
    if MODE == 0:
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        # block ids of the first tile, clamped into the row (masked by length later)
        blk_next = tl.load(bt_row + tl.minimum((lo + offs_n0) // BLOCK_SIZE, max_blocks - 1))
    else:
        seq_base = tl.load(base_ptr + seq).to(tl.int64)

    row_ok, tok, head, q_pos = _tile_rows(q_start, q0, q_len, prefix, kvh, GROUP, GROUP_P, BLOCK_Q, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if SCALED:  # fp8 K/V are upcast tile by tile (to fp16: one instruction on Hopper, bf16 is not);
        # their scales are per KV head, folded into the softmax scale and the output
        qk_scale = qk_scale * tl.load(ks_ptr + kvh)
        v_scale = tl.load(vs_ptr + kvh)
        if not DOT_F32:
            q = q.to(tl.float16)
    else:
        q = q.to(k_ptr.dtype.element_ty)

    hi = tl.where(q0 < q_len, hi, lo)  # spare tile (the grid is an upper bound): no keys

    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # PAGED (BT_AHEAD): the block ids of the *next* tile are fetched one iteration ahead,
    # so K/V addresses never wait on a load of the same iteration; an in-iteration index
    # load (BT_AHEAD=False) costs the software pipeliner stages: with equal num_stages,
    # fewer K/V tiles in flight.
    # CAUSAL_SPLIT: keys up to the tile's first query are visible to every row, so the tiles
    # wholly below it run a first loop without length, causal or padding masks (plain loads,
    # no selects); the diagonal tiles run the masked loop (FlashAttention's two stages).
    if CAUSAL_SPLIT:
        mid = lo + tl.maximum(tl.minimum(prefix + q0 + 1, hi) - lo, 0) // BLOCK_N * BLOCK_N
    else:
        mid = lo
    for phase in tl.static_range(0 if CAUSAL_SPLIT else 1, 2):
        if phase == 0:
            start_at = lo
            stop_at = mid
        else:
            start_at = mid
            stop_at = hi
        for start in range(start_at, stop_at, BLOCK_N):
            offs_n = start + offs_n0
            n_ok = offs_n < hi
            if MODE == 0:
                if BT_AHEAD:
                    blk = blk_next.to(tl.int64)
                    nxt = offs_n + BLOCK_N
                    blk_next = tl.load(bt_row + nxt // BLOCK_SIZE, mask=nxt < hi, other=0)
                elif phase == 0:
                    blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
                else:
                    blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
                slot = blk * BLOCK_SIZE + offs_n % BLOCK_SIZE
            elif RING:
                slot = seq_base + offs_n % ring
            else:
                slot = seq_base + offs_n
            k_ptrs = k_base + slot[:, None] * stride_ks + offs_d[None, :]
            v_ptrs = v_base + slot[:, None] * stride_vs + offs_d[None, :]
            if phase == 0 and BLOCK_D == HEAD_DIM:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            elif phase == 0:
                k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                kv_mask = n_ok[:, None] & d_ok[None, :]
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
                v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            if SCALED:
                k = k.to(q.dtype)  # fp16 (or fp32 for exact dots)
                v = v.to(q.dtype)

            if DOT_F32:
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = qk * qk_scale
            if phase == 1:
                causal = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
                if WINDOWED:
                    causal = causal & (offs_n[None, :] > q_pos[:, None] - window)
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

    pdl_trigger_at(PDL, TRIGGER, 2)  # the keys are read
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SCALED:
        out = out * v_scale
    st_mask = row_ok[:, None] & d_ok[None, :]
    if not SPLIT:
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
    num_splits,
    SPLITS_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False, TRIGGER: tl.constexpr = 2,
):
    """out[t, h] = sum_j w_j * o_j / sum_j w_j with w_j = 2^(lse_j - max lse)."""
    pdl_enter(PDL, TRIGGER)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P)
    s_ok = offs_s < num_splits
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


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3:
            raise ValueError(f"{name} must be [num_slots, num_kv_heads, head_dim], got {tuple(c.shape)}")
        if c.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim, got strides {c.stride()}")
        if c.dtype not in _FLOAT_DTYPES + _FP8_DTYPES:
            raise ValueError(f"{name} dtype {c.dtype} not supported (fp16, bf16, fp32, fp8 e4m3/e5m2)")
        if c.device != q.device:
            raise ValueError(f"{name} is on {c.device}, q on {q.device}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache {tuple(v_cache.shape)} "
                         f"{v_cache.dtype} must agree on slots, heads, head_dim and dtype")
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
    if meta.seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be [num_seqs], got {tuple(meta.seq_lens.shape)}")
    num_seqs = meta.seq_lens.shape[0]
    check_query_bound(q, meta)
    if meta.query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"query_start_loc must be [num_seqs + 1] = [{num_seqs + 1}], got {tuple(meta.query_start_loc.shape)}"
        )
    ints = [("query_start_loc", meta.query_start_loc), ("seq_lens", meta.seq_lens)]
    if meta.mode == Addressing.PAGED:
        if meta.block_table.dim() != 2 or meta.block_table.shape[0] != num_seqs:
            raise ValueError(f"block_table must be [{num_seqs}, max_blocks], got {tuple(meta.block_table.shape)}")
        if meta.block_table.shape[1] == 0:
            raise ValueError("block_table has no columns")
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
        if t.stride(-1) != 1 and t.shape[-1] > 1:  # the kernel reads element i at ptr + i
            raise ValueError(f"{name} must be contiguous along its last dim, got strides {t.stride()} "
                             f"(pass {name}.contiguous())")


def check_query_bound(q: torch.Tensor, meta: AttentionMetadata) -> None:
    """max_query_len bounds every sequence's query count (one tile a sequence from it on): ``q``'s
    tokens must fit ``num_seqs`` of them, else rows past the bound are never written."""
    num_seqs = meta.seq_lens.shape[0]
    if q.shape[0] > num_seqs * max(meta.max_query_len, 0):
        raise ValueError(f"max_query_len {meta.max_query_len} is below the longest query: {q.shape[0]} tokens in "
                         f"{num_seqs} sequences (pass the largest query_start_loc[i + 1] - query_start_loc[i])")


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Causal GQA attention of ``q [T, Hq, D]`` over the cache, written into ``out [T, Hq, D]``.

    ``config`` overrides the heuristic (tests and tuning); ``k_scale``/``v_scale`` (fp32
    ``[num_kv_heads]``) dequantize fp8 caches; ``window > 0`` is a sliding window."""
    _check_inputs(q, k_cache, v_cache, meta)
    scaled = k_cache.dtype in _FP8_DTYPES
    if scaled:
        from kernels.triton_cache import check_scales

        check_scales(k_scale, v_scale, k_cache.shape[1], q.device)
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: full attention), got {window!r}")
    if out.shape != q.shape or out.stride(2) != 1 or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} on {q.device}, contiguous along head_dim")
    if value_checks.active():  # KVLAB_KERNEL_CHECKS=1: reads the metadata back (a sync)
        value_checks.attention(q, k_cache.shape[0], meta, window)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    num_seqs = meta.seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    # keys one tile can see: a window bounds them whatever the context length
    span = min(meta.max_seq_len, window + meta.max_query_len - 1) if window else meta.max_seq_len
    cfg = config or choose_config(
        num_seqs=num_seqs,
        max_query_len=meta.max_query_len,
        max_seq_len=span,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        elem_size=k_cache.element_size(),
        fp8=scaled,
        num_sms=device_sms(q.device),
    )
    group_p = _pow2(group)
    block_m = max(16, cfg.block_q * group_p)
    block_d = max(16, _pow2(head_dim))
    # max_query_len is an upper bound on every q_len (metadata contract): when one tile
    # holds any sequence's queries, map programs to sequences directly (decode)
    direct = meta.max_query_len <= cfg.block_q
    # where the only empty sequences are trailing padding (full CUDA graphs pad to max_num_seqs),
    # at most num_tokens real ones come first (each holds a token): the padding needs no program
    seqs = min(num_seqs, num_tokens) if meta.trailing_padding else num_seqs
    num_qblocks = seqs if direct else query_tiles(num_tokens, seqs, cfg.block_q)
    # fp32 caches: exact dots. bf16 under the CPU interpreter: its bf16 dot is broken
    # (Triton 3.9), so dot in fp32 there; on the GPU bf16/fp16 use the tensor cores.
    dot_dtype = q.dtype if scaled else k_cache.dtype
    dot_f32 = dot_dtype == torch.float32 or (not q.is_cuda and dot_dtype == torch.bfloat16)

    split = cfg.num_splits > 1
    if split:
        po = _workspace((cfg.num_splits, num_tokens, num_heads, head_dim), q.device)
        plse = _workspace((cfg.num_splits, num_tokens, num_heads), q.device)
        # fixed-width splits: keys per split from the launch's max_seq_len (even ones: the kernel's own)
        chunk = 0 if cfg.even_split else fixed_split_chunk(span, cfg.num_splits, cfg.block_n)
    else:
        po = plse = out  # unused
        chunk = 0
    paged = meta.mode == Addressing.PAGED
    bt = meta.block_table if paged else meta.seq_lens  # unused pointer in the other mode
    base = meta.seq_base if not paged else meta.seq_lens
    seq_major = cfg.seq_major and direct
    on = pdl.enabled(q.device)
    grid = (num_kv_heads, num_qblocks, cfg.num_splits) if seq_major else (num_qblocks, num_kv_heads, cfg.num_splits)
    _attn_kernel[grid](
        q, k_cache, v_cache, out, po, plse,
        meta.query_start_loc, meta.seq_lens, bt, base,
        k_scale if scaled else meta.seq_lens, v_scale if scaled else meta.seq_lens,  # unused unless fp8
        scale * _LOG2E,
        window,
        meta.ring,
        num_seqs,
        meta.block_table.shape[1] if paged else 1,
        cfg.num_splits, chunk,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        meta.block_table.stride(0) if paged else 0,
        po.stride(0) if split else 0,
        po.stride(1) if split else 0,
        po.stride(2) if split else 0,
        plse.stride(0) if split else 0,
        plse.stride(1) if split else 0,
        MODE=int(meta.mode),
        BLOCK_SIZE=int(meta.block_size) if paged else 1,
        GROUP=group, GROUP_P=group_p,
        BLOCK_Q=cfg.block_q, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        SPLIT=split,
        EVEN_SPLIT=split and cfg.even_split,  # one variant of an unsplit launch
        DIRECT=direct,
        BT_AHEAD=cfg.bt_ahead,
        DOT_F32=dot_f32,
        SCALED=scaled,
        WINDOWED=window > 0,
        RING=meta.ring > 0,
        CAUSAL_SPLIT=cfg.causal_split and not split and window == 0,
        LONGEST_FIRST=cfg.longest_first and not direct,
        SEQ_MAJOR=seq_major,
        PDL=on, TRIGGER=pdl.TRIGGER,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_kwargs(on),
    )
    if split:
        _merge_kernel[(num_tokens, num_heads)](
            po, plse, out,
            po.stride(0), po.stride(1), po.stride(2),
            plse.stride(0), plse.stride(1),
            out.stride(0), out.stride(1),
            cfg.num_splits,
            SPLITS_P=_pow2(cfg.num_splits),
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            PDL=on, TRIGGER=pdl.TRIGGER,
            num_warps=1 if block_d <= 64 else 2, **pdl.launch_kwargs(on),
        )
    return out


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
    """Same contract as ``kernels.reference.attention``."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return attention_into(out, q, k_cache, v_cache, meta, scale, None, k_scale, v_scale, window)


__all__ = ["AttnConfig", "attention", "attention_into", "choose_config", "decode_wave", "device_sms",
           "fixed_split_chunk"]
