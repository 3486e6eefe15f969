"""Hostile inputs to the Triton wrappers: refused with an error naming the field, before launch.

Without CUDA the kernels run under Triton's interpreter (as in test_kernels_triton.py). The
free checks (shapes, dtypes, devices, strides) run on every call; the value checks (a block id
past the cache, a context longer than its table row...) only with ``KVLAB_KERNEL_CHECKS=1``
(``value_checks.ENABLED``), as they read index tensors back to the host (a device sync).
A launch with any of these inputs reads or writes out of bounds, or is silently wrong.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="Triton: the dev extra (its interpreter on a CPU) or the gpu extra")

from kernels import fused_ops, reference, triton_ops, value_checks  # noqa: E402
from kernels.metadata import Addressing, AttentionMetadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PAGED, LINEAR = Addressing.PAGED, Addressing.LINEAR
H, G, D, BS, SLOTS = 2, 2, 16, 4, 64


def _batch(mode=PAGED, lens=((10, 2), (5, 1)), seed=0):
    """Two sequences (context, queries) in a cache of SLOTS rows: PAGED 4 blocks a row, LINEAR at 0 and 20."""
    gen = torch.Generator().manual_seed(seed)
    kc, vc = (torch.randn(SLOTS, H, D, generator=gen).to(DEVICE) for _ in range(2))
    q_lens = [q for _, q in lens]
    qsl = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    extra = (dict(block_table=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32, device=DEVICE),
                  block_size=BS) if mode == PAGED else
             dict(seq_base=torch.tensor([0, 20], dtype=torch.int64, device=DEVICE)))
    meta = AttentionMetadata(mode, qsl.to(DEVICE), torch.tensor([c for c, _ in lens], dtype=torch.int32, device=DEVICE),
                             max(q_lens), max(c for c, _ in lens), torch.empty(0, dtype=torch.int64, device=DEVICE),
                             **extra)
    q = torch.randn(int(qsl[-1]), H * G, D, generator=gen).to(DEVICE)
    return q, kc, vc, meta


def _with(meta: AttentionMetadata, **changes) -> AttentionMetadata:
    return AttentionMetadata(**{**meta.__dict__, **changes})


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, every other element of a larger buffer (stride 2)."""
    return torch.stack([t, torch.full_like(t, 7)], dim=-1)[..., 0]


@pytest.fixture
def checks(monkeypatch):
    monkeypatch.setattr(value_checks, "ENABLED", True)


# ----------------------------------------------------------------------------- free checks: attention


@pytest.mark.parametrize("mode,field", [(PAGED, "seq_lens"), (PAGED, "query_start_loc"), (LINEAR, "seq_base")])
def test_attention_refuses_strided_index_tensors(mode, field):
    """The kernel reads element i at ptr + i: a strided view gave silently wrong attention."""
    q, kc, vc, meta = _batch(mode)
    bad = _with(meta, **{field: _strided(getattr(meta, field))})
    assert torch.equal(getattr(bad, field), getattr(meta, field))
    with pytest.raises(ValueError, match=f"{field} must be contiguous"):
        triton_ops.attention(q, kc, vc, bad)


def test_attention_refuses_caches_of_other_slot_counts():
    """v_cache shorter than k_cache: the kernel read V past its end."""
    q, kc, vc, meta = _batch()
    with pytest.raises(ValueError, match="agree on slots"):
        triton_ops.attention(q, kc, vc[:8], meta)


@pytest.mark.parametrize("max_query_len", [0, 1])
def test_attention_refuses_understated_max_query_len(max_query_len):
    """max_query_len below a sequence's queries: one tile a sequence, rows past it never written."""
    q, kc, vc, meta = _batch(lens=((10, 2), (5, 2)))
    with pytest.raises(ValueError, match="max_query_len"):
        triton_ops.attention(q, kc, vc, _with(meta, max_query_len=max_query_len))


def test_attention_refuses_bad_metadata_fields():
    q, kc, vc, meta = _batch()
    with pytest.raises(ValueError, match=r"seq_lens must be \[num_seqs\]"):
        triton_ops.attention(q, kc, vc, _with(meta, seq_lens=meta.seq_lens[:, None]))
    with pytest.raises(ValueError, match="block_size must be an int"):
        triton_ops.attention(q, kc, vc, _with(meta, block_size=4.0))
    q, kc, vc, meta = _batch(LINEAR)
    with pytest.raises(ValueError, match="ring must be >= 0"):
        triton_ops.attention(q, kc, vc, _with(meta, ring=-4))


