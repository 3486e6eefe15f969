"""Engine settings (the Hydra group conf/engine/ mirrors these fields)."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from allocators.checks import is_int, is_real

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# KV cache element types (vLLM's kv_cache_dtype names; "fp8" is e4m3 as there)
KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def graph_token_bound(cuda_graph_max_tokens: int | None, max_num_batched_tokens: int | None) -> int | None:
    """The prefill/mixed CUDA graphs' token bound an engine really gets: ``cuda_graph_max_tokens``
    capped at the token budget (no step is larger). None where either is unknown (a record
    without it)."""
    if cuda_graph_max_tokens is None or max_num_batched_tokens is None:
        return cuda_graph_max_tokens
    return min(cuda_graph_max_tokens, max_num_batched_tokens)


T = TypeVar("T")


def checked_quietly(build: Callable[[], T], what: str) -> T | None:
    """``build()`` as a check made before the real thing (an engine built without weights): its
    logs below ERROR held back (the real build logs them), a ValueError (a refused setting)
    raised, any other failure left for the real build to report (None)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return build()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - not this check's to report
        logging.getLogger("kvlab.engine").debug("%s skipped: %s: %s", what, type(e).__name__, e)
        return None
    finally:
        logging.disable(previous)


_TOKENS = (1 << 31) - 1
# whole-number settings: (least, null allowed, most) and what they count
WHOLE = {"max_model_len": (0, False, _TOKENS), "max_num_seqs": (1, False, 1 << 20),
         "max_num_batched_tokens": (1, False, _TOKENS), "kv_cache_tokens": (1, True, _TOKENS),
         "kv_cache_memory": (1, True, 1 << 50), "cpu_kv_cache_memory": (1, False, 1 << 50),
         "seed": (0, False, (1 << 63) - 1), "cpu_threads": (0, False, 1 << 12)}
WHOLE_MEANING = {"max_model_len": "tokens a sequence may hold; 0: the model's limit, at most 4096",
                 "max_num_seqs": "sequences in a batch", "max_num_batched_tokens": "tokens a step computes",
                 "kv_cache_tokens": "the KV pool in tokens; null: sized by kv_cache_memory or the device",
                 "kv_cache_memory": "the KV pool in bytes; null: a share of the device",
                 "cpu_kv_cache_memory": "bytes of the KV pool on CPU", "seed": "the sampling seed",
                 "cpu_threads": "torch threads on CPU; 0: chosen by model size"}
FLAGS = ("enable_chunked_prefill", "enable_prefix_caching", "enforce_eager", "detokenize", "record_memory",
         "stream_outputs", "enable_pdl")


