"""Profiled cost model for simulate mode: step times from tables measured by ``kvlab profile``.

A step costs what the real engine's step costs on the profiled device, built from the same
pieces the engine runs:

- a pure-decode batch that fits a CUDA graph: the measured replay time of the whole model's
  decode graph at the padded batch size and the batch's mean context (``decode_graph``), plus
  sampling;
- any other batch (prefill chunks, mixed; piecewise CUDA graphs up to the engine's
  ``cuda_graph_max_tokens``, padded to the captured size, else eager): the device time of a forward of as many
  tokens (``prefill_graph``) with its fresh-prefill attention swapped for the batch's own (every
  prefill chunk, the decode tokens in the mixed kernel configuration; per layer), plus logits
  of the extra sampled rows (``gemm``) and sampling; the step then takes the later of that and
  the launch floor (the smallest eager, or piecewise, forward measured: launches, not the
  device, bound it), and what its measured forward spent beyond both;
- host time per step, per allocator: the real engine's steps (``host``) minus their modelled
  device time, plus the driver's time between steps, a trimmed mean per batch-size bin,
  separately for decode graph, prefill/mixed graph and eager steps. With asynchronous
  scheduling (``overlapped``) a step's host part is what hides behind the device's previous
  step, so it is measured as such: the CPU time of the profile's asynchronous steps (all of
  the step but its waits for the device: scheduling, input preparation, launching the graphs
  and kernels, output handling) plus the driver's gap; a profile without such steps falls
  back to the synchronous residual, which misses the launch's CPU time (a warning says so);
- a decode graph step of a ragged batch (sequences of unequal context) adds what its attention
  takes beyond a uniform batch of the same mean: the critical-path term
  (experiments/ragged_decode.py) fitted to the profile's ``ragged`` table;
- with asynchronous scheduling, a decode graph step's device part adds what the profile's
  device-bound asynchronous steps took beyond their modelled device time (input copies, events,
  the bubble between graphs; also any difference between the GPU that ran the host steps and the
  one that measured the tables), per batch-size bin (``period_table``);
- the allocator's own costs: attention in its addressing mode and block size, VMM page maps
  and unmaps done on the step's critical path (``vmm``, scaled by what such calls cost the
  profile's engine steps beyond the driver call; maps made ahead on the background thread are
  not charged), swap copies by size (``copy``).

Tables are interpolated linearly between grid points (so monotonically), clamped below the
first point and extended in proportion above the last; the decode graph above its longest context
along its last segment (a whole step's weights do not grow with the context, only its attention).
A model absent from the profile is composed from the ``gemm`` and ``attention`` tables, scaled by
how the composition of a profiled model compares with its measured tables.
"""
from __future__ import annotations

import logging
from functools import lru_cache

from engine.cuda_graphs import capture_sizes, padded
from engine.piecewise_graphs import token_sizes
from experiments.device_pieces import DevicePiecesMixin
from experiments.device_profile import DeviceProfile, Grid1D, Grid2D, HostTable
from experiments.host_calibration import (HostCalibrationMixin, _calibration_work, _host_rows_for, _token_slope,
                                          _vmm_scale, _warn_host_fallback, _warn_no_max_context, _warn_no_period)
from experiments.profile_lookup import _column, _config, _nearest, _shape, ragged_fit
from kernels import metadata as km

log = logging.getLogger("kvlab.sim")
# the helpers moved to host_calibration and profile_lookup stay importable from here
__all__ = ["ProfiledCostModel", "_calibration_work", "_column", "_config", "_host_rows_for", "_nearest", "_shape",
           "_token_slope", "_vmm_scale", "_warn_host_fallback", "_warn_no_max_context", "_warn_no_period",
           "_warn_other_launch", "ragged_fit"]


_WARNED_SHORT: set = set()  # (profile, model, largest size) whose short graph table was warned about once