@pytest.mark.parametrize("mode", [PAGED, LINEAR])
def test_attention_accepts_what_it_should(mode):
    """int64 index tensors, strided block-table rows, a query of another float dtype: match the reference."""
    q, kc, vc, meta = _batch(mode)
    meta = _with(meta, query_start_loc=meta.query_start_loc.long(), seq_lens=meta.seq_lens.long())
    if mode == PAGED:
        wide = torch.cat([meta.block_table, meta.block_table], 0)
        meta = _with(meta, block_table=wide[::2])
    for qq in (q, q.half()):
        torch.testing.assert_close(triton_ops.attention(qq, kc, vc, meta).float(),
                                   reference.attention(qq, kc, vc, meta).float(), atol=1e-2, rtol=1e-2)


def test_tma_prefill_refuses_what_the_pointer_kernel_does():
    """The TMA prefill kernel (LINEAR) read strided metadata at ptr + i, V past a shorter v_cache."""
    from kernels.triton_prefill_tma import prefill_tma_into

    q, kc, vc, meta = _batch(LINEAR, lens=((10, 4), (5, 5)))
    out = torch.empty_like(q)
    torch.testing.assert_close(prefill_tma_into(out, q, kc, vc, meta), reference.attention(q, kc, vc, meta),
                               atol=1e-3, rtol=1e-3)
    for field in ("seq_lens", "query_start_loc", "seq_base"):
        with pytest.raises(ValueError, match=f"{field} must be a contiguous 1-D"):
            prefill_tma_into(out, q, kc, vc, _with(meta, **{field: _strided(getattr(meta, field))}))
    with pytest.raises(ValueError, match="as many slots"):
        prefill_tma_into(out, q, kc, vc[:8], meta)
    with pytest.raises(ValueError, match="max_query_len"):
        prefill_tma_into(out, q, kc, vc, _with(meta, max_query_len=2))


# ----------------------------------------------------------------------------- free checks: cache ops


def test_cache_ops_refuse_strided_ids():
    """Index tensors are read at ptr + i: a strided view wrote or copied the wrong rows."""
    kc, vc = torch.zeros(32, H, D, device=DEVICE), torch.zeros(32, H, D, device=DEVICE)
    k = torch.randn(3, H, D, device=DEVICE)
    slots = _strided(torch.tensor([1, 5, 9], device=DEVICE))
    with pytest.raises(ValueError, match="slot_mapping must be contiguous"):
        triton_ops.write_kv(kc, vc, k, k, slots)
    src, dst = _strided(torch.tensor([0, 1], device=DEVICE)), torch.tensor([5, 6], device=DEVICE)
    with pytest.raises(ValueError, match="src must be contiguous"):
        triton_ops.copy_blocks(kc, src, dst, BS)
    with pytest.raises(ValueError, match="block_ids must be contiguous"):
        triton_ops.gather_blocks(kc, src, BS, torch.zeros(2 * BS, H, D, device=DEVICE))
    with pytest.raises(ValueError, match="block_ids must be contiguous"):
        triton_ops.scatter_blocks(kc, src, BS, torch.zeros(2 * BS, H, D, device=DEVICE))
    caches = [(kc, vc), (kc.clone(), vc.clone())]
    stage = torch.zeros(1, 2, 2, BS, H, D, device=DEVICE)
    with pytest.raises(ValueError, match="slots must be contiguous"):
        triton_ops.gather_layers(caches, _strided(torch.arange(BS, device=DEVICE)), BS, stage)


