"""Triton kernels against the torch reference (kernels/reference.py).

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below
before Triton is imported); with CUDA the same tests run the compiled kernels. Every
case draws fresh random data (seeded per case, KVLAB_TEST_SEED shifts all seeds), and
poisons what the kernel must not read or must write: unused cache slots and other layers
hold NaN, output and split-KV scratch buffers start as NaN.
"""
from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="Triton: the dev extra (its interpreter on a CPU) or the gpu extra")

from kernels import reference  # noqa: E402
from kernels import triton_attention, triton_ops  # noqa: E402
from kernels.metadata import Addressing, AttentionMetadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = {
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
}
REL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _gen(*key) -> torch.Generator:
    seed = zlib.crc32(repr(key).encode()) + int(os.environ.get("KVLAB_TEST_SEED", "0"))
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def _assert_same(actual: torch.Tensor, expect: torch.Tensor, converted: bool = False) -> None:
    """Bit-exact, NaN where NaN. A write that converts fp32 -> bf16 may differ by one ulp
    under the interpreter, which rounds toward zero (the GPU rounds to nearest even)."""
    rtol = 2**-7 if converted and DEVICE.type == "cpu" else 0.0
    torch.testing.assert_close(actual, expect, equal_nan=True, rtol=rtol, atol=0)


