"""kernels.small_linear's RoPE epilogue (rope=): the qkv GEMV writes q and k normed and rotated and stores k
and v into the cache, against the unfused sequence (small_linear_ref -> qk_norm_rope_ref -> write_kv) and
against the unfused kernels it replaces (small_linear, then fused_ops.qk_norm_rope_ with cache=)."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton: the dev extra (its interpreter on a CPU) or the gpu extra")

from engine.rope import RotaryEmbedding  # noqa: E402
from kernels import fused_ops  # noqa: E402
from kernels.small_linear import (MAX_TOKENS, SMEM_BUDGET, LinearConfig, choose_rope_config, small_linear,  # noqa: E402
                                  small_linear_ref)
from kernels.small_linear_rope import RopeEpilogue  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NUM_SLOTS, MAX_LEN, K = 40, 64, 64


def _case(m, hq, hk, d, dtype, *, bias=False, qk_norm=False, seed=0, dev=DEV):
    """x, the qkv weight and bias, the input norm's weight, and a RopeEpilogue over NaN-poisoned caches at
    non-monotonic slots with padding (-1) among them."""
    g = torch.Generator().manual_seed(seed)
    n = (hq + 2 * hk) * d
    x = torch.randn(m, K, generator=g)
    w = torch.randn(n, K, generator=g) / K ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    nw = 1 + 0.1 * torch.randn(K, generator=g)
    qw, kw = ((1 + 0.3 * torch.randn(d, generator=g), 1 + 0.3 * torch.randn(d, generator=g)) if qk_norm
              else (None, None))
    x, w, b, nw, qw, kw = [t if t is None else t.to(dev, dtype) for t in (x, w, b, nw, qw, kw)]
    rope = RotaryEmbedding(d, MAX_LEN, 10000.0, None).to(dev)
    pos = torch.randint(0, MAX_LEN, (m,), generator=g).to(dev)
    slots = torch.randperm(NUM_SLOTS, generator=g)[:m]
    slots[1::3] = -1  # padding tokens: written nowhere
    k_cache = torch.full((NUM_SLOTS, hk, d), float("nan"), dtype=dtype, device=dev)
    epi = RopeEpilogue(rope.cos, rope.sin, pos, d, hq, hk, qw, kw, 1e-6,
                       cache=(k_cache, k_cache.clone(), slots.to(dev)))
    return x, w, b, nw, epi


def _with_caches(epi: RopeEpilogue) -> RopeEpilogue:
    """The same epilogue over copies of its caches (each path writes its own)."""
    k_cache, v_cache, slots = epi.cache
    return RopeEpilogue(epi.cos, epi.sin, epi.positions, epi.head_dim, epi.num_q_heads, epi.num_kv_heads,
                        epi.q_norm_w, epi.k_norm_w, epi.eps, cache=(k_cache.clone(), v_cache.clone(), slots))


def _unfused(x, w, b, nw, epi: RopeEpilogue, config: LinearConfig | None):
    """What the engine ran before: small_linear, then qk_norm_rope_ with the store (on its own caches)."""
    epi = _with_caches(epi)
    k_cache, v_cache, slots = epi.cache
    y = small_linear(x, w, b, norm_weight=nw, eps=1e-5, config=config)
    m, d = x.shape[0], epi.head_dim
    q, k, v = y.split([epi.num_q_heads * d, epi.num_kv_heads * d, epi.num_kv_heads * d], dim=-1)
    fused_ops.qk_norm_rope_(q.view(m, -1, d), k.view(m, -1, d), epi.cos, epi.sin, epi.positions, epi.q_norm_w,
                            epi.k_norm_w, epi.eps, cache=(v.view(m, -1, d), k_cache, v_cache, slots))
    return y, k_cache, v_cache


def _config(epi: RopeEpilogue, split: bool) -> LinearConfig | None:
    """None: the default tiles; ``split``: 16 pairs a program (several programs a head)."""
    return LinearConfig(block_n=16, block_k=64, num_warps=4, num_stages=2) if split else None


def _assert_slots_written(got: torch.Tensor, want: torch.Tensor, slots: torch.Tensor, **tol) -> None:
    """The given slots hold the reference's rows; every other slot is still NaN (poisoned)."""
    written = sorted(s for s in slots.tolist() if s >= 0)
    rest = [s for s in range(got.shape[0]) if s not in written]
    assert got[rest].isnan().all(), "a slot outside the real tokens' was written"
    assert not got[written].isnan().any(), "a real token's slot was not written"
    torch.testing.assert_close(got[written], want[written], **tol)


