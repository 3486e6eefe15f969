"""The TMA prefill kernel (kernels/triton_prefill_tma.py) against the torch reference: LINEAR caches
poisoned with NaN outside each sequence's keys, mixed batches (whole prompts, chunks over a cached
prefix, decode tokens, empty sequences), strided caches (a layer of an interleaved buffer, the
fused QKV projection's views), and the inputs it refuses. Under Triton's interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

from test_kernels_triton import (DEVICE, LINEAR, PAGED, _assert_close_attn, _gen, _nan_like, _randint,  # noqa: F401
                                 make_batch, random_lens)

from kernels import reference, triton_attention  # noqa: E402
from kernels.metadata import AttentionMetadata  # noqa: E402
from kernels.triton_prefill_tma import prefill_tma_into  # noqa: E402


def run_tma(q, kc, vc, meta, config=None, scale=None) -> torch.Tensor:
    out = _nan_like(q)
    return prefill_tma_into(out, q, kc, vc, meta, scale=scale, config=config)


def config(block_q: int, block_n: int) -> triton_attention.AttnConfig:
    return triton_attention.AttnConfig(block_q=block_q, block_n=block_n, num_splits=1, num_warps=4, num_stages=2,
                                       causal_split=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_q,block_n", [(4, 16), (16, 32)])
def test_tma_prefill_mixed_batch(dtype, block_q, block_n):
    """Every kind of sequence a step holds; 16-key tiles put most keys in the unmasked loop."""
    gen = _gen("tma-mixed", dtype, block_q, block_n)
    lens = random_lens(gen, num_seqs=6, max_ctx=150, max_prefill=40) + [(37, 37), (100, 21)]
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=dtype, mode=LINEAR)
    _assert_close_attn(run_tma(q, kc, vc, meta, config(block_q, block_n), scale=0.2),
                       reference.attention(q, kc, vc, meta, scale=0.2))


@pytest.mark.parametrize("group,warp_specialize", [(1, False), (2, True), (3, False)])
def test_tma_prefill_groups_and_default_config(group, warp_specialize):
    """Grouped-query heads packed in a tile, a group that is not a power of two; the pointer kernel's
    own prefill choice of tiles; the warp-specialised key loop (the interpreter runs it as written)."""
    gen = _gen("tma-groups", group)
    lens = [(_randint(gen, 40, 120), _randint(gen, 2, 40)) for _ in range(3)] + [(25, 25), (60, 1)]
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=2, group=group, head_dim=32, dtype=torch.float32,
                                    mode=LINEAR)
    out = prefill_tma_into(_nan_like(q), q, kc, vc, meta, warp_specialize=warp_specialize)
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))


def test_tma_prefill_strided_caches():
    """A layer of a [slots, layers, 2, H, D] buffer (other layers NaN), and whole prompts read from a
    fused QKV projection's K and V views (each sequence at its first query token)."""
    gen = _gen("tma-strided")
    lens = [(50, 9), (33, 33), (80, 1)]
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.float32,
                                    mode=LINEAR, interleaved=True)
    assert kc.stride(0) > 2 * 64
    _assert_close_attn(run_tma(q, kc, vc, meta, config(8, 16)), reference.attention(q, kc, vc, meta))

    q_lens = [30, 17, 45]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    t = sum(q_lens)
    qkv = torch.randn(t, (8 + 2 + 2) * 64, generator=gen).to(DEVICE)
    q = qkv[:, :8 * 64].view(t, 8, 64)
    k = qkv[:, 8 * 64:10 * 64].view(t, 2, 64)
    v = qkv[:, 10 * 64:].view(t, 2, 64)
    meta = AttentionMetadata(mode=LINEAR, query_start_loc=qsl, seq_lens=qsl.diff(), max_query_len=max(q_lens),
                             max_seq_len=max(q_lens), slot_mapping=torch.arange(t, device=DEVICE),
                             seq_base=qsl[:-1].long())
    _assert_close_attn(run_tma(q, k, v, meta, config(8, 16)), reference.attention(q, k, v, meta))


def test_tma_prefill_refuses_what_it_does_not_read():
    gen = _gen("tma-refuse")
    lens = [(40, 8), (20, 20)]
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=2, group=2, head_dim=32, dtype=torch.float32,
                                    mode=PAGED, block_size=16)
    with pytest.raises(ValueError, match="LINEAR"):
        run_tma(q, kc, vc, meta)
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=2, group=2, head_dim=32, dtype=torch.float32, mode=LINEAR)
    meta.ring = 64
    with pytest.raises(ValueError, match="ring"):
        run_tma(q, kc, vc, meta)
    meta.ring = 0
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        run_tma(q, kc.to(torch.float16), vc.to(torch.float16), meta)
    with pytest.raises(ValueError, match="split-KV"):
        run_tma(q, kc, vc, meta, triton_attention.AttnConfig(block_q=4, block_n=16, num_splits=2, num_warps=4,
                                                             num_stages=2))
