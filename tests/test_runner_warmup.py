"""The runner's kernel warm-up: every eager batch shape runs on a scratch cache, the pool untouched."""
from __future__ import annotations

import logging

import pytest
import torch

from engine import LLMEngine
from engine.config import EngineConfig
from kernels.metadata import Addressing, contiguous_metadata


@pytest.mark.parametrize("allocator,args", [("paged", {"block_size": 8}), ("contiguous", {})])
def test_warmup_runs_every_shape_and_leaves_the_pool_alone(allocator, args, caplog):
    eng = LLMEngine(EngineConfig(model="tiny-llama", allocator=allocator, allocator_args=args, device="cpu",
                                 kv_cache_tokens=2048, max_model_len=256))
    for k, v in eng.runner.kv_caches:
        k.fill_(0.5)
        v.fill_(-0.5)
    with caplog.at_level(logging.WARNING, logger="kvlab.runner"):
        eng.runner.warmup()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # every batch ran (another test may leave INFO on)
    for k, v in eng.runner.kv_caches:
        assert bool((k == 0.5).all()) and bool((v == -0.5).all())


def test_contiguous_metadata_lays_sequences_back_to_back():
    m = contiguous_metadata(Addressing.PAGED, [5, 1], [5, 17], "cpu", block_size=4)
    assert m.block_table.tolist() == [[0, 1, 0, 0, 0], [2, 3, 4, 5, 6]]
    assert m.slot_mapping.tolist() == [0, 1, 2, 3, 4, 24]  # block 6, offset 0: token 16 of sequence 2
    assert m.query_start_loc.tolist() == [0, 5, 6] and m.max_query_len == 5 and m.max_seq_len == 17
    lin = contiguous_metadata(Addressing.LINEAR, [5, 1], [5, 17], "cpu")
    assert lin.seq_base.tolist() == [0, 5] and lin.slot_mapping.tolist() == [0, 1, 2, 3, 4, 21]
    assert lin.seq_base.dtype == torch.int64


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_warmup_covers_every_attention_variant_of_a_mixed_step(group):
    """Every (query tile, one-tile-per-sequence, one sequence or several) an eager step can pick
    is among the warm-up's: a variant first met in a measured run stalls it 0.1-0.6 s (seen on
    the H200: a 17-32-token prefill beside decodes, qwen3-0.6b's heads)."""
    from engine.runner import ModelRunner
    from kernels.triton_attention import choose_config

    def variant(q_lens):
        cfg = choose_config(num_seqs=len(q_lens), max_query_len=max(q_lens), max_seq_len=2048, num_kv_heads=8,
                            group=group, head_dim=128, elem_size=2, num_sms=132)
        return cfg.block_q, max(q_lens) <= cfg.block_q, len(q_lens) == 1

    warm = {variant(b) for b in ModelRunner.WARMUP_BATCHES}
    for q in range(2, 2049):
        for decodes in (0, 1, 5, 40):
            assert variant([q] + [1] * decodes) in warm, (q, decodes)


def test_warmup_block_table_has_the_engines_width():
    m = contiguous_metadata(Addressing.PAGED, [5, 1], [5, 17], "cpu", block_size=4, table_width=16)
    assert m.block_table.shape == (2, 16) and m.block_table[1, :5].tolist() == [2, 3, 4, 5, 6]


def test_eager_token_counts_cover_the_steps_above_the_graphs():
    from engine.runner import eager_token_counts

    assert eager_token_counts(2048, 8192) == list(range(2176, 8193, 128))
    assert eager_token_counts(2048, 8000)[-1] == 8000  # the largest step itself
    assert eager_token_counts(8192, 8192) == []  # every step replays a graph
    assert eager_token_counts(0, 512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]  # all eager


def test_warm_gemms_runs_every_sampled_row_count_and_each_linear_at_eager_counts(monkeypatch):
    """The logits GEMM at 1..max_num_seqs rows; every distinct linear layer's GEMM alone
    (``F.linear``: no tensor-parallel collective) at every eager token count: no graphs on the CPU,
    so every count up to max_num_batched_tokens on the grid, and every decode batch size."""
    eng = LLMEngine(EngineConfig(model="tiny-llama", allocator="paged", device="cpu", kv_cache_tokens=2048,
                                 max_model_len=256, max_num_seqs=8, max_num_batched_tokens=300))
    runner = eng.runner
    calls = []
    linear = torch.nn.functional.linear

    def counting(x, w, b=None):
        calls.append((x.shape[0], tuple(w.shape), x.is_contiguous()))
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    done = runner.warm_gemms()
    head = tuple(runner.model.lm_head.weight.shape)
    assert [r for r, s in done if s == head][:8] == list(range(1, 9))
    shapes = {tuple(m.weight.shape) for m in runner.model.model.modules() if isinstance(m, torch.nn.Linear)}
    counts = [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 300]
    for shape in shapes:
        assert sorted({n for n, s, _ in calls if s == shape}) == counts
    assert all(contiguous for _, _, contiguous in calls)
    assert {(n, s) for n, s, _ in calls} == set(done)


def test_warmup_runs_whole_prompts_over_their_own_kv_with_prompt_attention_qkv(caplog):
    """prompt_attention=qkv: each warm-up batch runs again as whole prompts read LINEAR from their own
    K and V (the kernel variant an eager step of whole prompts launches), the pool untouched."""
    eng = LLMEngine(EngineConfig(model="tiny-llama", allocator="paged", allocator_args={"block_size": 8},
                                 device="cpu", kv_cache_tokens=2048, max_model_len=256, prompt_attention="qkv"))
    runner = eng.runner
    for k, v in runner.kv_caches:
        k.fill_(0.5)
    seen = []
    forward = runner.model.forward
    runner.model.forward = lambda ids, pos, meta, caches: seen.append(meta) or forward(ids, pos, meta, caches)
    with caplog.at_level(logging.WARNING, logger="kvlab.runner"):
        runner.warmup()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    own = [m for m in seen if m.own_kv]
    assert len(own) == len(seen) // 2 > 0
    for m in own:
        assert m.mode == Addressing.LINEAR and torch.equal(m.seq_base, m.query_start_loc[:-1].long())
        assert torch.equal(m.seq_lens, m.query_start_loc.diff())  # whole prompts
    assert all(bool((k == 0.5).all()) for k, _ in runner.kv_caches)


def test_warmup_covers_every_small_linear_variant_of_an_eager_step():
    """Steps of up to 16 tokens take kernels.small_linear (engine.fused_gemv_max_tokens), whose
    variants differ by the rows' power of two (NORM_M, a constexpr) and Triton's specialisation of
    M (1, a multiple of 16): an eager step of one token (enforce_eager, layer groups: decodes of one
    sequence) compiled its own after the warm-up."""
    import triton

    from engine.runner import ModelRunner

    def variant(m):
        return triton.next_power_of_2(m), m == 1, m % 16 == 0

    warm = {variant(sum(b)) for b in ModelRunner.WARMUP_BATCHES if sum(b) <= 16}
    for m in range(1, 17):
        assert variant(m) in warm, m