def test_layers_copy_refuses_partial_blocks_and_unlike_layers():
    kc, vc = torch.zeros(32, H, D, device=DEVICE), torch.zeros(32, H, D, device=DEVICE)
    caches = [(kc, vc), (kc.clone(), vc.clone())]
    stage = torch.zeros(1, 2, 2, BS, H, D, device=DEVICE)
    # 6 slots in blocks of 4: the kernel wrote the 2 extra rows past the stage's end
    with pytest.raises(ValueError, match="multiple of block_size"):
        triton_ops.gather_layers(caches, torch.arange(6, device=DEVICE), BS, stage)
    with pytest.raises(ValueError, match="block_size"):
        triton_ops.scatter_layers(caches, torch.arange(4, device=DEVICE), 0, stage)
    # one launch moves every layer as the first: another dtype or head count was moved wrong
    for other in ((kc.half(), vc.half()), (kc[:, :1].contiguous(), vc[:, :1].contiguous())):
        with pytest.raises(ValueError, match="every layer's K and V alike"):
            triton_ops.gather_layers([caches[0], other], torch.arange(BS, device=DEVICE), BS, stage)
    from kernels.triton_cache import layer_pointers

    with pytest.raises(ValueError, match="ptrs must be layer_pointers"):
        triton_ops.gather_layers(caches, torch.arange(BS, device=DEVICE), BS, stage, ptrs=layer_pointers(caches[:1]))


# ----------------------------------------------------------------------------- free checks: fused ops


