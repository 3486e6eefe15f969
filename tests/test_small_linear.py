"""kernels.small_linear against its torch reference (interpreter on CPU; the GPU's own numerics
under the gpu marker)."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton: the dev extra (its interpreter on a CPU) or the gpu extra")

from kernels.small_linear import MAX_TOKENS, LinearConfig, choose_config, small_linear, small_linear_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = LinearConfig(block_n=16, block_k=64, num_warps=4, num_stages=2)  # several programs and K steps


def _inputs(m, n, k, dtype, *, gated=False, bias=False, norm=False, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn((2 if gated else 1) * n, k, generator=g) / k ** 0.5
    b = torch.randn(w.shape[0], generator=g) if bias else None
    nw = 1 + 0.1 * torch.randn(k, generator=g) if norm else None
    r = torch.randn(m, n, generator=g) if residual else None
    return [t if t is None else t.to(DEV, dtype) for t in (x, w, b, nw, r)]


@pytest.mark.parametrize("m", [1, 5, MAX_TOKENS])
@pytest.mark.parametrize("n,k", [(48, 128), (40, 100)], ids=["even", "ragged"])  # 40: a part tile; 100: K masks
@pytest.mark.parametrize("gated,bias,norm,residual", [
    (False, False, False, False), (False, False, True, False), (True, False, True, False),
    (False, True, False, True), (True, True, True, False), (False, True, True, True)],
    ids=["plain", "norm", "norm-gated", "bias-residual", "all-gated", "all-residual"])
def test_equals_the_unfused_sequence_fp32(m, n, k, gated, bias, norm, residual):
    """Every prologue/epilogue combination, exact dots: only summation order differs."""
    x, w, b, nw, r = _inputs(m, n, k, torch.float32, gated=gated, bias=bias, norm=norm, residual=residual)
    x_before = x.clone()
    want = small_linear_ref(x, w, b, norm_weight=nw, eps=1e-5, gated=gated, residual=None if r is None else r.clone())
    got = small_linear(x, w, b, norm_weight=nw, eps=1e-5, gated=gated, residual=r, config=SMALL)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.shape == (m, n)
    if residual:
        assert got.data_ptr() == r.data_ptr(), "with residual=, the stream is updated in place and returned"
    assert torch.equal(x, x_before), "x is read only"


@pytest.mark.parametrize("gated,norm,residual", [(False, True, False), (True, True, False), (False, False, True)])
def test_bf16_within_rounding_of_the_reference(gated, norm, residual):
    x, w, _, nw, r = _inputs(8, 64, 256, torch.bfloat16, gated=gated, norm=norm, residual=residual, seed=3)
    want = small_linear_ref(x, w, norm_weight=nw, gated=gated, residual=None if r is None else r.clone())
    got = small_linear(x, w, norm_weight=nw, gated=gated, residual=r, config=SMALL)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < (1e-2 if DEV == "cuda" else 5e-2), err  # the interpreter's bf16 casts truncate


def test_the_heuristic_config_covers_every_column():
    """The default tiles (as the engine calls it): every output column written, none past N."""
    x, w, _, nw, _ = _inputs(3, 200, 192, torch.float32, norm=True, seed=5)
    cfg = choose_config(200, 192, num_sms=4)
    assert 200 % cfg.block_n, "the shape must leave a part tile for this test to mean something"
    got = small_linear(x, w, norm_weight=nw, config=cfg)
    torch.testing.assert_close(got, small_linear_ref(x, w, norm_weight=nw), atol=1e-4, rtol=1e-4)


def test_choose_config_keeps_every_multiprocessor_busy_and_fits_shared_memory():
    """The swept tiles where they give a program an SM; fewer rows a program where they do not."""
    from kernels.small_linear import SMEM_BUDGET

    assert choose_config(6144, 4096, num_sms=132).block_n == 32  # llama3-8b QKV: 192 programs
    assert choose_config(4096, 4096, num_sms=132).block_n == 32  # o_proj: 128 programs, as swept
    assert choose_config(1024, 2048, num_sms=132).block_n == 16  # qwen3-0.6b's: 32 programs of 32 rows
    assert choose_config(14336, 4096, num_sms=132, gated=True) == LinearConfig(64, 128, 8, 3)
    assert choose_config(4096, 100, num_sms=4).block_k == 128  # no wider than K's power of two
    for n, k, gated in ((6144, 4096, False), (14336, 4096, True), (1024, 3072, False), (3072, 1024, True)):
        c = choose_config(n, k, num_sms=132, gated=gated)
        assert c.num_stages * ((2 if gated else 1) * c.block_n + MAX_TOKENS) * c.block_k * 2 <= SMEM_BUDGET


@pytest.mark.parametrize("case,match", [
    (dict(m=0), "1 to 16 rows"), (dict(m=MAX_TOKENS + 1), "1 to 16 rows"),
    (dict(wk=64), "x's 128 columns"), (dict(gated_rows=47), "gate's rows then up's"),
    (dict(bias_n=10), "bias must be"), (dict(norm_k=10), "norm_weight must be"),
    (dict(res_shape=(2, 5)), "residual must be"), (dict(dtype=torch.int32), "bf16, fp16 or fp32"),
    (dict(strided_x=True), "contiguous rows"),
    (dict(bias_n=48, bias_dtype=torch.float64), "bias must be torch.float32 like x"),
    (dict(norm_k=128, norm_dtype=torch.bfloat16), "norm_weight must be torch.float32 like x"),
])
def test_hostile_inputs_are_refused_naming_the_argument(case, match):
    m = case.get("m", 2)
    x = torch.randn(max(m, 1), 128)[:m] if m else torch.randn(0, 128)
    if case.get("strided_x"):
        x = torch.randn(128, 2).t()
    w = torch.randn(case.get("gated_rows", 48), case.get("wk", 128))
    kw = {}
    if "bias_n" in case:
        kw["bias"] = torch.randn(case["bias_n"]).to(case.get("bias_dtype", torch.float32))
    if "norm_k" in case:
        kw["norm_weight"] = torch.randn(case["norm_k"]).to(case.get("norm_dtype", torch.float32))
    if "res_shape" in case:
        kw["residual"] = torch.randn(*case["res_shape"])
    if "dtype" in case:
        x, w = x.to(case["dtype"]), w.to(case["dtype"])
    with pytest.raises(ValueError, match=match):
        small_linear(x, w, gated="gated_rows" in case, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-interpreter check; on a GPU the engine's tokens are "
                    "checked against HF in test_gpu_engine.py")
@pytest.mark.parametrize("gemv_max_tokens", [16, 3], ids=["every-step", "decode-only"])
def test_fused_model_with_small_linear_gives_the_reference_tokens(monkeypatch, gemv_max_tokens):
    """The whole fused forward with small_linear for steps of up to ``gemv_max_tokens`` tokens (3:
    the 4- and 6-token prompt steps take cuBLAS, decodes small_linear) gives the torch path's tokens."""
    from engine import LLM, SamplingParams
    from kernels import small_linear as module

    prompts = [[5, 6, 7, 8], [9, 10]]
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    monkeypatch.setenv("KVLAB_KERNELS", "reference")
    ref = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256).generate(prompts, p)
    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    llm = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256, max_num_batched_tokens=6)
    llm.engine.model.fuse(gemv_max_tokens)
    rows = []
    call = module.small_linear
    monkeypatch.setattr(module, "small_linear", lambda x, *a, **k: rows.append(x.shape[0]) or call(x, *a, **k))
    got = llm.generate(prompts, p)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    layers = llm.engine.model.config.num_hidden_layers
    assert rows and max(rows) <= gemv_max_tokens and len(rows) % (4 * layers) == 0  # four kernels a layer
    assert (max(rows) > 3) == (gemv_max_tokens == 16)


