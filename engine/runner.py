"""Model runner: turns a scheduled batch into flat tensors, runs the model, samples.

The allocator supplies slots and addressing; nothing here depends on which one it is.
"""
from __future__ import annotations

import torch

from allocators.base import KVAllocator
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from kernels.metadata import Addressing, AttentionMetadata

Sampled = list[tuple[Sequence, int, "float | None"]]


def build_metadata(batch: ScheduledBatch, allocator: KVAllocator, device) -> tuple[list[int], list[int], AttentionMetadata, list[int]]:
    """Flatten a batch: token ids, positions, attention metadata and the rows to sample."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    sample_rows: list[int] = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(allocator.slot_mapping(seq, start, end))
        qsl.append(qsl[-1] + n)
        seq_lens.append(end)
        if end == seq.num_tokens:
            sample_rows.append(qsl[-1] - 1)
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        mode=allocator.mode,
        query_start_loc=torch.tensor(qsl, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        max_query_len=max(batch.num_new_tokens),
        max_seq_len=max(seq_lens),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
    )
    if allocator.mode == Addressing.PAGED:
        tables = [allocator.block_ids(s) for s in batch.seqs]
        width = max(len(t) for t in tables)
        meta.block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], **i32)
        meta.block_size = allocator.block_size
    else:
        meta.seq_base = torch.tensor([allocator.seq_base(s) for s in batch.seqs], dtype=torch.int64, device=device)
    return input_ids, positions, meta, sample_rows


class ModelRunner:
    def __init__(self, model: torch.nn.Module, allocator: KVAllocator, device: str, eos_ids: list[int], seed: int = 0):
        self.model = model
        self.allocator = allocator
        self.device = torch.device(device)
        self.eos_ids = eos_ids
        self.sampler = Sampler(self.device, seed)
        self.kv_caches = [allocator.kv_cache(i) for i in range(model.config.num_hidden_layers)]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> Sampled:
        input_ids, positions, meta, rows = build_metadata(batch, self.allocator, self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, meta, self.kv_caches)
        if not rows:
            return []
        seqs = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == s.num_tokens]
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        tokens, logprobs = self.sampler(logits, seqs, self.eos_ids)
        return list(zip(seqs, tokens, logprobs))

    def forget(self, seq: Sequence) -> None:
        self.sampler.forget(seq)
