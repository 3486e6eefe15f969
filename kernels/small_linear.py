"""Linear layers of a small batch (decode at 1-16 tokens) with their neighbours fused in.

At batch 1 an 8B model's decode step is its weights streamed once, and cuBLAS streams the big
ones at ~90% of copy bandwidth; what the step loses is elsewhere: two RMSNorms, SiLU-and-mul and
two split-K reductions a layer, each a kernel bound by launch latency (H200, llama3-8b:
~10 us a layer beside ~115 us of GEMMs, results/engine/decode_b1). Here one kernel does
``[RMSNorm] -> x @ W^T [+ bias] -> [SiLU(gate) * up] -> [+= residual]``: the norm in the
prologue (each program recomputes the rows' RMS: a few KiB of L2 reads at these batch sizes),
the gate and up rows of a fused ``gate_up`` weight in one program, the residual stream updated
in place by the program that owns those columns. No split-K: programs own whole rows of W. The qkv
projection's kernel can also norm and rotate q and k per head and store k and v into the KV cache
(``rope=``, ``kernels.small_linear_rope``): ``fused_ops.qk_norm_rope_``'s launch folded into it.

Numerics are HF's bf16 rounding points (as ``kernels.fused_ops``): the norm in fp32, rounded,
then times its weight; the GEMM's output rounded before SiLU and before the residual add.
``small_linear_ref`` is the torch reference (CPU, and the tests' oracle).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import pdl, small_linear_rope
from kernels.fused_ops import _check_rows, _check_vector, rms_norm_ref
from kernels.small_linear_rope import RopeEpilogue

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference still works
    triton = None

MAX_TOKENS = 16  # rows of x one program holds (tl.dot's smallest tile side)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # fp32: exact dots (tests; slow on a GPU)


def small_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     norm_weight: torch.Tensor | None = None, eps: float = 1e-6, gated: bool = False,
                     residual: torch.Tensor | None = None, rope: RopeEpilogue | None = None) -> torch.Tensor:
    """The unfused sequence: ``rms_norm`` (if ``norm_weight``), ``F.linear``, SiLU(gate) * up
    (if ``gated``: ``weight`` is gate's rows then up's), ``residual += y`` in place (returned);
    with ``rope``: ``fused_ops.qk_norm_rope_ref`` on q and k, then k and v into ``rope.cache``
    (``kernels.reference.write_kv``, in place)."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    y = torch.nn.functional.linear(x, weight, bias)
    if rope is not None:
        return small_linear_rope.reference(y, rope)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual is None:
        return y
    return residual.copy_((residual.float() + y.float()).to(residual.dtype))


@dataclass(frozen=True)
class LinearConfig:
    block_n: int  # rows of W a program owns (output columns)
    block_k: int  # columns of W a loop step loads
    num_warps: int
    num_stages: int


NORM_ELEMENTS = 4096  # x elements a program loads at once for the norm's RMS (32 fp32 a thread)
SMEM_BUDGET = 160 * 1024  # of an SM's shared memory (227 KiB on Hopper) for one program's stages


def choose_config(n: int, k: int, num_sms: int, gated: bool = False) -> LinearConfig:
    """Tiles from an H100 sweep of llama3-8b's shapes at 1 and 8 tokens (bench_small_linear --sweep,
    results/kernels/small_linear): 32 rows a program and 256-wide K steps, gated (two weight tiles a
    step) 64 rows, 128-wide steps and 8 warps; 16 rows where that leaves fewer programs than half the SMs
    (``num_sms``; o_proj's 128 programs of 32 rows were faster than 256 of 16 on 132 SMs); K steps no wider
    than K, the stages within ``SMEM_BUDGET``. Host integers only. (Swept again over every layer's weights
    in turn in the session of 2026-12-06, fifteenth: that sweep's best tiles moved a decode step by -1.0% to
    +0.9%, one round, not adopted: results/engine/session_2026-12-06f.)"""
    block_n, block_k, warps, stages = (64, 128, 8, 3) if gated else (32, 256, 4, 4)
    while block_n > 16 and triton.cdiv(n, block_n) < num_sms // 2:
        block_n //= 2
    return LinearConfig(block_n=block_n, block_k=_fit_block_k(block_k, k, block_n, 2 if gated else 1, stages),
                        num_warps=warps, num_stages=stages)