def _assert_close_attn(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output elements"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[out.dtype])
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel < REL[out.dtype], f"relative error {rel:.2e}"


# ----------------------------------------------------------------------------- batch builder


def make_cache(
    num_slots: int, num_kv_heads: int, head_dim: int, dtype, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN-filled caches; ``interleaved`` views one layer of a [slots, layers, 2, H, D] buffer."""
    if interleaved:
        buf = torch.full((num_slots, 3, 2, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        return buf[:, 1, 0], buf[:, 1, 1], buf
    k = torch.full((num_slots, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v = torch.full_like(k, float("nan"))
    return k, v, torch.stack([k, v])


def make_batch(
    gen: torch.Generator,
    lens: list[tuple[int, int]],
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    mode: Addressing,
    block_size: int = 16,
    interleaved: bool = False,
):
    """A batch of sequences given as (context length, query length), with the context
    already in a NaN-poisoned cache at randomly scattered blocks / base offsets."""
    num_seqs = len(lens)
    if mode == Addressing.PAGED:
        nblocks = [-(-ctx // block_size) for ctx, _ in lens]
        total = sum(nblocks) + 2  # + spare blocks that stay poisoned
        perm = torch.randperm(total, generator=gen)
        poison_block = int(perm[-1])
        max_blocks = max(nblocks) + 1
        table = torch.full((num_seqs, max_blocks), poison_block, dtype=torch.int32)
        at = 0
        for s, n in enumerate(nblocks):
            table[s, :n] = perm[at : at + n].to(torch.int32)
            at += n
        num_slots = total * block_size
        extra = dict(block_table=table.to(DEVICE), block_size=block_size)
    else:
        bases, at = [], 0
        for ctx, _ in lens:
            at += _randint(gen, 0, 5)  # poisoned gaps between regions
            bases.append(at)
            at += ctx + _randint(gen, 0, 5)
        num_slots = at + 1
        extra = dict(seq_base=torch.tensor(bases, dtype=torch.int64, device=DEVICE))
    k_cache, v_cache, buf = make_cache(num_slots, num_kv_heads, head_dim, dtype, interleaved)

    q_lens = [q for _, q in lens]
    qsl = torch.zeros(num_seqs + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    meta = AttentionMetadata(
        mode=mode,
        query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor([c for c, _ in lens], dtype=torch.int32, device=DEVICE),
        max_query_len=max(q_lens),
        max_seq_len=max(c for c, _ in lens),
        slot_mapping=torch.empty(0, dtype=torch.int64, device=DEVICE),
        **extra,
    )
    slots, new_slots = [], []
    for s, (ctx, q_len) in enumerate(lens):
        sl = reference.token_slots(meta, s, ctx)
        slots.append(sl)
        new_slots.append(sl[ctx - q_len :])
    meta.slot_mapping = torch.cat(new_slots)
    all_slots = torch.cat(slots)
    n = all_slots.numel()
    reference.write_kv(
        k_cache, v_cache,
        _randn(gen, n, num_kv_heads, head_dim, dtype=dtype),
        _randn(gen, n, num_kv_heads, head_dim, dtype=dtype),
        all_slots,
    )
    q = _randn(gen, int(qsl[-1]), num_kv_heads * group, head_dim, dtype=dtype)
    return q, k_cache, v_cache, meta, buf


def random_lens(gen: torch.Generator, num_seqs: int, max_ctx: int, max_prefill: int = 48) -> list[tuple[int, int]]:
    """Mix of decode tokens, whole prompts, prefill chunks over a cached prefix, empty seqs."""
    lens = []
    for _ in range(num_seqs):
        kind = _randint(gen, 0, 5)
        if kind <= 1:  # decode
            lens.append((_randint(gen, 1, max_ctx), 1))
        elif kind == 2:  # whole prompt
            ctx = _randint(gen, 1, max_prefill)
            lens.append((ctx, ctx))
        elif kind <= 4:  # chunk after a cached prefix
            q = _randint(gen, 2, max_prefill)
            lens.append((_randint(gen, q, max(q, max_ctx)), q))
        else:  # no query tokens this step
            lens.append((_randint(gen, 1, max_ctx), 0))
    if all(q == 0 for _, q in lens):
        lens[0] = (lens[0][0], 1)
    return lens


def run_attention(q, k_cache, v_cache, meta, scale=None, config=None, monkeypatch=None) -> torch.Tensor:
    """Triton attention into a NaN-poisoned output (and NaN split-KV scratch)."""
    if monkeypatch is not None:
        monkeypatch.setattr(
            triton_attention, "_workspace",
            lambda shape, device: torch.full(shape, float("nan"), dtype=torch.float32, device=device),
        )
    out = _nan_like(q)
    triton_ops.attention_into(out, q, k_cache, v_cache, meta, scale, config=config)
    return out


def record_grids(monkeypatch) -> list:
    """The grid of every attention launch from now on, in order."""
    grids, kernel = [], triton_attention._attn_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_attention, "_attn_kernel", Recorder())
    return grids


PAGED, LINEAR = Addressing.PAGED, Addressing.LINEAR

# (mode, block_size, group, dtype, head_dim, num_kv_heads): every block size, GQA ratio,
# dtype and head dim appears with several partners, not the full product (interpreter time).
MIXED_CASES = [
    (PAGED, 1, 1, torch.bfloat16, 64, 2),
    (PAGED, 16, 4, torch.float16, 128, 2),
    (PAGED, 256, 8, torch.bfloat16, 64, 1),
    (LINEAR, 0, 1, torch.float32, 128, 2),
    (PAGED, 16, 8, torch.float32, 64, 1),
    (LINEAR, 0, 4, torch.bfloat16, 64, 2),
    (PAGED, 1, 4, torch.float32, 128, 1),
    (LINEAR, 0, 8, torch.float16, 128, 1),
    (PAGED, 256, 1, torch.float16, 128, 2),
    (PAGED, 16, 1, torch.bfloat16, 32, 3),  # another power-of-two head dim
    (PAGED, 16, 7, torch.float16, 64, 1),  # non-power-of-two group (e.g. Qwen2-7B)
    (LINEAR, 0, 2, torch.bfloat16, 80, 2),  # non-power-of-two head dim
]


def _case_id(c) -> str:
    mode, bs, group, dtype, d, hkv = c
    m = f"paged{bs}" if mode == PAGED else "linear"
    return f"{m}-g{group}-{str(dtype).split('.')[-1]}-d{d}-kv{hkv}"


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("case", MIXED_CASES, ids=_case_id)
def test_attention_mixed_batch(case, monkeypatch):
    mode, bs, group, dtype, d, hkv = case
    gen = _gen("mixed", case)
    lens = random_lens(gen, num_seqs=5, max_ctx=200)
    q, kc, vc, meta, _ = make_batch(
        gen, lens, num_kv_heads=hkv, group=group, head_dim=d, dtype=dtype, mode=mode, block_size=bs
    )
    out = run_attention(q, kc, vc, meta, monkeypatch=monkeypatch)
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))


@pytest.mark.parametrize("mode,bs", [(PAGED, 1), (PAGED, 16), (PAGED, 256), (LINEAR, 0)])
@pytest.mark.parametrize("splits", [None, 1, 3, 8])
def test_attention_decode_split_kv(mode, bs, splits, monkeypatch):
    """Decode-only batches, one pass and split-KV (including splits left empty by short
    contexts, and a non-power-of-two split count)."""
    gen = _gen("decode", mode, bs, splits)
    group, hkv, dtype = (4, 2, torch.bfloat16) if bs != 1 else (8, 1, torch.float16)
    lens = [(_randint(gen, 1, 400), 1) for _ in range(3)] + [(1, 1), (_randint(gen, 2, 40), 1)]
    q, kc, vc, meta, _ = make_batch(
        gen, lens, num_kv_heads=hkv, group=group, head_dim=64, dtype=dtype, mode=mode, block_size=bs
    )
    config = None
    if splits is not None:
        # both ways of fetching block ids (PAGED): by hand one tile ahead, or pipeliner
        config = triton_attention.AttnConfig(
            block_q=1, block_n=32, num_splits=splits, num_warps=4, num_stages=2 if splits != 3 else 5,
            bt_ahead=splits != 3,
        )
    out = run_attention(q, kc, vc, meta, config=config, monkeypatch=monkeypatch)
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))


@pytest.mark.parametrize("mode,bs", [(PAGED, 16), (LINEAR, 0)])
@pytest.mark.parametrize("splits", [1, 3])
def test_attention_decode_seq_major(mode, bs, splits, monkeypatch):
    """``seq_major``: a decode launch's grid is (KV heads, sequences, splits), the same outputs;
    a batch with prefill tiles keeps its (tiles, heads) grid."""
    gen = _gen("seq-major", mode, bs, splits)
    lens = sorted((_randint(gen, 1, 300) for _ in range(6)), reverse=True)  # longest first, as it is meant
    q, kc, vc, meta, _ = make_batch(gen, [(c, 1) for c in lens], num_kv_heads=3, group=2, head_dim=32,
                                    dtype=torch.float16, mode=mode, block_size=bs)
    grids = record_grids(monkeypatch)
    for seq_major in (False, True):
        cfg = triton_attention.AttnConfig(block_q=1, block_n=32, num_splits=splits, num_warps=4, num_stages=2,
                                          seq_major=seq_major)
        _assert_close_attn(run_attention(q, kc, vc, meta, config=cfg, monkeypatch=monkeypatch),
                           reference.attention(q, kc, vc, meta))
    assert grids == [(6, 3, splits), (3, 6, splits)]
    q2, kc2, vc2, mixed, _ = make_batch(gen, [(40, 5), (30, 1)], num_kv_heads=3, group=2, head_dim=32,
                                        dtype=torch.float16, mode=mode, block_size=bs)
    cfg = triton_attention.AttnConfig(block_q=2, block_n=32, num_splits=1, num_warps=4, num_stages=2, seq_major=True)
    _assert_close_attn(run_attention(q2, kc2, vc2, mixed, config=cfg, monkeypatch=monkeypatch),
                       reference.attention(q2, kc2, vc2, mixed))
    assert grids[-1][1] == 3  # not direct: tiles first, heads second


def test_decode_goes_sequence_by_sequence_from_one_split_of_enough_sequences(monkeypatch):
    """choose_config: switched on (KVLAB_SEQ_MAJOR_MIN_SEQS), decode in one split from that many
    sequences launches sequence by sequence (the engine orders such batches longest first); fewer
    sequences, split launches and prefill keep the head-by-head grid. Off by default."""
    from kernels import metadata
    from kernels.metadata import SEQ_MAJOR_FROM

    llama = dict(max_seq_len=2048, num_kv_heads=8, group=4, head_dim=128, elem_size=2, num_sms=132)
    if "KVLAB_SEQ_MAJOR_MIN_SEQS" not in os.environ:
        assert not triton_attention.choose_config(num_seqs=256, max_query_len=1, **llama).seq_major
    monkeypatch.setattr(metadata, "SEQ_MAJOR_MIN_SEQS", SEQ_MAJOR_FROM)
    SEQ_MAJOR_MIN_SEQS = SEQ_MAJOR_FROM
    for n in (SEQ_MAJOR_MIN_SEQS, 256):
        cfg = triton_attention.choose_config(num_seqs=n, max_query_len=1, **llama)
        assert cfg.num_splits == 1 and cfg.seq_major, n
    assert not triton_attention.choose_config(num_seqs=SEQ_MAJOR_MIN_SEQS - 1, max_query_len=1, **llama).seq_major
    few_heads = triton_attention.choose_config(num_seqs=SEQ_MAJOR_MIN_SEQS, max_query_len=1,
                                               **{**llama, "num_kv_heads": 1})
    assert few_heads.num_splits > 1 and not few_heads.seq_major
    assert not triton_attention.choose_config(num_seqs=256, max_query_len=64, **llama).seq_major


@pytest.mark.parametrize("even", [True, False], ids=["even", "fixed"])
@pytest.mark.parametrize("mode,bs", [(PAGED, 16), (LINEAR, 0)])
def test_attention_split_kv_stale_max_seq_len(mode, bs, even, monkeypatch):
    """Fixed-width split bounds come from meta.max_seq_len; if it is stale (smaller than a
    context, as in a CUDA graph captured earlier) the last split takes the rest: still exact.
    Even splits never read it."""
    gen = _gen("stale", mode, bs)
    lens = [(_randint(gen, 100, 300), 1) for _ in range(3)]
    q, kc, vc, meta, _ = make_batch(
        gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.float16, mode=mode, block_size=bs
    )
    meta.max_seq_len = 40
    config = triton_attention.AttnConfig(block_q=1, block_n=16, num_splits=3, num_warps=4, num_stages=2,
                                         even_split=even)
    out = run_attention(q, kc, vc, meta, config=config, monkeypatch=monkeypatch)
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))


@pytest.mark.parametrize("even", [True, False], ids=["even", "fixed"])
@pytest.mark.parametrize("mode,bs", [(PAGED, 16), (LINEAR, 0)])
def test_attention_split_kv_ragged_graph_bound(mode, bs, even, monkeypatch):
    """A ragged decode batch under a CUDA graph's bound (max_seq_len = max_model_len, far above
    every context): even splits cut each sequence's own keys (some splits of the shortest ones
    empty), fixed ones cut the bound; both exact."""
    gen = _gen("ragged", mode, bs, even)
    # 321 keys in 5 splits of 16-key tiles: parts of 80, the last one holding a single key
    lens = [(n, 1) for n in (1, 7, 33, _randint(gen, 40, 90), _randint(gen, 150, 300), 321)]
    q, kc, vc, meta, _ = make_batch(
        gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.float16, mode=mode, block_size=bs
    )
    meta.max_seq_len = 2048
    config = triton_attention.AttnConfig(block_q=1, block_n=16, num_splits=5, num_warps=4, num_stages=2,
                                         even_split=even)
    out = run_attention(q, kc, vc, meta, config=config, monkeypatch=monkeypatch)
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))


@pytest.mark.parametrize("mode,bs", [(PAGED, 16), (LINEAR, 0)])
def test_attention_split_kv_mixed_batch(mode, bs, monkeypatch):
    """Split-KV is general: prefill tiles split too (causal rows with no key in a split)."""
    gen = _gen("split-mixed", mode, bs)
    lens = random_lens(gen, num_seqs=4, max_ctx=150, max_prefill=40)
    q, kc, vc, meta, _ = make_batch(
        gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.float16, mode=mode, block_size=bs
    )
    config = triton_attention.AttnConfig(block_q=4, block_n=16, num_splits=4, num_warps=4, num_stages=2)
    out = run_attention(q, kc, vc, meta, config=config, monkeypatch=monkeypatch)
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))


@pytest.mark.parametrize("block_q", [1, 2, 8])
@pytest.mark.parametrize("short", [True, False], ids=["spec-decode", "chunks"])
def test_attention_query_tiling(block_q, short, monkeypatch):
    """Program -> (sequence, query tile) mapping: binary search over query_start_loc for
    any tile height, or one program per sequence when every q_len fits one tile; with
    empty sequences in between."""
    gen = _gen("tiling", block_q, short)
    max_q = 3 if short else 11
    lens = [(_randint(gen, max_q, 90), _randint(gen, 0, max_q)) for _ in range(6)]
    lens[1] = (lens[1][0], 0)
    lens[2] = (lens[2][0], max_q)
    q, kc, vc, meta, _ = make_batch(
        gen, lens, num_kv_heads=1, group=4, head_dim=32, dtype=torch.float16, mode=PAGED, block_size=16
    )
    config = triton_attention.AttnConfig(
        block_q=block_q, block_n=32, num_splits=1, num_warps=4, num_stages=2, bt_ahead=block_q != 2
    )
    out = run_attention(q, kc, vc, meta, config=config, monkeypatch=monkeypatch)
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))


@pytest.mark.parametrize("mode", [PAGED, LINEAR])
def test_attention_trailing_padding_needs_no_tiles(mode, monkeypatch):
    """Full CUDA graphs pad a step to max_num_seqs empty sequences after the real ones
    (``trailing_padding``): the grid then bounds the query tiles by the tokens, not by the
    sequences, and the real ones' output is unchanged."""
    gen = _gen("trailing", mode)
    lens = [(40, 3), (17, 1), (60, 5), (9, 1)] + [(0, 0)] * 60  # 10 tokens, 64 sequences
    q, kc, vc, meta, _ = make_batch(gen, lens, num_kv_heads=2, group=2, head_dim=32, dtype=torch.float16,
                                    mode=mode, block_size=16)
    meta.max_query_len = 8  # the padded size's tile config, as a captured graph has it
    want = reference.attention(q, kc, vc, meta)
    grids = record_grids(monkeypatch)
    for block_q in (4, 8):  # tiles searched; one program a sequence (every query fits a tile)
        config = triton_attention.AttnConfig(block_q=block_q, block_n=16, num_splits=1, num_warps=4, num_stages=2)
        for padding in (False, True):
            meta.trailing_padding = padding
            _assert_close_attn(run_attention(q, kc, vc, meta, config=config, monkeypatch=monkeypatch), want)
    assert [g[0] for g in grids] == [10 // 4 + 64, 10 // 4 + 10, 64, 10]


@pytest.mark.parametrize("mode,bs,bt_ahead", [(PAGED, 16, True), (PAGED, 4, False), (LINEAR, 0, True)])
@pytest.mark.parametrize("block_q", [1, 4])
def test_attention_causal_split(mode, bs, bt_ahead, block_q, monkeypatch):
    """The unmasked first loop (keys every row of a tile sees) then the masked diagonal one:
    chunks over long cached prefixes, whole prompts, decodes; 16-key tiles so most tiles are
    in the first loop, and tiles that straddle blocks (block size 4)."""
    gen = _gen("causal-split", mode, bs, block_q)
    lens = [(_randint(gen, 60, 200), _randint(gen, 2, 30)) for _ in range(3)] + [(37, 37), (90, 1), (5, 0)]
    q, kc, vc, meta, _ = make_batch(
        gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.float16, mode=mode, block_size=bs
    )
    want = reference.attention(q, kc, vc, meta)
    for split in (True, False):  # with and without the longest tiles first
        config = triton_attention.AttnConfig(block_q=block_q, block_n=16, num_splits=1, num_warps=4, num_stages=2,
                                             bt_ahead=bt_ahead, causal_split=split, longest_first=split)
        _assert_close_attn(run_attention(q, kc, vc, meta, config=config, monkeypatch=monkeypatch), want)


@pytest.mark.parametrize("mode,bs", [(PAGED, 16), (PAGED, 1), (LINEAR, 0)])
def test_attention_layer_interleaved_cache(mode, bs, monkeypatch):
    """Caches as strided views of a [slots, layers, 2, H, D] buffer (others layers NaN)."""
    gen = _gen("interleaved", mode, bs)
    lens = random_lens(gen, num_seqs=4, max_ctx=120, max_prefill=24)
    q, kc, vc, meta, buf = make_batch(
        gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.bfloat16, mode=mode,
        block_size=bs, interleaved=True,
    )
    assert kc.stride(0) == 3 * 2 * 2 * 64
    out = run_attention(q, kc, vc, meta, scale=0.2, monkeypatch=monkeypatch)
    _assert_close_attn(out, reference.attention(q, kc, vc, meta, scale=0.2))


def test_attention_strided_query_and_public_wrapper():
    """q sliced out of a fused qkv projection (token stride > H*D); the public wrapper."""
    gen = _gen("strided-q")
    lens = [(37, 37), (90, 1), (64, 5)]
    _, kc, vc, meta, _ = make_batch(
        gen, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.float16, mode=PAGED, block_size=16
    )
    qkv = _randn(gen, int(meta.query_start_loc[-1]), (8 + 2 + 2) * 64, dtype=torch.float16)
    q = qkv[:, : 8 * 64].view(-1, 8, 64)
    assert not q.is_contiguous()
    out = triton_ops.attention(q, kc, vc, meta)
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))


