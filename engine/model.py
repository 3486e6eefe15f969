"""Llama-family decoder (Llama 2/3, Qwen2, Qwen3, Mistral) over the shared KV kernels.

Parameter names follow HF transformers, so a safetensors checkpoint loads as it is.
Inputs are flat token batches (no padding); the attention metadata says where each
sequence's tokens and cached context are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.model_config import ModelConfig
from kernels import fused_ops, pdl, small_linear, small_linear_rope
from engine.rope import RotaryEmbedding
from kernels.metadata import AttentionMetadata


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        self.window = window  # > 0: sliding-window attention over this many tokens
        # fp8 KV caches: dequantized = stored x scale, per KV head (fp32 [H]; see CausalLM.set_kv_cache_dtype)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.calibrate = ""  # "tensor" | "head": this step sets the scales from its K/V amax
        self.group = 0  # layer group (window-aware allocation): which of a list of metadata is this layer's
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = self.head_dim**-0.5
        self.qkv_proj: nn.Linear | None = None

    def fuse(self) -> None:
        """One GEMM for q, k and v (fewer launches, better shapes); HF names stay for loading."""
        self.qkv_proj = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, positions, rope, meta: AttentionMetadata, cache):
        """The unfused path (CPU, tests); a fused model runs ``project`` and ``attend``
        (``DecoderLayer.forward_fused``)."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        return self.o_proj(self._attend(q, k, v, meta, cache).reshape(t, -1))

    def project(self, x, positions, rope, slots: torch.Tensor, cache,
                qkv: torch.Tensor | None = None, rotated: bool = False) -> tuple[torch.Tensor, tuple]:
        """Fused path up to attention: q, k, v from one GEMM (or ``qkv``, its output computed
        elsewhere), norm + rope in place, k and v written to the cache at ``slots`` (-1: nowhere);
        returns q ``[t, heads, head_dim]`` and the step's own (k, v) ``[t, kv_heads, head_dim]`` (views
        of the GEMM's output: ``own_kv`` attention reads them). ``rotated``: ``qkv`` came from
        ``small_linear`` with ``rope_epilogue``'s epilogue (normed, rotated and stored already).
        Everything here has static shapes: piecewise CUDA graphs capture it."""
        if rotated and qkv is None:
            raise ValueError("rotated=True describes a qkv computed elsewhere: pass qkv=")
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = (self.qkv_proj(x) if qkv is None else qkv).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if rotated:  # normed, rotated and stored by the GEMV's epilogue
            return q, (k, v)
        qw = self.q_norm.weight if self.qk_norm else None
        kw = self.k_norm.weight if self.qk_norm else None
        eps = self.q_norm.eps if self.qk_norm else 1e-6
        if self._stores_as_is(cache, k.dtype):  # the store in the same kernel
            fused_ops.qk_norm_rope_(q, k, rope.cos, rope.sin, positions, qw, kw, eps,
                                    cache=(v, cache[0], cache[1], slots))
        else:  # fp8 caches quantize (kernels.write_kv)
            fused_ops.qk_norm_rope_(q, k, rope.cos, rope.sin, positions, qw, kw, eps)
            self._store(k, v, slots, cache)
        return q, (k, v)

    def _stores_as_is(self, cache, dtype: torch.dtype) -> bool:
        """Whether k and v go into the cache as they are, so the kernel that makes them can store them
        (fp8 caches quantize, and a calibrating step sets their scales first: ``_store``)."""
        return cache[0].dtype == dtype and not self.calibrate

    def rope_epilogue(self, positions, rope, slots: torch.Tensor, cache,
                      dtype: torch.dtype) -> small_linear_rope.RopeEpilogue | None:
        """The qkv ``small_linear``'s RoPE epilogue (q and k normed and rotated, k and v stored in the
        same kernel: ``fused_ops.qk_norm_rope_``'s launch saved), or None where ``project`` must do it:
        caches it cannot store into as they are, heads narrower than the kernel's tiles."""
        if not self._stores_as_is(cache, dtype) or self.head_dim < small_linear_rope.MIN_HEAD_DIM:
            return None
        qk = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else (None, None, 1e-6)
        return small_linear_rope.RopeEpilogue(rope.cos, rope.sin, positions, self.head_dim, self.num_heads,
                                              self.num_kv_heads, *qk, cache=(cache[0], cache[1], slots))

    def attend(self, q, meta: AttentionMetadata, cache, out: torch.Tensor | None = None,
               own: tuple | None = None) -> torch.Tensor:
        """Attention of ``q`` over the cache, or over the step's own ``(k, v)`` where ``meta.own_kv``
        (``out``: where to write it, ``q``'s shape)."""
        if meta.own_kv:
            if own is None:
                raise ValueError("own_kv attention reads the step's own (k, v): pass own= (Attention.project's)")
            cache = own  # the same values the cache holds now (own_kv: caches of the model's dtype)
        return kernels.attention(q, cache[0], cache[1], meta, self.scale, self.k_scale, self.v_scale, self.window,
                                 out=out)

    def _attend(self, q, k, v, meta: AttentionMetadata | list[AttentionMetadata], cache) -> torch.Tensor:
        meta = group_meta(meta, self.group)
        self._store(k, v, meta.slot_mapping, cache)
        return self.attend(q, meta, cache, own=(k, v))

    def _store(self, k, v, slots: torch.Tensor, cache) -> None:
        """K and V into the cache at ``slots`` (fp8: quantized, the scales set first when this
        step calibrates them)."""
        if self.calibrate:
            self._calibrate(k, v, cache[0].dtype)
        kernels.write_kv(cache[0], cache[1], k, v, slots, self.k_scale, self.v_scale)

    def _calibrate(self, k: torch.Tensor, v: torch.Tensor, fp8: torch.dtype) -> None:
        """Scales from this step's keys and values: amax / the format's max, in place (CUDA graphs
        captured earlier read the same tensors)."""
        top = torch.finfo(fp8).max
        for x, scale in ((k, self.k_scale), (v, self.v_scale)):
            amax = x.detach().abs().amax(dim=(0, 2)).float()
            if self.calibrate == "tensor":
                amax = amax.max().expand_as(amax)
            scale.copy_((amax / top).clamp(min=torch.finfo(torch.float32).tiny))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None

    def fuse(self) -> None:
        self.gate_up_proj = _concat_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            return self.down_proj(fused_ops.silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([p.weight.data for p in parts], dim=0)
    has_bias = parts[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    fused.weight.data = w
    if has_bias:
        fused.bias.data = torch.cat([p.bias.data for p in parts])
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.gemv_max_tokens = 0  # fused path: steps of up to this many tokens take kernels.small_linear
        # (set by CausalLM.fuse) parts of the stream rows' sums of squares, each written by the kernel that
        # adds into the stream for the norm after it: (after attention, after the MLP); row_sq_in: the one
        # this layer's first norm reads (None: the first layer's reads its input, the embeddings)
        self.row_sq_out: tuple[torch.Tensor, torch.Tensor] | None = None
        self.row_sq_in: torch.Tensor | None = None

    def gemv(self, x: torch.Tensor) -> bool:
        """Whether a fused step of ``x``'s tokens runs its linear layers as ``small_linear`` kernels
        (norm, SiLU and residual inside them): up to ``gemv_max_tokens`` tokens and plain ``nn.Linear``
        output projections (a tensor-parallel one all-reduces before the add). fp32 weights take exact
        (slow) dots: for tests; a GPU model is bf16 or fp16."""
        return (0 < x.shape[0] <= self.gemv_max_tokens and x.dtype in small_linear.DTYPES
                and type(self.self_attn.o_proj) is nn.Linear and type(self.mlp.down_proj) is nn.Linear)

    def forward(self, x, positions, rope, meta, cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x, residual, positions, rope, meta, cache):
        """Residual stream kept apart and updated in place by the fused add+norm kernels."""
        m = group_meta(meta, self.self_attn.group)
        (q, own), residual = self.pre_attention(x, residual, positions, rope, m.slot_mapping, cache)
        return self.post_attention(self.self_attn.attend(q, m, cache, own=own), residual)

    def pre_attention(self, x, residual, positions, rope, slots, cache):
        """(fused path) add + norm, then the attention's projections and cache write:
        ((q, (k, v)), residual)."""
        n1 = self.input_layernorm
        if self.gemv(x):  # the stream is the residual from here: post_attention adds into it in place
            stream = x if residual is None else residual.add_(x)
            attn = self.self_attn
            epilogue = attn.rope_epilogue(positions, rope, slots, cache, stream.dtype)
            qkv = small_linear.small_linear(stream, attn.qkv_proj.weight, attn.qkv_proj.bias, norm_weight=n1.weight,
                                            eps=n1.eps, row_sq=self.row_sq_in if residual is None else None,
                                            rope=epilogue)
            return attn.project(stream, positions, rope, slots, cache, qkv=qkv, rotated=epilogue is not None), stream
        if residual is None:
            residual = x
            h = fused_ops.rms_norm(x, n1.weight, n1.eps)
        else:
            h = fused_ops.rms_norm(x, n1.weight, n1.eps, residual)
        return self.self_attn.project(h, positions, rope, slots, cache), residual

    def post_attention(self, attn: torch.Tensor, residual):
        """(fused path) output projection, add + norm, MLP: (x, residual) for the next layer; with
        ``small_linear`` kernels (x, None): x the whole stream, both additions made in it."""
        if self.gemv(attn):
            o, n2 = self.self_attn.o_proj, self.post_attention_layernorm
            gate_up, down = self.mlp.gate_up_proj, self.mlp.down_proj
            after_attn, after_mlp = self.row_sq_out
            small_linear.small_linear(attn.view(attn.shape[0], -1), o.weight, o.bias, residual=residual,
                                      row_sq_out=after_attn)
            act = small_linear.small_linear(residual, gate_up.weight, gate_up.bias, norm_weight=n2.weight, eps=n2.eps,
                                            gated=True, row_sq=after_attn)
            small_linear.small_linear(act, down.weight, down.bias, residual=residual, row_sq_out=after_mlp)
            return residual, None
        h = self.self_attn.o_proj(attn.view(attn.shape[0], -1))
        h = fused_ops.rms_norm(h, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps, residual)
        return self.mlp(h), residual


def _check_gemv(gemv_max_tokens: int) -> None:
    if not 0 <= gemv_max_tokens <= small_linear.MAX_TOKENS:
        raise ValueError(f"gemv_max_tokens must be in [0, {small_linear.MAX_TOKENS}], got {gemv_max_tokens}")


def group_meta(meta: AttentionMetadata | list[AttentionMetadata], group: int) -> AttentionMetadata:
    """A layer's metadata: its layer group's where there is one per group (window-aware allocation)."""
    return meta[group] if isinstance(meta, list) else meta


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in cfg.layer_windows())
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_model_len: int):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, max_model_len, cfg.rope_theta, cfg.rope_scaling)
        self.fused = False
        self.pdl = False  # the step's Triton kernels with programmatic dependent launch (kernels.pdl)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        """Final-normed hidden states of every token; ``kv_caches[i]`` is layer i's (k, v)."""
        if self.pdl:  # read by each kernel when launched (and so kept by a CUDA graph captured here)
            with pdl.launches():
                return self._forward(input_ids, positions, meta, kv_caches)
        return self._forward(input_ids, positions, meta, kv_caches)

    def _forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        norm = self.model.norm
        if self.fused:
            residual = None
            for layer, cache in zip(self.model.layers, kv_caches):
                x, residual = layer.forward_fused(x, residual, positions, self.rope, meta, cache)
            return fused_ops.rms_norm(x, norm.weight, norm.eps, residual)
        for layer, cache in zip(self.model.layers, kv_caches):
            x = layer(x, positions, self.rope, meta, cache)
        return norm(x)

    def fuse(self, gemv_max_tokens: int = 0) -> "CausalLM":
        """Fused projections and Triton elementwise kernels (GPU inference, after loading); steps of
        up to ``gemv_max_tokens`` tokens run each linear layer with its norm, SiLU or residual add as
        one ``kernels.small_linear`` kernel (``EngineConfig.fused_gemv_max_tokens``)."""
        _check_gemv(gemv_max_tokens)  # before anything is fused
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self.fused = True
        return self.set_gemv_max_tokens(gemv_max_tokens)

    def set_gemv_max_tokens(self, gemv_max_tokens: int) -> "CausalLM":
        """(fused model) Steps of up to this many tokens through ``kernels.small_linear`` from now on
        (CUDA graphs captured before keep the path they captured)."""
        _check_gemv(gemv_max_tokens)
        for layer in self.model.layers:
            layer.gemv_max_tokens = gemv_max_tokens
        if gemv_max_tokens and self.model.layers[0].row_sq_out is None:
            self._share_row_sq()
        return self

    def _share_row_sq(self) -> None:
        """One buffer of sums-of-squares parts for all layers (stream-ordered: each part is read by the
        next kernel but one before it is written again); a layer reads the one its predecessor wrote."""
        cfg, dev = self.config, self.lm_head.weight.device
        h = cfg.hidden_size
        n_attn = small_linear.num_programs(h, cfg.num_attention_heads * cfg.head_dim, dev)
        n_mlp = small_linear.num_programs(h, cfg.intermediate_size, dev)
        buf = torch.zeros(2, max(n_attn, n_mlp), small_linear.MAX_TOKENS, dtype=torch.float32, device=dev)
        after_attn, after_mlp = buf[0, :n_attn], buf[1, :n_mlp]
        for i, layer in enumerate(self.model.layers):
            layer.row_sq_out = (after_attn, after_mlp)
            layer.row_sq_in = after_mlp if i else None

    def set_kv_cache_dtype(self, dtype: torch.dtype, scale: float | None = None) -> None:
        """fp8 KV caches: per-layer fp32 scales, ``scale`` for all (None: 1.0 until calibrated)."""
        from kernels.reference import is_fp8

        if not is_fp8(dtype):
            return
        dev = self.lm_head.weight.device
        for layer in self.model.layers:
            a = layer.self_attn
            a.k_scale = torch.full((a.num_kv_heads,), scale or 1.0, dtype=torch.float32, device=dev)
            a.v_scale = torch.full((a.num_kv_heads,), scale or 1.0, dtype=torch.float32, device=dev)

    def calibrate_kv_scales(self, granularity: str) -> None:
        """The next forward sets every layer's fp8 scales from its keys and values ("tensor" or
        "head"); ``""`` stops calibrating."""
        for layer in self.model.layers:
            layer.self_attn.calibrate = granularity

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype: greedy steps take their argmax as they are (the same
        token as in float32); the sampler widens them where it needs probabilities."""
        return self.lm_head(hidden)

    def compute_logits_into(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``compute_logits`` written into ``out`` (a CUDA graph's static buffer): the same product."""
        return torch.mm(hidden, self.lm_head.weight.t(), out=out)
