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

import numpy as np
import torch

from engine.cuda_graphs import capture_each, capture_sizes, padded
from engine.piecewise_graphs import token_sizes
from kernels.metadata import Addressing, AttentionMetadata

log = logging.getLogger("kvlab.graphs")


class FullGraphs:
    """``run`` takes a step's host arrays (``BatchInputs``): they are packed into one pinned buffer and
    copied with one transfer into the graph's static inputs; the graph gathers the PAGED block-table rows
    from the persistent table and the sampled rows' hidden states, whose logits a small graph of their row
    count computes (``logits``): a mixed step's launch is one copy and two replays, not a copy and a
    kernel per array and an eager GEMM."""

    host_inputs = True  # ModelRunner.forward hands over host arrays (PiecewiseGraphs: device metadata)

    def __init__(self, model, kv_caches, max_tokens: int, device: torch.device, *, mode: Addressing,
                 max_num_seqs: int, max_model_len: int, table=None, block_size: int = 0, ring: int = 0,
                 own_kv: bool = False, logits: bool = True):
        """``table``: the runner's ``PersistentBlockTable`` (PAGED); ``logits``: the graphs also compute
        the logits of the step's sampled rows (up to min(size, ``max_num_seqs``), named by the step)."""
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = token_sizes(max_tokens)
        self.max_model_len = max_model_len
        m, S = (self.sizes[-1] if self.sizes else 0), max_num_seqs
        self.max_num_seqs = S
        # one int64 buffer: [query starts and sequence lengths (int32 pairs in S + 1 words) | addressing S |
        # sampled rows S | then, for the replayed size s: token ids s | positions s | slots s]
        self.head = 3 * S + 1
        self.packed = torch.zeros(self.head + 3 * m, dtype=torch.int64, device=device)
        words = self.packed[:S + 1].view(torch.int32)
        self.qsl, self.seq_lens = words[:S + 1], words[S + 1:2 * S + 1]
        self.addressing = self.packed[S + 1:2 * S + 1]  # PAGED: block-table row; LINEAR: base slot
        self.rows = self.packed[2 * S + 1:3 * S + 1]
        if mode == Addressing.PAGED and table is None:
            raise ValueError("PAGED full graphs need the runner's block table")
        self.mode, self.table, self.block_size, self.ring = mode, table, block_size, ring
        self.own_kv = own_kv
        # logits: each step graph gathers its sampled rows' hidden states into ``sampled``; a small graph per
        # row count (the decode graphs' sizes) multiplies as many by lm_head into ``logits``, so a step pays
        # the GEMM of its own rows, not of max_num_seqs (lm_head at 256 rows: ~1.4x its time at 1-128)
        self.logits = self.sampled = None
        self.row_sizes: list[int] = []
        self.logit_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if logits and m:
            head = model.lm_head.weight
            self.row_sizes = capture_sizes(S)
            self.sampled = torch.zeros(S, head.shape[1], dtype=head.dtype, device=device)
            self.logits = torch.empty(S, head.shape[0], dtype=head.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.own_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.own_hidden: dict[int, torch.Tensor] = {}
        self.pool = None
        self.capture_s = 0.0

    def _tokens(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The static token ids, positions and slots of size ``s``."""
        h = self.head
        return self.packed[h:h + s], self.packed[h + s:h + 2 * s], self.packed[h + 2 * s:h + 3 * s]

    def _meta(self, s: int, own: bool = False) -> AttentionMetadata:
        slots = self._tokens(s)[2]
        if own:  # each sequence's keys from its first query row on (the cast is captured)
            return AttentionMetadata(
                mode=Addressing.LINEAR, query_start_loc=self.qsl, seq_lens=self.seq_lens, max_query_len=s,
                max_seq_len=s, slot_mapping=slots, seq_base=self.qsl[:-1].to(torch.int64), trailing_padding=True,
                own_kv=True)
        meta = AttentionMetadata(
            mode=self.mode, query_start_loc=self.qsl, seq_lens=self.seq_lens, max_query_len=s,
            max_seq_len=self.max_model_len, slot_mapping=slots, trailing_padding=True)
        if self.mode == Addressing.PAGED:  # the rows gathered inside the graph, as decode graphs do
            meta.block_table = self.table.device_t.index_select(0, self.addressing)
            meta.block_size = self.block_size
        else:
            meta.seq_base, meta.ring = self.addressing, self.ring
        return meta

    def _forward(self, s: int, own: bool = False) -> torch.Tensor:
        ids, pos, _ = self._tokens(s)
        hidden = self.model(ids, pos, self._meta(s, own), self.kv_caches)
        if self.sampled is not None:
            r = min(s, self.max_num_seqs)  # padding rows name row 0: gathered, never read
            torch.index_select(hidden, 0, self.rows[:r], out=self.sampled[:r])
        return hidden

    def _logits(self, r: int) -> torch.Tensor:
        return self.model.compute_logits_into(self.sampled[:r], self.logits[:r])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size (CUDA; elsewhere ``run`` calls the forward directly). The warm-up
        replay of each size runs with no sequences: nothing is read or written."""
        if self.device.type != "cuda":
            return
        t0 = time.perf_counter()
        self.graphs, self.hidden, self.pool = capture_each(self.sizes, self._forward, self.pool, self._empty)
        if self.own_kv:
            # each writes its hidden states into the other graph's of its size: the pool then holds
            # no second set of outputs (~0.8 GiB for llama3-8b up to 8,192 tokens)
            self.own_graphs, self.own_hidden, _ = capture_each(
                self.sizes, lambda s: self.hidden[s].copy_(self._forward(s, True)), self.pool, self._empty)
        if self.row_sizes:
            self.logit_graphs, _, _ = capture_each(self.row_sizes, self._logits, self.pool)
        self.capture_s = time.perf_counter() - t0
        if self.sizes:
            log.info("full CUDA graphs (attention included) for %d token counts up to %d%s in %.1f s",
                     len(self.sizes), self.sizes[-1], " (twice: own_kv)" if self.own_kv else "", self.capture_s)

    def padded_size(self, n: int) -> int | None:
        return padded(self.sizes, n)

    def _empty(self, s: int) -> None:
        """Size ``s``'s inputs as a step of no sequences: token 0 at position 0, written nowhere."""
        self.packed[:self.head].zero_()
        self.packed[self.head:self.head + 2 * s].zero_()
        self._tokens(s)[2].fill_(-1)

    def pack(self, inputs, s: int) -> np.ndarray:
        """The host words of a step (``BatchInputs`` or ``StepInputs``) padded to size ``s``: empty
        sequences after the real ones (no queries, no keys), padding tokens that write nowhere."""
        S, n, k = self.max_num_seqs, len(inputs.input_ids), len(inputs.seq_lens)
        if k > S:
            raise ValueError(f"{k} sequences in a step: more than the {S} captured")
        rows = inputs.sample_rows
        if len(rows) > min(s, S):
            raise ValueError(f"{len(rows)} sampled rows in a step of {s} tokens: more than the graph computes")
        out = np.zeros(self.head + 3 * s, dtype=np.int64)
        words = out[:S + 1].view(np.int32)
        words[:k + 1] = inputs.qsl
        words[k + 1:S + 1] = n
        words[S + 1:S + 1 + k] = inputs.seq_lens
        out[S + 1:S + 1 + k] = inputs.addressing
        out[2 * S + 1:2 * S + 1 + len(rows)] = rows
        h = self.head
        out[h:h + n] = inputs.input_ids
        out[h + s:h + s + n] = inputs.positions
        out[h + 2 * s:h + 2 * s + n] = inputs.slots
        out[h + 2 * s + n:] = -1
        return out

    @torch.inference_mode()
    def run(self, inputs, own: bool = False, feed=None, host=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final-normed hidden states of the step's tokens and the logits of its sampled rows (None
        where it samples none). ``own``: attention over the step's own K and V (a step of whole prompts).
        ``feed``: (token index, token) device tensors of inputs still on the device. ``host``: puts an
        array in a pinned buffer (``HostStaging.host``; default: the array as it is)."""
        n = len(inputs.input_ids)
        s = self.padded_size(n)
        if s is None:
            raise ValueError(f"a step of {n} tokens: more than the {self.sizes[-1] if self.sizes else 0} captured")
        if own and not self.own_kv:
            raise ValueError("an own_kv step, but no own_kv graphs were captured")
        words = self.pack(inputs, s)
        staged = host("full_graph", words) if host is not None else torch.from_numpy(words)
        self.packed[:words.size].copy_(staged, non_blocking=True)
        if feed is not None:  # tokens of the previous step that never left the device
            self._tokens(s)[0][feed[0]] = feed[1]
        graphs, hidden = (self.own_graphs, self.own_hidden) if own else (self.graphs, self.hidden)
        if s in graphs:
            graphs[s].replay()
            out = hidden[s]
        else:
            out = self._forward(s, own)
        r = len(inputs.sample_rows)
        if not r or self.logits is None:
            return out[:n], None
        b = padded(self.row_sizes, r)
        if b in self.logit_graphs:
            self.logit_graphs[b].replay()
        else:
            self._logits(b)
        return out[:n], self.logits[:r]