def test_attention_checks():
    gen = _gen("checks")
    q, kc, vc, meta, _ = make_batch(
        gen, [(10, 2)], num_kv_heads=2, group=2, head_dim=32, dtype=torch.float16, mode=PAGED, block_size=4
    )
    with pytest.raises(ValueError, match="multiple"):
        triton_ops.attention(q[:, :3], kc, vc, meta)
    with pytest.raises(ValueError, match="head_dim"):
        triton_ops.attention(q[..., :16], kc, vc, meta)
    with pytest.raises(ValueError, match="contiguous"):
        triton_ops.attention(q, kc.transpose(1, 2).contiguous().transpose(1, 2), vc, meta)
    bad = AttentionMetadata(**{**meta.__dict__, "block_table": None})
    with pytest.raises(ValueError, match="block_table"):
        triton_ops.attention(q, kc, vc, bad)
    bad = AttentionMetadata(**{**meta.__dict__, "seq_lens": meta.seq_lens.float()})
    with pytest.raises(ValueError, match="seq_lens"):
        triton_ops.attention(q, kc, vc, bad)


def test_long_prompts_take_larger_prefill_tiles():
    kw = dict(num_seqs=1, max_seq_len=8192, num_kv_heads=8, group=4, head_dim=128, elem_size=2, num_sms=132)
    short = triton_attention.choose_config(max_query_len=2048, **kw)
    long = triton_attention.choose_config(max_query_len=triton_attention.LONG_PROMPT, **kw)
    assert (short.block_q * 4, short.block_n, short.num_warps) == (64, 64, 4)
    assert (long.block_q * 4, long.block_n, long.num_warps) == (128, 128, 8)
    assert short.causal_split and long.causal_split and not short.longest_first