@pytest.mark.parametrize("m", [1, 3, MAX_TOKENS])
@pytest.mark.parametrize("hq,hk", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["", "qk_norm"])
def test_fp32_equals_the_unfused_sequence(m, hq, hk, d, bias, qk_norm):
    """Exact dots: q, k, v and the caches as the reference composition gives them (only summation order
    differs), and as the two kernels it replaces give them: the same bits without the per-head norm;
    with it within a few fp32 ulps (the interpreter adds the head's squares in another order)."""
    x, w, b, nw, epi = _case(m, hq, hk, d, torch.float32, bias=bias, qk_norm=qk_norm, seed=m + d)
    config = _config(epi, split=not qk_norm and m != 3)
    ref = _with_caches(epi)
    want = small_linear_ref(x, w, b, norm_weight=nw, eps=1e-5, rope=ref)
    x_before = x.clone()
    got = small_linear(x, w, b, norm_weight=nw, eps=1e-5, rope=epi, config=config)
    assert got.shape == (m, (hq + 2 * hk) * d) and torch.equal(x, x_before)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for mine, theirs in zip(epi.cache[:2], ref.cache[:2]):
        _assert_slots_written(mine, theirs, epi.cache[2], atol=2e-5, rtol=2e-5)
    y, k_cache, v_cache = _unfused(x, w, b, nw, epi, config)
    for mine, theirs in ((got, y), (epi.cache[0], k_cache), (epi.cache[1], v_cache)):
        if qk_norm:
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6, equal_nan=True)
        else:
            assert torch.equal(mine.nan_to_num(7.0), theirs.nan_to_num(7.0))


@pytest.mark.parametrize("m", [1, 3, MAX_TOKENS])
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 64), (2, 2, 128)], ids=["gqa-64", "mha-128"])
@pytest.mark.parametrize("bias,qk_norm", [(False, False), (True, False), (False, True)],
                         ids=["plain", "bias", "qk_norm"])
def test_bf16_within_rounding_of_the_unfused_sequence(m, hq, hk, d, bias, qk_norm):
    """bf16: within the existing small_linear tests' rounding of the reference composition, caches included;
    and the unfused kernels' bits (the same rounding points; the interpreter rounds both alike)."""
    x, w, b, nw, epi = _case(m, hq, hk, d, torch.bfloat16, bias=bias, qk_norm=qk_norm, seed=7 * m + d)
    ref = _with_caches(epi)
    want = small_linear_ref(x, w, b, norm_weight=nw, eps=1e-5, rope=ref)
    got = small_linear(x, w, b, norm_weight=nw, eps=1e-5, rope=epi)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < (1e-2 if DEV == "cuda" else 5e-2), err  # the interpreter's bf16 casts truncate
    slots = epi.cache[2]
    written = sorted(s for s in slots.tolist() if s >= 0)
    for mine, theirs in zip(epi.cache[:2], ref.cache[:2]):
        _assert_slots_written(mine, theirs, slots, atol=1.0, rtol=0.1)  # rows checked closely below
        a, b_ = mine[written].double(), theirs[written].double()
        assert ((a - b_).norm() / b_.norm()).item() < (1e-2 if DEV == "cuda" else 5e-2)
    if DEV == "cpu":
        y, k_cache, v_cache = _unfused(x, w, b, nw, epi, None)
        assert torch.equal(got, y)
        assert torch.equal(epi.cache[0].nan_to_num(7.0), k_cache.nan_to_num(7.0))
        assert torch.equal(epi.cache[1].nan_to_num(7.0), v_cache.nan_to_num(7.0))


