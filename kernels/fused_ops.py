"""Fused elementwise ops of the decoder layer for the GPU path (fewer launches per layer).

A decode step of a small model is bound by kernel count, not bytes: each op below replaces
several eager kernels. Numerics follow HF's bf16 rounding points (normalise in fp32, round,
then scale by the weight; add the residual in the activation dtype). Each has a torch
reference here, used on CPU and as the test oracle.
"""
from __future__ import annotations

import torch

from kernels import pdl, value_checks

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references still work
    triton = None


# -- torch references -----------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return w * y


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float):
    """Returns (norm(x + residual), x + residual)."""
    h = x + residual
    return rms_norm_ref(h, w, eps), h


def qk_norm_rope_ref(q, k, cos, sin, positions, q_w=None, k_w=None, eps=1e-6):
    """Per-head RMSNorm (when weights are given) then rotate-half RoPE; returns new q, k."""
    if q_w is not None:
        q, k = rms_norm_ref(q, q_w, eps), rms_norm_ref(k, k_w, eps)
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)

    def rot(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# -- Triton kernels -----------------------------------------------------------------------------
if triton is not None:
    from kernels.pdl import enter as pdl_enter

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(res_ptr + row * stride_r + cols, x, mask=mask)  # the residual stream, in place
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        y = (xf * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_heads(base, stride_h, num_heads, w_ptr, c, s, eps,
                         HALF: tl.constexpr, HP: tl.constexpr, NORM: tl.constexpr):
        """One token's ``num_heads`` heads at ``base`` (a [HP, HALF] tile per half), in place."""
        heads = tl.arange(0, HP)[:, None]
        offs = tl.arange(0, HALF)[None, :]
        mask = heads < num_heads
        p = base + heads * stride_h + offs
        x1 = tl.load(p, mask=mask, other=0.0)
        x2 = tl.load(p + HALF, mask=mask, other=0.0)
        dtype = x1.dtype
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        if NORM:
            rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF) + eps)
            w1 = tl.load(w_ptr + offs).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + offs).to(tl.float32)
            a = ((a * rstd[:, None]).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
            b = ((b * rstd[:, None]).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        y1 = (a * c - b * s).to(dtype)
        y2 = (b * c + a * s).to(dtype)
        tl.store(p, y1, mask=mask)
        tl.store(p + HALF, y2, mask=mask)
        return y1, y2

    @triton.jit
    def _qk_norm_rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, qw_ptr, kw_ptr,
                             v_ptr, kc_ptr, vc_ptr, slot_ptr,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_cs, num_q_heads, num_k_heads, eps,
                             stride_vt, stride_vh, stride_kcs, stride_kch, stride_vcs, stride_vch,
                             HALF: tl.constexpr, HQP: tl.constexpr, HKP: tl.constexpr, NORM: tl.constexpr,
                             STORE: tl.constexpr, PDL: tl.constexpr = False, TRIGGER: tl.constexpr = 2):
        # one program a token, all its heads: a program a head (40 x 256 of them in a llama3-8b
        # step of 256 sequences) spent its time being scheduled, not moving its 256 bytes.
        # STORE: the rotated k and v go to the cache slot too (one kernel a layer fewer)
        pdl_enter(PDL, TRIGGER)  # kernels.pdl (TRIGGER_END: at exit)
        t = tl.program_id(0).to(tl.int64)  # t x the qkv row stride passes 2**31 from ~200k tokens (70B)
        pos = tl.load(pos_ptr + t)
        offs = tl.arange(0, HALF)[None, :]
        c = tl.load(cos_ptr + pos * stride_cs + offs)
        s = tl.load(sin_ptr + pos * stride_cs + offs)
        _norm_rope_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, qw_ptr, c, s, eps, HALF, HQP, NORM)
        k1, k2 = _norm_rope_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, kw_ptr, c, s, eps, HALF, HKP, NORM)
        if STORE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:  # < 0: a padding token, written nowhere
                heads = tl.arange(0, HKP)[:, None]
                mask = heads < num_k_heads
                kc = kc_ptr + slot * stride_kcs + heads * stride_kch + offs
                tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=mask)
                tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mask)
                vp = v_ptr + t * stride_vt + heads * stride_vh + offs
                vc = vc_ptr + slot * stride_vcs + heads * stride_vch + offs
                tl.store(vc, tl.load(vp, mask=mask), mask=mask)
                tl.store(vc + HALF, tl.load(vp + HALF, mask=mask), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        u = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (s * u.to(tl.float32)).to(g.dtype), mask=mask)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be 2-D with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")


def _check_vector(w: torch.Tensor, name: str, n: int, like: torch.Tensor) -> None:
    """A per-column weight the kernels read at ``w + i`` for ``i < n``."""
    if w.shape != (n,) or (n > 1 and w.stride(0) != 1) or w.device != like.device:
        raise ValueError(f"{name} must be a contiguous [{n}] tensor on {like.device}, "
                         f"got {tuple(w.shape)} strides {w.stride()} on {w.device}")