def test_split_heuristic():
    """Few (seq, KV head) pairs -> split-KV; full batches and prefill -> one pass."""
    cfg = lambda **kw: triton_attention.choose_config(  # noqa: E731
        num_kv_heads=8, group=4, head_dim=128, elem_size=2, num_sms=132, **kw
    )
    assert cfg(num_seqs=1, max_query_len=1, max_seq_len=4096).num_splits > 1
    assert cfg(num_seqs=16, max_query_len=1, max_seq_len=16384).num_splits > 1
    assert cfg(num_seqs=64, max_query_len=1, max_seq_len=4096).num_splits > 1  # 1.3 waves
    assert cfg(num_seqs=1, max_query_len=1, max_seq_len=100).num_splits == 1  # too short
    assert cfg(num_seqs=256, max_query_len=1, max_seq_len=1024).num_splits == 1
    assert cfg(num_seqs=4, max_query_len=512, max_seq_len=4096).num_splits == 1
    # even splits (the default): a mid-size batch of short and long sequences is split too
    assert cfg(num_seqs=32, max_query_len=1, max_seq_len=2048).num_splits > 1
    assert cfg(num_seqs=32, max_query_len=1, max_seq_len=2048, even_split=False).num_splits == 1
    for b in (1, 8, 16, 32, 64, 128, 256):
        even = cfg(num_seqs=b, max_query_len=1, max_seq_len=2048)
        assert even.even_split and even.num_splits >= cfg(num_seqs=b, max_query_len=1, max_seq_len=2048,
                                                          even_split=False).num_splits


