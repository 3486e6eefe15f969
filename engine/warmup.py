"""The model runner's warm-up: kernels and GEMMs loaded at start-up rather than inside a measured step.

Triton compiles a kernel variant at its first launch and the driver loads a cuBLAS kernel at its
first launch (lazy module loading, which waits for the device to go idle): either, met inside a
run, stalls the step in flight. ``WarmupMixin`` (a part of ``ModelRunner``) runs, on a scratch
cache, the batch shapes that select every eager kernel variant, and every GEMM shape eager steps
and sampling can have.
"""
from __future__ import annotations

import logging

import torch

from kernels.metadata import Addressing, AttentionMetadata

log = logging.getLogger("kvlab.runner")


def eager_token_counts(graph_max_tokens: int, max_tokens: int, stride: int = 128) -> list[int]:
    """Token counts of eager steps whose GEMMs the warm-up runs: above the captured graphs'
    largest (``graph_max_tokens``; 0: every step is eager) up to ``max_tokens``, every ``stride``
    tokens and the powers of two below it (cuBLAS picks its kernels by ranges of M), and
    ``max_tokens`` itself."""
    counts = {2 ** i for i in range(stride.bit_length() - 1)} | set(range(stride, max_tokens + 1, stride))
    if max_tokens > 0:
        counts.add(max_tokens)
    return sorted(n for n in counts if graph_max_tokens < n <= max_tokens)


class WarmupMixin:
    """``ModelRunner``'s warm-up (it provides model, allocator, device, kv_caches, table, paged,
    prompt_qkv, graphs, mixed_graphs, kv_calibration and the step limits)."""

    # batches whose shapes select every kernel variant an eager step can need: a prefill of 2^i
    # or 2^i + 1 tokens, alone or beside 1, 3, 15 or 16 decodes, selects every query tile, and
    # whether one tile holds every sequence's queries, for any head grouping; token and
    # sequence counts of 1, multiples of 16 and others
    _PREFILLS = (2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65)
    WARMUP_BATCHES = ([[q] for q in (*_PREFILLS, 128, 129, 256, 300, 512, 1000, 4096)]
                      + [[q] + [1] * k for q in (*_PREFILLS, 256) for k in (1, 3, 15, 16)]
                      + [[1]])  # one token: small_linear's own variant (NORM_M = 1) in eager decodes of one sequence

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile the Triton kernels of eager steps now, on a scratch cache in this allocator's
        addressing mode: the first mixed step of a new shape would otherwise stall 0.1-0.6 s
        inside a measured run (or a served request)."""
        from kernels.metadata import contiguous_metadata

        mc = self.model.config
        bs = self.allocator.block_size if self.paged else 0
        need = max(sum(-(-(q + 16) // max(bs, 1)) * max(bs, 1) for q in b) for b in self.WARMUP_BATCHES)
        k = torch.zeros(need, mc.num_key_value_heads, mc.head_dim, dtype=self.kv_caches[0][0].dtype,
                        device=self.device)
        caches = [(k, torch.zeros_like(k))] * mc.num_hidden_layers  # one scratch layer: writes may overlap
        try:
            for qs in self.WARMUP_BATCHES:
                ctx = [q + (16 if q == 1 else 0) for q in qs]  # decode tokens have some context
                if max(ctx) > self.max_model_len:
                    continue
                meta = contiguous_metadata(self.allocator.mode, qs, ctx, self.device, bs,
                                           self.table.device_t.shape[1] if self.paged else 0)
                self._warm_step(qs, ctx, meta, caches)
                if self.prompt_qkv:  # the same tokens as whole prompts over their own K and V (LINEAR)
                    own = contiguous_metadata(Addressing.LINEAR, qs, qs, self.device)
                    own.seq_base, own.own_kv = own.query_start_loc[:-1].long(), True
                    self._warm_step(qs, qs, own, caches)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # an optimisation only: a shape it cannot run is compiled when met
            log.warning("kernel warm-up stopped early: %r", e)
        try:
            self.warm_gemms()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # likewise: a GEMM shape it did not run is loaded when met
            log.warning("GEMM warm-up stopped early: %r", e)

    def _warm_step(self, qs: list[int], ctx: list[int], meta: AttentionMetadata, caches) -> None:
        """One warm-up forward: sequences of ``qs`` new tokens reaching ``ctx``, and their logits."""
        ids = torch.zeros(sum(qs), dtype=torch.int64, device=self.device)
        pos = torch.cat([torch.arange(c - q, c, device=self.device) for q, c in zip(qs, ctx)])
        hidden = self.model(ids, pos, meta, caches)
        self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1]).argmax(-1)

    @torch.inference_mode()
    def warm_gemms(self) -> list[tuple[int, tuple[int, int]]]:
        """Run the logits GEMM at every number of sampled rows (1 to max_num_seqs) and each
        linear layer's GEMM at the token counts of eager steps (``eager_token_counts``; with no
        decode graphs, every batch size too); returns the (rows, weight shape) pairs run.

        cuBLAS picks its kernel by shape, and the driver loads a kernel at its first launch (lazy
        module loading), which waits for the device to go idle: inside a run, that stalls the step
        in flight behind it (measured on an H200: 15-350 ms launches in an offline run's first
        prefill wave, ``experiments/profile_wave.py``). A grid, not every count: one qwen3-0.6b
        eager count still loaded a kernel in its first wave."""
        top = self.mixed_graphs.sizes[-1] if self.mixed_graphs is not None and self.mixed_graphs.sizes else 0
        if self.kv_calibration:
            top = 0  # the calibrating step (the first with a prefill) runs eager at any size
        counts = eager_token_counts(top, self.max_num_batched_tokens)
        if self.graphs is None:  # decode steps run eager too, at every batch size
            counts = sorted(set(counts) | set(range(1, self.max_num_seqs + 1)))
        linears = {}
        for m in self.model.model.modules():
            if isinstance(m, torch.nn.Linear):
                linears.setdefault((tuple(m.weight.shape), m.bias is not None, m.weight.dtype), m)
        head = self.model.lm_head.weight
        width = max([head.shape[1]] + [shape[1] for shape, _, _ in linears])
        flat = torch.zeros(max([self.max_num_seqs, *counts]) * width, dtype=head.dtype, device=self.device)
        done = []  # inputs contiguous, as in a step: cuBLAS may choose by leading dimension too
        for r in range(1, self.max_num_seqs + 1):
            self.model.compute_logits(flat[:r * head.shape[1]].view(r, head.shape[1])).argmax(-1)
            done.append((r, tuple(head.shape)))
        for n in counts:
            for (shape, _, _), lin in linears.items():
                # the GEMM alone: a tensor-parallel layer's forward would add a collective
                torch.nn.functional.linear(flat[:n * shape[1]].view(n, shape[1]), lin.weight, lin.bias)
                done.append((n, shape))
        return done