def test_without_a_cache_only_the_output_is_written():
    """rope= without cache=: q and k rotated, v as the GEMM gives it, nothing else."""
    x, w, b, nw, epi = _case(5, 4, 2, 64, torch.float32, bias=True)
    bare = RopeEpilogue(epi.cos, epi.sin, epi.positions, 64, 4, 2)
    got = small_linear(x, w, b, norm_weight=nw, eps=1e-5, rope=bare)
    torch.testing.assert_close(got, small_linear_ref(x, w, b, norm_weight=nw, eps=1e-5, rope=bare), atol=2e-5,
                               rtol=2e-5)
    plain = small_linear(x, w, b, norm_weight=nw, eps=1e-5)
    assert torch.equal(got[:, 6 * 64:], plain[:, 6 * 64:]), "v is not rotated"
    assert not torch.allclose(got[:, :6 * 64], plain[:, :6 * 64]), "q and k are"


def test_pdl_launches_equal_plain_ones():
    """The ROPE mode's PDL path (no-op waits under the interpreter, the rest of the kernel as on a GPU)."""
    from kernels import pdl

    x, w, b, nw, epi = _case(3, 4, 2, 64, torch.float32, qk_norm=True)
    other = _with_caches(epi)
    off = small_linear(x, w, b, norm_weight=nw, rope=epi)
    with pdl.launches():
        on = small_linear(x, w, b, norm_weight=nw, rope=other)
    assert torch.equal(on, off)
    for a, b_ in zip(epi.cache[:2], other.cache[:2]):
        assert torch.equal(a.nan_to_num(7.0), b_.nan_to_num(7.0))


def test_choose_rope_config_keeps_pairs_within_a_head():
    """Pairs a program divide half a head (equal it with the per-head norm), the gated tiles otherwise;
    the stages fit shared memory."""
    llama = choose_rope_config(6144, 4096, num_sms=132, head_dim=128, norm_heads=False)  # 3072 pairs
    assert llama == LinearConfig(32, 128, 8, 3)  # 96 programs: no fewer than half the SMs
    qwen = choose_rope_config(4096, 1024, num_sms=132, head_dim=128, norm_heads=True)
    assert qwen.block_n == 64  # the whole head: 32 programs
    wide = choose_rope_config(8192, 4096, num_sms=132, head_dim=256, norm_heads=True)
    assert wide.block_n == 128
    for cfg, half in ((llama, 64), (qwen, 64), (wide, 128),
                      (choose_rope_config(512, 64, num_sms=8, head_dim=32, norm_heads=False), 16)):
        assert half % cfg.block_n == 0 and cfg.block_n >= 16
        assert cfg.num_stages * (2 * cfg.block_n + MAX_TOKENS) * cfg.block_k * 2 <= SMEM_BUDGET


def _refusal(case: str):
    x, w, b, nw, epi = _case(3, 4, 2, 64, torch.float32, qk_norm=case.startswith("norm"))
    k_cache, v_cache, slots = epi.cache
    kw: dict = {}

    def swap(**fields):
        return RopeEpilogue(**{**epi.__dict__, **fields})

    rope = {
        "gated": lambda: epi, "residual": lambda: epi, "not an epilogue": lambda: (epi.cos, epi.sin),
        "head_dim": lambda: swap(head_dim=48), "narrow heads": lambda: swap(head_dim=16),
        "heads": lambda: swap(num_q_heads=3), "zero kv heads": lambda: swap(num_kv_heads=0),
        "positions": lambda: swap(positions=epi.positions[:2]), "cos": lambda: swap(cos=epi.cos[:, :16]),
        "norm one weight": lambda: swap(k_norm_w=None),
        "norm weight dtype": lambda: swap(q_norm_w=epi.q_norm_w.double()),
        "cache dtype": lambda: swap(cache=(k_cache.bfloat16(), v_cache.bfloat16(), slots)),
        "cache heads": lambda: swap(cache=(k_cache[:, :1], v_cache[:, :1], slots)),
        "slots": lambda: swap(cache=(k_cache, v_cache, slots[:2])),
        "cache tuple": lambda: swap(cache=(k_cache, v_cache)),
        "block_n": lambda: epi, "norm block_n": lambda: epi,
    }[case]()
    if case == "gated":
        kw["gated"] = True
        w = torch.cat([w, w])
    if case == "residual":
        kw["residual"] = torch.zeros(3, w.shape[0])
    if case == "block_n":
        kw["config"] = LinearConfig(block_n=64, block_k=64, num_warps=4, num_stages=2)  # half a head is 32
    if case == "norm block_n":
        kw["config"] = LinearConfig(block_n=16, block_k=64, num_warps=4, num_stages=2)
    return lambda: small_linear(x, w, b, norm_weight=nw, rope=rope, **kw)