def _fit_block_k(block_k: int, k: int, block_n: int, tiles: int, stages: int) -> int:
    """K steps no wider than K's power of two, ``stages`` of them (``tiles`` weight tiles and x) within
    ``SMEM_BUDGET``."""
    block_k = max(64, min(block_k, triton.next_power_of_2(k)))
    while block_k > 64 and stages * (tiles * block_n + MAX_TOKENS) * block_k * 2 > SMEM_BUDGET:
        block_k //= 2
    return block_k


def choose_rope_config(n: int, k: int, num_sms: int, head_dim: int, norm_heads: bool) -> LinearConfig:
    """ROPE mode (``n`` output columns: n / 2 pairs, two weight tiles a step like gated): the gated tiles
    over the pairs, no more pairs a program than half a head (a program's pairs lie in one head), exactly
    half a head with the per-head norm (its RMS needs the whole head). Not swept yet."""
    cfg = choose_config(n // 2, k, num_sms, gated=True)
    half = head_dim // 2
    block_n = half if norm_heads else min(cfg.block_n, half)
    return LinearConfig(block_n=block_n, block_k=_fit_block_k(cfg.block_k, k, block_n, 2, cfg.num_stages),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


if triton is not None:
    from kernels.pdl import prefetch_l2, trigger_at, wait

    @triton.jit
    def _prefetch_rows(w_rows, K, LINES: tl.constexpr, LINE_ELEMS: tl.constexpr):
        """The first ``LINES`` cache lines of each row at ``w_rows`` ([BLOCK_N, 1] pointers) into L2."""
        cols = tl.minimum(tl.arange(0, LINES) * LINE_ELEMS, K - 1)
        prefetch_l2(w_rows + cols[None, :])

    @triton.jit
    def _rope_epilogue(a, b, out_ptrs, mask, head, offs_i, offs_m, m_ok, cos_ptr, sin_ptr, pos_ptr, qw_ptr, kw_ptr,
                       kc_ptr, vc_ptr, slot_ptr, stride_cs, num_q_heads, num_kv_heads,
                       stride_kcs, stride_kch, stride_vcs, stride_vch, eps,
                       HALF: tl.constexpr, NORM_HEADS: tl.constexpr, STORE_KV: tl.constexpr):
        """(ROPE) ``a``, ``b``: the GEMM's rounded output (fp32 [BLOCK_N, BLOCK_M]) at pairs ``offs_i`` and
        ``HALF + offs_i`` of ``head``. q and k heads: ``fused_ops._norm_rope_heads``' norm and rotation, its
        rounding points; v heads as they are. All stored at their columns; k and v at their cache slots too."""
        dtype = out_ptrs.dtype.element_ty
        rotate = head < num_q_heads + num_kv_heads  # a q or k head
        if NORM_HEADS:  # the tile is the whole head (BLOCK_N == HALF): its RMS over both halves, per token
            w1 = tl.where(head < num_q_heads, tl.load(qw_ptr + offs_i), tl.load(kw_ptr + offs_i)).to(tl.float32)
            w2 = tl.where(head < num_q_heads, tl.load(qw_ptr + HALF + offs_i),
                          tl.load(kw_ptr + HALF + offs_i)).to(tl.float32)
            rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF) + eps)
            na = ((a * rstd[None, :]).to(dtype).to(tl.float32) * w1[:, None]).to(dtype).to(tl.float32)
            nb = ((b * rstd[None, :]).to(dtype).to(tl.float32) * w2[:, None]).to(dtype).to(tl.float32)
            a = tl.where(rotate, na, a)
            b = tl.where(rotate, nb, b)
        pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)  # each token's row of cos and sin
        cs = pos[None, :] * stride_cs + offs_i[:, None]
        c = tl.load(cos_ptr + cs, mask=m_ok[None, :], other=0.0)
        s = tl.load(sin_ptr + cs, mask=m_ok[None, :], other=0.0)
        y1 = tl.where(rotate, a * c - b * s, a).to(dtype)
        y2 = tl.where(rotate, b * c + a * s, b).to(dtype)
        tl.store(out_ptrs, y1, mask=mask)
        tl.store(out_ptrs + HALF, y2, mask=mask)
        if STORE_KV:
            slot = tl.load(slot_ptr + offs_m, mask=m_ok, other=-1).to(tl.int64)
            ok = mask & (slot >= 0)[None, :]  # < 0: a padding token, written nowhere
            if head >= num_q_heads + num_kv_heads:
                c_ptrs = vc_ptr + (head - num_q_heads - num_kv_heads) * stride_vch + slot[None, :] * stride_vcs
                tl.store(c_ptrs + offs_i[:, None], y1, mask=ok)
                tl.store(c_ptrs + HALF + offs_i[:, None], y2, mask=ok)
            elif head >= num_q_heads:
                c_ptrs = kc_ptr + (head - num_q_heads) * stride_kch + slot[None, :] * stride_kcs
                tl.store(c_ptrs + offs_i[:, None], y1, mask=ok)
                tl.store(c_ptrs + HALF + offs_i[:, None], y2, mask=ok)

    @triton.jit
    def _small_linear_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, out_ptr, sq_in_ptr, sq_out_ptr,
                             cos_ptr, sin_ptr, pos_ptr, qw_ptr, kw_ptr, kc_ptr, vc_ptr, slot_ptr,
                             M, N, K, stride_xm, stride_wn, stride_om, eps, num_sq_in,
                             stride_cs, num_q_heads, num_kv_heads, stride_kcs, stride_kch, stride_vcs, stride_vch,
                             head_eps,
                             NORM: tl.constexpr, SQ_IN: tl.constexpr, SQ_OUT: tl.constexpr,
                             GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                             RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
                             ROPE: tl.constexpr, NORM_HEADS: tl.constexpr, STORE_KV: tl.constexpr, HALF: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             NUM_STAGES: tl.constexpr, DOT_F32: tl.constexpr,
                             NORM_M: tl.constexpr, NORM_K: tl.constexpr,
                             PDL: tl.constexpr, TRIGGER: tl.constexpr,
                             PREFETCH_LINES: tl.constexpr, LINE_ELEMS: tl.constexpr):
        trigger_at(PDL, TRIGGER, 0)  # kernels.pdl: nothing before wait() reads or writes what a kernel writes
        pid = tl.program_id(0)
        if ROPE:  # BLOCK_N pairs of one head (BLOCK_N divides HALF): its rows i and HALF + i, as two tiles
            head = pid * BLOCK_N // HALF
            offs_i = pid * BLOCK_N % HALF + tl.arange(0, BLOCK_N)
            offs_n = head * (2 * HALF) + offs_i
            offs_up = offs_n + HALF
        else:
            offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_up = N + offs_n  # (GATED) up's rows are N rows below gate's
        n_ok = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        w_up = w_ptr + offs_up[:, None].to(tl.int64) * stride_wn  # (GATED, ROPE) N * stride_wn in int32 could wrap
        dtype = w_ptr.dtype.element_ty
        if PREFETCH_LINES > 0:  # (PDL) this program's weights start for L2 while the kernel before runs
            rows = tl.minimum(offs_n, N - 1)  # a partial last tile: its real rows again
            _prefetch_rows(w_ptr + rows[:, None].to(tl.int64) * stride_wn, K, PREFETCH_LINES, LINE_ELEMS)
            if GATED:
                _prefetch_rows(w_ptr + (N + rows)[:, None].to(tl.int64) * stride_wn, K, PREFETCH_LINES, LINE_ELEMS)
            if ROPE:  # (every row of a ROPE tile is real)
                _prefetch_rows(w_up, K, PREFETCH_LINES, LINE_ELEMS)
        wait(PDL)  # x, row_sq and the residual: the kernels before wrote them
        trigger_at(PDL, TRIGGER, 1)
        if NORM and SQ_IN:  # the rows' sums of squares from the kernel that wrote x: its programs' parts,
            # added in a fixed order (deterministic, unlike atomics)
            offs_p = tl.arange(0, 64)
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            for p0 in range(0, num_sq_in, 64):
                pp = p0 + offs_p
                ss += tl.sum(tl.load(sq_in_ptr + pp[:, None] * BLOCK_M + offs_m[None, :],
                                     mask=(pp < num_sq_in)[:, None], other=0.0), axis=0)
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        elif NORM:  # the rows' RMS first: every program reads all of x (M x K, from L2) in wide chunks
            # of the real rows only (NORM_M = M's power of two): one or two loads' latency, not K / BLOCK_K
            offs_nm = tl.arange(0, NORM_M)
            offs_nk = tl.arange(0, NORM_K)
            ss = tl.zeros([NORM_M], dtype=tl.float32)
            for k0 in tl.range(0, K, NORM_K, num_stages=2):
                kk = k0 + offs_nk
                xv = tl.load(x_ptr + offs_nm[:, None] * stride_xm + kk[None, :],
                             mask=(offs_nm < M)[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(xv * xv, axis=1)
            rstd_m = 1.0 / tl.sqrt(ss / K + eps)
            # onto the tile's BLOCK_M rows (rows past M: never stored)
            rstd = tl.sum(tl.where(offs_m[:, None] == offs_nm[None, :], rstd_m[None, :], 0.0), axis=1)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            kk = k0 + offs_k
            if EVEN_K:
                xv = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
                w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None], other=0.0)
            else:
                k_ok = kk < K
                xv = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:
                nw = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                xv = ((xv.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32) * nw[None, :]).to(dtype)
            xt = tl.trans(xv.to(dtype))
            if DOT_F32:  # fp32 (and the CPU interpreter, whose 16-bit dots are not the GPU's numerics)
                xt = xt.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(w, xt, acc, input_precision="ieee" if DOT_F32 else None)  # [BLOCK_N, BLOCK_M]
            if GATED or ROPE:  # the second tile: up's rows, or the heads' second halves
                if EVEN_K:
                    wu = tl.load(w_up + kk[None, :], mask=n_ok[:, None], other=0.0)
                else:
                    wu = tl.load(w_up + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                if DOT_F32:
                    wu = wu.to(tl.float32)
                acc_up = tl.dot(wu, xt, acc_up, input_precision="ieee" if DOT_F32 else None)
        trigger_at(PDL, TRIGGER, 2)  # the weights are read: the next kernel's programs may come
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if GATED or ROPE:
                acc_up += tl.load(b_ptr + offs_up, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y = acc.to(dtype).to(tl.float32)
        if GATED:
            y = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
            y = y.to(dtype).to(tl.float32)
        mask = n_ok[:, None] & m_ok[None, :]
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        if ROPE:
            _rope_epilogue(y, acc_up.to(dtype).to(tl.float32), out_ptrs, mask, head, offs_i, offs_m, m_ok,
                           cos_ptr, sin_ptr, pos_ptr, qw_ptr, kw_ptr, kc_ptr, vc_ptr, slot_ptr, stride_cs,
                           num_q_heads, num_kv_heads, stride_kcs, stride_kch, stride_vcs, stride_vch, head_eps,
                           HALF, NORM_HEADS, STORE_KV)
        elif RESIDUAL:  # out is the stream: this program's columns of it, read and written here only
            r = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
            new = (y + r).to(out_ptr.dtype.element_ty)
            tl.store(out_ptrs, new, mask=mask)
            if SQ_OUT:  # this program's part of each row's sum of squares, for the next norm
                nf = tl.where(mask, new.to(tl.float32), 0.0)
                tl.store(sq_out_ptr + pid * BLOCK_M + offs_m, tl.sum(nf * nf, axis=0))
        else:
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_row_sq(t: torch.Tensor, name: str, rows: int, like: torch.Tensor, hint: str = "") -> None:
    ok = t.dim() == 2 and t.shape[1] == MAX_TOKENS and t.shape[0] == rows
    if not ok or t.dtype != torch.float32 or not t.is_contiguous() or t.device != like.device:
        raise ValueError(f"{name} must be a contiguous float32 [{rows}, {MAX_TOKENS}] tensor on {like.device} (parts of "
                         f"each row's sum of squares{hint}), got {tuple(t.shape)} {t.dtype} on {t.device}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """(first byte, past the last byte) of a tensor of contiguous rows."""
    rows = t.shape[0] if t.dim() == 2 else 1
    width = t.shape[-1] * t.element_size()
    lo = t.data_ptr()
    return lo, lo + ((rows - 1) * t.stride(0) * t.element_size() if rows > 1 else 0) + width


def _check_aliasing(x, residual, row_sq, row_sq_out) -> None:
    """Each program writes its columns of ``residual`` (its row of ``row_sq_out``) while the others read
    all of ``x`` (every row of ``row_sq``): memory both written and read races (x += x @ W^T). By byte
    spans, a few attribute reads; rows interleaved without sharing an element are refused too."""
    for wname, w, rname, r in (("residual", residual, "x", x), ("row_sq_out", row_sq_out, "row_sq", row_sq)):
        if w is None or r is None or not w.numel() or not r.numel():
            continue
        (w0, w1), (r0, r1) = _span(w), _span(r)
        if w.device == r.device and w0 < r1 and r0 < w1:
            raise ValueError(f"{wname} shares memory with {rname}: the kernel writes it while other programs read "
                             f"{rname} (a race); pass a copy of {rname}")
    if residual is not None and residual.shape[0] > 1 and residual.stride(0) < residual.shape[1]:
        raise ValueError(f"residual's rows overlap (strides {residual.stride()}): its programs would write one element "
                         "twice; pass a tensor with a row stride of at least its width")


def _check(x, weight, bias, norm_weight, gated, residual) -> int:
    """Shapes, strides, dtypes and devices the kernel reads; returns N (output columns)."""
    _check_rows(x, "x")
    _check_rows(weight, "weight")
    if x.dtype not in DTYPES or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"x and weight must be bf16, fp16 or fp32 of one dtype on one device, got {x.dtype} on {x.device} "
                         f"and {weight.dtype} on {weight.device}")
    if not 0 < x.shape[0] <= MAX_TOKENS:
        raise ValueError(f"small_linear takes 1 to {MAX_TOKENS} rows of x, got {x.shape[0]} (larger batches: F.linear)")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must have x's {x.shape[1]} columns")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"gated: weight must be [2n, K] (gate's rows then up's), got {weight.shape[0]} rows")
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    for name, v, size in (("bias", bias, weight.shape[0]), ("norm_weight", norm_weight, x.shape[1])):
        if v is not None:
            _check_vector(v, name, size, x)
            if v.dtype != x.dtype:  # the reference (F.linear, rms_norm_ref) takes x's dtype only
                raise ValueError(f"{name} must be {x.dtype} like x and weight, got {v.dtype}")
    if residual is not None:
        _check_rows(residual, "residual")
        if residual.shape != (x.shape[0], n) or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must be [{x.shape[0]}, {n}] of {x.dtype} on {x.device}, "
                             f"got {tuple(residual.shape)} {residual.dtype} on {residual.device}")
    return n


def _tiles(n: int, k: int, device: torch.device, gated: bool, config: LinearConfig | None,
           rope: RopeEpilogue | None = None) -> LinearConfig:
    """``config``, or the default tiles for this device."""
    from kernels.attention_config import device_sms

    if config:
        return config
    if rope is not None:
        return choose_rope_config(n, k, device_sms(device), rope.head_dim, rope.norm)
    return choose_config(n, k, device_sms(device), gated)


def num_programs(n: int, k: int, device: torch.device, gated: bool = False, config: LinearConfig | None = None) -> int:
    """Programs (``row_sq_out`` rows) of a ``small_linear`` of N output columns over K with ``config``'s
    tiles (None: the default ones, as ``small_linear`` picks them)."""
    return triton.cdiv(n, _tiles(n, k, device, gated, config).block_n)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 1e-6, gated: bool = False,
                 residual: torch.Tensor | None = None, row_sq: torch.Tensor | None = None,
                 row_sq_out: torch.Tensor | None = None, config: LinearConfig | None = None,
                 rope: RopeEpilogue | None = None) -> torch.Tensor:
    """``small_linear_ref`` in one kernel, for 1 to ``MAX_TOKENS`` rows of ``x``. With ``residual``
    the result is added into it in place and it is returned; else a new ``[M, N]`` tensor.

    ``row_sq_out`` (with ``residual``): each program writes its part of each new residual row's sum of
    squares into its row (float32 ``[num_programs(..., config=config), 16]``: exactly the grid's rows, so
    that no stale row of an earlier launch is summed); the next kernel's norm takes them as ``row_sq``
    instead of reading all of x first.

    ``rope`` (``small_linear_rope.RopeEpilogue``; the qkv projection): q and k come out (per-head normed
    and) rotated, and k and v are also written into ``rope.cache`` at its slots, as ``small_linear_ref``
    then ``fused_ops.qk_norm_rope_`` would (caches of x's dtype only: fp8 ones quantize, ``write_kv``)."""
    n = _check(x, weight, bias, norm_weight, gated, residual)
    if rope is not None:
        small_linear_rope.check(rope, x, weight, gated, residual)
    m, k = x.shape
    cfg = _tiles(n, k, x.device, gated, config, rope)
    if rope is not None:
        small_linear_rope.check_tiles(rope, cfg.block_n)
    grid = (n // 2) // cfg.block_n if rope is not None else triton.cdiv(n, cfg.block_n)
    if row_sq is not None:
        if norm_weight is None:
            raise ValueError("row_sq gives the norm's sums of squares: pass norm_weight too")
        # any number of parts, at least one: with none the norm would divide by sqrt(eps) alone
        _check_row_sq(row_sq, "row_sq", max(row_sq.shape[0], 1) if row_sq.dim() == 2 else 1, x,
                      hint="; at least one row: the parts the kernel before wrote")
    if row_sq_out is not None:
        if residual is None:
            raise ValueError("row_sq_out sums the squares of the new residual rows: pass residual too")
        # exactly: the next norm sums every row of it, and rows past this grid would hold stale parts
        # (a buffer sized by num_programs' default tiles, launched with another config=)
        _check_row_sq(row_sq_out, "row_sq_out", grid, x, hint="; rows: num_programs(n, k, device, gated, config)")
    _check_aliasing(x, residual, row_sq, row_sq_out)
    out = residual if residual is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    on = pdl.enabled(x.device)
    _small_linear_kernel[(grid,)](
        x, weight, bias if bias is not None else weight, norm_weight if norm_weight is not None else weight,
        out, row_sq if row_sq is not None else x, row_sq_out if row_sq_out is not None else x,
        M=m, N=n, K=k, stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_om=out.stride(0), eps=eps,
        num_sq_in=row_sq.shape[0] if row_sq is not None else 0, **small_linear_rope.kernel_args(rope, x),
        NORM=norm_weight is not None, SQ_IN=row_sq is not None, SQ_OUT=row_sq_out is not None,
        GATED=gated, HAS_BIAS=bias is not None, RESIDUAL=residual is not None,
        EVEN_K=k % cfg.block_k == 0, BLOCK_M=MAX_TOKENS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NUM_STAGES=cfg.num_stages, DOT_F32=x.device.type == "cpu" or x.dtype == torch.float32,
        NORM_M=triton.next_power_of_2(m), NORM_K=min(triton.next_power_of_2(k), NORM_ELEMENTS // triton.next_power_of_2(m)),
        PDL=on, TRIGGER=pdl.TRIGGER,
        PREFETCH_LINES=pdl.prefetch_lines(weight.shape[0], k * weight.element_size()) if on else 0,
        LINE_ELEMS=pdl.LINE // weight.element_size(), num_warps=cfg.num_warps, **pdl.launch_kwargs(on))
    return out
