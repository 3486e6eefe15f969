"""kernels.pdl: programmatic dependent launch of the step's Triton kernels (engine.enable_pdl).

On CPU the kernels run their PDL path under Triton's interpreter (wait, launch_dependents and the L2
prefetch are no-ops there, the rest of the code is the GPU's): the same results as without, and the
launches carry PDL exactly inside ``pdl.launches``. The ordering itself (no read before ``wait``) is
checked on the device: tests/test_gpu_engine.py's parity with HF and graphs = eager with PDL on."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton: the dev extra (its interpreter on a CPU) or the gpu extra")

from conftest import KernelSpy as Spy  # noqa: E402
from kernels import pdl  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"




def test_launches_turns_pdl_on_inside_only_and_restores_on_exit():
    dev = torch.device(DEV)
    assert not pdl.enabled(dev)
    with pdl.launches():
        assert pdl.enabled(dev) == (DEV == "cpu" or pdl.supported(dev))
        with pdl.launches(False):
            assert not pdl.enabled(dev)
        assert pdl.enabled(dev) == (DEV == "cpu" or pdl.supported(dev))
    assert not pdl.enabled(dev)
    with pytest.raises(RuntimeError), pdl.launches():
        raise RuntimeError("a failed step")
    assert not pdl.enabled(dev)  # an exception inside does not leave it on


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answers")
def test_a_cpu_is_not_supported_and_the_check_names_the_field():
    assert not pdl.supported("cpu")
    with pytest.raises(ValueError, match=r"engine.enable_pdl=true needs a CUDA device of compute capability >= 9.0"):
        pdl.check_supported("cpu")
    assert pdl.launch_kwargs(True) == {}  # the interpreter refuses launch_pdl
    assert pdl.launch_kwargs(False) == {}


@pytest.mark.parametrize("rows,row_bytes,budget,lines", [
    (4096, 8192, 16 << 20, 32),  # llama3-8b o_proj: 32 MiB of weights, half of it
    (28672, 8192, 16 << 20, 4),  # gate_up: 585 bytes a row -> 4 lines (a power of two below)
    (16, 8192, 16 << 20, 64),  # a small launch: whole rows
    (16, 200, 16 << 20, 1),  # rows shorter than two lines: one
    (1 << 20, 8192, 16 << 20, 0),  # less than a line a row: none
    (4096, 8192, 0, 0),  # off
])
def test_prefetch_lines_stay_within_the_budget_and_the_row(rows, row_bytes, budget, lines):
    got = pdl.prefetch_lines(rows, row_bytes, budget)
    assert got == lines
    assert got & (got - 1) == 0  # a power of two (tl.arange) or 0
    assert rows * got * pdl.LINE <= max(budget, 0) and got * pdl.LINE <= max(row_bytes, pdl.LINE)


@pytest.mark.parametrize("gated,norm,residual", [(True, True, False), (False, False, True), (False, True, False)])
@pytest.mark.parametrize("prefetch_mb", [0, 24])
def test_small_linear_with_pdl_equals_it_without_and_prefetches(monkeypatch, gated, norm, residual, prefetch_mb):
    from kernels import small_linear as module

    g = torch.Generator().manual_seed(0)
    m, n, k = 3, 40, 128
    x = torch.randn(m, k, generator=g).to(DEV)
    w = (torch.randn((2 if gated else 1) * n, k, generator=g) / k ** 0.5).to(DEV)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(DEV) if norm else None
    r = torch.randn(m, n, generator=g).to(DEV) if residual else None
    spy = Spy(module._small_linear_kernel)
    monkeypatch.setattr(module, "_small_linear_kernel", spy)
    monkeypatch.setattr(pdl, "PREFETCH_BYTES", prefetch_mb << 20)
    cfg = module.LinearConfig(block_n=16, block_k=64, num_warps=4, num_stages=2)
    off = module.small_linear(x, w, norm_weight=nw, gated=gated, residual=None if r is None else r.clone(), config=cfg)
    with pdl.launches():
        on = module.small_linear(x, w, norm_weight=nw, gated=gated, residual=None if r is None else r.clone(),
                                 config=cfg)
    assert torch.equal(on, off)
    assert spy.launches[0]["PDL"] is False and spy.launches[0]["PREFETCH_LINES"] == 0
    assert spy.launches[1]["PDL"] is True
    assert spy.launches[1]["PREFETCH_LINES"] == pdl.prefetch_lines(w.shape[0], k * w.element_size())
    assert (spy.launches[1]["PREFETCH_LINES"] > 0) == (prefetch_mb > 0)


def test_attention_and_rope_with_pdl_equal_them_without(monkeypatch):
    """Decode with split-KV (the attention kernel and the merge) and the fused norm + RoPE + store."""
    from kernels import fused_ops, triton_attention as ta
    from kernels.metadata import Addressing, AttentionMetadata

    g = torch.Generator().manual_seed(0)
    seqs, hq, hkv, d, bs, ctx = 2, 4, 2, 32, 16, 48
    blocks = seqs * ctx // bs
    kc = torch.randn(blocks * bs, hkv, d, generator=g).to(DEV)
    vc = torch.randn(blocks * bs, hkv, d, generator=g).to(DEV)
    q = torch.randn(seqs, hq, d, generator=g).to(DEV)
    meta = AttentionMetadata(
        mode=Addressing.PAGED, query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor([ctx, ctx - 5], dtype=torch.int32, device=DEV),
        block_table=torch.arange(blocks, dtype=torch.int32, device=DEV).view(seqs, -1), block_size=bs,
        max_query_len=1, max_seq_len=ctx, slot_mapping=torch.full((seqs,), -1, dtype=torch.int64, device=DEV))
    cfg = ta.AttnConfig(block_q=1, block_n=16, num_splits=3, num_warps=4, num_stages=2)
    attn, merge = Spy(ta._attn_kernel), Spy(ta._merge_kernel)
    monkeypatch.setattr(ta, "_attn_kernel", attn)
    monkeypatch.setattr(ta, "_merge_kernel", merge)
    off = ta.attention_into(torch.empty_like(q), q, kc, vc, meta, config=cfg)
    with pdl.launches():
        on = ta.attention_into(torch.empty_like(q), q, kc, vc, meta, config=cfg)
    assert torch.equal(on, off)
    assert [s["PDL"] for s in attn.launches] == [s["PDL"] for s in merge.launches] == [False, True]

    rope = Spy(fused_ops._qk_norm_rope_kernel)
    monkeypatch.setattr(fused_ops, "_qk_norm_rope_kernel", rope)
    cos, sin = torch.randn(64, d // 2, generator=g).to(DEV), torch.randn(64, d // 2, generator=g).to(DEV)
    pos = torch.tensor([3, 9], device=DEV)
    results = []
    for on in (False, True):
        qq, kk, v = q.clone(), torch.randn(seqs, hkv, d, generator=torch.Generator().manual_seed(1)).to(DEV), q[:, :hkv]
        cache = (torch.zeros_like(kc), torch.zeros_like(vc))
        with pdl.launches(on):
            fused_ops.qk_norm_rope_(qq, kk, cos, sin, pos, cache=(v, *cache, torch.tensor([5, 70], device=DEV)))
        results.append((qq, kk, *cache))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert [s["PDL"] for s in rope.launches] == [False, True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-interpreter check; on a GPU test_gpu_engine.py runs "
                    "the engine with enable_pdl against HF")
def test_a_model_with_pdl_gives_the_same_tokens_and_launches_every_kernel_with_it(monkeypatch):
    """The fused model (small_linear for decodes) with ``CausalLM.pdl``: the tokens of the model without,
    and every launch of the step's Triton kernels carries PDL; none outside ``forward``."""
    from engine import LLM, SamplingParams
    from kernels import fused_ops, small_linear, triton_attention as ta

    prompts = [[5, 6, 7, 8], [9, 10]]
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    tokens, spies = {}, {}
    for on in (False, True):
        llm = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256)
        llm.engine.model.fuse(16).pdl = on
        spies[on] = [Spy(small_linear._small_linear_kernel), Spy(ta._attn_kernel), Spy(fused_ops._qk_norm_rope_kernel)]
        for mod, name, spy in zip((small_linear, ta, fused_ops), ("_small_linear_kernel", "_attn_kernel",
                                                                  "_qk_norm_rope_kernel"), spies[on]):
            monkeypatch.setattr(mod, name, spy)
        tokens[on] = [o.token_ids for o in llm.generate(prompts, p)]
        for mod, name, spy in zip((small_linear, ta, fused_ops), ("_small_linear_kernel", "_attn_kernel",
                                                                  "_qk_norm_rope_kernel"), spies[on]):
            monkeypatch.setattr(mod, name, spy.kernel)
    assert tokens[True] == tokens[False] and len(tokens[True][0]) == 3
    for on in (False, True):
        for spy in spies[on]:
            assert spy.launches and {s["PDL"] for s in spy.launches} == {on}
    assert not pdl.enabled(torch.device("cpu"))  # nothing left on after the steps