@pytest.mark.parametrize("case,match", [
    ("gated", "neither gated=True nor residual="), ("residual", "neither gated=True nor residual="),
    ("not an epilogue", "rope must be a small_linear_rope.RopeEpilogue"),
    ("head_dim", "rope.head_dim must be a power of two of at least 32, got 48"),
    ("narrow heads", "rope.head_dim must be a power of two of at least 32, got 16"),
    ("heads", r"weight must have \(num_q_heads \+ 2 \* num_kv_heads\) \* head_dim .* = 448 rows"),
    ("zero kv heads", "rope.num_kv_heads must be a positive int"),
    ("positions", r"positions must be a contiguous int32/int64 \[3\]"), ("cos", r"cos must be \[max_positions, 32\]"),
    ("norm one weight", "rope.q_norm_w and rope.k_norm_w: both"),
    ("norm weight dtype", "rope.q_norm_w must be torch.float32 like x"),
    ("cache dtype", r"k_cache must be \[num_slots, 2, 64\] of torch.float32"),
    ("cache heads", r"k_cache must be \[num_slots, 2, 64\]"), ("slots", r"slots must be \[3\]"),
    ("cache tuple", r"rope.cache must be \(k_cache, v_cache, slots\)"),
    ("block_n", r"config.block_n 64 \(pairs a program\) must divide head_dim / 2 = 32"),
    ("norm block_n", r"config.block_n 16 \(pairs a program\) must equal head_dim / 2 = 32"),
])
def test_hostile_inputs_are_refused_naming_the_argument(case, match):
    with pytest.raises(ValueError, match=match):
        _refusal(case)()


@pytest.mark.gpu
def test_bf16_on_the_gpu_within_rounding_of_the_reference():
    """The GPU's own numerics (bf16 dots, rounding casts, FMA) against the reference composition, the default
    tiles, GQA with the per-head norm and llama-style without; caches outside the slots untouched."""
    for hq, hk, d, qk_norm, bias in ((4, 2, 128, True, False), (8, 2, 128, False, True), (4, 4, 64, False, False)):
        for m in (1, 5, MAX_TOKENS):
            x, w, b, nw, epi = _case(m, hq, hk, d, torch.bfloat16, bias=bias, qk_norm=qk_norm, seed=m, dev="cuda")
            ref = _with_caches(epi)
            want = small_linear_ref(x, w, b, norm_weight=nw, eps=1e-5, rope=ref)
            got = small_linear(x, w, b, norm_weight=nw, eps=1e-5, rope=epi)
            assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 1e-2
            for mine, theirs in zip(epi.cache[:2], ref.cache[:2]):
                _assert_slots_written(mine, theirs, epi.cache[2], atol=0.1, rtol=0.05)


# -- the engine ---------------------------------------------------------------------------------------
ENGINE_MODELS = {  # heads of 32 (the tiny presets' 16 are narrower than the epilogue's tiles)
    "llama-gqa": ("tiny-llama", dict(head_dim=32)),
    "qwen3-qk_norm": ("tiny-qwen3", dict(head_dim=32)),
    "qwen2-mha-bias": ("tiny-llama", dict(head_dim=32, num_key_value_heads=4, attention_bias=True)),
}


