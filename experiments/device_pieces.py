"""The pieces a step's device time is composed of in the profiled cost model: a mixin of
``ProfiledCostModel`` (experiments/profiled_costmodel.py) that reads its attention and GEMM tables.
A model absent from the profile is composed from the ``gemm`` table (its linear layers, the nearest
measured shape scaled by the weight size) and the attention tables of the profiled model nearest in
size (``_reference_model``), scaled by how that model's composition compares with its measured
decode graph (``_composition_factor``); one layer's prefill and decode attention are looked up per
chunk and batch, sliding windows scaled by the keys they leave unread, and a ragged decode batch's
critical-path term is composed per window group (experiments/ragged_decode.py)."""
from __future__ import annotations

import numpy as np

from experiments.costmodel import attended_keys
from experiments.profile_lookup import _column, _shape
from experiments.ragged_decode import programs_of_sums


class DevicePiecesMixin:
    """The device-time pieces of ``ProfiledCostModel``: it reads the model's ``profile``, ``model`` (the
    simulated shape), ``_gemm``, ``attn_decode``, ``attn_prefill``, ``kv_scale``, ``num_layers``,
    ``windows``, ``span``, ``num_sms`` and ``ragged`` that ``ProfiledCostModel.__init__`` sets (and its
    ``full_attention``)."""

    def _reference_model(self) -> str:
        models = sorted(self.profile.models())
        if not models:
            raise ValueError(f"profile {self.profile.path} holds no model tables: rerun kvlab profile")
        target = self.model.num_params
        return min(models, key=lambda m: abs(np.log(_shape(m).num_params / target)))

    def _gemm_fn(self, n: int, k: int):
        if (n, k) in self._gemm:
            return self._gemm[(n, k)]
        if not self._gemm:
            raise ValueError(f"profile {self.profile.path} has no gemm table")
        # the nearest measured shape, scaled by the weight size (GEMMs here stream their weights)
        (n0, k0), g = min(self._gemm.items(), key=lambda kv: abs(np.log(kv[0][0] * kv[0][1] / (n * k))))
        return lambda m, g=g, r=n * k / (n0 * k0): g(m) * r

    def _dense(self, tokens: int, shape=None) -> float:
        """One forward's linear layers (all layers, no lm_head) of ``shape`` (default: the
        simulated model) by composition from ``gemm``."""
        m = shape or self.model
        q, kv, h, i = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.hidden_size, m.intermediate_size
        per_layer = sum(self._gemm_fn(n, k)(tokens) for n, k in ((q + 2 * kv, h), (h, q), (2 * i, h), (h, i)))
        return m.num_layers * per_layer

    def _composition_factor(self, ref: str) -> float:
        """Measured decode graph of a profiled model over its composition (elementwise kernels,
        gaps between kernels): carried over to a model composed from tables."""
        g = self.profile.table("decode_graph", model=ref, mode="linear")
        g = g[(_column(g, "gemv") == 0) & (_column(g, "pdl") == 0)]  # cuBLAS's rows: what the composition is of
        g = g[g["context"] == g["context"].min()]
        if g.empty:
            return 1.0
        shape = _shape(ref)
        lm_head = self._gemm_fn(shape.vocab_size, shape.hidden_size)
        ratios = [row.value / (self._dense(int(row.batch), shape) + lm_head(int(row.batch))
                               + shape.num_layers * self.attn_decode(row.batch, row.context))
                  for row in g.itertuples()]
        return float(np.median(ratios))

    def _prefill_attn(self, q: int, c0: int) -> float:
        """One layer's attention for a chunk of ``q`` queries after ``c0`` cached tokens."""
        keys = sorted(self.attn_prefill)
        if not keys:
            return 0.0
        lo = self.attn_prefill[keys[0]](q)
        if len(keys) == 1 or c0 <= keys[0]:
            return lo * self.kv_scale
        hi_k = keys[-1] if c0 >= keys[-1] else keys[int(np.searchsorted(keys, c0))]
        lo_k = keys[0] if c0 >= keys[-1] else keys[int(np.searchsorted(keys, c0)) - 1]
        a, b = self.attn_prefill[lo_k](q), self.attn_prefill[hi_k](q)
        return (a + (b - a) * (c0 - lo_k) / (hi_k - lo_k)) * self.kv_scale  # linear in the keys read

    def _decode_attn(self, batch: int, context: int) -> float:
        return self.attn_decode(batch, context / batch) * self.kv_scale if batch else 0.0

    def _layers_attn(self, work: list[tuple[int, int]]) -> float:
        """Layers' worth of full attention this step costs: the layer count, less what sliding
        windows leave unread (time taken as proportional to the keys each layer attends)."""
        if self.full_attention:
            return self.num_layers
        full = sum(attended_keys(q, c) for q, c in work)
        return sum(n * sum(attended_keys(q, c, w) for q, c in work) for n, w in self.windows) / max(full, 1)

    def _ragged_excess(self, work: list[tuple[int, int]], padded: int) -> float:
        """What a decode graph step's attention takes beyond a uniform batch of its mean context
        (all layers; each window group with its keys capped): the critical-path term fitted to
        the profile's ``ragged`` table (experiments/ragged_decode.py)."""
        ctxs = [c for _, c in work] + [0] * (padded - len(work))  # padding rows read nothing
        total = 0.0
        for n, w in self.windows:
            keys = [min(c, w) for c in ctxs] if w else ctxs
            total += n * self._group_excess(padded, sum(keys), max(keys), w)
        return total

    def _group_excess(self, padded: int, keys: int, longest: int, window: int) -> float:
        """One layer's ragged term: ``padded`` rows reading ``keys`` keys, the longest ``longest``."""
        m = self.model
        # a window bounds the keys a program can see, and so the kernel's split config
        p = programs_of_sums(padded, keys, longest, num_kv_heads=m.num_kv_heads,
                             group=max(1, m.num_heads // m.num_kv_heads), head_dim=m.head_dim,
                             elem_size=m.kv_elem_bytes, num_sms=self.num_sms,
                             span=min(self.span, window) if window else self.span, fp8=m.kv_elem_bytes == 1)
        return self.ragged.excess(self.attn_decode(padded, keys / padded) * self.kv_scale, p)