def test_enable_pdl_is_a_flag_and_refused_where_it_cannot_run():
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match=r"enable_pdl='yes': give true or false"):
        EngineConfig(enable_pdl="yes")
    with pytest.raises(ValueError, match=r"enable_pdl=true runs with tensor_parallel_size=1 only"):
        EngineConfig(enable_pdl=True, tensor_parallel_size=2, device="cuda")
    assert EngineConfig().enable_pdl is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU engine's refusal")
def test_a_cpu_engine_with_pdl_is_refused_before_its_weights_are_made(monkeypatch):
    from engine import LLMEngine
    from engine import llm_engine
    from engine.config import EngineConfig

    made = []
    monkeypatch.setattr(llm_engine, "load_model", lambda *a, **k: made.append(1))
    with pytest.raises(ValueError, match=r"engine.enable_pdl=true needs a CUDA device .* set engine.enable_pdl=false"):
        LLMEngine(EngineConfig(model="tiny-llama", device="cpu", enable_pdl=True))
    assert not made


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not pdl.supported("cuda"), reason="a Hopper (or newer) GPU")
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("trigger,prefetch_mb", [(pdl.TRIGGER_END, 0), (pdl.TRIGGER_END, 24), (pdl.TRIGGER_EARLY, 24),
                                                 (pdl.TRIGGER_WAIT, 0)])
