"""Full CUDA graphs for prefill and mixed steps, attention included (vLLM's FULL mode).

Piecewise graphs (engine/piecewise_graphs.py) leave attention eager because its grid and
metadata depend on how a step's tokens split into sequences; the step then costs L graph
replays and L attention launches from Python, and a small model's prefill or mixed step is
bound by that CPU time, not by the device (qwen3-0.6b on an H200: ~150 us per layer,
results/engine/step_timing/). Here the attention kernel is captured too, with every input in a
static buffer: the token count padded to a captured size S, the sequences padded to
``max_num_seqs`` (empty ones: no queries, no keys), and the grid an upper bound on the query
tiles (``triton_attention``'s spare tiles do nothing). Its tile config is the one a prompt of S
tokens gets, whatever the step's longest query (the eager path picks it per step), so each size
is one graph and a step is one replay.

``own_kv`` (a PAGED engine's ``prompt_qkv``): each size has a second graph for steps of whole
prompts, whose attention reads the step's own K and V LINEAR (``AttentionMetadata.own_kv``).

Same interface as ``PiecewiseGraphs``: ``sizes``, ``padded_size``, ``capture``, ``run``.
Without CUDA nothing is captured and ``run`` calls the padded forward as it is (CPU tests).
"""
from __future__ import annotations

import logging
import time

import torch

from engine.cuda_graphs import capture_each, padded
from engine.piecewise_graphs import token_sizes
from kernels.metadata import Addressing, AttentionMetadata

log = logging.getLogger("kvlab.graphs")


class FullGraphs:
    def __init__(self, model, kv_caches, max_tokens: int, device: torch.device, *, mode: Addressing,
                 max_num_seqs: int, max_model_len: int, table_width: int = 0, block_size: int = 0, ring: int = 0,
                 own_kv: bool = False):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = token_sizes(max_tokens)
        self.max_model_len = max_model_len
        m, S = (self.sizes[-1] if self.sizes else 0), max_num_seqs
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(m, **i64)
        self.positions = torch.zeros(m, **i64)
        self.slot_mapping = torch.full((m,), -1, **i64)
        self.qsl = torch.zeros(S + 1, **i32)
        self.seq_lens = torch.zeros(S, **i32)
        self.mode, self.block_size, self.ring = mode, block_size, ring
        # PAGED: the step's block-table rows, copied in; LINEAR: each sequence's base slot
        self.block_table = torch.zeros(S, max(1, table_width), **i32) if mode == Addressing.PAGED else None
        self.seq_base = torch.zeros(S, **i64) if mode != Addressing.PAGED else None
        self.own_kv = own_kv
        self.own_base = torch.zeros(S, **i64) if own_kv else None  # own_kv: each sequence's first query row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.own_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.own_hidden: dict[int, torch.Tensor] = {}
        self.pool = None
        self.capture_s = 0.0

    def _meta(self, s: int, own: bool = False) -> AttentionMetadata:
        if own:
            return AttentionMetadata(
                mode=Addressing.LINEAR, query_start_loc=self.qsl, seq_lens=self.seq_lens, max_query_len=s,
                max_seq_len=s, slot_mapping=self.slot_mapping[:s], seq_base=self.own_base, trailing_padding=True,
                own_kv=True)
        return AttentionMetadata(
            mode=self.mode, query_start_loc=self.qsl, seq_lens=self.seq_lens, max_query_len=s,
            max_seq_len=self.max_model_len, slot_mapping=self.slot_mapping[:s], block_table=self.block_table,
            block_size=self.block_size, seq_base=self.seq_base, ring=self.ring, trailing_padding=True)

    def _forward(self, s: int, own: bool = False) -> torch.Tensor:
        return self.model(self.input_ids[:s], self.positions[:s], self._meta(s, own), self.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size (CUDA; elsewhere ``run`` calls the forward directly). The warm-up
        replay of each size runs with no sequences: nothing is read or written."""
        if self.device.type != "cuda":
            return
        t0 = time.perf_counter()
        self.graphs, self.hidden, self.pool = capture_each(self.sizes, self._forward, self.pool)
        if self.own_kv:
            # each writes its hidden states into the other graph's of its size: the pool then holds
            # no second set of outputs (~0.8 GiB for llama3-8b up to 8,192 tokens)
            self.own_graphs, self.own_hidden, _ = capture_each(
                self.sizes, lambda s: self.hidden[s].copy_(self._forward(s, True)), self.pool)
        self.capture_s = time.perf_counter() - t0
        if self.sizes:
            log.info("full CUDA graphs (attention included) for %d token counts up to %d%s in %.1f s",
                     len(self.sizes), self.sizes[-1], " (twice: own_kv)" if self.own_kv else "", self.capture_s)

    def padded_size(self, n: int) -> int | None:
        return padded(self.sizes, n)

    @torch.inference_mode()
    def run(self, n: int, input_ids, positions, slots, meta: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states of ``n`` tokens (device tensors); ``meta`` (device tensors
        too) describes the step's sequences and is copied into the static buffers."""
        s = self.padded_size(n)
        k = meta.seq_lens.shape[0]
        if k > self.seq_lens.shape[0]:
            raise ValueError(f"{k} sequences in a step: more than the {self.seq_lens.shape[0]} captured")
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slots, non_blocking=True)
        if s > n:
            self.slot_mapping[n:s].fill_(-1)  # padding rows write nowhere
        self.qsl[:k + 1].copy_(meta.query_start_loc, non_blocking=True)
        self.qsl[k + 1:].fill_(n)  # empty sequences after the real ones: no queries ...
        self.seq_lens[:k].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[k:].fill_(0)  # ... and no keys
        own = meta.own_kv
        if own:
            if not self.own_kv:
                raise ValueError("an own_kv step, but no own_kv graphs were captured")
            self.own_base[:k].copy_(meta.seq_base, non_blocking=True)
        elif self.block_table is not None:
            width = meta.block_table.shape[1]
            if width > self.block_table.shape[1]:
                raise ValueError(f"block table of {width} columns: wider than the {self.block_table.shape[1]} captured")
            self.block_table[:k, :width].copy_(meta.block_table, non_blocking=True)
        else:
            self.seq_base[:k].copy_(meta.seq_base, non_blocking=True)
        graphs, hidden = (self.own_graphs, self.own_hidden) if own else (self.graphs, self.hidden)
        if s in graphs:
            graphs[s].replay()
            return hidden[s][:n]
        return self._forward(s, own)[:n]
