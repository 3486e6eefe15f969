"""Model runner: turns a scheduled batch into flat tensors, runs the model, samples.

The allocator supplies slots and addressing; nothing here depends on which one it is.
On CUDA, pure-decode batches replay a captured CUDA graph (unless ``enforce_eager``);
prefill and mixed batches run eagerly. One host sync per step: the sampled token ids.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from allocators.base import KVAllocator
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from kernels.metadata import Addressing, AttentionMetadata

Sampled = list[tuple[Sequence, int, "float | None"]]


class BatchInputs:
    """Host-side arrays of one step (numpy: cheap to build, one copy to the device)."""

    def __init__(self, batch: ScheduledBatch, allocator: KVAllocator):
        n_tok = batch.num_tokens
        self.input_ids = np.empty(n_tok, dtype=np.int64)
        self.positions = np.empty(n_tok, dtype=np.int64)
        self.slots = np.empty(n_tok, dtype=np.int64)
        n_seq = len(batch.seqs)
        self.qsl = np.zeros(n_seq + 1, dtype=np.int32)
        self.seq_lens = np.empty(n_seq, dtype=np.int32)
        self.sample_rows: list[int] = []
        self.sample_seqs: list[Sequence] = []
        self.paged = allocator.mode == Addressing.PAGED
        tables = []
        bases = np.empty(n_seq, dtype=np.int64) if not self.paged else None
        t = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            if n == 1:
                self.input_ids[t] = seq.token_ids[start]
                self.positions[t] = start
            else:
                self.input_ids[t:t + n] = seq.token_ids[start:end]
                self.positions[t:t + n] = np.arange(start, end)
            self.slots[t:t + n] = allocator.slot_mapping(seq, start, end)
            t += n
            self.qsl[i + 1] = t
            self.seq_lens[i] = end
            if end == seq.num_tokens:
                self.sample_rows.append(t - 1)
                self.sample_seqs.append(seq)
            if self.paged:
                tables.append(allocator.block_ids(seq))
            else:
                bases[i] = allocator.seq_base(seq)
        if self.paged:
            width = max(len(tb) for tb in tables)
            self.addressing = np.zeros((n_seq, width), dtype=np.int32)
            for i, tb in enumerate(tables):
                self.addressing[i, : len(tb)] = tb
        else:
            self.addressing = bases
        self.max_query_len = max(batch.num_new_tokens)
        self.max_seq_len = int(self.seq_lens.max())

    def metadata(self, allocator: KVAllocator, device) -> AttentionMetadata:
        def dev(a):
            return torch.from_numpy(a).to(device, non_blocking=True)

        meta = AttentionMetadata(
            mode=allocator.mode, query_start_loc=dev(self.qsl), seq_lens=dev(self.seq_lens),
            max_query_len=self.max_query_len, max_seq_len=self.max_seq_len, slot_mapping=dev(self.slots))
        if self.paged:
            meta.block_table, meta.block_size = dev(self.addressing), allocator.block_size
        else:
            meta.seq_base = dev(self.addressing)
        return meta


def build_metadata(batch: ScheduledBatch, allocator: KVAllocator, device):
    """Flatten a batch: token ids, positions, attention metadata and the rows to sample."""
    inputs = BatchInputs(batch, allocator)
    return inputs.input_ids.tolist(), inputs.positions.tolist(), inputs.metadata(allocator, device), inputs.sample_rows


class ModelRunner:
    def __init__(self, model: torch.nn.Module, allocator: KVAllocator, device: str, eos_ids: list[int],
                 seed: int = 0, max_num_seqs: int = 256, max_model_len: int = 2048, enforce_eager: bool = True):
        self.model = model
        self.allocator = allocator
        self.device = torch.device(device)
        self.eos_ids = eos_ids
        self.sampler = Sampler(self.device, seed)
        self.kv_caches = [allocator.kv_cache(i) for i in range(model.config.num_hidden_layers)]
        self.graphs = None
        self.last_prep_s = 0.0
        if self.device.type == "cuda" and not enforce_eager:
            from engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, allocator, self.kv_caches, max_num_seqs, max_model_len, self.device)
            self.graphs.capture()

    def _is_graphable(self, batch: ScheduledBatch) -> bool:
        return (self.graphs is not None and batch.num_prefill_tokens == 0
                and self.graphs.padded_size(len(batch.seqs)) is not None)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> Sampled:
        t0 = time.perf_counter()
        inputs = BatchInputs(batch, self.allocator)
        self.last_prep_s = time.perf_counter() - t0
        if self._is_graphable(batch):
            logits = self.graphs.run(len(batch.seqs), *(torch.from_numpy(a) for a in (
                inputs.input_ids, inputs.positions, inputs.slots, inputs.seq_lens, inputs.addressing)))
        else:
            meta = inputs.metadata(self.allocator, self.device)
            ids = torch.from_numpy(inputs.input_ids).to(self.device, non_blocking=True)
            pos = torch.from_numpy(inputs.positions).to(self.device, non_blocking=True)
            hidden = self.model(ids, pos, meta, self.kv_caches)
            if not inputs.sample_rows:
                return []
            rows = torch.tensor(inputs.sample_rows, device=self.device)
            logits = self.model.compute_logits(hidden[rows])
        if not inputs.sample_seqs:
            return []
        tokens, logprobs = self.sampler(logits, inputs.sample_seqs, self.eos_ids)
        return list(zip(inputs.sample_seqs, tokens, logprobs))

    def forget(self, seq: Sequence) -> None:
        self.sampler.forget(seq)
