"""experiments/bench_small_linear's pieces that decide what it times, on the CPU (Triton's interpreter):
the QKV + RoPE epilogue timing checks the fused kernel against the reference first, and the sweep of the
RoPE epilogue's tiles only tries tiles the kernel takes (pairs within a head, the whole head when normed)."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton: the dev extra (its interpreter on a CPU) or the gpu extra")

from engine.presets import preset_config  # noqa: E402
from experiments import bench_small_linear as bench  # noqa: E402
from kernels import small_linear_rope  # noqa: E402


def _cfg(preset: str):
    cfg = preset_config(preset)
    cfg.head_dim = 32  # the epilogue's smallest head (MIN_HEAD_DIM): 16 pairs a half-head
    return cfg


def _once(fn, n, **_):
    """Stands in for _median_graph_us (CUDA graphs): runs the timed callable once, returns its launch count."""
    fn()
    return float(n)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_qkv_rope_timing_checks_the_fused_kernel_against_the_reference(monkeypatch, preset):
    monkeypatch.setattr(bench, "_median_graph_us", _once)
    cfg = _cfg(preset)
    layers = bench._weights(cfg, 2, "cpu")
    x = torch.randn(3, cfg.hidden_size).to(bench.DTYPE)
    epi = bench.rope_epilogue(cfg, 3, "cpu")
    assert epi.norm == cfg.qk_norm
    row = bench.time_qkv_rope(layers, x, cfg.rms_norm_eps, epi)
    # bf16 rounding (the interpreter's casts truncate: test_small_linear_rope's bound), not a wrong rotation
    # or a missing norm (either is of order 1)
    assert row["qkv_rope_rel_err"] < 5e-2
    assert row["qkv_rope_us"] == row["qkv_then_rope_us"] == 2.0
    k_cache, v_cache, slots = epi.cache
    assert k_cache[slots].abs().sum() > 0 and v_cache[slots].abs().sum() > 0  # the timed kernels stored there


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_the_rope_sweep_tries_only_tiles_the_epilogue_takes(monkeypatch, preset):
    monkeypatch.setattr(bench, "_median_graph_us", _once)
    cfg = _cfg(preset)
    layers = bench._weights(cfg, 1, "cpu")
    epi = bench.rope_epilogue(cfg, 1, "cpu")
    tried = []
    real = bench.small_linear

    def spy(*a, config=None, **kw):
        tried.append(config)
        assert kw.get("rope") is epi
        return real(*a, config=config, **kw)

    monkeypatch.setattr(bench, "small_linear", spy)
    best = bench.sweep([w["qkv"] for w in layers], 1, "qkv_rope", "cpu", budget_s=600, rope=epi)
    assert best and len(best) == len(tried)
    for _, c in best:
        small_linear_rope.check_tiles(epi, c.block_n)  # raises on a tile the kernel refuses
    assert {c.block_n for _, c in best} == {16}  # head_dim 32: 16 pairs a half-head, normed or not