def check_rope_tables(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, tokens: int, head_dim: int,
                      device: torch.device) -> None:
    """RoPE's inputs as the kernels read them: one int position a token, ``cos`` and ``sin`` tables of
    ``head_dim / 2`` columns read with cos's strides (``KVLAB_KERNEL_CHECKS``: every position a row)."""
    if positions.shape != (tokens,) or (tokens > 1 and positions.stride(0) != 1) \
            or positions.dtype not in (torch.int32, torch.int64) or positions.device != device:
        raise ValueError(f"positions must be a contiguous int32/int64 [{tokens}] tensor on {device}, one a token, "
                         f"got {tuple(positions.shape)} {positions.dtype} strides {positions.stride()} on "
                         f"{positions.device}")
    if cos.dim() != 2 or cos.shape[1] != head_dim // 2 or cos.stride(1) != 1 or cos.device != device:
        raise ValueError(f"cos must be [max_positions, {head_dim // 2}] with contiguous rows on {device}, "
                         f"got {tuple(cos.shape)} strides {cos.stride()} on {cos.device}")
    if sin.shape != cos.shape or sin.stride() != cos.stride() or sin.device != cos.device:
        raise ValueError(f"sin must be shaped and strided like cos {tuple(cos.shape)} {cos.stride()} (the kernel "
                         f"reads both with cos's strides), got {tuple(sin.shape)} {sin.stride()}")
    if tokens and value_checks.active():  # KVLAB_KERNEL_CHECKS=1: reads the positions back (a sync)
        value_checks.slots("positions", positions, cos.shape[0], rows="cos and sin's rows")


def check_head_norm(q_w: torch.Tensor | None, k_w: torch.Tensor | None, head_dim: int, like: torch.Tensor,
                    names: tuple[str, str] = ("q_w", "k_w")) -> None:
    """The per-head RMSNorm's weights: both or neither, each a contiguous ``[head_dim]`` vector."""
    if (q_w is None) != (k_w is None):
        raise ValueError(f"{names[0]} and {names[1]}: both (per-head RMSNorm) or neither")
    if q_w is not None:
        _check_vector(q_w, names[0], head_dim, like)
        _check_vector(k_w, names[1], head_dim, like)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of rows of ``x`` (of ``x + residual``, stored back into ``residual``, when given)."""
    _check_rows(x, "x")
    if residual is not None:
        _check_rows(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    _check_vector(w, "w", x.shape[1], x)
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    n = x.shape[1]
    res = residual if residual is not None else x
    _rms_norm_kernel[(x.shape[0],)](x, res, w, out, x.stride(0), res.stride(0), out.stride(0), n, eps,
                                    HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
                                    num_warps=4 if n >= 1024 else 1)
    return out


def qk_norm_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, q_w: torch.Tensor | None = None, k_w: torch.Tensor | None = None,
                  eps: float = 1e-6, cache: tuple | None = None) -> None:
    """In place on ``q [T, Hq, D]`` and ``k [T, Hkv, D]``: optional per-head RMSNorm, then RoPE.
    ``cache`` = (v, k_cache, v_cache, slots): also write the rotated k and v at ``slots`` (< 0:
    nowhere), as ``kernels.write_kv`` would for a cache of k's dtype."""
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on tokens and head_dim, "
                         "contiguous along head_dim")
    if d % 2 or d & (d - 1):
        raise ValueError(f"head_dim {d} must be a power of two")
    check_rope_tables(cos, sin, positions, t, d, q.device)
    check_head_norm(q_w, k_w, d, q)
    if t == 0:
        return
    norm = q_w is not None
    hk = k.shape[1]
    store = cache is not None
    if store:
        v, k_cache, v_cache, slots = cache
        _check_store(k, v, k_cache, v_cache, slots)
    else:
        v = k_cache = v_cache = slots = positions  # unused
    on = pdl.enabled(q.device)
    _qk_norm_rope_kernel[(t,)](
        q, k, cos, sin, positions, q_w if norm else cos, k_w if norm else cos, v, k_cache, v_cache, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), hq, hk, eps,
        *(v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1))
        if store else (0,) * 6,
        HALF=d // 2, HQP=triton.next_power_of_2(hq), HKP=triton.next_power_of_2(hk), NORM=norm, STORE=store,
        PDL=on, TRIGGER=pdl.TRIGGER, num_warps=4 if hq * d >= 2048 else 1, **pdl.launch_kwargs(on))


def _check_store(k, v, k_cache, v_cache, slots) -> None:
    """What ``qk_norm_rope_(cache=...)`` writes: v like k, caches [slots, heads, head_dim] of k's
    dtype (fp8 caches quantize: ``kernels.write_kv``), one int slot a token."""
    if v.shape != k.shape or v.stride(2) != 1:
        raise ValueError(f"v {tuple(v.shape)} must be shaped like k {tuple(k.shape)}, contiguous along head_dim")
    check_cache_store(k_cache, v_cache, slots, *k.shape, k.dtype, k.device)


def check_cache_store(k_cache, v_cache, slots, tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device) -> None:
    """Caches a kernel writes ``tokens`` rows of k and v into as they are (no quantization): [num_slots,
    kv_heads, head_dim] of ``dtype``, one int slot a token (< 0: nowhere; ``KVLAB_KERNEL_CHECKS``: the
    others inside the cache)."""
    from kernels.triton_cache import _check_cache, _check_ids  # write_kv's own checks

    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_cache(name, c)
        if c.shape[1:] != (kv_heads, head_dim) or c.dtype != dtype or c.device != device:
            raise ValueError(f"{name} must be [num_slots, {kv_heads}, {head_dim}] of {dtype} on {device}, "
                             f"got {tuple(c.shape)} {c.dtype} on {c.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _check_ids("slots", slots, device)
    if slots.shape != (tokens,):
        raise ValueError(f"slots must be [{tokens}], one slot a token, got {tuple(slots.shape)}")
    if value_checks.active():
        value_checks.slots("slots", slots, k_cache.shape[0], padding=True)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :n]) * x[:, n:]`` for ``x [T, 2n]``."""
    _check_rows(x, "x")
    if x.shape[1] % 2:
        raise ValueError(f"x must be [T, 2n] (gate then up), got an odd width {x.shape[1]}")
    n = x.shape[1] // 2
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block = 1024
    _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block)
    return out
