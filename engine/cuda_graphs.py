"""CUDA graphs for decode batches: one graph per padded batch size, static input buffers.

A decode step of B sequences copies its inputs into the first B rows of the buffers and
replays the graph of the smallest captured size >= B. Padding rows write nowhere
(slot -1) and attend to no token; their logits are dropped.
"""
from __future__ import annotations

import bisect
import logging

import numpy as np
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
    """Static inputs in one int64 buffer (sequence lengths as int32 pairs, then, for the replayed size
    bs: addressing, token ids, positions, slots), filled with one copy a step from one pinned array."""

    def __init__(self, model, allocator: KVAllocator, kv_caches, table, max_num_seqs: int, max_model_len: int,
                 device: torch.device):
        self.model, self.allocator, self.kv_caches = model, allocator, kv_caches
        self.device = device
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        m = self.sizes[-1]
        self.head = (m + 1) // 2
        self.packed = torch.zeros(self.head + 4 * m, dtype=torch.int64, device=device)
        self.seq_lens = self.packed[:self.head].view(torch.int32)[:m]
        self.query_start_loc = torch.arange(m + 1, dtype=torch.int32, device=device)
        self.paged = allocator.mode == Addressing.PAGED
        # PAGED: rows of the persistent block table, gathered inside the graph; LINEAR: base slots
        self.table = table
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def static_inputs(self, bs: int) -> tuple[torch.Tensor, ...]:
        """Size ``bs``'s static addressing, token ids, positions and slots."""
        h = self.head
        return tuple(self.packed[h + i * bs:h + (i + 1) * bs] for i in range(4))

    def _meta(self, bs: int) -> AttentionMetadata:
        addressing, _, _, slots = self.static_inputs(bs)
        meta = AttentionMetadata(
            mode=self.allocator.mode, query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], max_query_len=1, max_seq_len=self.max_model_len, slot_mapping=slots)
        if self.paged:
            meta.block_table = self.table.device_t.index_select(0, addressing)
            meta.block_size = self.allocator.block_size
        else:
            meta.seq_base = addressing
        return meta

    def _forward(self, bs: int) -> torch.Tensor:
        _, ids, pos, _ = self.static_inputs(bs)
        hidden = self.model(ids, pos, self._meta(bs), self.kv_caches)
        return self.model.compute_logits(hidden)

    def _empty(self, bs: int) -> None:
        """Size ``bs``'s inputs as a batch that reads nothing and writes nowhere."""
        self.packed[:self.head + 3 * bs].zero_()
        self.static_inputs(bs)[3].fill_(-1)

    @torch.inference_mode()
    def capture(self) -> None:
        self.graphs, self.logits, self.pool = capture_each(self.sizes, self._forward, self.pool, self._empty)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def padded_size(self, n: int) -> int | None:
        return padded(self.sizes, n)

    def pack(self, inputs, bs: int) -> np.ndarray:
        """The words of a decode step (``BatchInputs``: one token a sequence) padded to ``bs`` rows:
        padding rows write nowhere (slot -1) and read nothing (length 0: an unmapped virtual page
        would fault)."""
        n = len(inputs.seq_lens)
        out = np.zeros(self.head + 4 * bs, dtype=np.int64)
        out[:self.head].view(np.int32)[:n] = inputs.seq_lens
        h = self.head
        for i, a in enumerate((inputs.addressing, inputs.input_ids, inputs.positions, inputs.slots)):
            out[h + i * bs:h + i * bs + n] = a
        out[h + 3 * bs + n:] = -1
        return out

    def run(self, inputs, feed=None, host=None) -> torch.Tensor:
        """Replay for a decode step's host arrays (``BatchInputs``); the logits of its ``n`` rows.
        ``feed``: (row, token) device tensors of tokens still on the device; ``host``: puts an array
        in a pinned buffer (``HostStaging.host``; default: the array as it is)."""
        n = len(inputs.seq_lens)
        bs = self.padded_size(n)
        words = self.pack(inputs, bs)
        self.packed[:words.size].copy_(host("decode_graph", words) if host is not None else torch.from_numpy(words),
                                       non_blocking=True)
        if feed is not None:  # tokens of the previous step that never left the device
            self.static_inputs(bs)[1][feed[0]] = feed[1]
        if bs in self.graphs:
            self.graphs[bs].replay()
            return self.logits[bs][:n]
        return self._forward(bs)[:n]  # not captured (CPU)
