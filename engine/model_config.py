"""Model shape, from a preset or a HF ``config.json`` (Llama family: Llama 2/3, Qwen2/3, Mistral)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from allocators.checks import is_int, is_real

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
LAYER_TYPES = ("full_attention", "sliding_attention")
# config.json "architectures" kvlab runs, and the model_type each belongs to
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "MistralForCausalLM": "mistral"}


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    o_proj_bias: bool = False  # Llama / Qwen3 with attention_bias: on o_proj too (HF); never Qwen2's
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    # attention window of the sliding layers (Mistral: every layer; Qwen with use_sliding_window:
    # layers from max_window_layers on; layer_types: the layers it names "sliding_attention")
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"; None: see above
    name: str = "custom"

    def __post_init__(self) -> None:
        # a config.json or hf_overrides is hostile input: every size a whole number in a real range
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
            _check_size(self.name, f, getattr(self, f), 1)
        _check_size(self.name, "head_dim", self.head_dim, 0)
        for f in ("tie_word_embeddings", "attention_bias", "o_proj_bias", "qk_norm"):
            _check_bool(self.name, f, getattr(self, f))
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 1:
                raise ValueError(f"{self.name}: hidden_size {self.hidden_size} is smaller than num_attention_heads "
                                 f"{self.num_attention_heads}: give head_dim, or fix the config")
        if self.eos_token_id is None:  # config.json's null: the model has no EOS token
            self.eos_token_id = []
        if is_int(self.eos_token_id):
            self.eos_token_id = [self.eos_token_id]
        _check_token_ids(self.name, self.eos_token_id, self.bos_token_id, self.vocab_size)
        # NaN, zero or negative values ran and gave NaN hidden states (every output token 0), a text or a
        # malformed rope_scaling failed with a KeyError / TypeError while the model was built
        for f in ("rms_norm_eps", "rope_theta"):
            _check_positive(self.name, f, getattr(self, f))
            setattr(self, f, float(getattr(self, f)))
        _check_rope_scaling(self.name, self.rope_scaling)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.sliding_window is not None:
            if not is_int(self.sliding_window) or self.sliding_window < 1:
                raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
            self.sliding_window = int(self.sliding_window)
        if self.layer_types is not None:
            _check_layer_types(self.name, self.layer_types)
            self.layer_types = list(self.layer_types)
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types {bad} are not attention kvlab runs: supported {list(LAYER_TYPES)}")
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types names {len(self.layer_types)} layers, the model has "
                                 f"{self.num_hidden_layers}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")

    def layer_windows(self) -> list[int]:
        """Per layer, the attention window in tokens (0: full attention)."""
        w = self.sliding_window or 0
        if self.layer_types is None:
            return [w] * self.num_hidden_layers
        return [w if t == "sliding_attention" else 0 for t in self.layer_types]

    @property
    def num_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "custom") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type is None:
            raise ValueError(f"{name}: config.json has no model_type: kvlab runs {SUPPORTED} "
                             "(set the model_type of the architecture the weights are for)")
        if model_type not in SUPPORTED:
            raise ValueError(f"model_type '{model_type}' is not supported: kvlab runs {SUPPORTED}")
        for arch in d.get("architectures") or ():
            if ARCHITECTURES.get(arch) != model_type:
                raise ValueError(
                    f"{name}: architecture '{arch}' is not one kvlab runs as model_type '{model_type}': "
                    f"supported architectures {sorted(ARCHITECTURES)} (each with its own model_type)")
        # the dataclass's defaults are a tiny test model's: a size config.json leaves out (or nulls) would
        # silently build (or, in simulate, time) a model of another shape
        missing = [k for k in REQUIRED_SIZES if d.get(k) is None]
        if missing:
            raise ValueError(f"{name}: config.json gives no {', '.join(missing)}: restore the model's config.json "
                             "(save_pretrained writes every size)")
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{name}: rope_parameters={rope!r} in config.json is not an object of RoPE settings")
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = d.get("eos_token_id", 2)
        bias = d.get("attention_bias")  # bool() below would take a text "false" as true
        if bias is not None:
            _check_bool(name, "attention_bias", bias, where="config.json")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        kw.update(
            model_type=model_type,
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),  # checked by __post_init__
            rope_scaling=dict(scaling) if isinstance(scaling, dict) else scaling or None,
            eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else eos,  # null or an id: __post_init__
            qk_norm=model_type == "qwen3",
            attention_bias=model_type == "qwen2" if bias is None else bias,
            o_proj_bias=bool(bias) and model_type in ("llama", "qwen3"),
            head_dim=d.get("head_dim") or 0,
            # HF: no num_key_value_heads is multi-head attention (one KV head a query head)
            num_key_value_heads=d["num_attention_heads"] if d.get("num_key_value_heads") is None
            else d["num_key_value_heads"],
            name=name,
        )
        kw["sliding_window"], kw["layer_types"] = _windows(d, model_type, name)
        return cls(**kw)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: a model directory needs config.json")
        try:
            d = json.loads(cfg_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{cfg_file} is not a readable JSON config ({e}): "
                             "restore the model's config.json") from None
        if not isinstance(d, dict):
            raise ValueError(f"{cfg_file} holds a JSON {type(d).__name__}, not the object of a model config")
        return cls.from_hf_dict(d, name=Path(path).name)


def _windows(d: dict, model_type: str, name: str = "custom") -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) as HF transformers reads them: None, None for full attention."""
    w = d.get("sliding_window")
    if model_type == "mistral":  # every layer (HF's Mistral ignores layer_types)
        return (w, None) if w else (None, None)  # __post_init__ checks it (int() cut 4.5 to 4, failed on a list)
    if model_type not in ("qwen2", "qwen3"):
        return None, None  # Llama has no window
    use = d.get("use_sliding_window")
    if use is not None:  # a text "false" was taken as true
        _check_bool(name, "use_sliding_window", use, where="config.json")
    if not (w and use):
        return None, None  # Qwen's window is off unless use_sliding_window
    layer_types = d.get("layer_types")
    if layer_types is not None:
        _check_layer_types(name, layer_types)
    if not layer_types:
        # config.json is hostile input, read here before __post_init__'s checks: a text max_window_layers
        # (int()) and a null, text or missing num_hidden_layers (range()) crashed without naming the field.
        # A max_window_layers above the layer count is real (Qwen2.5-14B: 70, of 48 layers): no layer slides.
        first, layers = d.get("max_window_layers", 28), d.get("num_hidden_layers")
        _check_size(name, "max_window_layers", first, 0, where="config.json")
        _check_size(name, "num_hidden_layers", layers, 1, where="config.json")
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if "sliding_attention" not in layer_types:
        return None, None
    return w, layer_types  # checked by __post_init__