def test_fused_ops_refuse_bad_vectors_and_tables():
    x = torch.randn(3, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"w must be a contiguous \[32\]"):
        fused_ops.rms_norm(x, torch.randn(8, device=DEVICE), 1e-6)  # read past w
    with pytest.raises(ValueError, match=r"w must be a contiguous \[32\]"):
        fused_ops.rms_norm(x, torch.randn(64, device=DEVICE)[::2], 1e-6)  # every other weight
    with pytest.raises(ValueError, match="odd width"):
        fused_ops.silu_and_mul(torch.randn(3, 65, device=DEVICE))
    q, k = torch.randn(3, 4, D, device=DEVICE), torch.randn(3, 2, D, device=DEVICE)
    cos, sin = torch.randn(16, D // 2, device=DEVICE), torch.randn(16, D // 2, device=DEVICE)
    pos = torch.tensor([0, 5, 9], device=DEVICE)
    with pytest.raises(ValueError, match="positions must be"):
        fused_ops.qk_norm_rope_(q, k, cos, sin, pos[:1])  # one position for three tokens
    with pytest.raises(ValueError, match="positions must be"):
        fused_ops.qk_norm_rope_(q, k, cos, sin, _strided(pos))
    with pytest.raises(ValueError, match="cos must be"):
        fused_ops.qk_norm_rope_(q, k, torch.randn(16, D, device=DEVICE)[:, ::2], sin, pos)
    with pytest.raises(ValueError, match="sin must be"):
        fused_ops.qk_norm_rope_(q, k, cos, torch.randn(16, D, device=DEVICE)[:, : D // 2], pos)
    with pytest.raises(ValueError, match=r"q_w must be a contiguous \[16\]"):
        fused_ops.qk_norm_rope_(q, k, cos, sin, pos, torch.randn(4, device=DEVICE), torch.randn(D, device=DEVICE))


# ----------------------------------------------------------------------------- value checks (debug flag)


@pytest.mark.parametrize("mode,change,match", [
    (PAGED, dict(block_table=[[0, 1, 100, 3], [4, 5, 6, 7]]), "outside the cache's 64 slots"),
    (PAGED, dict(block_table=[[0, -3, 2, 3], [4, 5, 6, 7]]), "outside the cache's 64 slots"),
    (PAGED, dict(seq_lens=[10, 30], max_seq_len=30), "needs 8 blocks of 4, block_table has 4 columns"),
    (LINEAR, dict(seq_base=[0, 60]), "outside the cache's 64 slots"),
    (PAGED, dict(query_start_loc=[0, 2, 4]), "at most q's 3 tokens"),
    (PAGED, dict(query_start_loc=[0, 3, 2]), "query_start_loc must rise"),
    (PAGED, dict(seq_lens=[1, 5]), "must be >= its 2 queries"),
    (PAGED, dict(seq_lens=[-5, 5]), "seq_lens -5"),
])
def test_attention_value_checks(checks, mode, change, match):
    q, kc, vc, meta = _batch(mode)
    like = dict(block_table=meta.block_table, seq_base=meta.seq_base, seq_lens=meta.seq_lens,
                query_start_loc=meta.query_start_loc)
    change = {f: torch.tensor(v, dtype=like[f].dtype, device=DEVICE) if isinstance(v, list) else v
              for f, v in change.items()}
    with pytest.raises(ValueError, match=match):
        triton_ops.attention(q, kc, vc, _with(meta, **change))


def test_tma_prefill_value_checks(checks):
    from kernels.triton_prefill_tma import prefill_tma_into

    q, kc, vc, meta = _batch(LINEAR, lens=((10, 4), (5, 5)))
    bad = _with(meta, seq_base=torch.tensor([0, 60], dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="outside the cache's 64 slots"):
        prefill_tma_into(torch.empty_like(q), q, kc, vc, bad)


def test_attention_value_checks_pass_valid_batches(checks):
    """No false alarms: a sliding window over a table whose blocks before it are gone (-1), a
    ring, empty sequences."""
    q, kc, vc, meta = _batch(lens=((14, 1), (5, 0)))
    meta = _with(meta, block_table=torch.tensor([[-1, -1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32, device=DEVICE),
                 query_start_loc=torch.tensor([0, 1, 1], dtype=torch.int32, device=DEVICE))
    torch.testing.assert_close(triton_ops.attention(q, kc, vc, meta, window=4),
                               reference.attention(q, kc, vc, meta, window=4), atol=1e-3, rtol=1e-3)
    q, kc, vc, meta = _batch(LINEAR, lens=((30, 2), (5, 1)))
    meta = _with(meta, ring=8)
    torch.testing.assert_close(triton_ops.attention(q, kc, vc, meta, window=6),
                               reference.attention(q, kc, vc, meta, window=6), atol=1e-3, rtol=1e-3)


def test_cache_ops_value_checks(checks):
    kc, vc = torch.zeros(32, H, D, device=DEVICE), torch.zeros(32, H, D, device=DEVICE)
    k = torch.randn(3, H, D, device=DEVICE)
    triton_ops.write_kv(kc, vc, k, k, torch.tensor([1, -1, 31], device=DEVICE))  # -1: padding
    with pytest.raises(ValueError, match="slot_mapping holds 1..40"):
        triton_ops.write_kv(kc, vc, k, k, torch.tensor([1, 5, 40], device=DEVICE))
    ok, beyond = torch.tensor([0, 1], device=DEVICE), torch.tensor([5, 8], device=DEVICE)  # 8 blocks: 0..7
    with pytest.raises(ValueError, match="dst holds blocks 5..8"):
        triton_ops.copy_blocks(kc, ok, beyond, BS)
    with pytest.raises(ValueError, match="race"):
        triton_ops.copy_blocks(kc, ok, torch.tensor([1, 2], device=DEVICE), BS)
    buf = torch.zeros(2 * BS, H, D, device=DEVICE)
    with pytest.raises(ValueError, match="block_ids holds blocks 5..8"):
        triton_ops.gather_blocks(kc, beyond, BS, buf)
    with pytest.raises(ValueError, match="block_ids holds blocks"):
        triton_ops.scatter_blocks(kc, -ok - 1, BS, buf)
    stage = torch.zeros(1, 1, 2, BS, H, D, device=DEVICE)
    with pytest.raises(ValueError, match="slots holds 30..33"):
        triton_ops.gather_layers([(kc, vc)], torch.arange(30, 34, device=DEVICE), BS, stage)
    q, kk = torch.randn(3, 4, D, device=DEVICE), torch.randn(3, 2, D, device=DEVICE)
    cos, sin = torch.randn(16, D // 2, device=DEVICE), torch.randn(16, D // 2, device=DEVICE)
    with pytest.raises(ValueError, match="positions holds 0..16"):
        fused_ops.qk_norm_rope_(q, kk, cos, sin, torch.tensor([0, 5, 16], device=DEVICE))


def test_value_checks_off_by_default_read_nothing(monkeypatch):
    """Off (the default): no value is read back, so no device sync on the hot path."""
    assert value_checks.ENABLED is (os.environ.get("KVLAB_KERNEL_CHECKS", "0") not in ("", "0"))
    monkeypatch.setattr(value_checks, "ENABLED", False)

    def boom(*args, **kwargs):
        raise AssertionError("a value check ran with the checks off")

    for name in ("attention", "slots", "blocks"):
        monkeypatch.setattr(value_checks, name, boom)
    q, kc, vc, meta = _batch()
    triton_ops.attention(q, kc, vc, meta)
    triton_ops.write_kv(kc, vc, q[:, :H], q[:, :H], torch.tensor([1, 2, 3], device=DEVICE))
