"""Build a model: a preset with seeded random weights, or a local HF directory (safetensors only)."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from engine.model import CausalLM
from engine.model_config import ModelConfig
from engine.presets import PRESETS, preset_config


def resolve_config(model: str, overrides: dict | None = None) -> ModelConfig:
    """A preset name or a local directory; anything else is a clear error. ``overrides``
    (vLLM's hf_overrides) replace fields of the config, e.g. ``{"sliding_window": 1024}``."""
    if model in PRESETS:
        mc = preset_config(model)
    elif Path(model).is_dir():
        mc = ModelConfig.from_dir(model)
    else:
        mc = preset_config(model)  # raises "unknown model ... use a preset or a local HF directory"
    if overrides:
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"hf_overrides {bad} are not model config fields: choose from {sorted(known)}")
        mc = dataclasses.replace(mc, **dict(overrides))
    return mc


def _random_init(model: CausalLM, seed: int) -> None:
    # drawn on the parameters' own device: an 8B model never passes through host memory
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # RMSNorm weights stay 1
                p.normal_(0.0, 0.02, generator=gen)


def _load_safetensors(model: CausalLM, path: Path) -> None:
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    seen: dict[str, Path] = {}
    for f in checkpoint_files(path):
        with unreadable_names(f):
            tensors = load_file(str(f))
        for name, tensor in tensors.items():
            note_once(seen, name, f)
            if name not in params:
                if "rotary_emb" in name:
                    continue
                raise ValueError(f"{f.name}: checkpoint tensor '{name}' has no place in the kvlab model")
            if params[name].shape != tensor.shape:
                raise ValueError(f"{f.name}: '{name}': checkpoint {tuple(tensor.shape)} vs model "
                                 f"{tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor.to(params[name].dtype))
    check_complete(model, params, set(seen), path)


def checkpoint_files(path: Path) -> list[Path]:
    """The folder's *.safetensors files in order, shared by the one-device and the per-rank loaders so
    that both refuse a folder without weights alike: a user's folder is a clear error (ValueError,
    exit 2), not a missing-file crash."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {path}: save the model with save_pretrained(safe_serialization=True); "
                         "pickle checkpoints are not loaded")
    return files


def note_once(seen: dict[str, Path], name: str, f: Path) -> None:
    """Record that tensor ``name`` comes from file ``f``; a tensor in two files (a stale file beside
    a re-saved model, two shardings in one folder) is refused: the later file silently won."""
    if name in seen:
        raise ValueError(f"checkpoint tensor '{name}' is in both {seen[name].name} and {f.name} in {f.parent}: "
                         "remove the file(s) of the other save, so each tensor is in one *.safetensors file")
    seen[name] = f


@contextmanager
def unreadable_names(f: Path) -> Iterator[None]:
    """A file safetensors cannot read (truncated, not safetensors at all) is named in the error."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f}: not a readable safetensors file ({e}); save the model again with "
                         "save_pretrained(safe_serialization=True)") from e


def check_complete(model: nn.Module, params, seen: set[str], path) -> None:
    """Every parameter came from the checkpoint (a tied lm_head is the embedding)."""
    if model.config.tie_word_embeddings:
        seen.add("lm_head.weight")
    missing = set(params) - seen
    if missing:
        raise ValueError(f"checkpoint in {path} lacks {sorted(missing)[:5]}")


@contextmanager
def _uninitialized(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Modules built here get parameters allocated on ``device`` in ``dtype`` and left
    uninitialised: a checkpoint or a seeded draw fills them next.

    Why not ``torch.device("meta")``: its kernels are Python references that import
    ``torch._dynamo`` (3-4 s of a CPU run's start). Why ``dtype`` as the default: an 8B model
    materialised in fp32 first would hold twice its weights for a moment. Buffers that ask for
    fp32 explicitly (the rotary tables) stay fp32.
    """
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    old_dtype = torch.get_default_dtype()
    for cls in saved:
        cls.reset_parameters = lambda self: None  # the default init would be drawn and thrown away
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old_dtype)
        for cls, reset in saved.items():
            cls.reset_parameters = reset


def load_model(
    cfg: ModelConfig, source: str, max_model_len: int, dtype: torch.dtype, device: str, seed: int = 0
) -> CausalLM:
    with _uninitialized(device, dtype):
        model = CausalLM(cfg, max_model_len)  # RMSNorm weights are ones, the rest is filled below
    if Path(source).is_dir():
        _load_safetensors(model, Path(source))
    else:
        _random_init(model, seed)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
