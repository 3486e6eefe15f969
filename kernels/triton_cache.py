"""Triton kernels that move KV rows: the write through ``slot_mapping`` and block copies.

Caches are ``[num_slots, num_kv_heads, head_dim]`` views whose slot and head strides are
arbitrary (a layer-interleaved buffer gives a slot stride of ``layers * 2 * H * D``); only
``head_dim`` is contiguous. Every kernel takes the strides as arguments and computes
addresses in int64, because ``slot * slot_stride`` overflows int32 on caches of a few GB.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import value_checks

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_CACHE_DTYPES = _FLOAT_DTYPES + _FP8_DTYPES  # block copies move bytes: any of them
_MAX_TILE = 4096  # elements per program tile: big enough for wide 16-byte accesses


def _pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(n)


def _check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 3:
        raise ValueError(f"{name} must be [num_slots, num_kv_heads, head_dim], got {tuple(cache.shape)}")
    if cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"{name} dtype {cache.dtype} not supported (fp16, bf16, fp32, fp8 e4m3/e5m2)")
    if cache.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous along head_dim, got strides {cache.stride()}")


def _check_ids(name: str, ids: torch.Tensor, device: torch.device) -> None:
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device}, cache on {device}")
    if ids.numel() > 1 and ids.stride(0) != 1:  # the kernels read element i at ids + i
        raise ValueError(f"{name} must be contiguous, got stride {ids.stride(0)} (pass {name}.contiguous())")


# ----------------------------------------------------------------------------- write_kv


@triton.jit
def _fp8_grid(x, MANT: tl.constexpr, SUB: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even on the fp8 grid (MANT mantissa bits, subnormal
    step SUB), so the cast after it is exact everywhere: the GPU's cast rounds the same way,
    Triton's CPU interpreter mis-rounds where the mantissa carries into the exponent."""
    u = x.to(tl.int32, bitcast=True)
    drop: tl.constexpr = 23 - MANT
    lsb = (u >> drop) & 1
    u = (u + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)  # a carry bumps the exponent
    normal = u.to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2**23: adding it rounds an fp32 to an integer, nearest-even
    sub = ((x / SUB + magic) - magic) * SUB
    return tl.where(tl.abs(x) < SUB * (1 << MANT), sub, normal)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8_MAX: tl.constexpr,  # > 0: fp8 cache, store value / scale[head] saturated to +-FP8_MAX
    FP8_MANT: tl.constexpr, FP8_SUB: tl.constexpr,  # its mantissa bits and subnormal step
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token: nothing to write
        return
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tok64 = tok.to(tl.int64)
    k = tl.load(k_ptr + tok64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + tok64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if FP8_MAX > 0:
        h_ok = offs_h < num_heads
        ks = tl.load(ks_ptr + offs_h, mask=h_ok, other=1.0)
        vs = tl.load(vs_ptr + offs_h, mask=h_ok, other=1.0)
        k = _fp8_grid(tl.clamp(k.to(tl.float32) / ks[:, None], -FP8_MAX, FP8_MAX), FP8_MANT, FP8_SUB)
        v = _fp8_grid(tl.clamp(v.to(tl.float32) / vs[:, None], -FP8_MAX, FP8_MAX), FP8_MANT, FP8_SUB)
    tl.store(
        kc_ptr + slot * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :],
        k.to(kc_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        vc_ptr + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
        v.to(vc_ptr.dtype.element_ty),
        mask=mask,
    )


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter ``k, v [num_tokens, H, D]`` into the caches at ``slot_mapping`` (< 0: skip);
    fp8 caches store ``value / scale[head]`` (``k_scale``, ``v_scale``: fp32 ``[H]``)."""
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache "
                         f"{tuple(v_cache.shape)} {v_cache.dtype} differ")
    num_slots, num_heads, head_dim = k_cache.shape
    fp8 = k_cache.dtype in _FP8_DTYPES
    if fp8:
        check_scales(k_scale, v_scale, num_heads, k_cache.device)
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[1:] != (num_heads, head_dim):
            raise ValueError(f"{name} must be [num_tokens, {num_heads}, {head_dim}], got {tuple(t.shape)}")
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim, got strides {t.stride()}")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device}, cache on {k_cache.device}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} not supported")
    num_tokens = k.shape[0]
    if v.shape[0] != num_tokens or slot_mapping.shape != (num_tokens,):
        raise ValueError(
            f"k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping {tuple(slot_mapping.shape)} "
            "must agree on num_tokens"
        )
    _check_ids("slot_mapping", slot_mapping, k_cache.device)
    if value_checks.active():  # KVLAB_KERNEL_CHECKS=1: reads the slots back (a sync)
        value_checks.slots("slot_mapping", slot_mapping, num_slots, padding=True)
    if num_tokens == 0:
        return
    block_d = max(16, _pow2(head_dim))
    block_h = min(_pow2(num_heads), max(1, _MAX_TILE // block_d))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _write_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,  # unused unless fp8
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        num_heads,
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        FP8_MAX=float(torch.finfo(k_cache.dtype).max) if fp8 else 0.0,
        FP8_MANT=3 if k_cache.dtype == torch.float8_e4m3fn else 2,
        FP8_SUB=2.0**-9 if k_cache.dtype == torch.float8_e4m3fn else 2.0**-16,
        num_warps=4,
    )


def check_scales(k_scale, v_scale, num_heads: int, device: torch.device) -> None:
    """fp8 caches need fp32 ``[num_kv_heads]`` scales for K and V on the cache's device."""
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None:
            raise ValueError(f"an fp8 cache needs {name} (fp32 [{num_heads}]): dequantized = stored x scale")
        if t.shape != (num_heads,) or t.dtype != torch.float32 or t.device != device or t.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous fp32 [{num_heads}] tensor on {device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")


# ----------------------------------------------------------------------------- block copies


@triton.jit
def _copy_rows_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    stride_ss, stride_sh, stride_ds, stride_dh,
    block_size, num_heads,
    SRC_BLOCKED: tl.constexpr, DST_BLOCKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Copy token rows of block ``i``: from ``src_ids[i]`` (or dense row ``i``) to
    ``dst_ids[i]`` (or dense row ``i``). One program: BLOCK_T tokens x BLOCK_H heads."""
    i = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    # flatten (head, dim) into one axis so a tile is one wide, contiguous-per-head load
    offs_hd = tl.arange(0, BLOCK_H * BLOCK_D)
    offs_h = tl.program_id(2) * BLOCK_H + offs_hd // BLOCK_D
    offs_d = offs_hd % BLOCK_D
    if SRC_BLOCKED:
        src_block = tl.load(src_ids_ptr + i).to(tl.int64)
    else:
        src_block = i.to(tl.int64)
    if DST_BLOCKED:
        dst_block = tl.load(dst_ids_ptr + i).to(tl.int64)
    else:
        dst_block = i.to(tl.int64)
    src_rows = src_block * block_size + offs_t
    dst_rows = dst_block * block_size + offs_t
    mask = (offs_t < block_size)[:, None] & ((offs_h < num_heads) & (offs_d < HEAD_DIM))[None, :]
    x = tl.load(src_ptr + src_rows[:, None] * stride_ss + (offs_h * stride_sh + offs_d)[None, :], mask=mask)
    tl.store(
        dst_ptr + dst_rows[:, None] * stride_ds + (offs_h * stride_dh + offs_d)[None, :],
        x.to(dst_ptr.dtype.element_ty),
        mask=mask,
    )


def _copy_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: torch.Tensor | None,
    dst_ids: torch.Tensor | None,
    num_blocks: int,
    block_size: int,
) -> None:
    if num_blocks == 0:
        return
    _, num_heads, head_dim = src.shape
    block_d = max(16, _pow2(head_dim))
    block_h = min(_pow2(num_heads), max(1, _MAX_TILE // block_d))
    block_t = min(_pow2(block_size), max(1, _MAX_TILE // (block_h * block_d)))
    dummy = src_ids if src_ids is not None else dst_ids  # unused pointer for dense sides
    grid = (num_blocks, triton.cdiv(block_size, block_t), triton.cdiv(num_heads, block_h))
    _copy_rows_kernel[grid](
        src, dst,
        src_ids if src_ids is not None else dummy,
        dst_ids if dst_ids is not None else dummy,
        src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
        block_size, num_heads,
        SRC_BLOCKED=src_ids is not None, DST_BLOCKED=dst_ids is not None,
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4,
    )


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_dense(name: str, buf: torch.Tensor, cache: torch.Tensor, rows: int) -> None:
    if buf.dim() != 3 or buf.shape != (rows, cache.shape[1], cache.shape[2]):
        raise ValueError(
            f"{name} must be [{rows}, {cache.shape[1]}, {cache.shape[2]}] "
            f"(n_blocks * block_size rows), got {tuple(buf.shape)}"
        )
    if buf.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous along head_dim, got strides {buf.stride()}")
    if buf.dtype not in _CACHE_DTYPES:
        raise ValueError(f"{name} dtype {buf.dtype} not supported")


def copy_blocks(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_size: int) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` inside one cache (copy-on-write).

    The destination blocks must not also be sources (true for copy-on-write, where the
    destination is freshly allocated): programs run concurrently, so an overlap would race.
    """
    _check_cache("cache", cache)
    _check_ids("src", src, cache.device)
    _check_ids("dst", dst, cache.device)
    _check_block_size(block_size)
    if src.shape != dst.shape:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must have the same length")
    if value_checks.active():  # KVLAB_KERNEL_CHECKS=1: reads the ids back (a sync)
        value_checks.blocks("src", src, cache.shape[0], block_size)
        value_checks.blocks("dst", dst, cache.shape[0], block_size)
        if set(src.tolist()) & set(dst.tolist()):
            raise ValueError("copy_blocks: a dst block is also a src block (the copies would race)")
    _copy_rows(cache, cache, src, dst, src.shape[0], block_size)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, block_size: int, out: torch.Tensor) -> None:
    """Gather blocks into a dense buffer ``out [n * block_size, H, D]`` (swap-out staging)."""
    _check_cache("cache", cache)
    _check_ids("block_ids", block_ids, cache.device)
    _check_block_size(block_size)
    _check_dense("out", out, cache, block_ids.shape[0] * block_size)
    if value_checks.active():  # KVLAB_KERNEL_CHECKS=1: reads the ids back (a sync)
        value_checks.blocks("block_ids", block_ids, cache.shape[0], block_size)
    if out.device != cache.device:
        # swap-out to host memory: gather on the device, then one bulk transfer
        staged = torch.empty(out.shape, dtype=out.dtype, device=cache.device)
        _copy_rows(cache, staged, block_ids, None, block_ids.shape[0], block_size)
        out.copy_(staged)
        return
    _copy_rows(cache, out, block_ids, None, block_ids.shape[0], block_size)


def scatter_blocks(cache: torch.Tensor, block_ids: torch.Tensor, block_size: int, src: torch.Tensor) -> None:
    """Scatter a dense buffer ``src [n * block_size, H, D]`` into blocks (swap-in)."""
    _check_cache("cache", cache)
    _check_ids("block_ids", block_ids, cache.device)
    _check_block_size(block_size)
    _check_dense("src", src, cache, block_ids.shape[0] * block_size)
    if value_checks.active():  # KVLAB_KERNEL_CHECKS=1: reads the ids back (a sync)
        value_checks.blocks("block_ids", block_ids, cache.shape[0], block_size)
    if src.device != cache.device:  # swap-in from host memory: one bulk transfer first
        src = src.to(cache.device)
    _copy_rows(src, cache, None, block_ids, block_ids.shape[0], block_size)


# ----------------------------------------------------------------------------- all layers at once


@triton.jit
def _layers_copy_kernel(
    ptrs_ptr, stage_ptr, slots_ptr,
    num_rows, block_size, row_elems, num_caches,
    TO_STAGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Rows of cache ``c`` (K or V of one layer: its base address is ``ptrs[c]``) at ``slots``
    to or from ``stage [n, num_caches, block_size, row]``: row r of the slot list is token
    ``r % block_size`` of block ``r // block_size``. One launch moves every layer's rows."""
    c = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    ok = (rows < num_rows)[:, None] & (e < row_elems)[None, :]
    base = tl.load(ptrs_ptr + c).to(tl.pointer_type(stage_ptr.dtype.element_ty))
    slot = tl.load(slots_ptr + rows, mask=rows < num_rows, other=0).to(tl.int64)
    r64 = rows.to(tl.int64)
    staged = ((r64 // block_size * num_caches + c) * block_size + r64 % block_size) * row_elems
    cache_at = base + slot[:, None] * row_elems + e[None, :]
    stage_at = stage_ptr + staged[:, None] + e[None, :]
    if TO_STAGE:
        tl.store(stage_at, tl.load(cache_at, mask=ok), mask=ok)
    else:
        tl.store(cache_at, tl.load(stage_at, mask=ok), mask=ok)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def layer_pointers(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Base addresses of every layer's K and V (int64 on their device), for gather/scatter_layers."""
    first = caches[0][0]
    for k, v in caches:
        for c in (k, v):
            _check_cache("cache", c)
            if not c.is_contiguous():
                raise ValueError("gather/scatter_layers need contiguous [num_slots, H, D] caches")
            # one launch moves every layer with the first cache's row size and dtype
            if c.shape != first.shape or c.dtype != first.dtype or c.device != first.device:
                raise ValueError(f"gather/scatter_layers need every layer's K and V alike: {tuple(first.shape)} "
                                 f"{first.dtype} on {first.device}, got {tuple(c.shape)} {c.dtype} on {c.device}")
    return torch.tensor([t.data_ptr() for kv in caches for t in kv], dtype=torch.int64, device=caches[0][0].device)


def _layers_copy(ptrs: torch.Tensor, like: torch.Tensor, stage: torch.Tensor, slots: torch.Tensor,
                 block_size: int, to_stage: bool) -> None:
    num_caches = ptrs.shape[0]
    row = like.shape[1] * like.shape[2]
    n_rows = slots.shape[0]
    _check_block_size(block_size)
    if n_rows % block_size:  # the stage holds whole blocks: a partial one would be written past its end
        raise ValueError(f"slots must be whole blocks: {n_rows} slots is not a multiple of block_size {block_size}")
    if stage.shape != (n_rows // block_size, num_caches // 2, 2, block_size, like.shape[1], like.shape[2]) \
            or stage.dtype != like.dtype or not stage.is_contiguous():
        raise ValueError(f"stage must be a contiguous [n, layers, 2, {block_size}, H, D] {like.dtype} tensor, "
                         f"got {tuple(stage.shape)} {stage.dtype}")
    _check_ids("slots", slots, like.device)
    if value_checks.active():  # KVLAB_KERNEL_CHECKS=1: reads the slots back (a sync)
        value_checks.slots("slots", slots, like.shape[0])
    if n_rows == 0:
        return
    block_e = _pow2(row)
    block_t = max(1, min(16, _MAX_TILE // block_e))
    grid = (triton.cdiv(n_rows, block_t), num_caches)
    _layers_copy_kernel[grid](
        ptrs, stage.view(_INT_OF_SIZE[stage.element_size()]), slots,
        n_rows, block_size, row, num_caches,
        TO_STAGE=to_stage, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4,
    )


def _pointers(caches, ptrs) -> torch.Tensor:
    if ptrs is None:
        return layer_pointers(caches)
    if ptrs.shape != (2 * len(caches),) or ptrs.dtype != torch.int64 or ptrs.device != caches[0][0].device:
        raise ValueError(f"ptrs must be layer_pointers(caches): int64 [{2 * len(caches)}] on {caches[0][0].device}, "
                         f"got {tuple(ptrs.shape)} {ptrs.dtype} on {ptrs.device}")
    return ptrs


def gather_layers(caches, slots: torch.Tensor, block_size: int, out: torch.Tensor, ptrs=None) -> None:
    """``out [n, layers, 2, block_size, H, D]`` = every layer's K and V rows at ``slots``
    (``n * block_size`` flat slots, block by block) in one launch."""
    _layers_copy(_pointers(caches, ptrs), caches[0][0], out, slots, block_size, True)


def scatter_layers(caches, slots: torch.Tensor, block_size: int, src: torch.Tensor, ptrs=None) -> None:
    """The inverse of gather_layers: ``src`` rows into every layer's K and V at ``slots``."""
    _layers_copy(_pointers(caches, ptrs), caches[0][0], src, slots, block_size, False)