def test_a_chain_of_kernels_with_pdl_in_a_cuda_graph_equals_it_without(monkeypatch, m, trigger, prefetch_mb):
    """Layers of llama3-8b's MLP shapes (the residual stream updated in place, the next norm reading the
    parts of the sums of squares the kernel before wrote), captured in a CUDA graph with PDL: each
    kernel's programs start before the one before has finished; bit for bit the eager chain without.
    Every trigger placement (KVLAB_PDL_TRIGGER; the early one leans on wait's transitivity most) and the
    L2 prefetch (KVLAB_PDL_PREFETCH_MB), as the session's timing runs launched them."""
    from kernels.small_linear import num_programs, small_linear

    monkeypatch.setattr(pdl, "TRIGGER", trigger)
    monkeypatch.setattr(pdl, "PREFETCH_BYTES", prefetch_mb << 20)

    torch.manual_seed(0)
    h, inter, layers, dev = 4096, 14336, 6, torch.device("cuda")
    ws = [(torch.randn(2 * inter, h, device=dev, dtype=torch.bfloat16) / h ** 0.5,
           torch.randn(h, inter, device=dev, dtype=torch.bfloat16) / inter ** 0.5,
           1 + 0.1 * torch.randn(h, device=dev, dtype=torch.bfloat16)) for _ in range(layers)]
    sq = torch.zeros(num_programs(h, inter, dev), 16, device=dev)
    stream0 = torch.randn(m, h, device=dev, dtype=torch.bfloat16)

    def chain(stream):
        for i, (gate_up, down, nw) in enumerate(ws):
            act = small_linear(stream, gate_up, norm_weight=nw, gated=True, row_sq=sq if i else None)
            small_linear(act, down, residual=stream, row_sq_out=sq)
        return stream

    expected = chain(stream0.clone())
    stream = stream0.clone()
    with pdl.launches():
        chain(stream.clone())  # compiles the PDL variants outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain(stream)
    for _ in range(3):  # replays: the same input each time
        stream.copy_(stream0)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(stream, expected)


