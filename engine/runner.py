"""Model runner: turns a scheduled batch into flat tensors, runs the model, samples.

The allocator supplies slots and addressing; nothing here depends on which one it is
beyond the addressing mode the kernels take. On CUDA (unless ``enforce_eager``), pure-decode
batches replay a captured CUDA graph of the whole step; prefill and mixed batches up to
``graph_max_tokens`` replay graphs of their padded size (``graph_mode``: full, attention captured
too; or piecewise, attention eager between them), larger ones run eagerly.
One host sync per step: the sampled token ids.
"""
from __future__ import annotations

import gc
import logging
import time

import numpy as np
import torch

from allocators.base import KVAllocator
from engine.batch_inputs import BatchInputs, StepInputs  # re-exported: they live in engine/batch_inputs.py now
from engine.block_table import PersistentBlockTable
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.staging import HostStaging
from engine.step_handle import Sampled, StepHandle  # re-exported: both live in engine/step_handle.py now
from engine.warmup import WarmupMixin, eager_token_counts  # eager_token_counts re-exported
from kernels import compile_watch
from kernels.metadata import Addressing, AttentionMetadata, orders_decode

log = logging.getLogger("kvlab.runner")

__all__ = ["BatchInputs", "ModelRunner", "Sampled", "StepHandle", "StepInputs", "eager_token_counts"]


