"""LLMEngine: requests in, one scheduling iteration per ``step()``, outputs out."""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from allocators import KVCacheSpec
from allocators.layer_groups import grouped_allocator
from allocators.registry import allocator_class, checked_args
from allocators.base import KVAllocator
from engine.accounting import ChunkedRows, MemoryAccountant, StepLog, StepRecord  # noqa: F401 (StepRecord: re-export)
from engine.config import EngineConfig
from engine.fault_isolation import FaultIsolator
from engine.finishing import FinishingMixin
from engine.forking import ForkingMixin
from engine.request_checks import RequestChecksMixin
from engine.loader import load_model, resolve_config
from engine.model_config import ModelConfig
from engine.output_processor import OutputProcessor
from engine.parallel import check_shardable
from engine.outputs import FinishedRequest, RequestOutput
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import SeqStatus, Sequence
from engine.stepping import StepMixin
from engine.tokenizer import load_tokenizer
from kernels import pdl

log = logging.getLogger("kvlab.engine")
CPU_SLOW_PARAMS = 2_000_000_000  # a real run on the CPU of a model above this is said to be slow


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    finished: bool = False
    unborn: list[Sequence] = field(default_factory=list)  # n > 1: samples forked once the prompt is in
    prompt_logprobs_sent: bool = False


def start_tp_group(config: EngineConfig, mc: ModelConfig, max_model_len: int, dtype, device: str):
    """The worker ranks of a tensor-parallel engine (engine/tp_worker.py), after the checks that
    need no process."""
    config.check_devices(device)
    if config.async_scheduling:
        raise ValueError("async_scheduling=True is not supported with tensor_parallel_size > 1 yet (the workers "
                         "would need the sampled tokens that never leave rank 0's device): set async_scheduling=False")
    from engine.tp_worker import TPGroup

    return TPGroup(config, mc, max_model_len, dtype, device)


