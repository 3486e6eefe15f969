"""Roofline cost model for simulate mode.

In simulate mode the real scheduler and allocator run but no model does: each engine step
advances a virtual clock by ``RooflineCostModel.step_time(batch)``, the larger of the time
to stream the bytes the step must touch (weights once, the KV cache it attends over, the KV
it writes) and the time to do its FLOPs, at a fraction ``efficiency`` of datasheet peak,
plus a fixed per-step overhead.  That is the physical limit: a decode step
cannot beat (weight bytes + KV bytes read) / HBM bandwidth.

Tensor parallelism (``tensor_parallel_size`` = tp): each GPU holds ``ModelShape.shard(tp)``: the
layers' heads and MLP width divided by tp, norms, embedding and lm_head replicated (as the engine
shards, ``engine/parallel.py``), so weights, KV bytes and FLOPs are one GPU's; every layer adds
two all-reduces of ``new_tokens x hidden x dtype_bytes`` (after attention and after the MLP),
each charged as a ring all-reduce over NVLink: ``latency + 2 (tp-1)/tp x bytes / bandwidth``,
not overlapped with compute (as in Megatron-style inference).

Deliberately ignored (small next to the terms kept, or not a memory-strategy effect):
activations traffic, the embedding gather, norms/rotary/softmax element-wise work, and
kernel-level differences between allocators (those are measured on GPU, not simulated).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from allocators.checks import is_int

__all__ = ["AllReduceCost", "DeviceSpec", "ModelShape", "DEVICES", "MODEL_SHAPES", "StepCost", "RooflineCostModel",
           "get_device", "get_model_shape"]

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    mem_bandwidth: float  # bytes/s (HBM)
    flops: float          # dense fp16/bf16 tensor-core FLOP/s (no sparsity)
    memory_bytes: int
    nvlink_bandwidth: float = 0.0  # bytes/s one way between two GPUs of a node (NVLink, all links)
    nvlink_latency_s: float = 0.0  # fixed cost of one small all-reduce


# NVIDIA datasheet figures (SXM parts); memory is what the driver reports as total. NVLink: A100
# 600 GB/s and H100/H200 900 GB/s bidirectional per GPU (datasheets), i.e. half of it each way.
# The all-reduce latency is not a datasheet figure: ~10 us is the order nccl-tests report for a
# small all-reduce inside one NVLink node.
DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        DeviceSpec("a100-40gb", 1555e9, 312e12, 40 * GiB, 300e9, 1e-5),
        DeviceSpec("a100-80gb", 2039e9, 312e12, 80 * GiB, 300e9, 1e-5),
        DeviceSpec("h100-sxm", 3.35e12, 989e12, 81559 * MiB, 450e9, 1e-5),
        DeviceSpec("h200", 4.8e12, 989e12, 143771 * MiB, 450e9, 1e-5),
    )
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    gated_mlp: bool = True            # Llama-style gate/up/down (3 matrices); OPT: fc1/fc2 (2)
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    max_position_embeddings: int = 2048
    kv_dtype_bytes: int = 0  # bytes per KV element (1: fp8); 0: dtype_bytes
    layer_windows: tuple[int, ...] = ()  # per layer, its sliding window (0: full); (): all full

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return attn + mlp + 2 * h  # + two norms (biases of OPT are < 0.1%: left out)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Approximate: layers, final norm, embedding, and the lm_head when untied."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return self.num_layers * self.layer_params + self.hidden_size + embed + head

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_elem_bytes(self) -> int:
        return self.kv_dtype_bytes or self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_elem_bytes

    def window_groups(self) -> list[tuple[int, int]]:
        """(number of layers, window) per distinct window (0: full attention)."""
        if not self.layer_windows:
            return [(self.num_layers, 0)]
        return sorted((self.layer_windows.count(w), w) for w in set(self.layer_windows))

    def shard(self, tp: int) -> ModelShape:
        """One GPU's part under tensor parallelism: heads and MLP width / tp, the rest replicated."""
        if tp == 1:
            return self
        for field in ("num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, field) % tp:
                raise ValueError(f"tensor_parallel_size={tp} does not divide {self.name}'s {field}="
                                 f"{getattr(self, field)}: choose a tensor_parallel_size that divides it")
        return dataclasses.replace(self, name=f"{self.name}/tp{tp}", num_heads=self.num_heads // tp,
                                   num_kv_heads=self.num_kv_heads // tp,
                                   intermediate_size=self.intermediate_size // tp)

    @classmethod
    def from_hf_config(cls, config: dict, name: str | None = None) -> ModelShape:
        """From a HF ``config.json`` dict (Llama/Qwen/Mistral and OPT key names)."""
        opt = config.get("model_type") == "opt"
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        return cls(
            name=name or config.get("_name_or_path") or config.get("model_type", "model"),
            num_layers=config["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate_size=config["ffn_dim"] if opt else config["intermediate_size"],
            vocab_size=config["vocab_size"],
            gated_mlp=not opt,
            tie_word_embeddings=config.get("tie_word_embeddings", opt),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
        )


def attended_keys(q: int, c: int, window: int = 0) -> int:
    """Keys the ``q`` new tokens of a ``c``-token context attend to, causally (and within
    ``window``): query at position p sees min(p + 1, window) keys."""
    full = q * (c - q) + q * (q + 1) // 2
    if not window or c <= window:
        return full
    # positions c - q .. c - 1; those >= window - 1 see exactly window keys
    first_capped = max(c - q, window - 1)
    capped = c - first_capped
    below = (first_capped - (c - q))  # positions c-q .. first_capped-1 see p + 1 keys
    return capped * window + below * (c - q + 1 + first_capped) // 2


def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, heads, hidden // heads, 4 * hidden, 50272,
                      gated_mlp=False, tie_word_embeddings=True, max_position_embeddings=2048)


# Shapes from each model's HF config.json.
MODEL_SHAPES: dict[str, ModelShape] = {
    m.name: m
    for m in (
        _opt("opt-13b", 40, 5120, 40),
        _opt("opt-66b", 64, 9216, 72),
        ModelShape("llama2-7b", 32, 4096, 32, 32, 128, 11008, 32000, max_position_embeddings=4096),
        ModelShape("llama2-13b", 40, 5120, 40, 40, 128, 13824, 32000, max_position_embeddings=4096),
        ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256, max_position_embeddings=8192),
        ModelShape("yi-34b", 60, 7168, 56, 8, 128, 20480, 64000, max_position_embeddings=4096),
        ModelShape("qwen3-0.6b", 28, 1024, 16, 8, 128, 3072, 151936, tie_word_embeddings=True,
                   max_position_embeddings=40960),
        ModelShape("tiny-llama", 2, 64, 4, 2, 16, 128, 512, max_position_embeddings=4096),
    )
}


def get_device(name: str) -> DeviceSpec:
    if name not in DEVICES:
        raise ValueError(f"unknown device '{name}': choose one of {sorted(DEVICES)}")
    return DEVICES[name]


def get_model_shape(name: str) -> ModelShape:
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape '{name}': choose one of {sorted(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]


def _total_s(compute_s: float, memory_s: float, comm_s: float, overhead_s: float) -> float:
    """A step's seconds: compute and memory overlap, the all-reduces and the overhead do not."""
    return max(compute_s, memory_s) + comm_s + overhead_s


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    overhead_s: float
    comm_s: float = 0.0  # tensor-parallel all-reduces (not overlapped with compute)

    @property
    def total_s(self) -> float:
        return _total_s(self.compute_s, self.memory_s, self.comm_s, self.overhead_s)

    @property
    def memory_bound(self) -> bool:
        return self.memory_s >= self.compute_s


class AllReduceCost:
    """Seconds of a step's tensor-parallel all-reduces: 2 per layer of ``tokens x hidden`` values,
    each ``latency + 2 (tp-1)/tp x bytes / bandwidth`` (ring all-reduce; 0 at tp=1)."""

    def __init__(self, tp: int, hidden_size: int, num_layers: int, dtype_bytes: int, device: DeviceSpec,
                 bandwidth: float | None = None, latency_s: float | None = None):
        if not is_int(tp) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        self.tp, self.hidden_size, self.num_layers, self.dtype_bytes = tp, hidden_size, num_layers, dtype_bytes
        self.bandwidth = device.nvlink_bandwidth if bandwidth is None else bandwidth
        self.latency_s = device.nvlink_latency_s if latency_s is None else latency_s
        if tp > 1 and self.bandwidth <= 0:
            raise ValueError(f"tensor_parallel_size={tp} on {device.name}: no NVLink bandwidth is known for it; "
                             "set sim.nvlink_bandwidth (bytes/s one way)")
        if self.latency_s < 0:
            raise ValueError(f"sim.nvlink_latency_s must be >= 0, got {self.latency_s}")

    def one_s(self, tokens: int) -> float:
        if self.tp == 1 or tokens == 0:
            return 0.0
        nbytes = tokens * self.hidden_size * self.dtype_bytes
        return self.latency_s + 2 * (self.tp - 1) / self.tp * nbytes / self.bandwidth

    def step_s(self, tokens: int) -> float:
        return 2 * self.num_layers * self.one_s(tokens)


class RooflineCostModel:
    """Step time of a batch on a device: ``max(compute, memory) + step_overhead_s``.

    ``efficiency`` scales both peaks (0.8: well-tuned GEMMs and attention kernels reach
    ~80% of datasheet FLOP/s and bandwidth).  ``step_overhead_s`` (0.5 ms) stands for the
    CPU side of a step: scheduling, input preparation, launches or graph replay, sampling.
    """

    def __init__(self, model: ModelShape, device: DeviceSpec, efficiency: float = 0.8,
                 step_overhead_s: float = 5e-4, tensor_parallel_size: int = 1,
                 nvlink_bandwidth: float | None = None, nvlink_latency_s: float | None = None):
        """``model``: the whole model; with ``tensor_parallel_size`` > 1 ``self.model`` is one GPU's shard."""
        if not 0 < efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
        if step_overhead_s < 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {step_overhead_s}")
        self.allreduce = AllReduceCost(tensor_parallel_size, model.hidden_size, model.num_layers, model.dtype_bytes,
                                       device, nvlink_bandwidth, nvlink_latency_s)
        self.full_model = model
        model = model.shard(tensor_parallel_size)
        self.model, self.device = model, device
        self.efficiency, self.step_overhead_s = efficiency, step_overhead_s
        # matmul weights every token goes through (the embedding is a gather, not a GEMM)
        embed = model.vocab_size * model.hidden_size
        head = 0 if model.tie_word_embeddings else model.lm_head_params
        self._token_matmul_params = model.num_params - embed - head
        # QK^T and PV: 2 FLOPs per multiply-add, 2 matmuls, per query head, layer, key
        self._attn_flops_per_key = 4 * model.num_layers * model.num_heads * model.head_dim
        self._groups = model.window_groups()
        self._full = len(self._groups) == 1 and self._groups[0][1] == 0

    def step_cost(self, batch: list[tuple[int, int]]) -> StepCost:
        """``batch``: one ``(num_new_tokens, context_len_after)`` per sequence in the step."""
        if not batch:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0)
        return StepCost(*self._cost(*self._sums(batch)))

    def _sums(self, batch: list[tuple[int, int]]) -> tuple[int, int, int, int]:
        """(tokens computed, sequences, keys attended, KV rows read) of a batch, the last two
        summed over layers."""
        m = self.model
        if self._full:  # full attention: one pass (the hot path)
            new_tokens = context = keys = 0
            for q, c in batch:
                new_tokens += q
                context += c
                # causal: new token i (of q) sees the c - q earlier tokens and i + 1 of the chunk
                keys += q * (c - q) + q * (q + 1) // 2
            return new_tokens, len(batch), m.num_layers * keys, m.num_layers * context
        # per layer group: keys attended (causal, within its window) and KV rows read
        new_tokens = sum(q for q, _ in batch)
        attended = read = 0
        for layers, w in self._groups:
            attended += layers * sum(attended_keys(q, c, w) for q, c in batch)
            read += layers * sum(min(c, w + q - 1) if w else c for q, c in batch)
        return new_tokens, len(batch), attended, read

    def _cost(self, new_tokens: int, num_seqs: int, attended: int,
              read: int) -> tuple[float, float, float, float, float, float]:
        """The fields of the step's StepCost from its sums: tokens computed, sequences, keys
        attended and KV rows read (both summed over layers)."""
        m = self.model
        # logits only for the last position of each sequence (the sampled one)
        flops = (2 * self._token_matmul_params * new_tokens
                 + 2 * m.lm_head_params * num_seqs
                 + self._attn_flops_per_key * attended / m.num_layers)
        kv = m.kv_bytes_per_token
        # weights, KV read, KV written
        nbytes = m.weight_bytes + kv * read / m.num_layers + kv * new_tokens
        eff = self.efficiency
        return (flops, nbytes, flops / (self.device.flops * eff), nbytes / (self.device.mem_bandwidth * eff),
                self.step_overhead_s, self.allreduce.step_s(new_tokens))

    def step_time(self, batch: list[tuple[int, int]]) -> float:
        """Seconds for one engine step; 0 for an empty batch (no step runs)."""
        if not batch:
            return 0.0
        _, _, compute_s, memory_s, overhead_s, comm_s = self._cost(*self._sums(batch))
        return _total_s(compute_s, memory_s, comm_s, overhead_s)

    def host_device_time(self, batch: list[tuple[int, int]], num_sampled: int | None = None, vmm_maps: int = 0,
                         vmm_unmaps: int = 0) -> tuple[float, float]:
        """``step_time`` as (host seconds, device seconds): the fixed overhead is the host's (what
        asynchronous scheduling overlaps with the device's previous step)."""
        if not batch:
            return 0.0, 0.0
        _, _, compute_s, memory_s, overhead_s, comm_s = self._cost(*self._sums(batch))
        return overhead_s, max(compute_s, memory_s) + comm_s

    @property
    def full_attention(self) -> bool:
        """Every layer attends to the whole context (no sliding window)."""
        return self._full

    def sums_host_device(self, new_tokens: int, num_seqs: int, keys: int, context: int) -> tuple[float, float]:
        """``host_device_time`` of a batch given by its sums (full attention only): tokens computed,
        sequences, keys attended (``q * (c - q) + q * (q + 1) // 2`` per sequence of ``q`` new
        tokens and context ``c`` after the step) and contexts. The same figures to the bit, so
        simulate's bulk path times a run of steps without a list per step."""
        if not self._full:
            raise ValueError("step times from sums need full attention: a sliding window counts keys per sequence")
        if not num_seqs:
            return 0.0, 0.0
        layers = self.model.num_layers
        _, _, compute_s, memory_s, overhead_s, comm_s = self._cost(new_tokens, num_seqs, layers * keys,
                                                                    layers * context)
        return overhead_s, max(compute_s, memory_s) + comm_s

    def decode_host_device(self, num_seqs: int, context: int, longest: int = 0, vmm_maps: int = 0,
                           vmm_unmaps: int = 0) -> tuple[float, float]:
        """``sums_host_device`` of ``num_seqs`` sequences that compute one token each, their contexts
        (after the step) summing to ``context`` (a decode token attends to its whole context).
        ``longest`` and the VMM calls: the profiled model's (``ProfiledCostModel.decode_host_device``);
        none here."""
        return self.sums_host_device(num_seqs, num_seqs, context, context)

    def kv_capacity_tokens(self, gpu_memory_utilization: float = 0.9,
                           activation_reserve_bytes: int = 0) -> int:
        """KV token slots: (utilization x device memory - weights - activation reserve) / KV per token.

        With the defaults (0.9, no reserve) OPT-13B on A100-40GB gives 15,836 slots
        (36 GiB - 25.7 GB of weights = 12.97 GB at 800 KiB/token), within 1% of the ~15.7k
        of the PagedAttention paper; the activations of a 2048-token prefill of that model
        take ~0.1 GB, which a caller can pass as ``activation_reserve_bytes``.
        """
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        budget = gpu_memory_utilization * self.device.memory_bytes
        free = budget - self.model.weight_bytes - activation_reserve_bytes
        if free < self.model.kv_bytes_per_token:
            reserve = (f" and sim.activation_reserve_bytes={activation_reserve_bytes:g}" if activation_reserve_bytes
                       else "")
            raise ValueError(
                f"{self.model.name} ({self.model.weight_bytes / GiB:.1f} GiB of weights){reserve} "
                f"leave{'' if reserve else 's'} no KV memory in {gpu_memory_utilization:.0%} of {self.device.name}: "
                "use a larger device or raise gpu_memory_utilization"
                + (" or lower sim.activation_reserve_bytes" if reserve else ""))
        return int(free // self.model.kv_bytes_per_token)
