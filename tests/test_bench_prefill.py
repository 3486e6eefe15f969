"""experiments.bench_prefill's cases on CPU (Triton's interpreter): chunks over a cached prefix agree
with the reference in both addressing modes, and its table says PAGED against LINEAR."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="Triton: the dev extra (its interpreter on a CPU) or the gpu extra")

from experiments import bench_kernels as bk  # noqa: E402
from experiments import bench_prefill as bp  # noqa: E402


@pytest.fixture
def on_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CPU check; the device runs the benchmark itself")
    monkeypatch.setattr(bk, "DEV", "cpu")


def test_a_chunk_over_a_cached_prefix(on_cpu):
    case = bp.PrefillCase(2, 16, prefix=32)
    # the chunk's slots: its tokens' rows of the paged cache hold the linear cache's last 16 of each 48
    own = case.k.view(2, 48, bp.HKV, bp.D)[:, 32:].reshape(-1, bp.HKV, bp.D)
    torch.testing.assert_close(case.k_paged[case.meta["paged"].slot_mapping], own)
    errs = case.check(with_reference=True)
    assert set(errs) == set(bp.IMPLS) and max(errs.values()) < 2e-2
    assert case.flops == 4 * bp.D * bp.HQ * 2 * (16 * 32 + 16 * 17 // 2)
    assert "sdpa_flash" not in case.impls() and case.name == "2x16+32"


def test_whole_prompts_through_the_linear_kernel_over_qkv_views(on_cpu):
    case = bp.PrefillCase(2, 32)
    assert case.k_qkv.stride(0) == (bp.HQ + 2 * bp.HKV) * bp.D  # strided, as the engine's projection
    assert case.meta["prompt-qkv"].seq_base.tolist() == [0, 32]  # each sequence at its first token
    errs = case.check(with_reference=True)
    assert set(errs) == {*bp.IMPLS, "prompt-qkv", "sdpa_flash"} and max(errs.values()) < 2e-2
    assert case.impls() == (*bp.IMPLS, "prompt-qkv", "sdpa_flash")


def test_shapes_and_the_paged_vs_linear_table():
    assert bp.parse_shape("4x2048") == (4, 2048, 0)
    assert bp.parse_shape("1x4096+4096") == (1, 4096, 4096)
    for bad in ("4x", "x+1", "2x10", "1x16+-16"):
        with pytest.raises(SystemExit, match="--shapes"):
            bp.parse_shape(bad)
    rows = [dict(batch=b, length=64, prefix=p, impl=i, time_us=t)
            for b, p in ((1, 0), (2, 64)) for i, t in (("paged", 12.0 * b), ("linear", 10.0))]
    rows.append(dict(batch=1, length=64, prefix=0, impl="prompt-qkv", time_us=10.2))
    rows.append(dict(batch=2, length=64, prefix=64, impl="linear-tma", time_us=9.0))
    table = bp.paged_vs_linear(rows)
    assert "| 1x64 | +20.0% | +2.0% | - |" in table and "| 2x64+64 | +140.0% | - | -10.0% |" in table


def test_a_candidate_that_does_not_run_is_reported_not_timed(on_cpu, monkeypatch):
    """The TMA kernel failing (a Triton or device without tensor descriptors) drops it from the
    case with its error; the kernels in the engine are still checked and timed."""
    import kernels.triton_prefill_tma as tma

    def broken(*a, **k):
        raise RuntimeError("no TMA here")

    monkeypatch.setattr(tma, "prefill_tma_into", broken)
    case = bp.PrefillCase(1, 32)
    errs = case.check(with_reference=False)
    assert not set(bp.CANDIDATES) & (set(errs) | set(case.impls()))
    assert case.failed == dict.fromkeys(bp.CANDIDATES, "RuntimeError: no TMA here") and "linear" in errs


def test_bench_kernels_pdl_impls_are_the_kernels_launched_with_pdl(on_cpu, monkeypatch):
    """bench_kernels --pdl: paged_pdl and linear_pdl run the same kernels inside pdl.launches (the PDL path),
    give their plain impls' outputs, and are checked against the reference as those are."""
    from conftest import KernelSpy
    from kernels import pdl, triton_attention as ta

    monkeypatch.setattr(bk, "PDL", True)
    case = bk.DecodeCase(2, 32, 1 << 16)
    assert set(bk.PDL_IMPLS) <= set(case.impls)
    spy = KernelSpy(ta._attn_kernel)
    monkeypatch.setattr(ta, "_attn_kernel", spy)
    for impl in ("paged", "linear"):
        plain = case.run(impl, 0).clone()
        assert torch.equal(case.run(impl + "_pdl", 0), plain)
    assert [s["PDL"] for s in spy.launches] == [False, True, False, True] and not pdl.enabled(torch.device("cpu"))
    errs = case.check()
    assert errs["paged_pdl"] == errs["paged"] and errs["linear_pdl"] == errs["linear"] < 2e-2


def test_bench_kernels_sweep_times_decode_tiles_with_their_error(on_cpu, monkeypatch, tmp_path):
    """bench_kernels --sweep (E): the decode tiles besides choose_config's (keys a loop step, warps, stages)
    at the default split, each row with its error against the reference; a tile of more keys than a split
    holds is left out."""
    import csv

    from conftest import KernelSpy
    from kernels import triton_attention as ta

    monkeypatch.setattr(bk, "DECODE_TILES", ((32, 4, 6), (64, 8, 3), (128, 4, 3)))
    monkeypatch.setattr(bk, "_median_graph_us", lambda fn, calls: fn() or 1.0)
    spy = KernelSpy(ta._attn_kernel)
    monkeypatch.setattr(ta, "_attn_kernel", spy)
    case = bk.DecodeCase(1, 64, 1)
    bk.sweep({(1, 64): case}, copy_bw=1.0, out_dir=tmp_path, tag="cpu", budget_s=600)
    # every swept tile was launched as named, for its time and for its error
    assert sum((s["BLOCK_N"], s["num_warps"], s["num_stages"]) == (32, 4, 6) for s in spy.launches) == 4
    rows = list(csv.DictReader((tmp_path / "sweep_cpu.csv").open()))
    tiles = {(r["impl"], r["config"].split("/x")[0]) for r in rows}
    assert {("paged", "n32/w4/s6"), ("linear", "n32/w4/s6"), ("paged", "n64/w8/s3"), ("linear", "n64/w8/s3")} <= tiles
    assert not any(c.startswith("n128") for _, c in tiles)  # 128 keys a step: more than the 64 a split has
    assert all(float(r["err"]) < 2e-2 for r in rows), [(r["config"], r["err"]) for r in rows]
    monkeypatch.setattr(case, "run", lambda impl, i, config=None: torch.zeros(1, bk.HQ, bk.D))
    assert case.error("linear") > 0.5  # what a config computes is checked, not assumed


def test_read_stream_sums_every_element_once(on_cpu):
    """bench_kernels' read-only bandwidth kernel: its partial sums add up to the buffer's sum, so it
    reads every element exactly once (a skipped or doubled block changes the total)."""
    from experiments.read_stream import BLOCK, stream_read

    x = torch.arange(3 * BLOCK + 123, dtype=torch.float32) % 7 - 3  # integers: exact in fp32
    part = torch.empty(8)
    got = stream_read(x, part, programs_per_sm=2).sum()  # two loop steps a program
    assert got.item() == x.sum().item()
    with pytest.raises(ValueError, match="float32"):
        stream_read(x.half(), part)
