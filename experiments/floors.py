"""Physical floors of an engine step, the denominators of the benchmarks' "% of floor".

- memory floor: the bytes a decode step must read (weights streamed + KV read) at the copy
  bandwidth; right where every GEMM is memory-bound (small batches).
- per-phase floor: each linear layer at the slower of its FLOPs at the device's measured matmul
  rate and its weight bytes at the copy bandwidth (at 256 sequences the GEMMs are compute-bound),
  plus everything else (KV read, the other weights) at the copy bandwidth. Phases run one after
  the other, so their times add: a max over the whole step would claim overlap that is not there.
"""
from __future__ import annotations

import torch


def linear_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weight of every linear layer once (a tied LM head is the embedding table)."""
    seen: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            seen.setdefault(id(m.weight), m.weight)
    return list(seen.values())


def streamed_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the weights: all of them but an untied embedding table
    (gathered, a row per token)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    return total if emb is model.lm_head.weight else total - emb.numel() * emb.element_size()


def memory_floor_s(model: torch.nn.Module, kv_bytes: float, copy_bw: float) -> float:
    return (streamed_weight_bytes(model) + kv_bytes) / copy_bw


def phase_floor_s(model: torch.nn.Module, num_seqs: int, kv_bytes: float, copy_bw: float,
                  matmul_flops: float) -> float:
    """Per-phase floor of a decode step of ``num_seqs`` sequences reading ``kv_bytes`` of KV;
    ``matmul_flops`` the device's measured bf16 matmul rate in FLOP/s."""
    linear = linear_weights(model)
    gemms = sum(max(2 * num_seqs * w.numel() / matmul_flops, w.numel() * w.element_size() / copy_bw)
                for w in linear)
    rest = streamed_weight_bytes(model) - sum(w.numel() * w.element_size() for w in linear)
    return gemms + (rest + kv_bytes) / copy_bw