def test_fuse_refuses_a_bound_past_the_kernel():
    from engine.model import CausalLM
    from engine.presets import preset_config

    with pytest.raises(ValueError, match=r"gemv_max_tokens must be in \[0, 16\]"):
        CausalLM(preset_config("tiny-llama"), 64).fuse(17)


def test_layers_with_small_linear_equal_them_without(monkeypatch):
    """Every decoder layer's fused halves in turn, the first taking a pending addend (x beside a
    residual stream) as the cuBLAS path does: the same queries at every layer and the same stream
    after the last (the later layers' norms read the parts of the sums of squares the kernel before
    them wrote)."""
    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    from engine.model import CausalLM
    from engine.presets import preset_config

    torch.manual_seed(0)
    cfg = preset_config("tiny-llama")
    model = CausalLM(cfg, 64).to(DEV).fuse(16)
    for p in model.parameters():  # norms away from 1: their weights must be applied
        p.data.add_(0.05 * torch.randn_like(p))
    t, d, hkv = 3, cfg.head_dim, cfg.num_key_value_heads
    cache = (torch.zeros(8, hkv, d, device=DEV), torch.zeros(8, hkv, d, device=DEV))
    x0, res0 = torch.randn(t, cfg.hidden_size, device=DEV), torch.randn(t, cfg.hidden_size, device=DEV)
    pos, slots = torch.arange(t, device=DEV), torch.full((t,), -1, device=DEV)
    g = torch.Generator().manual_seed(1)
    attn = [torch.randn(t, cfg.num_attention_heads, d, generator=g).to(DEV) for _ in model.model.layers]
    out = {}
    for bound in (0, 16):
        x, res, qs = x0.clone(), res0.clone(), []
        for layer, a in zip(model.model.layers, attn):
            layer.gemv_max_tokens = bound
            (q, _), res = layer.pre_attention(x, res, pos, model.rope, slots, cache)
            qs.append(q.clone())
            x, res = layer.post_attention(a, res)
        out[bound] = qs, (x if res is None else res + x)  # the stream after the last layer, either way
    assert len(out[16][0]) == cfg.num_hidden_layers >= 2
    for q16, q0 in zip(out[16][0], out[0][0]):
        torch.testing.assert_close(q16, q0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[16][1], out[0][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [1, 6])
def test_row_sq_parts_feed_the_next_norm(m):
    """A residual kernel's row_sq_out: its programs' parts add up to each new row's sum of squares
    (rows past M: 0); the next kernel's norm from them equals its norm from x."""
    from kernels.small_linear import num_programs

    x, w, _, _, r = _inputs(m, 72, 96, torch.float32, residual=True, seed=7)  # 72 columns: a part tile
    _, w2, _, nw, _ = _inputs(m, 40, 72, torch.float32, norm=True, seed=8)
    grid = -(-72 // SMALL.block_n)
    assert num_programs(72, 96, torch.device(DEV), config=SMALL) == grid
    buf = torch.full((grid + 2, MAX_TOKENS), float("nan"), device=DEV)  # rows past the grid: untouched
    parts = buf[:grid]
    small_linear(x, w, residual=r, row_sq_out=parts, config=SMALL)
    torch.testing.assert_close(parts.sum(0)[:m], r.pow(2).sum(-1), atol=1e-4, rtol=1e-5)
    assert torch.equal(parts[:, m:], torch.zeros(grid, MAX_TOKENS - m, device=DEV))
    assert buf[grid:].isnan().all()
    want = small_linear(r, w2, norm_weight=nw, eps=1e-5, config=SMALL)
    got = small_linear(r, w2, norm_weight=nw, eps=1e-5, row_sq=parts, config=SMALL)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, small_linear_ref(r, w2, norm_weight=nw, eps=1e-5), atol=1e-4, rtol=1e-4)


def test_row_sq_out_of_another_grid_than_the_launch_is_refused():
    """A buffer sized for the default tiles (num_programs) but launched with wider ones would keep
    stale parts in the rows past the grid, and the next norm sums every row: refused, not summed."""
    from kernels.small_linear import num_programs

    x, w, _, _, r = _inputs(2, 72, 96, torch.float32, residual=True, seed=7)
    wide = LinearConfig(block_n=32, block_k=64, num_warps=4, num_stages=2)
    rows = num_programs(72, 96, torch.device(DEV))
    assert rows > num_programs(72, 96, torch.device(DEV), config=wide) == 3, "the shape must tell the grids apart"
    parts = torch.zeros(rows, MAX_TOKENS, device=DEV)
    small_linear(x, w, residual=r.clone(), row_sq_out=parts)  # the default tiles fill every row
    with pytest.raises(ValueError, match=r"row_sq_out must be a contiguous float32 \[3, 16\].*num_programs"):
        small_linear(x, w, residual=r, row_sq_out=parts, config=wide)


@pytest.mark.parametrize("case,match", [
    ("row_sq without norm", "pass norm_weight too"), ("row_sq_out without residual", "pass residual too"),
    ("short row_sq_out", r"row_sq_out must be a contiguous float32 \[3, 16\]"),
    ("long row_sq_out", r"row_sq_out must be a contiguous float32 \[3, 16\]"),
    ("bf16 row_sq", r"row_sq must be a contiguous float32"),
    ("empty row_sq", r"row_sq must be a contiguous float32 \[1, 16\] .*at least one row"),
])
def test_row_sq_arguments_are_checked(case, match):
    x, w = torch.randn(2, 64), torch.randn(48, 64)
    kw = {"row_sq without norm": dict(row_sq=torch.zeros(3, 16)),
          "row_sq_out without residual": dict(row_sq_out=torch.zeros(3, 16)),
          "short row_sq_out": dict(residual=torch.zeros(2, 48), row_sq_out=torch.zeros(2, 16)),
          "long row_sq_out": dict(residual=torch.zeros(2, 48), row_sq_out=torch.zeros(4, 16)),
          "bf16 row_sq": dict(norm_weight=torch.ones(64), row_sq=torch.zeros(3, 16, dtype=torch.bfloat16)),
          "empty row_sq": dict(norm_weight=torch.ones(64), row_sq=torch.zeros(0, 16))}[case]
    with pytest.raises(ValueError, match=match):
        small_linear(x, w, config=SMALL, **kw)


def test_a_refused_bound_leaves_the_model_unfused():
    from engine.model import CausalLM
    from engine.presets import preset_config

    model = CausalLM(preset_config("tiny-llama"), 64)
    with pytest.raises(ValueError, match="gemv_max_tokens"):
        model.fuse(-1)
    assert not model.fused and model.model.layers[0].self_attn.qkv_proj is None
    assert model.fuse(4).set_gemv_max_tokens(0).model.layers[1].gemv_max_tokens == 0


@pytest.mark.parametrize("gated,bias,residual", [(False, False, False), (True, False, False), (True, True, False),
                                                 (False, True, True), (True, False, True)],
                         ids=["norm", "gated", "gated-bias", "bias-residual", "gated-residual"])
def test_fp16_rounds_where_the_reference_does(gated, bias, residual):
    """fp16 (the interpreter rounds it to nearest, as a GPU does; its bf16 casts truncate): the norm
    rounded before its weight, the GEMM's output before SiLU and before the residual add. Only the
    summation order differs from the reference, so nearly every element is the same bits (a dropped
    rounding point changed 20-60% of them)."""
    x, w, b, nw, r = _inputs(8, 64, 256, torch.float32, gated=gated, bias=bias, norm=True, residual=residual, seed=3)
    x, w, nw = (3 * x).half(), w.half(), (1 + 3 * (nw - 1)).half()  # norm weights well away from 1
    b, r = (None if b is None else b.half()), (None if r is None else r.half())
    want = small_linear_ref(x, w, b, norm_weight=nw, gated=gated, residual=None if r is None else r.clone())
    got = small_linear(x, w, b, norm_weight=nw, gated=gated, residual=r, config=SMALL)
    assert got.dtype == torch.float16
    assert (got != want).float().mean().item() <= 0.02
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_strided_rows_are_read_and_written_at_their_strides():
    """x, the weight and the residual each a view of wider rows (none contiguous): the same result as on
    contiguous copies, the norm's read of all of x included, and nothing outside the views written."""
    g = torch.Generator().manual_seed(11)
    xbuf, rbuf = torch.randn(5, 130, generator=g).to(DEV), torch.randn(5, 70, generator=g).to(DEV)
    w = (torch.randn(64, 96, generator=g) / 10).to(DEV)
    wide = torch.randn(64, 100, generator=g).to(DEV)
    wide[:, :96] = w
    x, res, nw = xbuf[:, 2:98], rbuf[:, 3:67], (1 + 0.1 * torch.randn(96, generator=g)).to(DEV)
    before = rbuf.clone()
    want = small_linear_ref(x.clone(), w, norm_weight=nw, residual=res.clone())
    got = small_linear(x, wide[:, :96], norm_weight=nw, residual=res, config=SMALL)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(rbuf[:, :3], before[:, :3]) and torch.equal(rbuf[:, 67:], before[:, 67:])


@pytest.mark.parametrize("case", ["residual is x", "residual apart from x", "one parts buffer in and out",
                                  "residual rows overlap"])
def test_writes_that_race_with_reads_are_refused(case):
    """Programs write their columns of residual (their row of row_sq_out) while others read all of x
    (every row of row_sq): memory both written and read is refused, naming both."""
    x, w = torch.randn(3, 64, device=DEV), torch.randn(64, 64, device=DEV)
    parts = torch.zeros(4, MAX_TOKENS, device=DEV)
    nw = torch.ones(64, device=DEV)
    call, match = {
        "residual is x": (dict(residual=x), "residual shares memory with x"),
        "residual apart from x": (dict(residual=torch.randn(3, 128, device=DEV)[:, :64]), None),
        "one parts buffer in and out": (dict(residual=torch.zeros(3, 64, device=DEV), norm_weight=nw,
                                             row_sq=parts, row_sq_out=parts), "row_sq_out shares memory with row_sq"),
        "residual rows overlap": (dict(residual=torch.zeros(64, device=DEV).expand(3, 64)), "rows overlap"),
    }[case]
    if match is None:  # a view of its own buffer, apart from x: taken
        got = small_linear(x, w, config=SMALL, **call)
        assert got.data_ptr() == call["residual"].data_ptr()
        return
    with pytest.raises(ValueError, match=match):
        small_linear(x, w, config=SMALL, **call)
