"""FP8 KV caches and sliding-window attention: Triton kernels against the torch reference.

Same harness as test_kernels_triton.py (interpreter on a CPU, compiled on a GPU). The
stated bounds: attention over an fp8 cache is within 5% (e4m3) / 10% (e5m2) relative
error of the same attention over the bf16 cache it was quantized from (measured about
3.3% and 6.6% on Gaussian K/V), and within bf16 rounding of the reference that reads the
same fp8 values. A window must not read keys before it: those slots are NaN-poisoned.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_kernels_triton import (DEVICE, LINEAR, PAGED, _assert_close_attn, _gen, _randn, make_batch,
                                       random_lens, reference, triton_attention, triton_ops)

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
BOUND = {torch.float8_e4m3fn: 0.05, torch.float8_e5m2: 0.10}  # relative error against bf16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _scales(cache: torch.Tensor, dtype: torch.dtype, per_head: bool) -> torch.Tensor:
    amax = torch.nan_to_num(cache.float(), nan=0.0).abs().amax(dim=(0, 2))  # [H]
    if not per_head:
        amax = amax.max().expand_as(amax)
    return (amax / torch.finfo(dtype).max).clamp(min=1e-12).float().contiguous()


def _fp8_batch(gen, mode, bs, fp8, per_head=True, lens=None):
    lens = lens or random_lens(gen, num_seqs=5, max_ctx=180)
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.bfloat16,
                                    mode=mode, block_size=bs)
    ks, vs = _scales(kc, fp8, per_head), _scales(vc, fp8, per_head)
    return q, kc, vc, reference.quantize(kc, fp8, ks), reference.quantize(vc, fp8, vs), ks, vs, meta


@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("mode,bs", [(PAGED, 16), (PAGED, 1), (LINEAR, 0)])
@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "per-tensor"])
def test_fp8_attention_error_bound(fp8, mode, bs, per_head):
    gen = _gen("fp8", fp8, mode, bs, per_head)
    q, kc, vc, k8, v8, ks, vs, meta = _fp8_batch(gen, mode, bs, fp8, per_head)
    out = torch.full_like(q, float("nan"))
    triton_ops.attention_into(out, q, k8, v8, meta, None, None, ks, vs)
    same_values = reference.attention(q, k8, v8, meta, None, ks, vs)
    _assert_close_attn(out, same_values)
    err = _rel(out, reference.attention(q, kc, vc, meta))
    assert err < BOUND[fp8], f"fp8 attention {err:.3f} from bf16 (bound {BOUND[fp8]})"
    assert err > 1e-3  # the cache really is fp8 (a bf16 read would be exact)


@pytest.mark.parametrize("mode,bs", [(PAGED, 16), (LINEAR, 0)])
def test_fp8_split_kv_decode(mode, bs, monkeypatch):
    """Split-KV partials carry the V scale; the merge needs nothing else."""
    gen = _gen("fp8-split", mode, bs)
    lens = [(_n, 1) for _n in (300, 17, 120)]
    q, kc, vc, k8, v8, ks, vs, meta = _fp8_batch(gen, mode, bs, torch.float8_e4m3fn, lens=lens)
    cfg = triton_attention.AttnConfig(block_q=1, block_n=32, num_splits=4, num_warps=4, num_stages=2)
    out = torch.full_like(q, float("nan"))
    triton_ops.attention_into(out, q, k8, v8, meta, None, cfg, ks, vs)
    _assert_close_attn(out, reference.attention(q, k8, v8, meta, None, ks, vs))


@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
def test_fp8_write_kv_matches_reference(fp8):
    gen = _gen("fp8-write", fp8)
    n, h, d = 40, 3, 64
    k, v = _randn(gen, n, h, d, dtype=torch.bfloat16) * 4, _randn(gen, n, h, d, dtype=torch.bfloat16)
    k[0, 0, 0] = 1e6  # beyond the format's range: saturates, never inf or NaN
    ks = torch.tensor([0.01, 0.02, 0.5], device=DEVICE)
    vs = torch.full((h,), 0.003, device=DEVICE)
    slots = torch.randperm(64, generator=gen)[:n].to(DEVICE)
    slots[5] = -1  # padding: not written
    caches = [torch.zeros(64, h, d, dtype=fp8, device=DEVICE) for _ in range(4)]
    triton_ops.write_kv(caches[0], caches[1], k, v, slots, ks, vs)
    reference.write_kv(caches[2], caches[3], k, v, slots, ks, vs)
    # rounding is explicit (nearest-even on the fp8 grid), so kernel and reference agree exactly
    torch.testing.assert_close(caches[0].float(), caches[2].float(), rtol=0, atol=0)
    torch.testing.assert_close(caches[1].float(), caches[3].float(), rtol=0, atol=0)
    assert reference.dequantize(caches[0], ks)[slots[0], 0, 0] == torch.finfo(fp8).max * 0.01
    untouched = sorted(set(range(64)) - set(slots.tolist()))  # includes where token 5 would go
    assert caches[0][untouched].float().abs().sum() == 0


def test_fp8_needs_scales():
    k = torch.zeros(4, 2, 16, dtype=torch.float8_e4m3fn, device=DEVICE)
    x = torch.zeros(2, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="k_scale"):
        triton_ops.write_kv(k, k.clone(), x, x, torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="v_scale must be a contiguous fp32"):
        triton_ops.write_kv(k, k.clone(), x, x, torch.tensor([0, 1], device=DEVICE),
                            torch.ones(2, device=DEVICE), torch.ones(3, device=DEVICE))


def _poison_outside_window(kc, vc, meta, window: int) -> None:
    """NaN every cached key no query of its sequence may see (freed or overwritten memory)."""
    qsl, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    for s, ctx in enumerate(lens):
        first = max(0, ctx - (qsl[s + 1] - qsl[s]) - window + 1)
        slots = reference.token_slots(meta, s, first)
        kc[slots] = float("nan")
        vc[slots] = float("nan")


@pytest.mark.parametrize("mode,bs", [(PAGED, 16), (PAGED, 1), (LINEAR, 0)])
@pytest.mark.parametrize("window", [1, 7, 64])
def test_sliding_window_attention(mode, bs, window, monkeypatch):
    gen = _gen("window", mode, bs, window)
    lens = random_lens(gen, num_seqs=6, max_ctx=200)
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.float16,
                                    mode=mode, block_size=bs)
    want = reference.attention(q, kc, vc, meta, window=window)
    assert _rel(want, reference.attention(q, kc, vc, meta)) > 1e-2  # the window matters here
    _poison_outside_window(kc, vc, meta, window)
    for cfg in (None, triton_attention.AttnConfig(block_q=2 if meta.max_query_len > 1 else 1, block_n=16,
                                                  num_splits=3, num_warps=4, num_stages=2)):
        out = torch.full_like(q, float("nan"))
        triton_ops.attention_into(out, q, kc, vc, meta, None, cfg, None, None, window)
        _assert_close_attn(out, want)


def test_sliding_window_reference_skips_old_keys():
    """The reference (CPU engine path) never reads keys before the window either."""
    gen = _gen("window-ref")
    lens = [(50, 1), (30, 10)]
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=1, group=2, head_dim=32, dtype=torch.float32,
                                    mode=PAGED, block_size=4)
    _poison_outside_window(kc, vc, meta, 8)
    assert torch.isfinite(reference.attention(q, kc, vc, meta, window=8)).all()
    with pytest.raises(ValueError, match="window"):
        triton_ops.attention_into(torch.empty_like(q), q, kc, vc, meta, None, None, None, None, -1)


@pytest.mark.parametrize("window,ring", [(8, 24), (16, 64), (1, 9)])
def test_ring_addressing_with_window(window, ring):
    """LINEAR ring (contiguous and virtual local layers): token t at seq_base + t % ring holds
    only the last ``ring`` tokens; with ring >= window + q_len - 1 nothing the window needs is
    overwritten, so attention equals the full cache's."""
    import dataclasses

    gen = _gen("ring", window, ring)
    q_max = ring - window + 1
    lens = [(150, 1), (60, min(q_max, 9)), (ring + 3, q_max), (5, 5 if q_max >= 5 else 1)]
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=2, group=2, head_dim=32, dtype=torch.float16,
                                    mode=LINEAR)
    want = reference.attention(q, kc, vc, meta, window=window)
    n = len(lens)
    rk = torch.full((n * ring, 2, 32), float("nan"), dtype=torch.float16, device=DEVICE)
    rv = rk.clone()
    for s, (ctx, _) in enumerate(lens):
        t = torch.arange(max(0, ctx - ring), ctx, device=DEVICE)
        src = reference.token_slots(meta, s, ctx)[t]
        rk[s * ring + t % ring], rv[s * ring + t % ring] = kc[src], vc[src]
    rmeta = dataclasses.replace(meta, seq_base=torch.arange(n, device=DEVICE, dtype=torch.int64) * ring, ring=ring)
    _assert_close_attn(reference.attention(q, rk, rv, rmeta, window=window), want)
    out = torch.full_like(q, float("nan"))
    triton_ops.attention_into(out, q, rk, rv, rmeta, None, None, None, None, window)
    _assert_close_attn(out, want)
