"""Tiles, splits and grid of the attention kernel (kernels.triton_attention): host integers only.

``choose_config`` picks, for a batch's shape, the query tile, key tile, warps and stages, and for
decode the split-KV count (flash-decoding: enough programs to fill the GPU when a batch has few
(sequence, KV head) pairs); ``query_tiles`` is the grid's tile count of a mixed batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from kernels.metadata import decode_seq_major

# Split-KV heuristic knobs (see choose_config).
SPLIT_MIN_TOKENS = 256  # never give a split fewer keys than this
SPLIT_MAX = 64
RAGGED_PROGRAMS_PER_SM = 4  # decode, even splits: at least this many programs an SM (see choose_config)
LONG_PROMPT = 4096  # prefill tiles grow from this query length on (choose_config)
SMEM_PER_SM = 227 * 1024  # usable shared memory per SM (Hopper); sets decode occupancy


def _pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(n)


@dataclass(frozen=True)
class AttnConfig:
    block_q: int  # query tokens per tile (rows = block_q * group, padded)
    block_n: int  # keys per inner-loop tile
    num_splits: int  # split-KV factor (1 = single pass)
    num_warps: int
    num_stages: int
    # PAGED: fetch a tile's block ids one iteration ahead by hand (True, the default) or
    # leave the indirect load to Triton's software pipeliner (False), which needs two more
    # stages for the same K/V depth. Measured on an H200 (Triton 3.6), False with 5 stages
    # was 0-5% slower than True with 3 at every benchmark shape; kept as a tuning knob.
    bt_ahead: bool = True
    # prefill: tiles below the diagonal skip every mask (the kernel's CAUSAL_SPLIT); decode
    # keeps one masked loop (its tiles are all but one unmasked already, and it is at bandwidth)
    causal_split: bool = False
    longest_first: bool = False  # prefill: programs take query tiles last to first
    # decode: programs launch sequence by sequence, all KV heads of one together (grid (heads,
    # sequences, splits)), not head by head; with the batch ordered longest first that starts a
    # ragged batch's longest programs first (unsplit: split j of every pair launches after split
    # j - 1 of all). A tuning knob: experiments/bench_ragged.py times it
    seq_major: bool = False
    # split-KV: each tile's own keys in num_splits equal parts (True), or fixed-width parts of the
    # launch's max_seq_len (False: in a CUDA graph captured at max_model_len a short sequence uses
    # only the first splits, and a ragged batch ends on its longest sequences' full-width chunks)
    even_split: bool = True


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; a small stand-in on CPU (interpreter)."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def decode_wave(block_n: int, num_stages: int, row_bytes: int, num_sms: int) -> int:
    """Decode programs resident at once: as many an SM as its shared memory holds (the K/V
    tiles in flight plus ~8 KiB of the rest), at most 8."""
    smem = (num_stages - 1) * 2 * block_n * row_bytes + 8 * 1024
    return max(1, min(8, SMEM_PER_SM // smem)) * num_sms


def fixed_split_chunk(span: int, num_splits: int, block_n: int) -> int:
    """Keys of each fixed-width split (``even_split=False``): ``span`` in ``num_splits`` parts,
    BLOCK_N-aligned (the last split also takes anything beyond)."""
    return triton.cdiv(triton.cdiv(max(1, span), num_splits), block_n) * block_n


def choose_config(
    *,
    num_seqs: int,
    max_query_len: int,
    max_seq_len: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    elem_size: int,
    num_sms: int,
    fp8: bool = False,
    even_split: bool = True,
) -> AttnConfig:
    """Tile sizes and split count from host-side integers only (no device sync, so the
    call is CUDA-graph safe).

    Decode is memory bound: one (sequence, KV head) program streams its keys through a
    3-stage cp.async pipeline (2 tiles of K and V in flight), and shared memory limits
    how many programs an SM holds (3 for Llama heads in bf16): ``wave`` programs run at
    once. Two resident programs per SM already keep HBM busy, so with fewer (sequence,
    KV head) pairs than 2 x SMs, split-KV brings the count up to that; with between one
    and two waves of pairs it cuts programs into ~3 waves, so the last partial wave costs
    little; from two waves on, one pass. (H200 sweep of fixed-width splits on batches of one
    length, Llama-3-8B heads: 8x4096 best at 4 splits, 16x16384 at 2, 64x4096 at 3, 32x2048 and
    128x1024 unsplit.)

    Those figures are for batches whose sequences share one length. A real batch is ragged, and
    one program streams at only ~20 GB/s, so a batch ends on its longest sequences' programs:
    with even splits (each sequence's own keys cut in equal parts) the count is at least
    ``RAGGED_PROGRAMS_PER_SM`` programs an SM. H200, Llama-3-8B heads, 2048-token graph bound
    (experiments/bench_ragged.py, results/engine/session_2026-12-03b): lognormal batches of 8-48
    sequences 16-29% faster than fixed-width splits (e.g. 24 of mean 700: 46.0 -> 31.8 us), within
    ~5% of the best split count from 4 to 256 sequences; uniform ones of 24-48 sequences up to 26%
    slower, unchanged from 64 on."""
    group_p = _pow2(group)
    block_d = max(16, _pow2(head_dim))
    row_bytes = block_d * elem_size
    if max_query_len <= 1:
        # decode: all heads of a KV head in one tile, BLOCK_N keys per step
        block_n, num_stages = (64 if row_bytes <= 256 else 32), 3
        if fp8 and row_bytes <= 128:  # one-byte rows: twice the keys per tile keeps the bytes in flight
            block_n = 128
        wave = decode_wave(block_n, num_stages, row_bytes, num_sms)
        pairs = max(1, num_seqs * num_kv_heads)
        if pairs <= 2 * num_sms:
            splits = 2 * num_sms // pairs
        elif wave < pairs < 2 * wave:
            splits = triton.cdiv(3 * wave, pairs)
        else:
            splits = 1
        if even_split:  # a ragged batch: enough programs that its longest sequences do not set the time
            splits = max(splits, triton.cdiv(RAGGED_PROGRAMS_PER_SM * num_sms, pairs))
        splits = max(1, min(splits, max_seq_len // SPLIT_MIN_TOKENS, SPLIT_MAX))
        return AttnConfig(block_q=1, block_n=block_n, num_splits=splits, num_warps=4, num_stages=num_stages,
                          even_split=even_split, seq_major=decode_seq_major(num_seqs, splits))
    # prefill / mixed: compute bound; ~64 query rows per tile and 64 keys, one warpgroup; prompts of
    # LONG_PROMPT tokens or more take 128 x 128 tiles, 8 warps (H200, Llama-3-8B heads, bench_prefill:
    # 1x8192 442 vs 414 TFLOP/s; 4x2048 347 vs 361). Unmasked first loop; tiles in launch order
    # (longest first measured 2-6% slower)
    if max_query_len >= LONG_PROMPT and row_bytes <= 256:
        block_q = max(1, min(_pow2(max_query_len), 128 // group_p))
        return AttnConfig(block_q=block_q, block_n=128, num_splits=1, num_warps=8, num_stages=2, causal_split=True)
    block_q = max(1, min(_pow2(max_query_len), 64 // group_p))
    block_n = 64 if row_bytes <= 256 else 32
    return AttnConfig(block_q=block_q, block_n=block_n, num_splits=1, num_warps=4, num_stages=2, causal_split=True)


def query_tiles(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Programs along the query axis of a launch that is not DIRECT: an upper bound on its tiles,
    ``num_tokens // block_q`` plus one ragged tile a sequence (``num_seqs``: those that can hold queries)."""
    return num_tokens if block_q == 1 else num_tokens // block_q + num_seqs