class ProfiledCostModel(HostCalibrationMixin, DevicePiecesMixin):
    """Step time of a batch from a device profile (see the module docstring)."""

    name = "profiled"

    def __init__(self, profile: DeviceProfile, shape, *, model: str, paged: bool, block_size: int = 0,
                 max_graph_batch: int = 256, enforce_eager: bool = False, allocator: str = "paged",
                 calibrate_host: bool = True, allreduce=None,
                 graph_max_tokens: int = 0, graph_mode: str = "full", overlapped: bool = False,
                 max_model_len: int = 0, prompt_qkv: bool = False, gemv_max_tokens: int = 0, pdl: bool = False):
        """``graph_max_tokens``: prefill/mixed steps up to this many tokens replay CUDA graphs (the
        engine's ``cuda_graph_max_tokens``), ``graph_mode`` piecewise or full (its
        ``cuda_graph_mode``; modelled where the profile has that mode's ``<mode>_forward`` table,
        full falling back to piecewise with a warning). ``shape``: the whole model; ``allreduce``
        (``costmodel.AllReduceCost``) with tp > 1: each GPU's shard is composed from the GEMM and attention tables (a profile measures one GPU
        running whole models) and every step adds its all-reduces. ``overlapped``: the engine
        schedules asynchronously (host time from the profile's asynchronous steps).
        ``max_model_len``: the decode graphs' bound on a sequence's keys, which sets their split
        rule (default: the profile's). ``gemv_max_tokens``: the engine's ``fused_gemv_max_tokens``: decode
        graphs of up to that many rows are timed from the profile's ``decode_graph`` rows measured with
        ``kernels.small_linear`` (``gemv`` column) where it has them, else (``gemv_table`` False) as cuBLAS's;
        ``pdl`` (the engine's ``enable_pdl``): those from the rows measured with programmatic dependent launch
        (``pdl`` column 1) where the profile has them, else (``cost_pdl_table`` False) from those without.
        cuBLAS's decode graphs have no PDL rows: with cuBLAS, PDL changes a step within noise (H100)."""
        self.allreduce = allreduce
        self.overlapped = overlapped
        self.gemv_max_tokens = gemv_max_tokens
        self.decode_graph_gemv = None  # Grid2D of decode graphs through small_linear (the profile's gemv rows)
        self.pdl = pdl
        self.gemv_pdl = False  # decode_graph_gemv is from rows measured with PDL
        self.host_scheduling = "sync"  # which steps the host tables come from (describe())
        tp = allreduce.tp if allreduce is not None else 1
        shape = shape.shard(tp)
        self.profile, self.model = profile, shape
        self.num_layers = shape.num_layers
        self.graph_sizes = [] if enforce_eager else capture_sizes(max_graph_batch)
        # tensor parallelism: ranks run prefill/mixed steps eagerly (no piecewise graphs there)
        self.piecewise_sizes = [] if enforce_eager or tp > 1 else token_sizes(graph_max_tokens)
        mode = "paged" if paged else "linear"
        # the profile times bf16 KV, full attention and one GPU: an fp8 cache, sliding windows or
        # tensor parallelism are composed from its tables (attention scaled by the bytes and keys it streams)
        same_attention = shape.kv_elem_bytes == 2 and all(w == 0 for _, w in shape.window_groups())
        self.profiled_model = model if model in profile.models() and same_attention and tp == 1 else None
        self.windows = [(n, w) for n, w in shape.window_groups()]
        ref = self.profiled_model or self._reference_model()
        self._attention_tables(profile, ref, mode, shape, block_size=block_size, paged=paged,
                               prompt_qkv=prompt_qkv, max_model_len=max_model_len)
        s = profile.table("sample", model=ref)
        if s.empty:  # (Grid1D's own error names no table)
            raise ValueError(f"profile {profile.path} has no sample table for {ref}: rerun kvlab profile")
        self.sample = Grid1D(s["batch"], s["value"] * shape.vocab_size / _config(ref).vocab_size)
        self._gemm = {(int(n), int(k)): Grid1D(g["m"], g["value"])
                      for (n, k), g in profile.table("gemm").groupby(["n", "k"])}
        self.lm_head = self._gemm_fn(shape.vocab_size, shape.hidden_size)
        layer_ratio = self._forward_tables(profile, ref, mode, gemv_max_tokens=gemv_max_tokens, pdl=pdl)
        self._graph_tables(profile, ref, graph_mode, layer_ratio)
        self._transfer_tables(profile)
        self.vmm_scale = 1.0  # a VMM call's host time on the step's path over the driver call's (_vmm_scale)
        # host seconds by step kind: decode graph replay, prefill/mixed graph replay, eager
        self.host_tables = {k: HostTable([], []) for k in ("graph", "mixed_graph", "eager")}
        self.token_slope = {k: 0.0 for k in self.host_tables}  # host seconds a step's token adds (_token_slope)
        # asynchronous decode graph steps: seconds a step's period holds beyond its modelled device
        # time (prefill/mixed steps: none, their period depends on more than the batch size)
        self.period_table = HostTable([], [])
        if calibrate_host:
            self._calibrate_host(profile, allocator, paged, block_size, max_graph_batch, enforce_eager)

    # -- __init__'s parts: each reads one group of the profile's tables ----------------------
    def _attention_tables(self, profile: DeviceProfile, ref: str, mode: str, shape, *, block_size: int,
                          paged: bool, prompt_qkv: bool, max_model_len: int) -> None:
        """Attention by phase (decode, decode in mixed steps, prefill by cached prefix, the prompt_qkv
        path), its ragged-batch term and, for a model composed from another's tables, the KV scale."""
        att = profile.table("attention", model=ref, mode=mode)
        if att.empty:
            raise ValueError(f"profile {profile.path} has no {mode} attention for {ref}: rerun kvlab profile")
        self.block_size = int(_nearest(att["block_size"], block_size)) if paged else 0
        att = att[att["block_size"] == self.block_size]
        mixed = att["mixed"].fillna(False).astype(bool) if "mixed" in att else att["query"] < 0
        dec = att[(att["query"] == 1) & ~mixed]
        self.attn_decode = Grid2D(dec["batch"], dec["context"], dec["value"])
        mdec = att[(att["query"] == 1) & mixed]
        self.attn_decode_mixed = Grid2D(mdec["batch"], mdec["context"], mdec["value"]) if not mdec.empty \
            else self.attn_decode
        pre = att[(att["query"] > 1) & (att["batch"] == 1)]
        c0 = pre["context"] - pre["query"]
        self.attn_prefill = {float(k): Grid1D(g["query"], g["value"]) for k, g in pre.groupby(c0)}
        # the engine's prompt_attention=qkv: a PAGED step of whole prompts attends LINEAR over its own
        # K and V (ModelRunner.prompt_qkv: caches of the model's dtype, bf16 here; not in piecewise
        # graphs, see _chunks_attn)
        self.attn_prompt = None
        if prompt_qkv and paged and shape.kv_elem_bytes == 2:
            lin = profile.table("attention", model=ref, mode="linear")
            lin = lin[(lin["query"] > 1) & (lin["batch"] == 1) & (lin["context"] == lin["query"])]
            if lin.empty:
                raise ValueError(f"profile {profile.path} has no linear prefill attention for {ref}: "
                                 "rerun kvlab profile")
            self.attn_prompt = Grid1D(lin["query"], lin["value"])
        self.span = int(max_model_len or profile.meta.get("max_model_len") or 0)
        self.num_sms = int(profile.meta.get("num_sms") or 0)
        self.ragged = ragged_fit(profile, ref, mode, self.block_size) if self.span else None
        timed = int(profile.meta.get("seq_major_min_seqs") or 1 << 30)  # profiles from before it: off
        if timed != km.SEQ_MAJOR_MIN_SEQS:
            _warn_other_launch(profile.path, timed, km.SEQ_MAJOR_MIN_SEQS)
        self.kv_scale = 1.0
        if self.profiled_model is None:  # attention streams KV: scale by KV bytes per token and layer
            rc = _config(ref)
            self.kv_scale = (shape.num_kv_heads * shape.head_dim) / (rc.num_key_value_heads * rc.head_dim)
            self.kv_scale *= shape.kv_elem_bytes / 2  # profiled with bf16 caches

    def _forward_tables(self, profile: DeviceProfile, ref: str, mode: str, *, gemv_max_tokens: int,
                        pdl: bool) -> float:
        """Whole forwards: decode graphs (cuBLAS, small_linear, with PDL), eager and prefill graph
        forwards of the profiled model, or their composition from the tables for another model.
        Returns the layer ratio that scales the graph tables' floor (1: the profiled model)."""
        if self.profiled_model:
            g = profile.table("decode_graph", model=ref, mode=mode, block_size=self.block_size)
            gemv = _column(g, "gemv")
            launched = _column(g, "pdl")
            # beyond the longest context measured (2048, 1024 at the largest batches) the step grows by its
            # attention, not in proportion: 16k-context steps were 7x too long, and 3 sequences (padded to 4,
            # a shorter mean context) faster than 2
            base = g[(gemv == 0) & (launched == 0)]  # cuBLAS linear layers
            self.decode_graph = (Grid2D(base["batch"], base["context"], base["value"], above="linear")
                                 if not base.empty else None)
            # small_linear rows: measured with every decode graph of up to `gemv` rows through it
            fast = g[(gemv >= gemv_max_tokens) & (g["batch"] <= gemv_max_tokens)] if gemv_max_tokens else g[:0]
            self.gemv_pdl = pdl and bool((launched[fast.index] == 1).any())
            fast = fast[launched[fast.index] == int(self.gemv_pdl)]
            if not fast.empty:
                self.decode_graph_gemv = Grid2D(fast["batch"], fast["context"], fast["value"], above="linear")
            if self.decode_graph is None:  # profiled without CUDA graphs (a CPU): every step is eager
                self.graph_sizes = []
            e = profile.table("eager_forward", model=ref)
            if e.empty:
                raise ValueError(f"profile {profile.path} has no eager_forward table for {ref}: rerun kvlab profile")
            self.eager_forward = Grid1D(e["query"], e["value"])
            pg = profile.table("prefill_graph", model=ref)
            self.prefill_gpu = Grid1D(pg["query"], pg["value"]) if not pg.empty else self.eager_forward
            self.launch_floor = float(e["value"].min())
            self.compose = 1.0
            return 1.0
        self.decode_graph = None
        self.compose = self._composition_factor(ref)
        e = profile.table("eager_forward", model=ref)
        # launches scale with the layer count; device time is composed from the tables
        self.launch_floor = (float(e["value"].min()) * self.num_layers / _shape(ref).num_layers
                             if not e.empty else 0.0)
        self.prefill_gpu = lambda t: (self.compose * self._dense(t) + self.lm_head(1)
                                      + self.num_layers * self._prefill_attn(t, 0))
        self.eager_forward = lambda t: max(self.launch_floor, self.prefill_gpu(t))
        return self.num_layers / _shape(ref).num_layers

    def _graph_tables(self, profile: DeviceProfile, ref: str, graph_mode: str, layer_ratio: float) -> None:
        """Prefill/mixed steps through piecewise or full CUDA graphs (full falls back to piecewise
        where the profile has no full_forward table)."""
        # piecewise CUDA graphs: one replay per layer boundary and one attention launch per layer;
        # full graphs: one replay (a profile from before them has no table: piecewise stands in)
        self.graph_mode = graph_mode
        self.engine_graph_mode = graph_mode  # the engine's, where a profile's tables make graph_mode another
        p = profile.table(f"{graph_mode}_forward", model=ref)
        if p.empty and graph_mode != "piecewise" and self.piecewise_sizes:
            log.warning("profile %s has no %s_forward table for %s: prefill and mixed steps are modelled as "
                        "piecewise graphs (rerun kvlab profile)", profile.path, graph_mode, ref)
            p = profile.table("piecewise_forward", model=ref)
            self.graph_mode = "piecewise"
        self.piecewise_forward = self.piecewise_floor = None
        if not p.empty and self.piecewise_sizes:
            measured = int(p["query"].max())
            if measured < self.piecewise_sizes[-1] and (profile.path, ref, measured) not in _WARNED_SHORT:
                _WARNED_SHORT.add((profile.path, ref, measured))
                log.warning("profile %s times %s's %s graphs up to %d tokens, the engine replays them up to %d: "
                            "larger steps are extrapolated (rerun kvlab profile without --skip graphs)",
                            profile.path, ref, self.graph_mode, measured, self.piecewise_sizes[-1])
            self.piecewise_floor = float(p["value"].min()) * layer_ratio
            self.piecewise_forward = (Grid1D(p["query"], p["value"]) if self.profiled_model
                                      else lambda t: max(self.piecewise_floor, self.prefill_gpu(t)))
        elif self.piecewise_sizes:
            log.warning("profile %s has no piecewise_forward table for %s: prefill and mixed steps are modelled "
                        "as eager (rerun kvlab profile)", profile.path, ref)

    def _transfer_tables(self, profile: DeviceProfile) -> None:
        """Host-device copies by size (swap, the host tier) and VMM map/unmap per page."""
        c = profile.table("copy")
        self.copy = {op: Grid1D(g["bytes"], g["value"]) for op, g in c.groupby("op")} if not c.empty else {}
        v = profile.table("vmm")
        self.map_s = float(v[v["op"] == "cuMemMap+cuMemSetAccess"]["value"].median()) if not v.empty else 0.0
        u = v[v["op"] == "cuMemUnmap"] if not v.empty else v
        self.unmap_s = float(u["value"].median()) if not u.empty else 0.0

    # -- pieces (those read from the tables: device_pieces.DevicePiecesMixin) ----------------
    def padded(self, batch: int) -> int | None:
        return padded(self.graph_sizes, batch)

    # -- the step ----------------------------------------------------------------------------
    def graph_batch(self, work: list[tuple[int, int]]) -> int | None:
        """The decode CUDA graph a step replays (its padded batch), or None: a prefill/mixed step. A
        one-token prompt (one query, one key: no decode has fewer than two) is prefill to the
        scheduler (``ScheduledBatch.add``), so its step replays no decode graph."""
        return None if any(q > 1 or c == 1 for q, c in work) else self.padded(len(work))

    def device_time(self, work: list[tuple[int, int]], num_sampled: int | None = None,
                    padded: int | None | bool = False) -> float:
        """``padded``: ``graph_batch(work)`` where the caller has it already."""
        if not work:
            return 0.0
        sampled = len(work) if num_sampled is None else num_sampled
        prefill = [(q, c) for q, c in work if q > 1]
        context = sum(c for _, c in work)
        if padded is False:
            padded = self.graph_batch(work)
        comm = self.allreduce.step_s(padded or sum(q for q, _ in work)) if self.allreduce is not None else 0.0
        return comm + self._device_time(work, sampled, prefill, context, padded)

    def _device_time(self, work, sampled: int, prefill, context: int, padded: int | None) -> float:
        if padded is not None:
            return self._graph_device(padded, len(work), context, sampled, self._layers_attn(work),
                                      self._ragged_excess(work, padded) if self.ragged is not None else None)
        dec = [c for q, c in work if q == 1]
        tokens = sum(q for q, _ in work)
        # every sequence from token 0 (a single-token prompt counts, as in BatchInputs.whole_prompts)
        whole = all(c == q for q, c in work)
        return self._mixed_device(tokens, sampled, self._chunks_attn(prefill, whole, tokens), len(dec), sum(dec),
                                  bool(prefill), self._layers_attn(work))

    def _chunks_attn(self, prefill: list[tuple[int, int]], whole: bool, tokens: int) -> float:
        """One layer's attention of a step's prefill chunks ``(queries, context)``. With the engine's
        prompt_attention=qkv a step of whole prompts (``whole``) reads its own K and V, LINEAR
        (``ModelRunner.forward``), except in a piecewise graph."""
        if (self.attn_prompt is not None and whole and prefill
                and not (self.engine_graph_mode == "piecewise" and self.piecewise_size(tokens) is not None)):
            return sum(self.attn_prompt(q) for q, _ in prefill) * self.kv_scale
        return sum(self._prefill_attn(q, c - q) for q, c in prefill)

    def _mixed_device(self, tokens: int, sampled: int, prefill_attn: float, decodes: int, decode_context: int,
                      has_prefill: bool, layers_attn: float) -> float:
        """A prefill/mixed (or eager) step's device time: ``tokens`` computed, ``prefill_attn`` one
        layer's attention of its prefill chunks, ``decodes`` decode tokens of ``decode_context`` keys."""
        attn = prefill_attn
        if decodes:
            grid = self.attn_decode_mixed if has_prefill else self.attn_decode
            attn += grid(decodes, decode_context / decodes) * self.kv_scale
        # piecewise graphs: the dense layers run at the padded size, attention on the real tokens
        size = self.piecewise_size(tokens)
        piecewise = size is not None
        size = size or tokens
        # the measured single-sequence forward of as many tokens: its device time with one fresh
        # prefill's attention, one row of logits and sampling swapped for this batch's
        gpu = (self.prefill_gpu(size) - self.num_layers * self._prefill_attn(size, 0)
               + layers_attn * attn)
        if sampled > 1:
            # full graphs: the sampled rows' logits by a graph of the decode graphs' row counts
            # (FullGraphs.logit_graphs, capture_sizes(max_num_seqs): 9 rows replay the 16-row GEMM); else exactly
            rows = sampled
            if piecewise and self.engine_graph_mode == "full":
                rows = padded(self.graph_sizes, sampled) or sampled
            gpu += self.lm_head(rows) - self.lm_head(1) + self.sample(sampled) - self.sample(1)
        # a step waits for the later of its launches and its device work; what the measured
        # forward spent beyond both (sync, read-back) carries over
        wall_of, floor = ((self.piecewise_forward, self.piecewise_floor) if piecewise
                          else (self.eager_forward, self.launch_floor))
        rest = max(0.0, wall_of(size) - max(floor, self.prefill_gpu(size)))
        return max(floor, gpu) + rest

    def _graph_device(self, padded: int, num: int, context: int, sampled: int, layers_attn: float,
                      excess: float | None) -> float:
        """A decode graph step's device time: ``num`` sequences (``padded`` rows) holding ``context``
        keys, ``excess`` its ragged term (None: none modelled)."""
        if self.decode_graph_gemv is not None and padded <= self.gemv_max_tokens:
            body = self.decode_graph_gemv(padded, context / padded)
        elif self.decode_graph is not None:
            body = self.decode_graph(padded, context / padded)
        else:
            body = self.compose * (self._dense(padded) + self.lm_head(padded)
                                   + layers_attn * self._decode_attn(num, context))
        if excess is not None:
            body += excess
        return body + (self.sample(sampled) if sampled else 0.0)

    @property
    def full_attention(self) -> bool:
        """Every layer attends to the whole context (no sliding window): what the sums need."""
        return len(self.windows) == 1 and self.windows[0][1] == 0

    def decode_host_device(self, num_seqs: int, context: int, longest: int, vmm_maps: int = 0,
                           vmm_unmaps: int = 0) -> tuple[float, float] | None:
        """``host_device_time``'s (host seconds, device seconds) of ``num_seqs`` sequences that compute
        one token each and all sample, their contexts (after the step) summing to ``context``, the
        longest ``longest``: the same figures to the bit from the sums alone, for simulate's bulk path;
        None where a decode graph does not take the batch (an eager step needs more than sums) or
        with sliding windows."""
        padded = self.padded(num_seqs) if num_seqs else None
        if padded is None or not self.full_attention:
            return None
        excess = (self.windows[0][0] * self._group_excess(padded, context, longest, 0) if self.ragged is not None
                  else None)
        device = self._graph_device(padded, num_seqs, context, num_seqs, self.num_layers, excess)
        if self.allreduce is not None:
            device = self.allreduce.step_s(padded) + device
        if self.overlapped:
            device = max(0.0, device + self.period_table(num_seqs))
        return self.host_tables["graph"](num_seqs) + self._vmm_s(vmm_maps, vmm_unmaps), device

    def _vmm_s(self, maps: int, unmaps: int) -> float:
        """Host seconds of VMM page maps and unmaps on a step's path."""
        return (maps * self.map_s + unmaps * self.unmap_s) * self.vmm_scale

    def piecewise_size(self, tokens: int) -> int | None:
        """The captured size a prefill/mixed step of ``tokens`` replays, or None: eager."""
        return None if self.piecewise_forward is None else padded(self.piecewise_sizes, tokens)

    def admission_host_device(self, decodes: int, decode_context: int, prompts: list[int], vmm_maps: int = 0,
                              vmm_unmaps: int = 0) -> tuple[float, float] | None:
        """``host_device_time``'s (host seconds, device seconds) of ``decodes`` sequences computing one
        token each (their contexts after the step summing to ``decode_context``) and whole prompts of
        ``prompts`` tokens, every one sampling: the same figures to the bit, for simulate's bulk path
        (no list of the decodes). None for prompts of one token (the engine's step then) or with
        sliding windows."""
        if not prompts or min(prompts) < 2 or not self.full_attention:
            return None
        num = decodes + len(prompts)
        tokens = decodes + sum(prompts)
        # as _device_time's sum over the prefill chunks: each prompt's own keys, in batch order
        attn = self._chunks_attn([(n, n) for n in prompts], decodes == 0, tokens)
        device = self._mixed_device(tokens, num, attn, decodes, decode_context, True, self.num_layers)
        if self.allreduce is not None:
            device = self.allreduce.step_s(tokens) + device
        return self._mixed_host(num, tokens, decodes) + self._vmm_s(vmm_maps, vmm_unmaps), device

    def step_time(self, work: list[tuple[int, int]], num_sampled: int | None = None, vmm_maps: int = 0,
                  vmm_unmaps: int = 0) -> float:
        """Seconds for one engine step: device time + host time (+ VMM page maps and unmaps on
        the step's path)."""
        host, device = self.host_device_time(work, num_sampled, vmm_maps, vmm_unmaps)
        return device + host

    def host_device_time(self, work: list[tuple[int, int]], num_sampled: int | None = None, vmm_maps: int = 0,
                         vmm_unmaps: int = 0) -> tuple[float, float]:
        """``step_time`` as (host seconds, device seconds): host work and the VMM calls made on
        the scheduling thread (counted by simulate's MapCounter), then the device's (what
        asynchronous scheduling overlaps)."""
        if not work:
            return 0.0, 0.0
        padded = self.graph_batch(work)  # graph or eager: decided once for both parts
        maps = self._vmm_s(vmm_maps, vmm_unmaps)
        device = self.device_time(work, num_sampled, padded)
        if self.overlapped and padded is not None:  # a decode graph step's period beyond its device work
            device = max(0.0, device + self.period_table(len(work)))
        return self.host_time(work, padded) + maps, device

    def swap_time(self, transfers: list[int], direction: str = "d2h") -> float:
        """Seconds to copy KV of ``transfers`` (bytes, one copy per sequence) between host and device."""
        table = self.copy.get(direction)
        if table is None:
            return 0.0
        return sum(table(b) for b in transfers if b > 0)

    def describe(self) -> dict:
        m = self.profile.meta
        return dict(cost_model=self.name, cost_profile=self.profile.path, cost_profile_device=m.get("device"),
                    cost_profile_commit=m.get("commit"), cost_host_steps=self.host_scheduling,
                    cost_ragged_term=self.ragged is not None, cost_vmm_scale=round(self.vmm_scale, 3),
                    cost_period_term=not self.period_table.empty,
                    cost_gemv_table=self.decode_graph_gemv is not None, cost_pdl_table=self.gemv_pdl,
                    cost_profile_model=self.profiled_model or f"composed from {self._reference_model()}")

@lru_cache(maxsize=None)
def _warn_other_launch(path: str, timed: int, now: int) -> None:
    def says(n: int) -> str:
        return f"from {n} sequences" if n < 1 << 30 else "never"

    log.warning("profile %s timed decode launches that go sequence by sequence %s, this engine's %s "
                "(KVLAB_SEQ_MAJOR_MIN_SEQS): its decode tables of such batches are 0.4-2.6%% off (rerun kvlab profile "
                "with the same setting)", path, says(timed), says(now))


