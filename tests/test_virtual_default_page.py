"""The virtual allocator picks a page size that fits the model and the pool when none is given.

vAttention maps 2 MiB pages; the tiny CPU model's K (or V) of one token in one layer is
2 heads x 16 x 4 B = 128 B, so 2 MiB holds 16,384 tokens: more than the default 4096-token pool.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from allocators import KVCacheSpec
from allocators.virtual import MIN_PAGES_PER_SEQ, VirtualAllocator, default_page_size
from engine import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
TINY = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu")
MiB = 1 << 20


def test_default_page_for_the_tiny_model_and_the_default_pool(caplog):
    """conf/engine/default.yaml: 4096 tokens, 64 slots, max_model_len 512: 64-token pages (8 KiB)."""
    with caplog.at_level(logging.INFO, logger="kvlab.allocators"):
        a = VirtualAllocator(TINY, capacity_tokens=4096, max_num_seqs=64, max_model_len=512, backend="host")
    try:
        assert a.page_size == 8192 and a.page_tokens == 64
        assert a.num_groups == 64  # a page group for every slot at once
        assert a.pages_per_slot == 8  # a 512-token sequence is mapped in 8 steps, not at once
        line = caplog.records[-1].getMessage()
        assert "page_size=8192" in line and "64 slots" in line and "allocator.args.page_size" in line
    finally:
        a.close()


@pytest.mark.parametrize("given", [None, "auto"])
def test_auto_and_none_mean_the_same(given):
    a = VirtualAllocator(TINY, 4096, 64, 512, page_size=given, backend="host")
    try:
        assert a.page_size == 8192
    finally:
        a.close()


def test_default_page_size_rules():
    # a large pool with long sequences keeps vAttention's 2 MiB (Llama-3-8B bf16: 2 KiB a token and layer)
    big = default_page_size(2048, 1, capacity_tokens=1 << 20, max_num_seqs=64, max_model_len=8192)
    assert (big.page_size, big.page_tokens) == (2 * MiB, 1024)
    # the share of each slot bounds the page: 32768 tokens / 256 slots = 128 tokens
    share = default_page_size(2048, 1, capacity_tokens=32768, max_num_seqs=256, max_model_len=4096)
    assert share.page_tokens == 128 and share.page_size == 256 * 1024
    # short sequences bound it too: at least MIN_PAGES_PER_SEQ pages of a max_model_len sequence
    short = default_page_size(2048, 1, capacity_tokens=1 << 20, max_num_seqs=8, max_model_len=256)
    assert short.page_tokens * MIN_PAGES_PER_SEQ <= 256 and short.page_tokens == 64
    # OPT-13B: 10 KiB a token and layer, no power of two holds whole tokens: rounded down to whole tokens
    opt = default_page_size(10240, 1, capacity_tokens=15836, max_num_seqs=256, max_model_len=2048)
    assert opt.page_size % 10240 == 0 and opt.page_tokens * 256 <= 15836
    # the CUDA driver maps 2 MiB pages at the least: no smaller page is offered, and the line says why
    cuda = default_page_size(2048, 2 * MiB, capacity_tokens=400_000, max_num_seqs=256, max_model_len=2048)
    assert cuda.page_size == 2 * MiB and "granularity" in cuda.why


def test_an_explicit_page_size_that_cannot_work_names_the_key_and_the_fix():
    with pytest.raises(ValueError) as err:
        VirtualAllocator(TINY, 4096, 64, 512, page_size=2 * MiB, backend="host")
    msg = str(err.value)
    assert "allocator.args.page_size=2097152" in msg and "4096 tokens" in msg
    assert "allocator.args.page_size=8192" in msg and "engine.kv_cache_tokens" in msg
    with pytest.raises(ValueError, match=r"allocator.args.page_size=1000 .* multiple of 128"):
        VirtualAllocator(TINY, 4096, 64, 512, page_size=1000, backend="host")


def test_llm_with_the_virtual_allocator_and_no_page_size_generates():
    llm = LLM(model="tiny-llama", allocator="virtual", device="cpu", max_model_len=512, kv_cache_tokens=4096,
              max_num_seqs=64)
    assert llm.engine.allocator.page_size == 8192
    ref = LLM(model="tiny-llama", allocator="paged", device="cpu", max_model_len=512, kv_cache_tokens=4096)
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, p)] == \
        [o.outputs[0].token_ids for o in ref.generate(prompts, p)]


def kvlab_run(run_dir: Path, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "run", *overrides, "progress=false",
                           "report=false", f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_default_virtual_run_works_and_is_not_contiguous_max(tmp_path):
    """`kvlab run allocator=virtual` on the default config: runs, and maps pages on demand.

    With a page that holds a whole 512-token slot (page_size=65536 here) the first token of a
    request maps its max_model_len at once, exactly what contiguous-max reserves, so the
    figures were contiguous-max's: 8 requests at a time, token states 17% of the pool. The
    default 64-token pages are mapped as sequences grow, so a request holds only the pages its
    tokens reach (plus the rest of its last page): 4x the requests run at once and token
    states fill far more of the pool.
    """
    # conf/allocator/virtual.yaml says page_size=auto: the allocator picks 64-token pages here
    virtual = kvlab_run(tmp_path / "virtual", "allocator=virtual")
    contiguous = kvlab_run(tmp_path / "contiguous", "allocator=contiguous", "allocator.args.policy=max")
    whole_slot = kvlab_run(tmp_path / "whole_slot", "allocator=virtual", "allocator.args.page_size=65536")
    assert virtual["allocator"] == "virtual" and virtual["num_requests"] == contiguous["num_requests"] == 32
    assert whole_slot["max_concurrency"] == contiguous["max_concurrency"] == 8
    assert whole_slot["token_states"] == pytest.approx(contiguous["token_states"])
    assert virtual["max_concurrency"] >= 4 * contiguous["max_concurrency"]
    assert virtual["token_states"] > 2 * contiguous["token_states"]
    assert virtual["internal_frag"] < contiguous["internal_frag"] / 4