def test_ops_dispatch_to_triton(monkeypatch):
    """kernels.ops routes to triton_ops with KVLAB_KERNELS=triton (and on CUDA)."""
    from kernels import ops

    gen = _gen("dispatch")
    q, kc, vc, meta, _ = make_batch(
        gen, [(20, 3), (9, 1)], num_kv_heads=1, group=2, head_dim=32, dtype=torch.float32, mode=LINEAR
    )
    calls = []
    real = triton_ops.attention
    monkeypatch.setattr(triton_ops, "attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    out = ops.attention(q, kc, vc, meta)
    assert calls, "ops.attention did not dispatch to triton_ops"
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))


# ----------------------------------------------------------------------------- write_kv


@pytest.mark.parametrize(
    "dtype,src_dtype,interleaved,heads,d",
    [
        (torch.float16, torch.float16, False, 2, 64),
        (torch.bfloat16, torch.float32, True, 8, 128),  # converts on write
        (torch.float32, torch.float32, True, 1, 32),
        (torch.bfloat16, torch.bfloat16, False, 3, 80),
    ],
)
def test_write_kv(dtype, src_dtype, interleaved, heads, d):
    gen = _gen("write", dtype, src_dtype, interleaved, heads, d)
    num_slots, num_tokens = 96, 40
    kc, vc, buf = make_cache(num_slots, heads, d, dtype, interleaved)
    # k, v sliced out of a fused projection: token stride larger than H * D
    kv = _randn(gen, num_tokens, 2 * heads * d + 16, dtype=src_dtype)
    k = kv[:, : heads * d].view(num_tokens, heads, d)
    v = kv[:, heads * d : 2 * heads * d].view(num_tokens, heads, d)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:7]] = -1  # padding tokens
    slots = slots.to(DEVICE)
    expect = buf.clone()
    ek, ev = (expect[:, 1, 0], expect[:, 1, 1]) if interleaved else (expect[0], expect[1])
    reference.write_kv(ek, ev, k, v, slots)
    triton_ops.write_kv(kc, vc, k, v, slots)
    if not interleaved:
        buf = torch.stack([kc, vc])
    _assert_same(buf, expect, converted=src_dtype != dtype)
    assert torch.isnan(buf).any()  # untouched slots stayed poisoned


