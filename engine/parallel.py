"""Tensor parallelism: the process group and Megatron-style sharding of the decoder.

Each of ``tp`` ranks holds, per layer, ``num_attention_heads / tp`` query heads and
``num_key_value_heads / tp`` KV heads (q/k/v projections split by output rows, i.e. by heads:
column-parallel), the matching ``num_heads / tp`` input columns of ``o_proj`` (row-parallel),
``intermediate_size / tp`` rows of ``gate_proj`` / ``up_proj`` and columns of ``down_proj``.
The outputs of ``o_proj`` and ``down_proj`` are partial sums: one all-reduce after each (two
per layer). Norms, the embedding and ``lm_head`` are replicated (every rank holds the whole
vocabulary: simple, and only rank 0 computes logits; for a 34B model the replicated
embedding and head cost about 1.8 GB per GPU in bf16).

A rank's model is built with its local shapes (``shard_config``) and filled with its slice of
the full weights: a checkpoint is read slice by slice (safetensors ``get_slice``), seeded random
weights are drawn whole, one parameter at a time, exactly as ``loader._random_init`` draws them
for one device, and sliced, so TP=N computes the same function as TP=1.
"""
from __future__ import annotations

import dataclasses
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.loader import _uninitialized, check_complete, checkpoint_files, note_once, unreadable_names
from engine.model import CausalLM
from engine.model_config import ModelConfig

# parameter name parts split by output features (dim 0 of weight and bias) ...
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
# ... and by input features (dim 1), followed by an all-reduce
ROW_PARALLEL = ("o_proj", "down_proj")


def check_shardable(mc: ModelConfig, tp: int) -> None:
    """Every rank needs whole heads and an equal share of the MLP; refuse anything else."""
    if tp == 1:
        return
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        n = getattr(mc, field)
        if n % tp:
            fits = [d for d in range(1, n + 1) if n % d == 0 and mc.num_attention_heads % d == 0
                    and mc.num_key_value_heads % d == 0 and mc.intermediate_size % d == 0]
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide {mc.name}'s {field}={n}: each GPU needs whole "
                f"heads and an equal MLP share; choose tensor_parallel_size in {fits}")


def shard_config(mc: ModelConfig, tp: int) -> ModelConfig:
    """The shapes one rank builds: heads and MLP width divided by ``tp`` (head_dim kept)."""
    check_shardable(mc, tp)
    return dataclasses.replace(mc, num_attention_heads=mc.num_attention_heads // tp,
                               num_key_value_heads=mc.num_key_value_heads // tp,
                               intermediate_size=mc.intermediate_size // tp, head_dim=mc.head_dim)


def shard_dim(name: str) -> int | None:
    """The dimension of parameter ``name`` (HF naming) split across ranks; None: replicated."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    module, kind = parts[-2], parts[-1]
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL and kind == "weight":
        return 1
    return None


def shard_slice(full_shape: tuple[int, ...], dim: int, rank: int, tp: int) -> tuple[slice, ...]:
    n = full_shape[dim] // tp
    idx = [slice(None)] * len(full_shape)
    idx[dim] = slice(rank * n, (rank + 1) * n)
    return tuple(idx)


class RowParallelLinear(nn.Linear):
    """A linear layer over this rank's input columns: the partial products of all ranks summed.

    Installed by changing the class of the model's own ``o_proj`` / ``down_proj`` (parameter
    names stay the HF ones); bias-free, as in every model kvlab runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out


def _install_all_reduce(model: CausalLM) -> None:
    for layer in model.model.layers:
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            if lin.bias is not None:
                raise ValueError("row-parallel layers with a bias are not supported")
            lin.__class__ = RowParallelLinear


def _random_init_sharded(model: CausalLM, seed: int, rank: int, tp: int) -> None:
    """``loader._random_init`` on the full shapes, keeping this rank's slice: the generator
    advances exactly as on one device, so every rank's slice matches TP=1's weights."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm weights stay 1 (and draw nothing)
                continue
            dim = shard_dim(name)
            if dim is None:
                p.normal_(0.0, 0.02, generator=gen)
                continue
            full_shape = list(p.shape)
            full_shape[dim] *= tp
            full = torch.empty(full_shape, dtype=p.dtype, device=device).normal_(0.0, 0.02, generator=gen)
            p.copy_(full[shard_slice(tuple(full_shape), dim, rank, tp)])
            del full  # one full parameter at a time: a 70B model never exists whole on one GPU


def _load_safetensors_sharded(model: CausalLM, path: Path, rank: int, tp: int) -> None:
    """Each rank reads only its slice of each tensor (safetensors slices lazily)."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    seen: dict[str, Path] = {}
    for f in checkpoint_files(path):  # a folder without weights: the one-device loader's ValueError
        with unreadable_names(f):
            st = safe_open(str(f), framework="pt", device="cpu")
        with st:
            for name in st.keys():
                note_once(seen, name, f)
                if name not in params:
                    if "rotary_emb" in name:
                        continue
                    raise ValueError(f"{f.name}: checkpoint tensor '{name}' has no place in the kvlab model")
                p, dim = params[name], shard_dim(name)
                sl = st.get_slice(name)
                shape = tuple(sl.get_shape())
                want = list(p.shape)
                if dim is not None:
                    want[dim] *= tp
                if shape != tuple(want):
                    raise ValueError(f"{f.name}: '{name}': checkpoint {shape} vs model {tuple(want)}")
                tensor = sl[shard_slice(shape, dim, rank, tp)] if dim is not None else sl[:]
                with torch.no_grad():
                    p.copy_(tensor.to(p.dtype))
    check_complete(model, params, set(seen), path)


def load_sharded_model(mc: ModelConfig, source: str, max_model_len: int, dtype: torch.dtype, device: str,
                       seed: int, rank: int, tp: int) -> CausalLM:
    """Rank ``rank``'s shard of the model (``mc``: the full model's config); its ``config`` holds
    the local shapes (heads / tp), which is what its KV cache and kernels see."""
    local = shard_config(mc, tp)
    with _uninitialized(device, dtype):
        model = CausalLM(local, max_model_len)
    if Path(source).is_dir():
        _load_safetensors_sharded(model, Path(source), rank, tp)
    else:
        _random_init_sharded(model, seed, rank, tp)
    if local.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _install_all_reduce(model)
    model.tp_rank, model.tp_size = rank, tp
    return model.eval()


# -- process group ---------------------------------------------------------------------------
def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, rank: int) -> str:
    """One GPU per rank (cuda:rank); CPU ranks share the host."""
    return f"cuda:{rank}" if device.startswith("cuda") else "cpu"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(backend: str, init_method: str, rank: int, world: int, timeout_s: float) -> None:
    """The default process group of this engine's ranks; a collective that waits longer than
    ``timeout_s`` (a rank died or hangs) raises instead of hanging forever."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialised in this process: "
                           "one tensor-parallel engine per process (close the other engine first)")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
