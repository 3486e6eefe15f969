"""A step's model inputs as host arrays: ``BatchInputs`` built from a scheduled batch (token
ids, positions, slots, block-table rows or base slots, query starts, the rows that sample) and
``StepInputs``, the same without its sequences (what another tensor-parallel rank runs)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from allocators.base import KVAllocator
from engine.block_table import PersistentBlockTable
from engine.scheduler import ScheduledBatch
from engine.sequence import PENDING, Sequence
from kernels.metadata import Addressing


class BatchInputs:
    """Host-side arrays of one step (numpy: cheap to build, one copy each to the device).

    ``addressing`` is, per sequence, its row of the persistent block table (PAGED) or its
    base slot (LINEAR). Decode slots are computed for all sequences at once from that.
    """

    def __init__(self, batch: ScheduledBatch, allocator: KVAllocator, table: PersistentBlockTable | None,
                 pending_rows: dict[int, int] | None = None, order: list[int] | None = None):
        """``pending_rows``: seq_id -> row of the in-flight step's sampled tokens, for inputs that
        are still on the device (asynchronous scheduling); they go to ``feed``. ``order``: the
        batch's sequences in this order (indices into ``batch.seqs``), else as scheduled."""
        # Python lists first, one numpy conversion each: cheaper than per-element numpy writes
        ids: list[int] = []
        positions: list[int] = []
        addressing: list[int] = []
        seq_lens: list[int] = []
        qsl = [0]
        prefill_slots: list[tuple[int, list[int]]] = []  # (first token index, slots)
        dec_tok: list[int] = []
        self.feed: list[tuple[int, int]] = []  # (token index, row of the previous step's samples)
        self.sample_rows: list[int] = []
        self.sample_seqs: list[Sequence] = []
        self.prompt_lp: list[tuple[Sequence, int, int, int]] = []  # (seq, first row, first position, rows)
        paged = allocator.mode == Addressing.PAGED
        live = batch.seqs
        # every sequence computes its whole context in this step (prompts from token 0, no cached
        # prefix, no decode): its keys are all in the step's own K and V (AttentionMetadata.own_kv)
        self.whole_prompts = True
        t = 0
        items = zip(batch.seqs, batch.num_new_tokens)
        if order is not None:
            items = [(batch.seqs[i], batch.num_new_tokens[i]) for i in order]
        for seq, n in items:
            start = seq.num_computed_tokens
            end = start + n
            self.whole_prompts = self.whole_prompts and start == 0
            addressing.append(table.row(seq.seq_id, allocator.block_ids(seq), live) if paged
                              else allocator.seq_base(seq))
            if n == 1:
                tok = seq.token_ids[start]
                if tok == PENDING:
                    self.feed.append((t, pending_rows[seq.seq_id]))
                ids.append(tok)
                positions.append(start)
                dec_tok.append(t)
            else:
                ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                prefill_slots.append((t, allocator.slot_mapping(seq, start, end)))
            if seq.params.prompt_logprobs is not None and start < seq.prompt_len - 1:
                # rows that predict prompt tokens start+1 .. min(end, prompt_len - 1)
                self.prompt_lp.append((seq, t, start, min(end, seq.prompt_len - 1) - start))
            t = end - start + t
            qsl.append(t)
            seq_lens.append(end)
            if end == len(seq.token_ids):
                self.sample_rows.append(t - 1)
                self.sample_seqs.append(seq)
        self.input_ids = np.array(ids, dtype=np.int64)
        self.positions = np.array(positions, dtype=np.int64)
        self.addressing = np.array(addressing, dtype=np.int64)
        self.seq_lens = np.array(seq_lens, dtype=np.int32)
        self.qsl = np.array(qsl, dtype=np.int32)
        self.slots = np.empty(t, dtype=np.int64)
        for first, slots in prefill_slots:
            self.slots[first:first + len(slots)] = slots
        if dec_tok:
            # the PAGED / LINEAR addressing rule (docs/ARCHITECTURE.md), for every single-token sequence at once
            dec = np.array(dec_tok, dtype=np.int64)
            pos = self.positions[dec]
            rows = self.addressing[np.searchsorted(self.qsl, dec, side="right") - 1]
            if paged:
                bs = allocator.block_size
                self.slots[dec] = table.host[rows, pos // bs].astype(np.int64) * bs + pos % bs
            else:
                ring = getattr(allocator, "ring", 0)  # a windowed layer group's ring of slots
                self.slots[dec] = rows + (pos % ring if ring else pos)
        self.max_query_len = max(batch.num_new_tokens)
        self.max_seq_len = max(seq_lens)
        self.num_seqs = len(batch.seqs)
        self.num_prefill_tokens = batch.num_prefill_tokens


@dataclass
class StepInputs:
    """A step's model inputs without its sequences (what another tensor-parallel rank runs)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    seq_lens: np.ndarray
    qsl: np.ndarray
    addressing: np.ndarray
    max_query_len: int
    max_seq_len: int
    num_seqs: int
    num_prefill_tokens: int
    whole_prompts: bool
    sample_rows: tuple = ()  # only rank 0 computes logits and samples
    prompt_lp: tuple = ()

    @classmethod
    def of(cls, b: BatchInputs) -> "StepInputs":
        return cls(b.input_ids, b.positions, b.slots, b.seq_lens, b.qsl, b.addressing, b.max_query_len,
                   b.max_seq_len, b.num_seqs, b.num_prefill_tokens, b.whole_prompts)