def _generate(monkeypatch, preset: str, overrides: dict, epilogue: bool):
    """Greedy tokens and the final caches of a fused CPU model with small_linear for every step (prompts
    chunked into steps of up to 6 tokens), with the RoPE epilogue or without (today's path before it)."""
    from conftest import KernelSpy
    from engine import LLM, SamplingParams
    from engine.model import Attention

    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    if not epilogue:
        monkeypatch.setattr(Attention, "rope_epilogue", lambda *a, **k: None)
    spy = KernelSpy(fused_ops._qk_norm_rope_kernel)
    monkeypatch.setattr(fused_ops, "_qk_norm_rope_kernel", spy)
    llm = LLM(preset, device="cpu", max_model_len=64, kv_cache_tokens=256, max_num_batched_tokens=6,
              hf_overrides=overrides)
    llm.engine.model.fuse(16)
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    tokens = [o.token_ids for o in llm.generate([[5, 6, 7, 8, 9, 10, 11], [9, 10], [3, 4, 5]], p)]
    monkeypatch.undo()
    return tokens, [(k.clone(), v.clone()) for k, v in llm.engine.runner.kv_caches], len(spy.launches)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-interpreter check; on a GPU the engine's tokens are "
                    "checked against HF in test_gpu_engine.py")
@pytest.mark.parametrize("model", list(ENGINE_MODELS))
def test_engine_with_the_epilogue_gives_the_same_tokens_and_caches(monkeypatch, model):
    """A fused model whose steps all take small_linear: the same greedy tokens and the same cache contents
    with the qkv GEMV's RoPE epilogue as with small_linear then qk_norm_rope_; and no qk_norm_rope_ launch
    left (the per-head norm's squares add up in another order under the interpreter: within fp32 ulps)."""
    preset, overrides = ENGINE_MODELS[model]
    want, want_caches, before = _generate(monkeypatch, preset, overrides, epilogue=False)
    got, got_caches, after = _generate(monkeypatch, preset, overrides, epilogue=True)
    assert got == want and len(got[0]) == 5
    assert before > 0 and after == 0, "one kernel a layer fewer"
    exact = preset != "tiny-qwen3"
    for (k1, v1), (k0, v0) in zip(got_caches, want_caches):
        for a, b in ((k1, k0), (v1, v0)):
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert k1.abs().sum() > 0


def test_the_engine_keeps_the_unfused_path_where_the_epilogue_cannot_store():
    """fp8 caches (quantized by write_kv), a calibrating step and heads narrower than the tiles: no epilogue."""
    from engine.model import Attention
    from engine.presets import preset_config

    cfg = preset_config("tiny-llama")
    cfg.head_dim = 32
    attn = Attention(cfg)
    rope = RotaryEmbedding(32, MAX_LEN, 10000.0, None)
    pos, slots = torch.arange(2), torch.tensor([3, -1])
    cache = (torch.zeros(8, 2, 32), torch.zeros(8, 2, 32))
    epi = attn.rope_epilogue(pos, rope, slots, cache, torch.float32)
    assert epi is not None and epi.cache[2] is slots and (epi.num_q_heads, epi.num_kv_heads) == (4, 2)
    fp8 = tuple(c.to(torch.float8_e4m3fn) for c in cache)
    assert attn.rope_epilogue(pos, rope, slots, fp8, torch.float32) is None
    attn.calibrate = "tensor"
    assert attn.rope_epilogue(pos, rope, slots, cache, torch.float32) is None
    attn.calibrate = ""
    cfg.head_dim = 16
    assert Attention(cfg).rope_epilogue(pos, rope, slots, cache, torch.float32) is None


def test_project_refuses_rotated_without_qkv():
    from engine.model import Attention
    from engine.presets import preset_config

    attn = Attention(preset_config("tiny-llama"))
    attn.fuse()
    x = torch.zeros(1, 64)
    with pytest.raises(ValueError, match="rotated=True describes a qkv computed elsewhere"):
        attn.project(x, torch.zeros(1, dtype=torch.long), None, torch.zeros(1, dtype=torch.long), None, rotated=True)
