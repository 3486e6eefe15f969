"""Simulate mode: the real scheduler and allocator, no model compute, a virtual clock.

``simulated_engine`` builds an ordinary :class:`engine.llm_engine.LLMEngine` with

- a model *shape* instead of weights (``model.shape`` names an entry of
  ``experiments.costmodel.MODEL_SHAPES``, e.g. ``opt-13b``; without it the shape of the
  configured preset or HF directory is used), so the KV pool is accounting only;
- a :class:`VirtualClock` the engine reads for every timestamp;
- a :class:`SimRunner` in place of the model runner: it "computes" a scheduled batch by
  advancing the clock by the roofline cost model's step time of that batch and emits one
  token for every sequence whose new tokens reach its end, exactly where the real runner
  samples one. The engine then does what it always does (advance ``num_computed_tokens``,
  append, stop checks, memory accounting), so every scheduler and allocator decision is the
  real one;
- ``advance_idle(seconds)`` for the driver: with nothing to run, time jumps to the next
  arrival instead of sleeping;
- ``decode_fast_forward`` for the driver: runs of steps in which every running sequence just
  decodes a token and nothing can change the schedule advance in bulk, with the same records
  (experiments/sim_fastpath.py).

The KV pool, when neither ``engine.kv_cache_tokens`` nor ``engine.kv_cache_memory`` is set,
is what the simulated device leaves after the weights: ``RooflineCostModel.kv_capacity_tokens``
(OPT-13B on A100-40GB at ``gpu_memory_utilization=0.9``: 15,836 token slots).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path

from allocators.checks import is_real
from engine.config import EngineConfig
from engine.model_config import ModelConfig
from experiments.costmodel import ModelShape, RooflineCostModel, get_device, get_model_shape
from experiments.sim_fastpath import DecodeFastForward
from experiments.sim_runner import (AsyncSimRunner, MapCounter, SimRunner,  # noqa: F401  (re-exported)
                                    SimStepHandle, VirtualClock)

__all__ = ["VirtualClock", "SimRunner", "AsyncSimRunner", "SimStepHandle", "SimSettings", "shape_of", "model_config_of", "simulated_engine"]

_DTYPE_BY_BYTES = {2: "bfloat16", 4: "float32"}
log = logging.getLogger("kvlab.sim")


@dataclasses.dataclass
class SimSettings:
    """Mirrors the Hydra group ``conf/sim/*.yaml``."""

    device: str = "a100-40gb"
    efficiency: float = 0.8
    step_overhead_s: float = 5e-4
    activation_reserve_bytes: int = 0
    pcie_bandwidth: float = 25e9  # bytes/s host<->device for swapped KV (PCIe 4.0 x16, effective)
    transfer_latency_s: float = 1e-5  # fixed cost of one host<->device memcpy (host KV tier; roofline)
    cost_model: str = "auto"  # auto (profiled where a profile exists) | profiled | roofline
    profile: str | None = None  # a device profile written by `kvlab profile` (parquet)
    # tensor parallelism: NVLink bytes/s one way and all-reduce latency; None: the device's datasheet figures
    nvlink_bandwidth: float | None = None
    nvlink_latency_s: float | None = None

    @classmethod
    def from_mapping(cls, d: Mapping | None) -> SimSettings:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sim settings {unknown}: valid keys are {sorted(names)}")
        return cls(**d)

    # numbers: (least, whether the least itself is allowed, whether null is, what they mean)
    RANGES = {"step_overhead_s": (0.0, True, False, "seconds of CPU per step"),
              "activation_reserve_bytes": (0.0, True, False, "bytes kept for activations"),
              "pcie_bandwidth": (0.0, False, False, "bytes/s host<->device, e.g. 25e9"),
              "transfer_latency_s": (0.0, True, False, "seconds per host<->device copy"),
              "nvlink_bandwidth": (0.0, False, True, "bytes/s one way, or null for the datasheet's"),
              "nvlink_latency_s": (0.0, True, True, "seconds per all-reduce, or null for the datasheet's")}

    def __post_init__(self) -> None:
        if self.profile is not None and not isinstance(self.profile, str):  # sim.profile=123: a TypeError in the run
            raise ValueError(f"sim.profile={self.profile!r}: give the path of a .parquet file `kvlab profile` wrote, "
                             "or null (the roofline cost model)")
        e = self.efficiency
        if not is_real(e) or not 0 < e <= 1:
            raise ValueError(f"sim.efficiency={e!r}: give a number in (0, 1] (the share of the device's peak "
                             "rates the roofline model reaches)")
        for name, (low, closed, nullable, meaning) in self.RANGES.items():
            v = getattr(self, name)
            if v is None and nullable:
                continue
            ok = is_real(v) and math.isfinite(v) and (v >= low if closed else v > low)
            if not ok:
                raise ValueError(f"sim.{name}={v!r}: give a finite number {'>=' if closed else '>'} {low:g} "
                                 f"({meaning})")


def model_config_of(shape: ModelShape) -> ModelConfig:
    """An engine ModelConfig with the shape's KV layout (nothing else of it is used: no weights)."""
    return ModelConfig(
        model_type="llama", vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings, bos_token_id=None, eos_token_id=[2], name=shape.name)


def shape_of(mc: ModelConfig, dtype_bytes: int = 2, kv_dtype_bytes: int = 0) -> ModelShape:
    """The cost-model shape of an engine model config (Llama-style gated MLP)."""
    windows = mc.layer_windows()
    return ModelShape(mc.name, mc.num_hidden_layers, mc.hidden_size, mc.num_attention_heads,
                      mc.num_key_value_heads, mc.head_dim, mc.intermediate_size, mc.vocab_size,
                      dtype_bytes=dtype_bytes, gated_mlp=True, tie_word_embeddings=mc.tie_word_embeddings,
                      max_position_embeddings=mc.max_position_embeddings, kv_dtype_bytes=kv_dtype_bytes,
                      layer_windows=tuple(windows) if any(windows) else ())


def simulated_engine(cfg, engine_config: EngineConfig, clock: VirtualClock | None = None):
    """An LLMEngine over the real scheduler and allocator, timed by the roofline cost model.

    ``cfg`` is the run's config (``cfg.model`` with optional ``shape``; ``cfg.sim``);
    ``engine_config`` the engine settings of the run. Returns the engine with extra attributes:
    ``advance_idle`` and ``decode_fast_forward`` (the driver's hooks), ``sim_device``,
    ``cost_model`` and ``sim_summary``.
    """
    from engine.llm_engine import LLMEngine
    from engine.loader import resolve_config

    sim = SimSettings.from_mapping(_to_dict(cfg.get("sim")))
    device = get_device(sim.device)
    shape_name = cfg.model.get("shape")
    econf = dataclasses.replace(engine_config, device="cpu")  # nothing is allocated: accounting only
    if shape_name:
        shape = get_model_shape(shape_name)
        mc = model_config_of(shape)
    else:
        mc = resolve_config(econf.model, econf.hf_overrides)
        dtype_bytes = 2 if econf.dtype in ("auto", "float16", "fp16", "bfloat16", "bf16") else 4
        shape = shape_of(mc, dtype_bytes)
    if econf.kv_cache_dtype != "auto":
        shape = dataclasses.replace(shape, kv_dtype_bytes=1)
    if econf.dtype == "auto":  # the simulated GPU's dtype, not the CPU's float32
        econf.dtype = _DTYPE_BY_BYTES[shape.dtype_bytes]
    # with tensor_parallel_size > 1 the cost model times one GPU's shard (cost.model) plus the all-reduces
    cost = RooflineCostModel(shape, device, efficiency=sim.efficiency, step_overhead_s=sim.step_overhead_s,
                             tensor_parallel_size=econf.tensor_parallel_size, nvlink_bandwidth=sim.nvlink_bandwidth,
                             nvlink_latency_s=sim.nvlink_latency_s)
    if econf.kv_cache_tokens is None and econf.kv_cache_memory is None:
        econf.kv_cache_tokens = cost.kv_capacity_tokens(econf.gpu_memory_utilization,
                                                        sim.activation_reserve_bytes)
    else:
        _check_pool_fits(econf, cost, device)
    if not econf.max_model_len:
        econf.max_model_len = min(shape.max_position_embeddings, 4096)
    if econf.allocator == "virtual":
        _gpu_page_size(econf, cost.model)  # one GPU's heads: a page holds tokens of its shard
    clock = clock or VirtualClock()
    runner: dict = {}

    def factory(allocator):
        step_cost = cost_model_for(sim, cost, shape, shape_name or econf.model, econf, allocator)
        cls = AsyncSimRunner if econf.async_scheduling else SimRunner
        runner["r"] = cls(step_cost, clock, mc.vocab_size, mc.eos_token_id, allocator, sim.pcie_bandwidth,
                          sim.transfer_latency_s)
        return runner["r"]

    engine = LLMEngine(econf, model_config=mc, runner_factory=factory, clock=clock)
    engine.advance_idle = clock.advance
    engine.sim_device = device.name
    engine.cost_model = runner["r"].cost_model
    engine.sim_summary = (engine.cost_model.describe() if hasattr(engine.cost_model, "describe")
                          else dict(cost_model="roofline", cost_profile=None))
    # the driver advances runs of plain decode steps in bulk (the same steps, far less work)
    engine.decode_fast_forward = DecodeFastForward(engine)
    return engine


def _check_pool_fits(econf: EngineConfig, cost: RooflineCostModel, device) -> None:
    """A pool set by hand and the weights must fit the simulated GPU (per GPU with tensor
    parallelism): a study of a pool no device holds measures nothing real."""
    m = cost.model  # one GPU's shard
    key, pool = (("kv_cache_tokens", econf.kv_cache_tokens * m.kv_bytes_per_token) if econf.kv_cache_tokens is not None
                 else ("kv_cache_memory", econf.kv_cache_memory))
    if pool + m.weight_bytes > device.memory_bytes:
        gib = 1 << 30
        raise ValueError(f"engine.{key}={getattr(econf, key)}: a KV pool of {pool / gib:.1f} GiB per GPU and "
                         f"{m.weight_bytes / gib:.1f} GiB of weights do not fit the simulated {device.name}'s "
                         f"{device.memory_bytes / gib:.1f} GiB: lower it, or set engine.kv_cache_tokens=null "
                         "engine.kv_cache_memory=null to size the pool from the device")


def _gpu_page_size(econf: EngineConfig, shape: ModelShape) -> None:
    """``page_size=auto`` picks what the simulated GPU would map: 2 MiB pages (CUDA's VMM
    granularity) whenever the pool holds a group of them; a pool too small for that (a tiny
    model) gets the host-side choice, with a line saying so."""
    from allocators.virtual import range_token_bytes
    from allocators.vmm_backends import CUDA_GRANULARITY

    args = dict(econf.allocator_args)
    if args.get("page_size") not in (None, "auto") or econf.kv_cache_tokens is None:
        return
    layers = shape.num_layers
    if econf.kv_grouping == "shared" and any(shape.layer_windows):  # a range holds one layer group's layers
        from allocators.layer_groups import plan_groups

        layers = plan_groups(shape.layer_windows).group_size
    token_bytes, _ = range_token_bytes(args.get("layout", "per_layer"), layers, shape.num_kv_heads,
                                       shape.head_dim, shape.kv_elem_bytes)
    page = CUDA_GRANULARITY // token_bytes * token_bytes
    if page and econf.kv_cache_tokens >= page // token_bytes:
        econf.allocator_args = {**args, "page_size": page}
    else:
        log.info("virtual allocator: a GPU maps %d-byte pages, more than this %d-token pool holds; "
                 "simulating the page size chosen to fit", CUDA_GRANULARITY, econf.kv_cache_tokens)


def cost_model_for(sim: SimSettings, roofline: RooflineCostModel, shape: ModelShape, model: str,
                   econf: EngineConfig, allocator):
    """The profiled model where the device has a profile (``sim.profile``), else the roofline."""
    from experiments.device_profile import ROOT, load_profile, resolve_profile_path
    from experiments.profiled_costmodel import ProfiledCostModel
    from kernels.metadata import Addressing

    if sim.cost_model not in ("auto", "profiled", "roofline"):
        raise ValueError(f"sim.cost_model='{sim.cost_model}': choose auto, profiled or roofline")
    if sim.cost_model == "roofline":
        return roofline
    path = resolve_profile_path(sim.profile)
    if path is None and sim.profile and any(p.is_dir() for p in (Path(sim.profile), ROOT / sim.profile)):
        # (kvlab profile --out takes a folder: sim.profile does not) not a missing profile: no roofline unsaid
        raise ValueError(f"sim.profile={sim.profile}: a folder, not a profile: name the .parquet file in it "
                         "(kvlab profile --out FOLDER writes FOLDER/<device>.parquet)")
    if path is None:
        msg = (f"no device profile for {sim.device}" + (f" ({sim.profile} does not exist)" if sim.profile else "")
               + ": run `kvlab profile` on that device and set sim.profile")
        if sim.cost_model == "profiled":
            raise ValueError(msg)
        log.warning("%s; simulating with the roofline cost model", msg)
        return roofline
    try:
        profile = load_profile(str(path))
    except (OSError, ValueError) as e:  # pyarrow's errors are both; a user's file, named with the key
        raise ValueError(f"sim.profile={sim.profile or path}: not a device profile ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}): give a parquet file `kvlab profile` "
                         "wrote, or null for the roofline cost model") from None
    if not _same_device(sim.device, profile.device):
        log.warning("sim.profile=%s was measured on %s, not the simulated %s: its step times are that device's, "
                    "the KV pool is sized from %s's memory (set sim to the profile's device, or give a profile of %s)",
                    sim.profile, profile.device, sim.device, sim.device, sim.device)
    if profile.meta.get("partial"):
        log.warning("sim.profile=%s is partial (a kvlab profile run that was cut off): the tables it had not measured "
                    "yet are missing or composed; rerun kvlab profile with --merge %s", sim.profile, sim.profile)
    cost = ProfiledCostModel(
        profile, shape, model=model, paged=allocator.mode == Addressing.PAGED,
        block_size=getattr(allocator, "block_size", 0), max_graph_batch=econf.max_num_seqs,
        # the runner captures no graphs for layer groups (a grouped allocator has a plan)
        enforce_eager=econf.enforce_eager or getattr(allocator, "plan", None) is not None,
        allocator=econf.allocator,
        graph_max_tokens=(0 if getattr(allocator, "plan", None) is not None
                          else econf.graph_max_tokens),
        graph_mode=econf.cuda_graph_mode, overlapped=bool(econf.async_scheduling),
        max_model_len=econf.max_model_len or 0,
        prompt_qkv=econf.prompt_attention == "qkv" and getattr(allocator, "plan", None) is None,
        allreduce=roofline.allreduce if econf.tensor_parallel_size > 1 else None,
        gemv_max_tokens=econf.fused_gemv_max_tokens, pdl=econf.enable_pdl)
    if econf.fused_gemv_max_tokens and cost.decode_graph_gemv is None:  # profiles before it: cuBLAS's
        log.warning("engine.fused_gemv_max_tokens=%d: sim.profile=%s has no decode graphs measured through "
                    "kernels.small_linear (rerun kvlab profile); decode steps of up to %d sequences are timed as "
                    "cuBLAS runs them (an H100's step of one sequence: 3-5%% slower than the engine's)",
                    econf.fused_gemv_max_tokens, sim.profile or path, econf.fused_gemv_max_tokens)
    if econf.enable_pdl and econf.fused_gemv_max_tokens and cost.decode_graph_gemv is not None \
            and not cost.gemv_pdl:  # profiles before it (with cuBLAS, PDL changes a step within noise)
        log.warning("engine.enable_pdl=true: sim.profile=%s has no decode graphs measured with programmatic dependent "
                    "launch (rerun kvlab profile on a Hopper GPU); steps of up to %d sequences are timed as without it "
                    "(an H100's: 1.5%% (llama3-8b) to 5%% (qwen3-0.6b) slower than the engine's)",
                    sim.profile or path, econf.fused_gemv_max_tokens)
    return cost


def _same_device(sim_device: str, profiled: str) -> bool:
    """Whether a profile's device (``torch.cuda.get_device_name``: "NVIDIA H200", "NVIDIA
    A100-SXM4-80GB") is the simulated one (``conf/sim``: h200, a100-80gb): the chip, and the
    memory where both name it."""
    import re

    words = set(re.split(r"[^a-z0-9]+", str(profiled).lower()))
    chip, *rest = sim_device.split("-")
    memory = {w for w in rest if re.fullmatch(r"\d+gb", w)}
    named = {w for w in words if re.fullmatch(r"\d+gb", w)}
    return chip in words and not (memory and named and not memory & named)


def _to_dict(node) -> dict:
    if node is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(node)
