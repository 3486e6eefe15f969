"""The RoPE epilogue of ``kernels.small_linear``: the qkv GEMV writes q and k already (normed and)
rotated, and k and v into the KV cache, so ``fused_ops.qk_norm_rope_`` (a launch a layer, bound by
latency at decode batch sizes) is not needed.

In ROPE mode a program owns ``block_n`` *pairs* (i, HALF + i) of one head instead of ``block_n`` rows:
its two weight tiles are that head's rows ``head * D + i`` and ``head * D + HALF + i``, accumulated as
the gated mode accumulates gate's and up's, so the weight is the fused ``qkv_proj`` as it is. Heads
``0..Hq-1`` are q, the next ``Hk`` k, the rest v (not rotated). Numerics are ``qk_norm_rope_``'s.

Here: the epilogue's arguments (``RopeEpilogue``), their checks, the torch reference and the kernel's
launch arguments; the kernel and its tiles are in ``kernels.small_linear``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import fused_ops

MIN_HEAD_DIM = 32  # a program's tiles are >= 16 pairs (tl.dot's smallest side) within one half-head


@dataclass(frozen=True)
class RopeEpilogue:
    """What ``small_linear(..., rope=)`` needs to rotate (and norm) q and k and store k and v."""
    cos: torch.Tensor  # [max_positions, head_dim / 2], the rope module's fp32 tables
    sin: torch.Tensor
    positions: torch.Tensor  # int32/int64 [M]: each token's position (a row of cos and sin)
    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    q_norm_w: torch.Tensor | None = None  # per-head RMSNorm (Qwen3): both weights [head_dim] or neither
    k_norm_w: torch.Tensor | None = None
    eps: float = 1e-6  # the per-head norm's
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (k_cache, v_cache, slots); slot < 0: none

    @property
    def half(self) -> int:
        return self.head_dim // 2

    @property
    def norm(self) -> bool:
        return self.q_norm_w is not None

    @property
    def width(self) -> int:
        """Output columns: q's, k's and v's heads."""
        return (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim


def check(rope: RopeEpilogue, x: torch.Tensor, weight: torch.Tensor, gated: bool, residual) -> None:
    """Every input of the epilogue, before any launch (``small_linear``'s own checks ran first)."""
    if not isinstance(rope, RopeEpilogue):
        raise ValueError(f"rope must be a small_linear_rope.RopeEpilogue, got {type(rope).__name__}")
    if gated or residual is not None:
        raise ValueError("rope= rotates the qkv projection's output: it takes neither gated=True nor residual=")
    d = rope.head_dim
    if not isinstance(d, int) or d < MIN_HEAD_DIM or d & (d - 1):
        raise ValueError(f"rope.head_dim must be a power of two of at least {MIN_HEAD_DIM}, got {d!r}")
    for name in ("num_q_heads", "num_kv_heads"):
        if not isinstance(getattr(rope, name), int) or getattr(rope, name) < 1:
            raise ValueError(f"rope.{name} must be a positive int, got {getattr(rope, name)!r}")
    if weight.shape[0] != rope.width:
        raise ValueError(f"weight must have (num_q_heads + 2 * num_kv_heads) * head_dim = ({rope.num_q_heads} + 2 * "
                         f"{rope.num_kv_heads}) * {d} = {rope.width} rows (q's, k's and v's), got {weight.shape[0]}")
    m = x.shape[0]
    fused_ops.check_rope_tables(rope.cos, rope.sin, rope.positions, m, d, x.device)
    fused_ops.check_head_norm(rope.q_norm_w, rope.k_norm_w, d, x, names=("rope.q_norm_w", "rope.k_norm_w"))
    for name, w in (("rope.q_norm_w", rope.q_norm_w), ("rope.k_norm_w", rope.k_norm_w)):
        if w is not None and w.dtype != x.dtype:  # the reference's norm takes x's dtype only
            raise ValueError(f"{name} must be {x.dtype} like x, got {w.dtype}")
    if rope.cache is not None:
        if not isinstance(rope.cache, tuple) or len(rope.cache) != 3:
            raise ValueError("rope.cache must be (k_cache, v_cache, slots)")
        k_cache, v_cache, slots = rope.cache
        # fp8 caches quantize (kernels.write_kv): not here
        fused_ops.check_cache_store(k_cache, v_cache, slots, m, rope.num_kv_heads, d, x.dtype, x.device)


def check_tiles(rope: RopeEpilogue, block_n: int) -> None:
    """A program's pairs lie within one head (its half-rows), the whole head where the head is normed."""
    if block_n < 16 or rope.half % block_n or (rope.norm and block_n != rope.half):
        need = f"equal head_dim / 2 = {rope.half} (the per-head norm needs the whole head)" if rope.norm else \
            f"divide head_dim / 2 = {rope.half} (and be at least 16)"
        raise ValueError(f"config.block_n {block_n} (pairs a program) must {need}")


def reference(y: torch.Tensor, rope: RopeEpilogue) -> torch.Tensor:
    """The unfused sequence after the GEMM ``y [M, width]``: q and k per-head normed and rotated
    (``fused_ops.qk_norm_rope_ref``), k and v into the cache (``kernels.reference.write_kv``, in place);
    returns the new ``[M, width]`` with v as it was."""
    from kernels.reference import write_kv

    m, d = y.shape[0], rope.head_dim
    q, k, v = y.split([rope.num_q_heads * d, rope.num_kv_heads * d, rope.num_kv_heads * d], dim=-1)
    q, k = fused_ops.qk_norm_rope_ref(q.reshape(m, -1, d), k.reshape(m, -1, d), rope.cos, rope.sin,
                                      rope.positions.long(), rope.q_norm_w, rope.k_norm_w, rope.eps)
    v = v.reshape(m, -1, d)
    if rope.cache is not None:
        k_cache, v_cache, slots = rope.cache
        write_kv(k_cache, v_cache, k, v, slots.long())
    return torch.cat([t.reshape(m, -1) for t in (q, k, v)], dim=-1)


def kernel_args(rope: RopeEpilogue | None, like: torch.Tensor) -> dict:
    """``_small_linear_kernel``'s RoPE arguments by name (unused ones: any pointer, zeros)."""
    if rope is None:
        return dict(cos_ptr=like, sin_ptr=like, pos_ptr=like, qw_ptr=like, kw_ptr=like, kc_ptr=like, vc_ptr=like,
                    slot_ptr=like, stride_cs=0, num_q_heads=0, num_kv_heads=0, stride_kcs=0, stride_kch=0,
                    stride_vcs=0, stride_vch=0, head_eps=0.0, ROPE=False, NORM_HEADS=False, STORE_KV=False, HALF=1)
    k_cache, v_cache, slots = rope.cache if rope.cache is not None else (like, like, rope.positions)
    store = rope.cache is not None
    return dict(cos_ptr=rope.cos, sin_ptr=rope.sin, pos_ptr=rope.positions,
                qw_ptr=rope.q_norm_w if rope.norm else rope.cos, kw_ptr=rope.k_norm_w if rope.norm else rope.cos,
                kc_ptr=k_cache, vc_ptr=v_cache, slot_ptr=slots, stride_cs=rope.cos.stride(0),
                num_q_heads=rope.num_q_heads, num_kv_heads=rope.num_kv_heads,
                stride_kcs=k_cache.stride(0) if store else 0, stride_kch=k_cache.stride(1) if store else 0,
                stride_vcs=v_cache.stride(0) if store else 0, stride_vch=v_cache.stride(1) if store else 0,
                head_eps=float(rope.eps), ROPE=True, NORM_HEADS=rope.norm, STORE_KV=store, HALF=rope.half)
