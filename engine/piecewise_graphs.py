"""Piecewise CUDA graphs for prefill and mixed steps (vLLM's piecewise mode).

A step of T tokens is padded to the smallest captured size S >= T. Everything between two
attentions has static shapes for a given S, so it is captured once per S: piece 0 is the
embedding and layer 0 up to its attention (norm, QKV GEMM, qk-norm + rope, cache write);
piece i is layer i-1 after its attention (output projection, add + norm, MLP) and layer i up
to its own; the last piece ends with the final norm. Only attention runs eagerly between the
pieces: its grid and metadata depend on how the tokens split into sequences. An eager step of
L layers launches ~10 L kernels from Python; this one replays L + 1 graphs and launches L
attentions, so its host time no longer scales with the model's depth.

Padding rows write nowhere (slot -1) and are never read by attention; their rows of the
GEMMs are wasted work, bounded by the spacing of the sizes.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from engine.cuda_graphs import padded
from kernels import fused_ops, pdl
from kernels.metadata import AttentionMetadata

log = logging.getLogger("kvlab.graphs")


def token_sizes(max_tokens: int) -> list[int]:
    """Captured token counts: every 16 to 256, then coarser (padding at most 1/8 of the step), up to
    the first that holds ``max_tokens``."""
    sizes = list(range(16, 257, 16)) + list(range(288, 513, 32)) + list(range(576, 1025, 64))
    sizes += list(range(1152, 2049, 128)) + list(range(2304, 4097, 256)) + list(range(4608, 8193, 512))
    return sizes[:bisect.bisect_left(sizes, max_tokens) + 1] if max_tokens > 0 else []


class PiecewiseGraphs:
    own_kv = False  # attention reads the cache (a step of whole prompts too: no K/V buffers between pieces)
    host_inputs = False  # run takes device tensors and metadata (FullGraphs: host arrays)

    def __init__(self, model, kv_caches, max_tokens: int, device: torch.device):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = token_sizes(max_tokens)
        m = self.sizes[-1] if self.sizes else 0
        cfg = model.config
        self.input_ids = torch.zeros(m, dtype=torch.int64, device=device)
        self.positions = torch.zeros(m, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((m,), -1, dtype=torch.int64, device=device)
        dtype = model.lm_head.weight.dtype
        # every size's pieces write each layer's queries here and read the attention output from
        # here: one buffer each for all sizes and layers, so that no size keeps its QKV buffers
        # (a few GiB over 40 sizes) out of the shared pool
        self.query = torch.zeros(m, cfg.num_attention_heads, cfg.head_dim, dtype=dtype, device=device)
        self.attn_out = torch.zeros(m, cfg.num_attention_heads, cfg.head_dim, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # per size, the last piece's output
        self.pieces: dict[int, list] = {}  # without CUDA: the pieces, called as they are
        self.pool = None
        self.capture_s = 0.0

    # -- the pieces --------------------------------------------------------------------------
    def _pieces(self, s: int) -> list:
        """Callables of the pieces of size ``s``; each returns the tensors the next step needs.
        State between pieces (the residual stream and the last MLP output) lives in ``box``."""
        layers = self.model.model.layers
        rope, caches = self.model.rope, self.kv_caches
        ids, pos, slots, attn = self.input_ids[:s], self.positions[:s], self.slot_mapping[:s], self.attn_out[:s]
        query = self.query[:s]
        box: dict = {}

        def first():
            x = self.model.model.embed_tokens(ids)
            (q, _), box["residual"] = layers[0].pre_attention(x, None, pos, rope, slots, caches[0])
            return query.copy_(q)

        def middle(i):
            def piece():
                x, res = layers[i - 1].post_attention(attn, box["residual"])
                (q, _), box["residual"] = layers[i].pre_attention(x, res, pos, rope, slots, caches[i])
                return query.copy_(q)
            return piece

        def last():
            x, res = layers[-1].post_attention(attn, box["residual"])
            norm = self.model.model.norm
            return fused_ops.rms_norm(x, norm.weight, norm.eps, res)

        return [first] + [middle(i) for i in range(1, len(layers))] + [last]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size (on CUDA). Elsewhere the pieces are kept and called as they are:
        the same decomposition, testable on CPU."""
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        with pdl.launches(self.model.pdl):  # the graphs keep the launches' PDL attribute
            self._capture_all(cuda)
        if cuda:
            torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        if self.sizes:
            log.info("piecewise CUDA graphs for %d token counts up to %d (%d graphs each) in %.1f s",
                     len(self.sizes), self.sizes[-1], len(self.model.model.layers) + 1, self.capture_s)

    def _capture_all(self, cuda: bool) -> None:
        for s in reversed(self.sizes):  # largest first: smaller sizes reuse its pool
            pieces = self._pieces(s)
            if not cuda:
                self.pieces[s] = pieces
                continue
            for p in pieces:  # warm up (Triton compiles, cuBLAS picks kernels); attention is skipped
                p()
            torch.cuda.synchronize()
            graphs = []
            for p in pieces:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    out = p()
                if self.pool is None:
                    self.pool = g.pool()
                graphs.append(g)
            # the queries live in self.query; only the hidden states are this size's own
            self.graphs[s], self.hidden[s] = graphs, out

    def padded_size(self, n: int) -> int | None:
        return padded(self.sizes, n)

    def _replay(self, s: int, i: int) -> torch.Tensor:
        """Piece ``i`` of size ``s``: a layer's queries into ``self.query``; the last piece's
        return value is the hidden states."""
        if s in self.graphs:
            self.graphs[s][i].replay()
            return self.hidden[s]
        return self.pieces[s][i]()

    @torch.inference_mode()
    def run(self, n: int, input_ids, positions, slots, meta: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states of ``n`` tokens (device tensors ``[n]`` of ids, positions
        and cache slots); ``meta`` describes the n real tokens, for the eager attentions."""
        if meta.own_kv:
            raise ValueError("piecewise graphs attend over the cache: an own_kv step runs eager or in full graphs")
        s = self.padded_size(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slots, non_blocking=True)
        if s > n:
            self.slot_mapping[n:s].fill_(-1)  # padding rows write nowhere
        q, out = self.query[:n], self.attn_out[:n]
        with pdl.launches(self.model.pdl):  # the eager attentions (and pieces without CUDA)
            for i, layer in enumerate(self.model.model.layers):
                self._replay(s, i)  # writes this layer's queries into self.query
                layer.self_attn.attend(q, meta, self.kv_caches[i], out=out)
            return self._replay(s, len(self.model.model.layers))[:n]