def test_write_kv_checks():
    kc, vc, _ = make_cache(8, 2, 16, torch.float16, False)
    k = torch.zeros(3, 2, 16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="num_tokens"):
        triton_ops.write_kv(kc, vc, k, k, torch.zeros(4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[num_tokens, 2, 16\]"):
        triton_ops.write_kv(kc, vc, k[:, :1], k[:, :1], torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="int32 or int64"):
        triton_ops.write_kv(kc, vc, k, k, torch.zeros(3, dtype=torch.float32, device=DEVICE))


# ----------------------------------------------------------------------------- block copies


@pytest.mark.parametrize(
    "block_size,interleaved,dtype,heads,d",
    [
        (1, False, torch.float16, 2, 64),
        (16, True, torch.bfloat16, 4, 32),
        (256, True, torch.float32, 1, 16),
        (16, False, torch.float32, 3, 80),
    ],
)
def test_block_copies(block_size, interleaved, dtype, heads, d):
    gen = _gen("blocks", block_size, interleaved, dtype, heads, d)
    num_blocks = 12
    kc, _, buf = make_cache(num_blocks * block_size, heads, d, dtype, interleaved)
    # half the blocks hold data, the others stay NaN
    filled = torch.randperm(num_blocks, generator=gen)[: num_blocks // 2]
    rows = (filled[:, None] * block_size + torch.arange(block_size)).reshape(-1).to(DEVICE)
    kc[rows] = _randn(gen, rows.numel(), heads, d, dtype=dtype)

    # copy-on-write: sources are filled blocks, destinations distinct other blocks
    perm = torch.randperm(num_blocks, generator=gen)
    src = filled[:3].to(DEVICE)
    dst = torch.tensor([b for b in perm.tolist() if b not in filled.tolist()][:3], device=DEVICE)
    for ids_dtype in (torch.int64, torch.int32):
        expect = kc.clone()
        reference.copy_blocks(expect, src.to(ids_dtype), dst.to(ids_dtype), block_size)
        triton_ops.copy_blocks(kc, src.to(ids_dtype), dst.to(ids_dtype), block_size)
        _assert_same(kc, expect)

    # gather (swap-out staging) into a NaN buffer: every row must be written
    ids = perm[:5].to(DEVICE, torch.int32)
    out = torch.full((5 * block_size, heads, d), float("nan"), dtype=dtype, device=DEVICE)
    expect_out = out.clone()
    reference.gather_blocks(kc, ids, block_size, expect_out)
    triton_ops.gather_blocks(kc, ids, block_size, out)
    _assert_same(out, expect_out)

    # scatter (swap-in) of fresh data; other blocks and layers stay as they were
    before = buf.clone()
    src_buf = _randn(gen, 4 * block_size, heads, d, dtype=torch.float32)  # converts on write
    ids = perm[-4:].to(DEVICE)
    expect = kc.clone()
    reference.scatter_blocks(expect, ids, block_size, src_buf)
    triton_ops.scatter_blocks(kc, ids, block_size, src_buf)
    _assert_same(kc, expect, converted=dtype != torch.float32)
    if interleaved:  # neighbouring layers untouched
        _assert_same(buf[:, 0], before[:, 0])
        _assert_same(buf[:, 2], before[:, 2])
        _assert_same(buf[:, 1, 1], before[:, 1, 1])


def test_block_copy_checks():
    kc, _, _ = make_cache(32, 2, 16, torch.float16, False)
    ids = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="same length"):
        triton_ops.copy_blocks(kc, ids, ids[:1], 4)
    with pytest.raises(ValueError, match="block_size"):
        triton_ops.copy_blocks(kc, ids, ids, 0)
    with pytest.raises(ValueError, match=r"\[8, 2, 16\]"):
        triton_ops.gather_blocks(kc, ids, 4, torch.empty(7, 2, 16, dtype=torch.float16, device=DEVICE))


# ----------------------------------------------------------------------------- GPU only


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", [PAGED, LINEAR])
def test_gpu_llama3_decode_and_mixed(mode, monkeypatch):
    """Llama-3-8B heads at realistic lengths: decode-only (heuristic picks split-KV for
    the small batch) and a mixed batch with long prefill chunks."""
    gen = _gen("gpu-llama3", mode)
    for lens in (
        [(_randint(gen, 1000, 4096), 1) for _ in range(4)],
        [(4096, 1)] * 64,
        [(1500, 512), (777, 777)] + [(_randint(gen, 1, 3000), 1) for _ in range(30)],
    ):
        q, kc, vc, meta, _ = make_batch(
            gen, lens, num_kv_heads=8, group=4, head_dim=128, dtype=torch.bfloat16, mode=mode, block_size=16
        )
        out = run_attention(q, kc, vc, meta, monkeypatch=monkeypatch)
        _assert_close_attn(out, reference.attention(q, kc, vc, meta))


@gpu
@needs_cuda
def test_gpu_decode_cuda_graph():
    """Decode attention is capturable (no host sync) and replays correctly on new data."""
    gen = _gen("gpu-graph")
    lens = [(_randint(gen, 100, 2000), 1) for _ in range(8)]
    q, kc, vc, meta, _ = make_batch(
        gen, lens, num_kv_heads=8, group=4, head_dim=128, dtype=torch.float16, mode=PAGED, block_size=16
    )
    out = torch.empty_like(q)
    triton_ops.attention_into(out, q, kc, vc, meta)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_ops.attention_into(out, q, kc, vc, meta)
    q.copy_(_randn(gen, *q.shape, dtype=q.dtype))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _assert_close_attn(out, reference.attention(q, kc, vc, meta))
