"""CUDA graphs for decode batches: one graph per padded batch size, static input buffers.

A decode step of B sequences copies its inputs into the first B rows of the buffers and
replays the graph of the smallest captured size >= B. Padding rows write nowhere
(slot -1) and attend to no token; their logits are dropped.
"""
from __future__ import annotations

import bisect
import logging

import torch

from allocators.base import KVAllocator
from kernels.metadata import Addressing, AttentionMetadata

log = logging.getLogger("kvlab.graphs")


def padded(sizes: list[int], n: int) -> int | None:
    """The smallest of the (sorted) captured ``sizes`` that holds ``n``, or None."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def capture_each(sizes: list[int], forward, pool=None, prepare=None) -> tuple[dict, dict, object]:
    """One graph per size, largest first so that smaller ones reuse its memory pool: each size's
    ``forward(size)`` runs once to warm up (Triton compiles, cuBLAS picks kernels), then is
    captured. ``prepare(size)``, outside the capture, first sets its static inputs. Returns
    (graphs, outputs, pool) by size."""
    graphs, outs = {}, {}
    torch.cuda.synchronize()
    for s in reversed(sizes):
        if prepare is not None:
            prepare(s)
        forward(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            outs[s] = forward(s)
        if pool is None:
            pool = g.pool()
        graphs[s] = g
    torch.cuda.synchronize()
    return graphs, outs, pool


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


class DecodeGraphs:
    def __init__(self, model, allocator: KVAllocator, kv_caches, table, max_num_seqs: int, max_model_len: int,
                 device: torch.device):
        self.model, self.allocator, self.kv_caches = model, allocator, kv_caches
        self.device = device
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        m = self.sizes[-1]
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(m, dtype=torch.int64, device=device)
        self.positions = torch.zeros(m, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((m,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(m, **i32)
        self.query_start_loc = torch.arange(m + 1, **i32)
        self.paged = allocator.mode == Addressing.PAGED
        # PAGED: rows of the persistent block table, gathered inside the graph
        self.table = table
        self.addressing = torch.zeros(m, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            mode=self.allocator.mode, query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], max_query_len=1, max_seq_len=self.max_model_len,
            slot_mapping=self.slot_mapping[:bs])
        if self.paged:
            meta.block_table = self.table.device_t.index_select(0, self.addressing[:bs])
            meta.block_size = self.allocator.block_size
        else:
            meta.seq_base = self.addressing[:bs]
        return meta

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs), self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        self.graphs, self.logits, self.pool = capture_each(self.sizes, self._forward, self.pool)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def padded_size(self, n: int) -> int | None:
        return padded(self.sizes, n)

    def run(self, n: int, input_ids, positions, slots, seq_lens, addressing, feed=None) -> torch.Tensor:
        """Replay for ``n`` decode tokens; inputs are CPU tensors; addressing is each sequence's
        block-table row (PAGED) or base slot (LINEAR)."""
        bs = self.padded_size(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        if feed is not None:  # tokens of the previous step that never left the device
            self.input_ids[feed[0]] = feed[1]
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slots, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        if bs > n:
            # padding rows write nowhere and read nothing (an unmapped virtual page would fault)
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(0)
        self.addressing[:n].copy_(addressing, non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
