"""Attention metadata: the one description of a batch that every kernel reads.

The addressing mode is the only thing that differs between allocators inside a kernel.
"""
from __future__ import annotations

import enum
import operator
import os
from dataclasses import dataclass

import torch


class Addressing(enum.IntEnum):
    PAGED = 0  # token t of seq s at block_table[s, t // B] * B + t % B
    LINEAR = 1  # token t of seq s at seq_base[s] + t


@dataclass
class AttentionMetadata:
    """A mixed batch of prefill chunks and decode tokens, flattened along tokens.

    Sequence i owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; those are the
    *last* ``q_len`` of its ``seq_lens[i]`` context tokens (cached prefix + new tokens),
    so query j of sequence i sits at absolute position ``seq_lens[i] - q_len + j``.
    """

    mode: Addressing
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    max_query_len: int
    max_seq_len: int
    slot_mapping: torch.Tensor  # int64 [num_tokens]; < 0 means "do not write" (padding)
    block_table: torch.Tensor | None = None  # int32 [num_seqs, max_blocks] (PAGED)
    block_size: int = 0  # PAGED
    seq_base: torch.Tensor | None = None  # int64 [num_seqs] (LINEAR)
    ring: int = 0  # LINEAR, > 0: each sequence's region holds ``ring`` slots, token t at seq_base + t % ring
    # every sequence has queries except empty ones after the last that has (full CUDA graphs pad
    # to max_num_seqs so): the query-tile grid then needs no tile for the padding
    trailing_padding: bool = False
    # every sequence a whole prompt (no cached prefix, no decode): its keys are the step's own K and
    # V, which attention reads from the projection's rows (LINEAR, seq_base = query_start_loc), not
    # from the cache; a PAGED engine then attends at LINEAR's speed (engine.prompt_attention=qkv)
    own_kv: bool = False

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    def check(self) -> None:
        for name in ("block_size", "ring"):  # Triton takes them as ints: a float would be truncated
            try:
                operator.index(getattr(self, name))
            except TypeError:
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}") from None
        if self.ring < 0:
            raise ValueError(f"ring must be >= 0 (0: no ring), got {self.ring}")
        if self.mode == Addressing.PAGED:
            if self.block_table is None or self.block_size <= 0:
                raise ValueError("PAGED addressing needs block_table and block_size > 0")
        elif self.seq_base is None:
            raise ValueError("LINEAR addressing needs seq_base")
        if self.ring and self.mode != Addressing.LINEAR:
            raise ValueError("ring addressing is LINEAR only (PAGED frees blocks instead)")
        if self.own_kv and (self.mode != Addressing.LINEAR or self.ring):
            raise ValueError("own_kv reads the step's K and V LINEAR, without a ring")


def contiguous_metadata(mode: Addressing, q_lens: list[int], seq_lens: list[int], device,
                        block_size: int = 0, table_width: int = 0) -> AttentionMetadata:
    """A batch laid out back to back from slot 0 (LINEAR: one base per sequence; PAGED: blocks
    in order, rows padded with block 0 to at least ``table_width`` columns, the engine's table
    width, whose divisibility Triton specialises on): scratch batches for warm-ups and measurements."""
    i64 = dict(dtype=torch.int64, device="cpu")
    qsl = torch.tensor([0, *q_lens], **i64).cumsum(0)
    slots, bases, rows = [], [], []
    start = 0
    for q, n in zip(q_lens, seq_lens):
        if mode == Addressing.PAGED:
            nb = -(-n // block_size)
            rows.append(list(range(start // block_size, start // block_size + nb)))
            span = nb * block_size
        else:
            bases.append(start)
            span = n
        slots.extend(range(start + n - q, start + n))
        start += span
    meta = AttentionMetadata(
        mode, qsl.to(device=device, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max(q_lens), max(seq_lens), torch.tensor(slots, dtype=torch.int64, device=device))
    if mode == Addressing.PAGED:
        width = max(table_width, max(len(r) for r in rows))
        table = [r + [0] * (width - len(r)) for r in rows]
        meta.block_table = torch.tensor(table, dtype=torch.int32, device=device)
        meta.block_size = block_size
    else:
        meta.seq_base = torch.tensor(bases, dtype=torch.int64, device=device)
    return meta


# decode in one split from this many sequences: programs launch sequence by sequence (seq_major) and
# the engine hands the batch over longest first (engine/runner.py), so a ragged batch no longer ends
# on its longest sequences' programs. H200, bench_ragged (results/engine/session_2026-12-04): a
# lognormal batch of 128-256 sequences took 0.28-0.67 ms a step (32 layers, 28 for qwen3-0.6b)
# beyond a uniform one of the same mean as admitted, -0.24..+0.31 ms ordered this way; uniform
# batches 0.4-2.6% faster.
SEQ_MAJOR_FROM = 128
# Off by default until the simulate validation's real runs are made with it (results/sim_validation:
# their engine launched head by head as admitted, and the cost model follows this switch):
# KVLAB_SEQ_MAJOR_MIN_SEQS=128 (read once, at import) turns it on from that many sequences
SEQ_MAJOR_MIN_SEQS = int(os.environ.get("KVLAB_SEQ_MAJOR_MIN_SEQS") or 1 << 30)


def orders_decode(num_seqs: int) -> bool:
    """Whether the runner hands the kernel a decode batch of ``num_seqs`` sequences (CUDA graphs:
    the padded size) longest first (engine/runner.py). Harmless to a launch that stays head by head."""
    return num_seqs >= SEQ_MAJOR_MIN_SEQS


def decode_seq_major(num_seqs: int, num_splits: int) -> bool:
    """Whether a decode launch of ``num_seqs`` sequences (CUDA graphs: the padded size) in
    ``num_splits`` splits goes sequence by sequence (its batch is then ordered longest first)."""
    return num_splits == 1 and orders_decode(num_seqs)