# warmup(), warm_gemms(): engine/warmup.py
class ModelRunner(WarmupMixin):
    def __init__(self, model: torch.nn.Module, allocator: KVAllocator, device: str, eos_ids: list[int],
                 seed: int = 0, max_num_seqs: int = 256, max_model_len: int = 2048, enforce_eager: bool = True,
                 kv_calibration: str = "", graph_max_tokens: int = 0, graph_mode: str = "full",
                 max_num_batched_tokens: int = 0, prompt_qkv: bool = False):
        """``kv_calibration`` ("tensor" | "head"): fp8 KV scales are set by the first step with a
        prefill, from its keys and values. ``graph_max_tokens``: prefill and mixed steps of up to
        this many tokens replay CUDA graphs (CUDA, not ``enforce_eager``, fused model): ``graph_mode``
        "piecewise" (attention eager between them) or "full" (attention captured too).
        ``max_num_batched_tokens``: the largest eager step, whose GEMMs the warm-up loads.
        ``prompt_qkv`` (PAGED, caches of the model's dtype, one layer group): a step of whole prompts
        attends over its own K and V, LINEAR (``AttentionMetadata.own_kv``), except where piecewise
        graphs take it (their attention reads the cache)."""
        self.model = model
        self.kv_calibration = kv_calibration
        self.allocator = allocator
        self.device = torch.device(device)
        self.eos_ids = eos_ids
        self.sampler = Sampler(self.device, seed)
        self.kv_caches = [allocator.kv_cache(i) for i in range(model.config.num_hidden_layers)]
        self.paged = allocator.mode == Addressing.PAGED
        # layer groups (window-aware allocation): addressing and metadata per group, each layer
        # reading its group's; otherwise the allocator is the one group
        plan = getattr(allocator, "plan", None)
        self.views = [allocator.group(k) for k in range(plan.num_groups)] if plan else [allocator]
        if plan:
            for i, layer in enumerate(model.model.layers):
                layer.self_attn.group = plan.locate(i)[0]
        self.tables: list[PersistentBlockTable | None] = [None] * len(self.views)
        if self.paged:
            width = -(-max_model_len // allocator.block_size)
            self.tables = [PersistentBlockTable(max_num_seqs + 1, width, self.device) for _ in self.views]
        self.table = self.tables[0]
        model_dtype = next(model.parameters()).dtype
        self.prompt_qkv = (prompt_qkv and self.paged and plan is None and not kv_calibration
                           and self.kv_caches[0][0].dtype == model_dtype)
        if prompt_qkv and not self.prompt_qkv:
            log.info("prompt_attention=qkv has no effect here: it needs the paged allocator, a KV cache of the "
                     "model's dtype (not fp8) and one layer group; every step reads the cache")
        self.graphs = None
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.last_prep_s = 0.0
        self.staging = HostStaging(self.device)
        self.sampler.staging = self.staging
        if self.device.type == "cuda":
            compile_watch.install()  # from here on, a compile outside warm-up is named in a warning
        if self.device.type == "cuda" and not enforce_eager and plan is None:  # graphs: one group only
            from engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, allocator, self.kv_caches, self.table, max_num_seqs, max_model_len,
                                       self.device)
            with compile_watch.expected():
                self.graphs.capture()
        self.mixed_graphs = None
        if (self.device.type == "cuda" and not enforce_eager and plan is None and graph_max_tokens > 0
                and getattr(model, "fused", False)):
            self.mixed_graphs = self._mixed_graphs(graph_mode, graph_max_tokens, max_num_seqs, max_model_len)
            with compile_watch.expected():
                self.mixed_graphs.capture()
        if self.device.type == "cuda":
            with compile_watch.expected():
                self.warmup()
            # what start-up made lives as long as the engine: keep the collector from scanning it
            # again (a full collection inside a step stalls it)
            gc.collect()
            gc.freeze()

    def _mixed_graphs(self, mode: str, max_tokens: int, max_num_seqs: int, max_model_len: int):
        """The graphs of prefill and mixed steps (not captured yet)."""
        if mode == "full":
            from engine.full_graphs import FullGraphs

            return FullGraphs(self.model, self.kv_caches, max_tokens, self.device, mode=self.allocator.mode,
                              max_num_seqs=max_num_seqs, max_model_len=max_model_len, table=self.table,
                              block_size=self.allocator.block_size if self.paged else 0,
                              ring=getattr(self.views[0], "ring", 0), own_kv=self.prompt_qkv)
        from engine.piecewise_graphs import PiecewiseGraphs

        return PiecewiseGraphs(self.model, self.kv_caches, max_tokens, self.device)

    def _metadata(self, inputs: BatchInputs, group: int = 0, own_kv: bool = False) -> AttentionMetadata:
        """``own_kv``: a step of whole prompts read LINEAR from its own K and V, each sequence's
        keys from its first query row on."""
        dev = self.staging.to_device
        tag = f"g{group}" if group else ""  # staging buffers of one group's arrays
        meta = AttentionMetadata(
            mode=self.allocator.mode, query_start_loc=dev("qsl", inputs.qsl), seq_lens=dev("seq_lens", inputs.seq_lens),
            max_query_len=inputs.max_query_len, max_seq_len=inputs.max_seq_len,
            slot_mapping=dev("slots" + tag, inputs.slots))
        if own_kv:
            meta.mode, meta.own_kv = Addressing.LINEAR, True
            meta.seq_base = dev("own_base", inputs.qsl[:-1].astype(np.int64))
        elif self.paged:
            table = self.tables[group]
            meta.block_table = table.device_t.index_select(0, dev("addressing" + tag, inputs.addressing))
            meta.block_size = self.allocator.block_size
        else:
            meta.seq_base = dev("addressing" + tag, inputs.addressing)
            meta.ring = getattr(self.views[group], "ring", 0)
        return meta

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, inflight: "StepHandle | None" = None) -> "StepHandle":
        """Queue the step on the device; the sampled tokens come back through the handle.

        Inputs still pending from ``inflight`` are gathered on the device from its samples,
        so this never waits for the previous step.
        """
        t0 = time.perf_counter()
        stage = self.staging
        stage.next_step()
        pending = inflight.rows if inflight else None
        order = self._decode_order(batch)
        inputs = BatchInputs(batch, self.views[0], self.table, pending, order)
        more = [BatchInputs(batch, v, t, pending, order) for v, t in zip(self.views[1:], self.tables[1:])]
        for k, table in enumerate(self.tables):
            if table is not None:
                table.sync(stage, f"block_table{k}" if k else "block_table")
        feed = None
        if inputs.feed:
            idx = stage.to_device("feed", np.array(inputs.feed, dtype=np.int64))
            feed = (idx[:, 0], inflight.tokens[idx[:, 1]])
        self.last_prep_s = time.perf_counter() - t0
        inputs.groups = more  # the other layer groups' addressing (window-aware allocation)
        self.publish(inputs)
        logits = self.forward(inputs, feed)
        if logits is None or not inputs.sample_seqs:
            handle = StepHandle([], on_cuda=self.device.type == "cuda")
        else:
            tokens, logprobs = self.sampler.sample(logits, inputs.sample_seqs, self.eos_ids, inflight)
            handle = StepHandle(inputs.sample_seqs, tokens, logprobs)
        stage.used_by(handle)
        return handle

    def _decode_order(self, batch: ScheduledBatch) -> list[int] | None:
        """A decode batch of ``orders_decode`` size (its launch size: the padded graph's, else its
        own) goes longest first, so that where its attention launches sequence by sequence (one
        split: ``decode_seq_major``) its longest sequences' programs start first; else None (as
        scheduled). Sampled tokens follow their sequences (``StepHandle.seqs``): greedy and seeded
        sampling give the same tokens either way; unseeded sampling draws its noise by row, and a
        step's outputs come in the launched order."""
        n = len(batch.seqs)
        if not n or batch.num_prefill_tokens:
            return None
        size = (self.graphs.padded_size(n) if self.graphs is not None else None) or n
        if not orders_decode(size):
            return None
        ctx = [seq.num_computed_tokens for seq in batch.seqs]
        return sorted(range(n), key=ctx.__getitem__, reverse=True)

    def publish(self, inputs: BatchInputs) -> None:
        """Hand a step's inputs to whoever must run it too: nobody on one device (tensor
        parallelism: the other ranks, ``engine/tp_worker.py``)."""

    def forward(self, inputs: "BatchInputs | StepInputs", feed=None) -> torch.Tensor | None:
        """The model over a step's inputs (the decode CUDA graph where one fits, else eager);
        the logits of the rows that sample, None where none does."""
        stage = self.staging
        if (self.graphs is not None and inputs.num_prefill_tokens == 0
                and self.graphs.padded_size(inputs.num_seqs) is not None):
            return self.graphs.run(inputs, feed, stage.host)
        more = getattr(inputs, "groups", ())
        calibrate = self.kv_calibration and inputs.num_prefill_tokens > 0
        n = len(inputs.input_ids)
        graphed = (self.mixed_graphs is not None and not calibrate and not more
                   and self.mixed_graphs.padded_size(n) is not None)
        # piecewise graphs have no own_kv variant: their steps read the cache
        own_kv = self.prompt_qkv and inputs.whole_prompts and (not graphed or self.mixed_graphs.own_kv)
        if graphed and self.mixed_graphs.host_inputs:  # full graphs: one copy in, the logits from their graphs
            hidden, logits = self.mixed_graphs.run(inputs, own_kv, feed, stage.host)
        else:
            hidden, logits = self._forward_metadata(inputs, feed, graphed, own_kv, calibrate, more), None
        if inputs.prompt_lp:
            self._prompt_logprobs(hidden, inputs.prompt_lp)
        if not inputs.sample_rows or logits is not None:
            return logits
        rows = stage.to_device("rows", np.array(inputs.sample_rows, dtype=np.int64))
        return self.model.compute_logits(hidden[rows])

    def _forward_metadata(self, inputs, feed, graphed: bool, own_kv: bool, calibrate, more) -> torch.Tensor:
        """The hidden states of a step run eagerly or through piecewise graphs, from device metadata."""
        stage = self.staging
        meta = self._metadata(inputs, own_kv=own_kv)
        if more:  # one metadata per layer group
            meta = [meta] + [self._metadata(x, k) for k, x in enumerate(more, 1)]
        ids = stage.to_device("ids", inputs.input_ids)
        if feed is not None:
            ids[feed[0]] = feed[1]
        pos = stage.to_device("positions", inputs.positions)
        if graphed:
            return self.mixed_graphs.run(len(inputs.input_ids), ids, pos, meta.slot_mapping, meta)
        if calibrate:
            self.model.calibrate_kv_scales(self.kv_calibration)
        try:
            hidden = self.model(ids, pos, meta, self.kv_caches)
        finally:
            if calibrate:
                self.model.calibrate_kv_scales("")
        if calibrate:
            self.kv_calibration = ""  # once: later tokens are quantized with these scales
        return hidden

    def _prompt_logprobs(self, hidden: torch.Tensor, items: list[tuple[Sequence, int, int, int]]) -> None:
        """Logprob of each prompt token (and the k most likely) from the rows before it. Rare
        (scoring requests), so read back at once."""
        for seq, row, start, m in items:
            lp = self.model.compute_logits(hidden[row:row + m]).float().log_softmax(-1)
            targets = torch.tensor(seq.token_ids[start + 1:start + 1 + m], device=lp.device)
            got = lp.gather(1, targets[:, None]).squeeze(1).tolist()
            k = seq.params.prompt_logprobs
            top = None
            if k:
                values, ids = lp.topk(min(k, lp.shape[1]), dim=-1)
                top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            seq.record_prompt_logprobs(start + 1, got, top)

    def release(self, seq: Sequence) -> None:
        """The sequence's blocks changed wholesale (preempted, swapped): drop its table row."""
        for table in self.tables:
            if table is not None:
                table.release(seq.seq_id)

    def forget(self, seq: Sequence) -> None:
        self.release(seq)
        self.sampler.forget(seq)
