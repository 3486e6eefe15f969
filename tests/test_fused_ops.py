"""Fused decoder-layer kernels against their torch references (interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton: the dev extra (its interpreter on a CPU) or the gpu extra")

from kernels import fused_ops as F  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 100])
def test_rms_norm_with_and_without_residual(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g).to(DEV, dtype)
    r = torch.randn(7, n, generator=g).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(DEV, dtype)
    torch.testing.assert_close(F.rms_norm(x, w, 1e-6), F.rms_norm_ref(x, w, 1e-6), atol=TOL[dtype], rtol=TOL[dtype])
    want, want_res = F.add_rms_norm_ref(x, r, w, 1e-6)
    res = r.clone()
    got = F.rms_norm(x, w, 1e-6, res)
    torch.testing.assert_close(res, want_res, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("heads", [(4, 2), (6, 3)], ids=["pow2-heads", "odd-heads"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_in_place_on_strided_views(norm, dtype, heads):
    """Every head of every token, none past them (the tile of heads is padded to a power of two)."""
    from engine.rope import RotaryEmbedding

    g = torch.Generator().manual_seed(1)
    (hq, hkv), t, d = heads, 5, 32
    rope = RotaryEmbedding(d, 64, 10000.0, None).to(DEV)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV, dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hkv, d)
    pos = torch.tensor([0, 3, 9, 17, 63], device=DEV)
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV, dtype) if norm else None
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV, dtype) if norm else None
    want_q, want_k = F.qk_norm_rope_ref(q.clone(), k.clone(), rope.cos, rope.sin, pos, qw, kw, 1e-6)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    F.qk_norm_rope_(q, k, rope.cos, rope.sin, pos, qw, kw, 1e-6)
    torch.testing.assert_close(q, want_q, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k, want_k, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before), "v must be untouched"


@pytest.mark.parametrize("heads", [(4, 2), (6, 3)], ids=["pow2-heads", "odd-heads"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_with_the_cache_store_equals_rope_then_write_kv(norm, dtype, heads):
    """``cache=``: the same q and k, and the caches written as ``kernels.write_kv`` writes them:
    K a layer's view of a [slots, layers, 2, heads, dim + pad] buffer, V of a [slots, heads + 1, dim]
    one (every stride differs from k's, v's and the other cache's), nothing else written."""
    from engine.rope import RotaryEmbedding
    from kernels import reference

    g = torch.Generator().manual_seed(4)
    (hq, hkv), t, d, slots_n = heads, 6, 32, 20
    rope = RotaryEmbedding(d, 64, 10000.0, None).to(DEV)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV, dtype)
    pos = torch.tensor([0, 3, 9, 17, 63, 5], device=DEV)
    slots = torch.tensor([7, -1, 0, 19, 3, -1], device=DEV)
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV, dtype) if norm else None
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV, dtype) if norm else None

    def views(x):
        q, k, v = x.split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)

    kbuf = torch.randn(slots_n, 3, 2, hkv, d + 8, generator=g).to(DEV, dtype)
    vbuf = torch.randn(slots_n, hkv + 1, d, generator=g).to(DEV, dtype)
    want_k, want_v = kbuf.clone(), vbuf.clone()
    q1, k1, v1 = views(qkv.clone())
    F.qk_norm_rope_(q1, k1, rope.cos, rope.sin, pos, qw, kw, 1e-6)
    reference.write_kv(want_k[:, 1, 0, :, :d], want_v[:, :hkv], k1, v1, slots)
    q2, k2, v2 = views(qkv.clone())
    v_apart = torch.zeros(t, hkv, d + 4, dtype=dtype, device=DEV)[..., :d]  # strides of its own
    v_apart.copy_(v2)
    F.qk_norm_rope_(q2, k2, rope.cos, rope.sin, pos, qw, kw, 1e-6,
                    cache=(v_apart, kbuf[:, 1, 0, :, :d], vbuf[:, :hkv], slots))
    assert torch.equal(q2, q1) and torch.equal(k2, k1)
    assert torch.equal(kbuf, want_k) and torch.equal(vbuf, want_v)  # the written rows, nothing else


def test_rope_cache_store_refuses_what_it_cannot_write():
    q, k, v = (torch.zeros(2, h, 16, device=DEV) for h in (4, 2, 2))
    cos = sin = torch.zeros(8, 8, device=DEV)
    pos = torch.zeros(2, dtype=torch.int64, device=DEV)
    slots = torch.zeros(2, dtype=torch.int64, device=DEV)
    fp8 = torch.zeros(4, 2, 16, device=DEV).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="k_cache must be"):
        F.qk_norm_rope_(q, k, cos, sin, pos, cache=(v, fp8, fp8, slots))
    with pytest.raises(ValueError, match="slots must be"):
        F.qk_norm_rope_(q, k, cos, sin, pos, cache=(v, torch.zeros(4, 2, 16, device=DEV),
                                                    torch.zeros(4, 2, 16, device=DEV), slots[:1]))


def test_rope_matches_the_model_rotary():
    """The fused rope equals engine.rope (the one HF parity is tested with) in fp32."""
    from engine.rope import RotaryEmbedding

    g = torch.Generator().manual_seed(2)
    rope = RotaryEmbedding(16, 32, 10000.0, None).to(DEV)
    q = torch.randn(3, 2, 16, generator=g).to(DEV)
    k = torch.randn(3, 1, 16, generator=g).to(DEV)
    pos = torch.tensor([1, 5, 30], device=DEV)
    want_q, want_k = rope(pos, q, k)
    F.qk_norm_rope_(q, k, rope.cos, rope.sin, pos)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    x = torch.randn(6, 2 * 1500, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    torch.testing.assert_close(F.silu_and_mul(x), F.silu_and_mul_ref(x), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-interpreter check; on a GPU the fused path is "
                    "tested against HF in test_gpu_engine.py")
def test_fused_model_equals_eager_model(monkeypatch):
    """The whole fused forward (Triton kernels) against the torch path, tiny model, fp32."""
    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    from engine import LLM, SamplingParams

    prompts = [[5, 6, 7, 8], [9, 10]]
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    monkeypatch.setenv("KVLAB_KERNELS", "reference")
    ref = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256).generate(prompts, p)
    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    llm = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256)
    llm.engine.model.fuse()
    got = llm.generate(prompts, p)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="contiguous rows"):
        F.rms_norm(torch.zeros(4, 8, device=DEV).t(), torch.ones(4, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="power of two"):
        F.qk_norm_rope_(torch.zeros(1, 1, 12, device=DEV), torch.zeros(1, 1, 12, device=DEV),
                        torch.zeros(4, 6, device=DEV), torch.zeros(4, 6, device=DEV), torch.zeros(1, dtype=torch.long, device=DEV))