def test_every_pdl_kernel_waits_before_its_first_global_access_in_its_ptx():
    """The ordering itself, without a GPU: each kernel launched with PDL, compiled for sm_90 with the GPU versions of
    kernels.pdl's helpers (a process without TRITON_INTERPRET), every trigger placement: one griddepcontrol.wait and
    no global load, store, async copy or atomic before it in its PTX (tests/pdl_ptx_check.py). The interpreter's
    no-op helpers cannot see a load moved above ``wait``; this does (and so would a compiler that hoisted one)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend (PTX)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "pdl_ptx_check.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("OK"), run.stdout[-4000:] + run.stderr[-2000:]


def test_an_unknown_trigger_placement_is_refused():
    """KVLAB_PDL_TRIGGER=late (the name of "wait" at first) no longer silently means the default."""
    assert pdl._trigger("wait") == pdl.TRIGGER_WAIT and pdl._trigger("end") == pdl.TRIGGER_END
    with pytest.raises(ValueError, match=r"KVLAB_PDL_TRIGGER='late': choose one of early, wait, end"):
        pdl._trigger("late")


@pytest.mark.parametrize("capability,expected", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)])
def test_only_hopper_and_newer_gpus_take_pdl(monkeypatch, capability, expected):
    """A CUDA device of compute capability below 9.0 (A100, L4) has no griddepcontrol: neither supported nor
    enabled inside ``launches``; 9.0 and newer are (the interpreter's stand-in answers aside)."""
    monkeypatch.setattr(pdl, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    pdl._capable.cache_clear()
    try:
        dev = torch.device("cuda", 0)
        assert pdl.supported(dev) is expected
        with pdl.launches():
            assert pdl.enabled(dev) is expected
        assert not pdl.enabled(dev)
        if not expected:
            with pytest.raises(ValueError, match="compute capability >= 9.0"):
                pdl.check_supported(dev)
    finally:
        pdl._capable.cache_clear()


def test_piecewise_steps_launch_with_pdl_only_for_a_pdl_model(monkeypatch):
    """Piecewise graphs' pieces and eager attentions (CPU: the pieces called as they are) launch with PDL for a
    model with ``pdl`` on, and a model without it in the same process launches without: nothing leaks."""
    from engine.model import CausalLM
    from engine.piecewise_graphs import PiecewiseGraphs
    from engine.presets import preset_config
    from kernels import triton_attention as ta
    from kernels.metadata import Addressing, contiguous_metadata

    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    cfg = preset_config("tiny-llama")
    spy = Spy(ta._attn_kernel)
    monkeypatch.setattr(ta, "_attn_kernel", spy)
    for on in (True, False):
        torch.manual_seed(0)
        model = CausalLM(cfg, 64).fuse(16)
        model.pdl = on
        d, hkv = cfg.head_dim, cfg.num_key_value_heads
        caches = [(torch.zeros(64, hkv, d), torch.zeros(64, hkv, d)) for _ in model.model.layers]
        pw = PiecewiseGraphs(model, caches, 8, torch.device("cpu"))
        pw.capture()
        meta = contiguous_metadata(Addressing.LINEAR, [3], [3], torch.device("cpu"))
        spy.launches.clear()
        pw.run(3, torch.tensor([5, 6, 7]), torch.arange(3), torch.arange(3), meta)
        assert spy.launches and {s["PDL"] for s in spy.launches} == {on}, on
    assert not pdl.enabled(torch.device("cpu"))