# step() and its stages: engine/stepping.py; stop checks, finish, retire: engine/finishing.py
class LLMEngine(RequestChecksMixin, ForkingMixin, StepMixin, FinishingMixin):
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        model_config: ModelConfig | None = None,
        runner_factory: Callable[[KVAllocator], object] | None = None,
        clock: Callable[[], float] | None = None,
        **overrides,
    ):
        """``runner_factory`` replaces the model (simulate mode): no weights, no KV tensors."""
        # a copy: auto is resolved into it below, and a caller may build another engine from theirs
        self.config = config = dataclasses.replace(config) if config else EngineConfig(**overrides)
        self.clock = clock or time.perf_counter
        self.model_config = mc = model_config or resolve_config(config.model, config.hf_overrides)
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype(self.device)
        self.max_model_len = config.resolved_max_model_len(mc)
        simulate = runner_factory is not None
        self.simulated = simulate  # a runner without a device: its steps' launch times are not a launch's
        # auto resolved once, here (the runner factory and the steps read the bool); with auto a
        # step holding beam-search sequences runs synchronously, with true they are refused
        self.async_auto = config.async_scheduling == "auto"
        config.async_scheduling = config.resolved_async(self.device, simulate)
        self.kv_dtype = config.resolved_kv_dtype(self.dtype)
        tp = config.tensor_parallel_size
        check_shardable(mc, tp)
        # each GPU holds every token's KV for its num_kv_heads / tp heads: the allocator's spec is one GPU's
        self.kv_spec = spec = KVCacheSpec(mc.num_hidden_layers, mc.num_key_value_heads // tp, mc.head_dim, self.kv_dtype,
                           None if simulate else self.device)
        self._build_model(simulate)
        self._build_allocator(spec)
        self.tokenizer = load_tokenizer(config.model, mc.vocab_size, mc.bos_token_id, mc.eos_token_id)
        self.eos_token_ids = list(self.tokenizer.eos_token_ids)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"enable_chunked_prefill=False needs max_num_batched_tokens >= max_model_len (got "
                f"{config.max_num_batched_tokens} < {self.max_model_len}), or no long prompt could ever run: "
                "raise max_num_batched_tokens, lower max_model_len, or enable chunked prefill")
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.enable_chunked_prefill, config.enable_prefix_caching, config.preemption_mode),
            self.allocator)
        self._build_runner(runner_factory)
        self.requests: dict[str, RequestState] = {}
        self.accountant = MemoryAccountant(spec.bytes_per_token)
        # per step, as compact chunks (a long run spills old ones to disk); reads like a list of StepRecord
        self.step_records = StepLog()
        self.finished_requests: list[FinishedRequest] = []  # retired requests: times and counts only
        # (step, tokens the live sequences hold) of each step that ran a batch (with record_memory)
        self.logical_tokens = ChunkedRows(2, np.int64)
        self._inflight = None  # async scheduling: the launched step whose tokens are not read yet
        self._launched = None  # the newest launched step's handle: the fence waits for it
        self._beam_requests = 0  # live beam-search requests: while any, steps run synchronously
        self._earlier: list[RequestOutput] = []  # outputs of a step read back before this step's own
        self._wait_s = 0.0
        self._fence_s = 0.0  # this step's wait for the step in flight, asked by the allocator
        self.allocator.set_fence(self._fence)
        self.output_processor = OutputProcessor(self.tokenizer if config.detokenize else None)
        self.isolator = FaultIsolator(self)
        self.num_generation_tokens = 0  # tokens sampled, all requests

    # -- construction (the steps of __init__, in order) ------------------------------------------
    def _build_model(self, simulate: bool) -> None:
        """The weights (none in simulate mode), on one device or a tensor-parallel group."""
        config, mc, tp = self.config, self.model_config, self.config.tensor_parallel_size
        self.model = None
        self.tp_group = None
        if not simulate:
            if config.enable_pdl:  # refused before anything is said or built
                pdl.check_supported(self.device)
            if self.device == "cpu" and mc.num_params > CPU_SLOW_PARAMS:  # said before minutes of weight init
                log.warning("%s: %.1fB parameters on the CPU: building the weights takes minutes and a step seconds "
                            "(a GPU: device=cuda; kvlab run mode=simulate for figures without one)",
                            config.model, mc.num_params / 1e9)
            torch.manual_seed(config.seed)
            if tp > 1:
                self.tp_group = start_tp_group(config, mc, self.max_model_len, self.dtype, self.device)
                self.model = self.tp_group.load_model(config.seed)
            else:
                self.model = load_model(mc, config.model, self.max_model_len, self.dtype, self.device, config.seed)
                if self.device.startswith("cuda"):
                    self.model.fuse(config.fused_gemv_max_tokens)
                self.model.pdl = config.enable_pdl  # (checked above, before the weights were made)
            self.model.set_kv_cache_dtype(self.kv_dtype, config.kv_scale)
        if self.device == "cpu":
            threads = config.cpu_threads or (1 if mc.num_params < 50_000_000 else 0)
            if threads:
                torch.set_num_threads(threads)

    def _build_allocator(self, spec: KVCacheSpec) -> None:
        """The KV allocator over the pool the config (or, on a GPU, the memory left) allows."""
        config, mc = self.config, self.model_config
        capacity = self._kv_capacity_tokens(spec)
        cls = allocator_class(config.allocator)
        alloc_args = checked_args(cls, dict(config.allocator_args))
        if cls.supports_prefix_caching:
            # the allocator hashes full blocks only when the scheduler will look them up
            alloc_args.setdefault("enable_prefix_caching", config.enable_prefix_caching)
        if cls.supports_swap and config.preemption_mode == "swap":
            swap_tokens = (capacity if config.swap_space is None
                           else int(config.swap_space * 2**30) // spec.bytes_per_token)
            alloc_args.setdefault("swap_space_tokens", swap_tokens)
        host_tokens = config.host_tier_tokens(spec.bytes_per_token)
        if host_tokens:
            if not cls.supports_host_tier:
                raise ValueError(f"allocator '{config.allocator}' has no host KV tier: use allocator=paged, "
                                 "or host_kv_cache_memory=0")
            alloc_args.setdefault("host_tier_tokens", host_tokens)
            alloc_args.setdefault("host_tier_policy", config.host_tier_policy)
            alloc_args.setdefault("host_transfer_blocks", config.host_transfer_blocks)
        # layer groups (kv_grouping=shared): window-aware allocation for sliding-window layers
        self.allocator = grouped_allocator(
            cls, mc.layer_windows(), config.kv_grouping, config.max_num_batched_tokens,
            spec=spec, capacity_tokens=capacity, max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len, **alloc_args)
        if self.allocator.max_fit_tokens() <= 0:
            raise ValueError(
                f"allocator '{config.allocator}' cannot fit a single request: its pool holds "
                f"{self.allocator.capacity_tokens} tokens but each request reserves {self.max_model_len} "
                "(max_model_len): raise kv_cache_memory / kv_cache_tokens or lower max_model_len")
        if self.tp_group is not None:  # rank 0 records its allocator calls (scheduler's too); the workers replay them
            self.allocator = self.tp_group.mirror(self.allocator, config.allocator, alloc_args)
        # in tokens of the whole model (a layer-grouped allocator counts tokens of one group)
        self.kv_capacity_tokens = self.allocator.capacity_tokens * self.allocator.bytes_per_token // spec.bytes_per_token
        log.info("KV cache: %d tokens, max concurrency %.2fx for %d-token requests (%s)",
                 self.kv_capacity_tokens, self.kv_capacity_tokens / self.max_model_len,
                 self.max_model_len, config.allocator)

    def _build_runner(self, runner_factory: Callable[[KVAllocator], object] | None) -> None:
        """What runs a step: the model runner, a tensor-parallel group's, or simulate's."""
        config = self.config
        if self.tp_group is not None:
            self.runner = self.tp_group.runner(self.model, self.allocator, self.eos_token_ids)
        else:
            self.runner = (runner_factory(self.allocator) if runner_factory is not None else
                           ModelRunner(self.model, self.allocator, self.device, self.eos_token_ids, config.seed,
                                       config.max_num_seqs, self.max_model_len, config.enforce_eager,
                                       graph_max_tokens=config.graph_max_tokens,
                                       max_num_batched_tokens=config.max_num_batched_tokens,
                                       graph_mode=config.cuda_graph_mode,
                                       prompt_qkv=config.prompt_attention == "qkv",
                                       kv_calibration=(config.kv_scale_granularity
                                                       if self.kv_dtype != self.dtype and config.kv_scale is None
                                                       else "")))

    # -- capacity ------------------------------------------------------------------------
    def _kv_capacity_tokens(self, spec: KVCacheSpec) -> int:
        c = self.config
        if c.kv_cache_tokens is not None:
            return int(c.kv_cache_tokens)
        if c.kv_cache_memory is not None:
            return int(c.kv_cache_memory) // spec.bytes_per_token
        if not self.device.startswith("cuda"):
            return c.cpu_kv_cache_memory // spec.bytes_per_token
        if self.tp_group is not None:
            return self.tp_group.profile_kv_budget(self, spec) // spec.bytes_per_token
        from engine.profiling import profile_kv_budget

        return profile_kv_budget(self, spec) // spec.bytes_per_token

    def kv_memory_summary(self) -> dict:
        """The KV pool per GPU and over all tensor-parallel GPUs (every GPU holds every token, for
        its share of the KV heads), and the tokens a virtual page holds with this GPU's heads."""
        tp = self.config.tensor_parallel_size
        per_gpu = self.allocator.capacity_tokens * self.allocator.bytes_per_token
        out = dict(tensor_parallel_size=tp, kv_heads_per_gpu=self.model_config.num_key_value_heads // tp,
                   kv_pool_bytes_per_gpu=per_gpu, kv_pool_bytes_total=per_gpu * tp)
        page_tokens = getattr(self.allocator, "page_tokens", None)
        if page_tokens is not None:
            out.update(kv_page_bytes=self.allocator.page_size, kv_tokens_per_page=page_tokens,
                       kv_shared_page_maps=getattr(self.allocator, "num_shared_maps", 0))  # prefix sharing
        windows = self.model_config.layer_windows()
        out.update(kv_cache_dtype=str(self.kv_dtype).removeprefix("torch."),
                   kv_bytes_per_token=self.kv_spec.bytes_per_token,  # every layer (a grouped allocator's spec: one group)
                   sliding_window=self.model_config.sliding_window or 0,
                   num_windowed_layers=sum(1 for w in windows if w), kv_grouping=self.config.kv_grouping)
        groups = getattr(self.allocator, "summary", None)
        if groups is not None:  # layer groups: what each holds (mean over steps, peak) and padding's share
            g = groups()
            out.update(kv_group_size=g["group_size"], kv_num_groups=g["num_groups"],
                       kv_padding_layers=g["padding_layers"], kv_padding_mean_bytes=g["padding_mean_bytes"])
            for kind, w in (("full", False), ("windowed", True)):
                mine = [x for x in g["groups"] if bool(x["window"]) == w]
                out[f"kv_{kind}_groups_mean_bytes"] = sum(x["mean_bytes"] for x in mine)
                out[f"kv_{kind}_groups_peak_bytes"] = sum(x["peak_bytes"] for x in mine)
        return out

    def close(self) -> None:
        """Release the KV pool and stop the tensor-parallel workers (the engine is unusable after).

        The runner froze what start-up made (``gc.freeze``); unfreezing lets the collector take
        the engine's reference cycles once it is dropped, its weights and CUDA graphs with them
        (a process that builds engine after engine would otherwise keep every one)."""
        self.allocator.set_fence(None)  # the engine's bound method: a cycle through the allocator
        self._launched = self._inflight = None
        self.allocator.close()
        if self.tp_group is not None:
            self.tp_group.close()
        for name in ("graphs", "piecewise"):
            if getattr(self.runner, name, None) is not None:
                setattr(self.runner, name, None)
        gc.unfreeze()

    # -- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, oracle_len: int = 0) -> None:
        params = params or SamplingParams()
        text, ids = self.encode(prompt)
        self.validate(request_id, ids, params)
        arrival = self.clock() if arrival_time is None else arrival_time
        seqs = [Sequence(request_id, ids, params, self.max_model_len, arrival_time=arrival, index=i,
                         oracle_len=oracle_len) for i in range(params.num_seqs)]
        req = self.requests[request_id] = RequestState(request_id, text, ids, params, seqs, arrival)
        if params.beam_width > 1:
            self._beam_requests += 1
            self.scheduler.has_beams = True
        self.output_processor.add(req)
        if self.output_processor.is_quiet(req, self.config.stream_outputs):
            for s in seqs:
                s.quiet = True
        if params.num_seqs > 1 and len(ids) >= 2:
            # one sequence computes the prompt; the others fork from it (sharing its KV where
            # the allocator can) and each computes the last prompt token and samples itself
            # (beam search: the k beams start as k copies of the prompt, see _beam_step)
            seqs[0].fork_pending = params.num_seqs - 1
            req.unborn = seqs[1:]
            self.scheduler.add(seqs[0])
        else:
            for s in seqs:
                self.scheduler.add(s)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                self._finish_seq(seq, "abort")
        self._retire(req)

    def fail_request(self, request_id: str, error: str) -> RequestOutput | None:
        """End a request with finish reason "error" (a step that only it makes fail)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        log.error("request %s failed: %s", request_id, error)
        for seq in req.seqs:
            if not seq.finished:
                self._finish_seq(seq, "error")
        for seq in req.unborn:
            seq.status, seq.finish_reason = SeqStatus.FINISHED, "error"
        req.unborn = []
        req.finished = True
        out = self.output_processor.output(req, error=error)
        self._retire(req)
        return out

    def undo(self, seqs: list[Sequence]) -> None:
        """Running sequences back to the queue, KV dropped (recomputed when readmitted); tokens
        sampled but not read back are forgotten, with the in-flight step (whose sequences are
        undone too: their last token must be sampled again)."""
        seqs = list(seqs)
        self._fence()  # what a launched step still uses may be unmapped next
        if self._inflight is not None:
            seqs += [s for s in self._inflight.seqs if s.status == SeqStatus.RUNNING and s not in seqs]
            self._inflight = None
        release = getattr(self.runner, "release", None)
        for s in seqs:
            s.drop_pending()
            if release is not None:
                release(s)
        self.scheduler.requeue(seqs)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