@dataclass
class EngineConfig:
    model: str = "tiny-llama"  # a preset name or a local HF directory
    allocator: str = "paged"
    allocator_args: dict = field(default_factory=dict)  # e.g. block_size, policy, page_size
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8_e4m3 | fp8_e5m2: one byte per element
    kv_scale_granularity: str = "tensor"  # fp8 scales per layer: "tensor" (one for K, one for V) or "head"
    hf_overrides: dict = field(default_factory=dict)  # model config fields replaced, e.g. sliding_window, layer_types
    kv_grouping: str = "none"  # sliding-window layers: none (every layer holds every token) | shared (window-aware)
    kv_scale: float | None = None  # fp8 scale for every layer's K and V; None: amax of the first prefill / fp8 max
    max_model_len: int = 0  # 0: min(model's max positions, 4096)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False
    preemption_mode: str = "recompute"  # or "swap" (allocators that support it; else recompute)
    swap_space: float | None = None  # GiB of host memory for swapped KV; None: as large as the KV pool
    # host KV tier (allocators/host_tier.py; vLLM's --kv-offloading-size): evicted prefix-cache
    # blocks kept in pinned host memory and loaded back on a hit; needs enable_prefix_caching
    host_kv_cache_memory: float = 0.0  # GiB of host memory (0: off) ...
    host_kv_cache_tokens: int | None = None  # ... or its size in tokens (takes precedence)
    host_tier_policy: str = "lru"  # lru | lfu (frequency-aware)
    host_transfer_blocks: int = 1  # blocks per host<->device copy (the transfer granularity)
    kv_cache_tokens: int | None = None  # explicit pool size in tokens ...
    kv_cache_memory: int | None = None  # ... or in bytes ...
    gpu_memory_utilization: float = 0.9  # ... else this share of the GPU (CPU: cpu_kv_cache_memory)
    cpu_kv_cache_memory: int = 64 << 20
    enforce_eager: bool = False
    # prefill and mixed steps of up to this many tokens replay CUDA graphs (cuda_graph_mode);
    # 0: they run eagerly. Decode steps have their own.
    cuda_graph_max_tokens: int = 8192
    # full: one graph per size, attention captured too (engine/full_graphs.py; the step costs one
    # replay, not 2 L launches from Python); piecewise: attention runs eagerly between the graphs
    cuda_graph_mode: str = "full"
    # steps of up to this many tokens (decode at small batches; at most 16) run each linear layer with
    # its RMSNorm, SiLU-and-mul or residual add inside one kernel (kernels/small_linear.py): four
    # kernels a layer where cuBLAS and the fused ops take nine. 0: off (cuBLAS for every step)
    fused_gemv_max_tokens: int = 0
    # programmatic dependent launch (Hopper and newer; kernels/pdl.py): each of the step's Triton kernels
    # launches while the one before it finishes (the launch gaps of a small batch's decode hidden). false: off
    enable_pdl: bool = False
    # where a step of whole prompts (every sequence from token 0: no cached prefix, no decode) reads
    # its keys: cache (through the allocator's addressing, as every other step) | qkv (from the
    # step's own K/V projection, LINEAR; the cache is written all the same). Only PAGED differs: its
    # prefill attention then runs at LINEAR's speed (results/kernels/prefill: +12-24% from the
    # cache). qkv needs caches of the model's dtype and one layer group; piecewise graphs read the
    # cache. cache by default until the simulate validation's real runs are made with qkv.
    prompt_attention: str = "cache"
    # overlap host work with the device (step N+1 launches before step N's tokens are read back;
    # a stop is seen one step late). auto: on for an engine on one CUDA device and in simulate (it
    # models one), off on CPU (nothing to overlap) and with tensor_parallel_size > 1; under auto,
    # steps holding beam-search sequences run synchronously. Works with prefix caching (a block
    # is indexed once its last token is read back). The experiments' config sets false.
    async_scheduling: bool | str = "auto"
    seed: int = 0
    detokenize: bool = True
    record_memory: bool = True
    stream_outputs: bool = True  # step() returns every request that got a token; False: finished only
    cpu_threads: int = 0  # torch threads on CPU; 0: one thread for tiny models (they lose to thread overhead)
    # GPUs (processes) one model is sharded over, Megatron-style by attention heads and MLP columns
    # (engine/parallel.py); CPU runs use gloo (tests). kv_cache_memory and gpu_memory_utilization are per GPU.
    tensor_parallel_size: int = 1

    @property
    def step_sequences(self) -> int:
        """The most sequences one step holds (a beam-search request's beams all run in each step)."""
        return min(self.max_num_seqs, self.max_num_batched_tokens)

    @property
    def graph_max_tokens(self) -> int:
        """``cuda_graph_max_tokens`` as the engine takes it (``graph_token_bound``)."""
        return graph_token_bound(self.cuda_graph_max_tokens, self.max_num_batched_tokens)

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if not is_int(self.cuda_graph_max_tokens) or not 0 <= self.cuda_graph_max_tokens <= 8192:
            raise ValueError(f"cuda_graph_max_tokens must be an integer in [0, 8192] (0: prefill and mixed steps "
                             f"run eagerly), got {self.cuda_graph_max_tokens!r}")
        self.cuda_graph_max_tokens = int(self.cuda_graph_max_tokens)  # a numpy count: a plain int from here on
        if not is_int(self.fused_gemv_max_tokens) or not 0 <= self.fused_gemv_max_tokens <= 16:
            raise ValueError(f"fused_gemv_max_tokens must be an integer in [0, 16] (0: cuBLAS for every step), "
                             f"got {self.fused_gemv_max_tokens!r}")
        self.fused_gemv_max_tokens = int(self.fused_gemv_max_tokens)
        if self.prompt_attention not in ("cache", "qkv"):
            raise ValueError(f"prompt_attention must be 'cache' (keys through the allocator's addressing) or 'qkv' "
                             f"(a step of whole prompts reads its own K/V projection), got {self.prompt_attention!r}")
        if self.cuda_graph_mode not in ("piecewise", "full"):
            raise ValueError(f"cuda_graph_mode must be 'piecewise' (attention eager between graphs) or 'full' "
                             f"(attention captured too), got {self.cuda_graph_mode!r}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.async_scheduling not in (True, False, "auto"):
            raise ValueError(f"async_scheduling must be true, false or auto (on for one CUDA device), "
                             f"got {self.async_scheduling!r}")
        tp = self.tensor_parallel_size
        if not is_int(tp) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1 (1: one device), got {tp!r}")
        self.tensor_parallel_size = int(tp)
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype '{self.dtype}': choose auto or one of {sorted(_DTYPES)}")
        if self.kv_cache_dtype not in ("auto", *KV_DTYPES):
            raise ValueError(f"kv_cache_dtype '{self.kv_cache_dtype}': choose auto or one of {sorted(KV_DTYPES)}")
        if self.kv_grouping not in ("none", "shared"):
            raise ValueError(f"kv_grouping '{self.kv_grouping}': choose none (full-length KV for every layer) or "
                             "shared (layer groups: windowed layers hold their window, vLLM's hybrid allocator)")
        if self.tensor_parallel_size > 1 and self.enable_pdl is True:
            raise ValueError("enable_pdl=true runs with tensor_parallel_size=1 only (the workers' steps launch "
                             "without it): set enable_pdl=false or tensor_parallel_size=1")
        if self.tensor_parallel_size > 1 and (self.kv_cache_dtype != "auto" or self.kv_grouping != "none"):
            raise ValueError("tensor_parallel_size > 1 runs kv_cache_dtype=auto and kv_grouping=none only (fp8 "
                             "scales and layer groups are not sent to the other ranks yet): choose one of the two")
        if self.kv_scale_granularity not in ("tensor", "head"):
            raise ValueError(f"kv_scale_granularity '{self.kv_scale_granularity}': choose tensor or head")
        if self.kv_scale is not None and not (is_real(self.kv_scale) and 0 < self.kv_scale < 1e6):
            raise ValueError(f"kv_scale must be a positive number (dequantized = fp8 value x scale) or null "
                             f"(computed from the first prefill), got {self.kv_scale!r}")
        if self.kv_scale is not None:
            self.kv_scale = float(self.kv_scale)
        self._check_host_tier()

    def _check_types(self) -> None:
        """Whole numbers where a count is meant and true/false where a switch is: a float, inf or
        nan would be truncated or compared silently (2.5 sequences, a pool of 1000.7 tokens)."""
        for name, (low, none_ok, high) in WHOLE.items():
            v = getattr(self, name)
            if v is None and none_ok:
                continue
            if isinstance(v, float) and v.is_integer() or is_int(v):
                v = int(v)  # 4e9 bytes, a numpy count: the same whole number
            if not is_int(v) or not low <= v <= high:
                raise ValueError(f"{name}={v!r}: give a whole number in [{low}, {high}]"
                                 + (" or null" if none_ok else "") + f" ({WHOLE_MEANING[name]})")
            setattr(self, name, v)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device={'null' if self.device is None else repr(self.device)}: give auto, cpu, cuda "
                             "or cuda:N")
        if self.kv_cache_tokens is not None and self.kv_cache_memory is not None:
            raise ValueError(f"kv_cache_tokens={self.kv_cache_tokens} and kv_cache_memory={self.kv_cache_memory} both "
                             "size the KV pool: give one (kvlab run's default is kv_cache_tokens=4096: add "
                             "engine.kv_cache_tokens=null to size it by kv_cache_memory)")
        for name in FLAGS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{name}={v!r}: give true or false")
        sw = self.swap_space
        if sw is not None and (not is_real(sw) or not math.isfinite(sw) or not 0 <= sw <= 1 << 20):
            raise ValueError(f"swap_space={sw!r}: give the GiB of host memory for swapped KV as a number >= 0, or "
                             "null for as much as the KV pool")

    def _check_host_tier(self) -> None:
        from allocators.host_tier import POLICIES

        mem, tokens = self.host_kv_cache_memory, self.host_kv_cache_tokens
        if not is_real(mem) or not math.isfinite(mem) or mem < 0:
            raise ValueError(f"host_kv_cache_memory={mem!r}: give the GiB of host memory for the host KV tier "
                             "as a number >= 0 (0 turns it off), e.g. host_kv_cache_memory=4")
        if tokens is not None and (not is_int(tokens) or tokens < 0):
            raise ValueError(f"host_kv_cache_tokens={tokens!r}: give a whole number of tokens >= 0, "
                             "or null to size the tier by host_kv_cache_memory")
        if tokens is not None:
            self.host_kv_cache_tokens = int(tokens)
        if self.host_tier_policy not in POLICIES:
            raise ValueError(f"host_tier_policy='{self.host_tier_policy}': choose one of {POLICIES}")
        tb = self.host_transfer_blocks
        if not is_int(tb) or tb < 1:
            raise ValueError(f"host_transfer_blocks={tb!r}: give a whole number of blocks >= 1 per "
                             "host<->device copy, e.g. host_transfer_blocks=1 (one block) or 8")
        self.host_transfer_blocks = int(tb)
        if (mem or tokens) and self.tensor_parallel_size > 1:
            raise ValueError("the host KV tier runs with tensor_parallel_size=1 only (the other ranks do not "
                             "copy their shards yet): set host_kv_cache_memory=0 or tensor_parallel_size=1")
        if (mem or tokens) and not self.enable_prefix_caching:
            raise ValueError("the host KV tier keeps evicted prefix-cache blocks: set enable_prefix_caching=true, "
                             "or host_kv_cache_memory=0 to turn the tier off")

    def host_tier_tokens(self, bytes_per_token: int) -> int:
        """Tokens of the host KV tier (0: off)."""
        if self.host_kv_cache_tokens is not None:
            return self.host_kv_cache_tokens
        return int(self.host_kv_cache_memory * 2**30) // bytes_per_token

    def resolved_max_model_len(self, mc) -> int:
        """``max_model_len``, 0 resolved to min(the model's positions, 4096); more positions than
        the model was trained on are refused."""
        n = self.max_model_len or min(mc.max_position_embeddings, 4096)
        if n > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={n} is more than {mc.name}'s max_position_embeddings "
                             f"({mc.max_position_embeddings}): lower it, or 0 for min(that, 4096)")
        return n

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is visible: use device=cpu")
        return self.device

    def resolved_async(self, device: str, simulate: bool = False) -> bool:
        """Whether steps overlap host work with the device: ``async_scheduling``, auto resolved."""
        if self.async_scheduling != "auto":
            return bool(self.async_scheduling)
        return (simulate or device.startswith("cuda")) and self.tensor_parallel_size == 1

    def resolved_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.kv_cache_dtype == "auto" else KV_DTYPES[self.kv_cache_dtype]

    def check_devices(self, device: str) -> None:
        """tensor_parallel_size GPUs must be visible (one process per GPU); on CPU any number runs."""
        tp = self.tensor_parallel_size
        if tp > 1 and device.startswith("cuda"):
            if device not in ("cuda", "cuda:0"):
                raise ValueError(f"tensor_parallel_size={tp} uses cuda:0 .. cuda:{tp - 1}: set device=cuda "
                                 f"(got device={device!r}); choose the GPUs with CUDA_VISIBLE_DEVICES")
            n = torch.cuda.device_count()
            if tp > n:
                raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs but {n} are visible: lower "
                                 "tensor_parallel_size or make more GPUs visible (CUDA_VISIBLE_DEVICES)")

    def resolved_dtype(self, device: str) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.startswith("cuda") else torch.float32
        return _DTYPES[self.dtype]