# the sizes a config.json must give (HF's own defaults for them are some 7B model's, never the checkpoint's)
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MAX_SIZE = 1 << 24  # larger than any dimension, layer count or vocabulary of a real model


def _check_token_ids(name: str, eos, bos, vocab_size: int) -> None:
    """EOS and BOS ids are ids of the vocabulary: a null EOS in the list, a text or an id outside it
    made every request with min_tokens fail inside a step (the sampler bans EOS by index), and a
    negative one banned another token."""
    if not isinstance(eos, (list, tuple)) or not all(is_int(t) and 0 <= t < vocab_size for t in eos):
        raise ValueError(f"{name}: eos_token_id={eos!r} is not a token id (or a list of them) in the vocabulary "
                         f"[0, {vocab_size}): fix it in config.json or engine.hf_overrides (null: no EOS token)")
    if bos is not None and not (is_int(bos) and 0 <= bos < vocab_size):
        raise ValueError(f"{name}: bos_token_id={bos!r} is not a token id in the vocabulary [0, {vocab_size}): "
                         "fix it in config.json or engine.hf_overrides (null: no BOS token)")


# the RoPE scalings kvlab runs (engine/rope.py) and the numbers each reads
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _check_positive(name: str, field_name: str, value) -> None:
    if not (is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: {field_name}={value!r} must be a finite number > 0 (config.json or "
                         "engine.hf_overrides)")


def _check_rope_scaling(name: str, scaling) -> None:
    """rope_scaling (or rope_parameters) as engine/rope.py reads it: an object, the numbers of its type."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"{name}: rope_scaling={scaling!r} is not an object of RoPE settings (config.json or "
                         "engine.hf_overrides)")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    # another type is refused where the model is built (engine/rope.py): simulate needs no RoPE
    for key in ROPE_SCALING_KEYS.get(kind, ()):
        _check_positive(name, f"rope_scaling.{key}", scaling.get(key))


def _check_layer_types(name: str, layer_types) -> None:
    if not isinstance(layer_types, (list, tuple)):  # list() of a text made its characters "layers"
        raise ValueError(f"{name}: layer_types={layer_types!r} must be a list, one attention type a layer "
                         f"({list(LAYER_TYPES)}): fix it in config.json or engine.hf_overrides")


def _check_bool(name: str, field_name: str, value, where: str = "config.json or engine.hf_overrides") -> None:
    """A JSON true or false: a text such as "false" is truthy and was taken as true (an untied checkpoint
    with ``tie_word_embeddings: "false"`` was built tied, and failed at load naming lm_head.weight)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: {field_name}={value!r} is not a boolean: give true or false ({where})")


def _check_size(name: str, field_name: str, value, minimum: int,
                where: str = "config.json or engine.hf_overrides") -> None:
    if not is_int(value) or not minimum <= value <= MAX_SIZE:
        raise ValueError(f"{name}: {field_name}={value!r} is not a model size: give a whole number in "
                         f"[{minimum}, {MAX_SIZE}] ({where})")
