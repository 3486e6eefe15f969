"""Seeded request generators: the traffic every experiment replays.

A workload is a list of :class:`RequestSpec` (prompt tokens, exact output length, arrival
offset, ``n``).  Runs use ``ignore_eos``, so ``output_len`` is the number of tokens each
sample produces, and the simulator and the real engine see the same lengths.

Every workload is a pure function of its :class:`WorkloadConfig`, ``vocab_size`` and
``max_model_len``.  The seed is split into three independent streams (lengths, token ids,
arrival gaps), so a request-rate sweep replays *the same requests* at each rate.

Lengths are clipped so that ``1 <= prompt_len`` and ``1 <= output_len`` and
``prompt_len + output_len <= max_model_len``.

Add a workload with ``@register_workload("name", uses=(...))`` on a function
``(cfg, ctx) -> list[RequestSpec]``; ``uses`` names the optional config fields it reads
(any other optional field that is set raises, so a typo'd sweep never runs silently).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from allocators.checks import is_int
# the length distributions live in workload_lengths.py; the request, config and context types and the
# registry of generators in workload_types.py
from experiments.workload_lengths import _NORMAL, ALPACA, SHAREGPT, DatasetLengths, LogNormalLengths
# trace replay (the ``trace`` workload, its line checks, tokenize_requests) lives in workload_trace.py
from experiments.workload_trace import (
    _TRACE_KEYS, MAX_ARRIVAL_S, MAX_TRACE_N, _say_cut, _trace_record, log, tokenize_requests, trace,
)
from experiments.workload_types import (
    _OPTIONAL, _RANGES, _USES, WORKLOADS, Generator, RequestSpec, WorkloadConfig, WorkloadContext,
    available_workloads, register_workload,
)

__all__ = [
    "RequestSpec", "WorkloadConfig", "WorkloadContext", "LogNormalLengths", "SHAREGPT", "ALPACA",
    "WORKLOADS", "register_workload", "available_workloads", "make_workload", "arrival_times",
    "tokenize_requests", "at_time_zero", "DatasetLengths", "_NORMAL", "Generator",
    "MAX_ARRIVAL_S", "MAX_TRACE_N", "trace", "log", "_TRACE_KEYS", "_say_cut", "_trace_record",
]


# ---------------------------------------------------------------- generators


def _lengths(rng: np.random.Generator, size: int, exact: int, lo: int | None, hi: int | None):
    """Uniform integers in [lo, hi] when a range is given, else ``exact`` for every request."""
    if lo is None:
        return np.full(size, exact, dtype=np.int64)
    return rng.integers(lo, hi + 1, size=size)


def _prompts_and_outputs(cfg: WorkloadConfig, ctx: WorkloadContext):
    rng, n = ctx.lengths_rng, cfg.num_requests
    prompt = _lengths(rng, n, cfg.input_len, cfg.input_len_min, cfg.input_len_max)
    output = _lengths(rng, n, cfg.output_len, cfg.output_len_min, cfg.output_len_max)
    return ctx.clip(prompt, output)


def _random_prompts(cfg: WorkloadConfig, ctx: WorkloadContext, prompt, output) -> list[RequestSpec]:
    return ctx.specs([ctx.tokens(p) for p in prompt], output, cfg.n)


@register_workload("fixed")
def fixed(cfg: WorkloadConfig, ctx: WorkloadContext) -> list[RequestSpec]:
    """Every request has exactly ``input_len`` prompt and ``output_len`` output tokens."""
    return _random_prompts(cfg, ctx, *_prompts_and_outputs(cfg, ctx))


@register_workload("uniform", uses=_RANGES)
def uniform(cfg: WorkloadConfig, ctx: WorkloadContext) -> list[RequestSpec]:
    """Lengths uniform over ``[*_len_min, *_len_max]`` (inclusive).

    Without a range, ``[L - L//2, L + L//2]`` around ``input_len`` / ``output_len`` (mean L,
    like vLLM's random dataset with range ratio 0.5)."""
    cfg = dataclasses.replace(cfg)
    for kind in ("input", "output"):
        mean = getattr(cfg, f"{kind}_len")
        if getattr(cfg, f"{kind}_len_min") is None:
            setattr(cfg, f"{kind}_len_min", mean - mean // 2)
            setattr(cfg, f"{kind}_len_max", mean + mean // 2)
    return _random_prompts(cfg, ctx, *_prompts_and_outputs(cfg, ctx))


@register_workload("sharegpt")
def sharegpt(cfg: WorkloadConfig, ctx: WorkloadContext) -> list[RequestSpec]:
    """ShareGPT-like lengths: mean input 161, output 338, heavy tailed (see ``SHAREGPT``)."""
    prompt, output = SHAREGPT.sample(ctx.lengths_rng, cfg.num_requests, ctx.max_model_len)
    return _random_prompts(cfg, ctx, prompt, output)


@register_workload("alpaca")
def alpaca(cfg: WorkloadConfig, ctx: WorkloadContext) -> list[RequestSpec]:
    """Alpaca-like lengths: mean input 19, output 58 (see ``ALPACA``)."""
    prompt, output = ALPACA.sample(ctx.lengths_rng, cfg.num_requests, ctx.max_model_len)
    return _random_prompts(cfg, ctx, prompt, output)


@register_workload("parallel", uses=_RANGES)
def parallel(cfg: WorkloadConfig, ctx: WorkloadContext) -> list[RequestSpec]:
    """``n`` samples per prompt (n >= 2); lengths exact, or uniform where a range is set.

    ``n`` works with every workload: ``name=alpaca n=4`` is the PagedAttention paper's
    parallel-sampling setup."""
    return _random_prompts(cfg, ctx, *_prompts_and_outputs(cfg, ctx))


@register_workload("shared_prefix", uses=_RANGES + ("prefix_len", "num_prefixes"))
def shared_prefix(cfg: WorkloadConfig, ctx: WorkloadContext) -> list[RequestSpec]:
    """k-shot prompts: ``num_prefixes`` random prefixes of ``prefix_len`` tokens; request i
    uses prefix ``i % num_prefixes`` (round robin: equal groups, interleaved arrivals)
    followed by its own ``input_len`` suffix (uniform where a range is set)."""
    prefixes = [ctx.tokens(cfg.prefix_len) for _ in range(cfg.num_prefixes)]
    rng, n = ctx.lengths_rng, cfg.num_requests
    suffix = _lengths(rng, n, cfg.input_len, cfg.input_len_min, cfg.input_len_max)
    output = _lengths(rng, n, cfg.output_len, cfg.output_len_min, cfg.output_len_max)
    # the prefix is never cut: the suffix and output give way (prefix_len <= max_model_len - 2)
    suffix = np.clip(suffix, 1, ctx.max_model_len - 1 - cfg.prefix_len)
    prompt, output = ctx.clip(cfg.prefix_len + suffix, output)
    prompts = [prefixes[i % cfg.num_prefixes] + ctx.tokens(s) for i, s in enumerate(suffix)]
    return ctx.specs(prompts, output, cfg.n)


def _conversations(cfg: WorkloadConfig) -> tuple[int, list[tuple[int, int]]]:
    """(conversations, [(conversation, turn)] in request order): turn t of every conversation
    before turn t+1 of any, so arrivals (increasing along the list) keep each conversation's turns
    in order, ``conversations`` requests apart (the think time between two turns)."""
    convs = -(-cfg.num_requests // cfg.turns)
    order = [(c, t) for t in range(cfg.turns) for c in range(convs)]
    return convs, [(c, t) for c, t in order if c * cfg.turns + t < cfg.num_requests]


@register_workload("chatbot", uses=("turns", "history_len"))
def chatbot(cfg: WorkloadConfig, ctx: WorkloadContext) -> list[RequestSpec]:
    """Conversations of ``turns`` ShareGPT-like exchanges (the PagedAttention paper's chatbot):
    the prompt of a turn is the conversation so far (earlier questions and answers) and the new
    question, cut to its last ``history_len`` tokens (1024 in the paper). Earlier answers are
    drawn tokens, not what the engine generated, so what a prefix cache can reuse is the previous
    turn's prompt."""
    history_len = cfg.history_len or 1024
    convs, order = _conversations(cfg)
    rng = ctx.lengths_rng
    user, reply = SHAREGPT.sample(rng, len(order), ctx.max_model_len)
    history: list[list[int]] = [[] for _ in range(convs)]
    prompts, outputs = [], []
    for (c, _), u, r in zip(order, user, reply):
        question = ctx.tokens(u)
        prompt = (history[c] + question)[-min(history_len, ctx.max_model_len - 1):]
        out = int(np.clip(r, 1, ctx.max_model_len - len(prompt)))
        prompts.append(prompt)
        outputs.append(out)
        history[c] = history[c] + question + ctx.tokens(out)
    specs = ctx.specs(prompts, outputs, cfg.n)
    for spec, (c, t) in zip(specs, order):
        spec.request_id = f"chat{c}-turn{t}"
    return specs


@register_workload("multi_turn", uses=_RANGES + ("turns", "prefix_hit_rate"))
def multi_turn(cfg: WorkloadConfig, ctx: WorkloadContext) -> list[RequestSpec]:
    """Conversations with a set prefix-hit rate: every follow-up prompt begins with the first
    ``round(prefix_hit_rate x its length)`` tokens of the conversation's previous prompt (as many
    as that has) and ends in fresh tokens, so an ideal token-level prefix cache reuses
    ``prefix_hit_rate`` of every follow-up prompt (block caches: whole blocks of it). Lengths as
    ``uniform``/``fixed``."""
    hit = cfg.prefix_hit_rate if cfg.prefix_hit_rate is not None else 0.5
    convs, order = _conversations(cfg)
    prompt_lens, outputs = _prompts_and_outputs(dataclasses.replace(cfg, num_requests=len(order)), ctx)
    last: dict[int, list[int]] = {}
    prompts = []
    for (c, _), n in zip(order, prompt_lens):
        keep = min(int(round(hit * n)), len(last.get(c, ())))
        prompt = last.get(c, [])[:keep] + ctx.tokens(n - keep)
        prompts.append(prompt)
        last[c] = prompt
    specs = ctx.specs(prompts, outputs, cfg.n)
    for spec, (c, t) in zip(specs, order):
        spec.request_id = f"conv{c}-turn{t}"
    return specs


# ---------------------------------------------------------------- arrivals


def arrival_times(num: int, request_rate: float, arrival: str = "poisson",
                  burstiness: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Arrival offsets (s) as vLLM's benchmark_serving: the first request at 0, then gaps
    exponential with mean 1/rate (poisson) or gamma with shape=burstiness and
    scale=1/(rate*burstiness) (mean 1/rate, coefficient of variation 1/sqrt(burstiness):
    below 1 burstier than Poisson, above 1 more regular)."""
    if math.isinf(request_rate):
        return np.zeros(num)
    rng = rng if rng is not None else np.random.default_rng()
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / request_rate, size=num)
    else:
        gaps = rng.gamma(burstiness, 1.0 / (request_rate * burstiness), size=num)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


# ---------------------------------------------------------------- entry point


MAX_REQUESTS = 10_000_000  # ~25 GB and hours of simulate: beyond it a typo, not a study
MAX_TOKENS = (1 << 31) - 1


def _as_int(cfg: WorkloadConfig, key: str, minimum: int, optional: bool = False, maximum: int = MAX_TOKENS,
            why: str = "") -> None:
    v = getattr(cfg, key)
    if v is None and optional:
        return
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not is_int(v) or not minimum <= v <= maximum:
        raise ValueError(f"workload.{key} must be an integer in [{minimum}, {maximum}]{why}, got {v!r}")
    setattr(cfg, key, v)


def _validate(cfg: WorkloadConfig, vocab_size: int, max_model_len: int, low: int) -> WorkloadConfig:
    cfg = dataclasses.replace(cfg)  # never mutate the caller's config
    if cfg.name not in WORKLOADS:
        raise ValueError(f"unknown workload '{cfg.name}': set workload.name to one of "
                         f"{available_workloads()}")
    _as_int(cfg, "num_requests", 1, maximum=MAX_REQUESTS)
    for key in ("input_len", "output_len"):
        _as_int(cfg, key, 1)
    for key in ("n", "beam_width"):
        _as_int(cfg, key, 1, maximum=1024)
    for key in _RANGES:
        _as_int(cfg, key, 1, optional=True)
    _as_int(cfg, "prefix_len", 0)
    # more prefixes or turns than requests go unused (and would all be built first)
    most = max(cfg.num_requests, 1024)
    for key in ("num_prefixes", "turns"):
        _as_int(cfg, key, 1, maximum=most, why=" (num_requests, or 1024 where that is less)")
    _as_int(cfg, "history_len", 1, optional=True)
    _as_int(cfg, "seed", 0, maximum=(1 << 63) - 1)
    if cfg.prefix_hit_rate is not None:
        try:
            if isinstance(cfg.prefix_hit_rate, bool):
                raise TypeError
            cfg.prefix_hit_rate = float(cfg.prefix_hit_rate)
        except (TypeError, ValueError):
            cfg.prefix_hit_rate = math.nan
        if not 0.0 <= cfg.prefix_hit_rate <= 1.0:
            raise ValueError(f"workload.prefix_hit_rate must be in [0, 1] (the share of a follow-up prompt "
                             f"that repeats the previous one), got {cfg.prefix_hit_rate}")
    for key, unset in _OPTIONAL.items():
        if getattr(cfg, key) != unset and key not in _USES[cfg.name]:
            raise ValueError(f"workload.{key} is not used by workload '{cfg.name}': remove it "
                             f"(it is read by {sorted(k for k, u in _USES.items() if key in u)})")
    for kind in ("input", "output"):
        lo, hi = getattr(cfg, f"{kind}_len_min"), getattr(cfg, f"{kind}_len_max")
        if (lo is None) != (hi is None):
            raise ValueError(f"workload.{kind}_len_min and {kind}_len_max go together: set both")
        if lo is not None and lo > hi:
            raise ValueError(f"workload.{kind}_len_min ({lo}) > {kind}_len_max ({hi})")
    # the drawn prompts' shortest (uniform without a range: input_len - input_len // 2); every
    # prompt at max_model_len or more would be clipped to max_model_len - 1 with one output token
    key = "input_len_min" if cfg.input_len_min is not None else "input_len"
    shortest = getattr(cfg, key) - (cfg.input_len // 2 if cfg.name == "uniform" and key == "input_len" else 0)
    if cfg.name in ("fixed", "uniform", "parallel", "multi_turn") and shortest >= max_model_len:
        raise ValueError(f"workload.{key}={getattr(cfg, key)}: no prompt that long fits max_model_len={max_model_len} with an "
                         "output token: lower it or raise engine.max_model_len")
    if cfg.name == "shared_prefix" and not 1 <= cfg.prefix_len <= max_model_len - 2:
        raise ValueError(f"workload.prefix_len must be in [1, max_model_len - 2 = "
                         f"{max_model_len - 2}] for shared_prefix, got {cfg.prefix_len}")
    if cfg.name == "shared_prefix" and cfg.prefix_len + shortest >= max_model_len:
        raise ValueError(f"workload.prefix_len + workload.{key} = {cfg.prefix_len} + {shortest}: no prompt that long fits "
                         f"max_model_len={max_model_len} with an output token: lower them or raise engine.max_model_len")
    if cfg.beam_width > 1 and cfg.n > cfg.beam_width:
        raise ValueError(f"workload.n ({cfg.n}) must be <= workload.beam_width ({cfg.beam_width}): "
                         "beam search returns the n best of its beams")
    if cfg.name == "parallel" and cfg.n < 2:
        raise ValueError("workload 'parallel' needs workload.n >= 2 samples per prompt")
    if cfg.name == "trace":
        if cfg.trace_path is None or not Path(cfg.trace_path).is_file():
            raise ValueError(f"workload.trace_path must name a local JSONL file, got {cfg.trace_path!r}")
    try:
        if isinstance(cfg.request_rate, bool) or isinstance(cfg.burstiness, bool):
            raise TypeError
        cfg.request_rate = float(cfg.request_rate)
        cfg.burstiness = float(cfg.burstiness)
    except (TypeError, ValueError):
        raise ValueError("workload.request_rate and workload.burstiness must be numbers "
                         "(request_rate=inf for offline)") from None
    if not cfg.request_rate > 0:
        raise ValueError(f"workload.request_rate must be > 0 req/s (inf = all at t=0), got {cfg.request_rate}")
    if cfg.arrival not in ("poisson", "gamma"):
        raise ValueError(f"workload.arrival must be 'poisson' or 'gamma', got {cfg.arrival!r}")
    if not (cfg.burstiness > 0 and math.isfinite(cfg.burstiness)):
        raise ValueError(f"workload.burstiness must be a finite number > 0, got {cfg.burstiness}")
    if cfg.arrival == "poisson" and cfg.burstiness != 1.0:
        raise ValueError("workload.burstiness only applies to gamma arrivals: set workload.arrival=gamma")
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2 (one prompt and one output token), got {max_model_len}")
    if vocab_size <= low:
        raise ValueError(f"vocab_size ({vocab_size}) must exceed the lowest token id drawn ({low})")
    return cfg


def check_workload(cfg: WorkloadConfig | Mapping, vocab_size: int, max_model_len: int,
                   *, low: int = 4) -> WorkloadConfig:
    """``cfg`` as a checked WorkloadConfig, without drawing a request (a sweep checks every run's
    workload before the first starts); ValueError names the field and the fix."""
    if not isinstance(cfg, WorkloadConfig):
        if not isinstance(cfg, Mapping):
            raise ValueError(f"workload config must be a WorkloadConfig or a mapping, got {type(cfg).__name__}")
        cfg = WorkloadConfig.from_dict(cfg)
    return _validate(cfg, vocab_size, max_model_len, low)


def make_workload(cfg: WorkloadConfig | Mapping, vocab_size: int, max_model_len: int,
                  *, low: int = 4) -> list[RequestSpec]:
    """Build the requests of a workload.

    ``cfg`` is a WorkloadConfig or a mapping with its fields (a Hydra DictConfig works).
    Prompt token ids are drawn uniformly from ``[low, vocab_size)``; ``low=4`` skips the ids
    that OPT and Llama-2 tokenizers reserve for pad/bos/eos/unk.
    """
    cfg = check_workload(cfg, vocab_size, max_model_len, low=low)
    lengths_ss, tokens_ss, arrivals_ss = np.random.SeedSequence(cfg.seed).spawn(3)
    ctx = WorkloadContext(vocab_size, max_model_len, np.random.default_rng(lengths_ss),
                          np.random.default_rng(tokens_ss), low)
    specs = WORKLOADS[cfg.name](cfg, ctx)
    if math.isfinite(cfg.request_rate):
        times = arrival_times(len(specs), cfg.request_rate, cfg.arrival, cfg.burstiness,
                              np.random.default_rng(arrivals_ss))
        for spec, t in zip(specs, times):
            spec.arrival_s = float(t)
    for i, spec in enumerate(specs):
        spec.request_id = spec.request_id or f"{cfg.name}-{i}"
        spec.beam_width = cfg.beam_width
    return specs


def at_time_zero(specs: list[RequestSpec]) -> list[RequestSpec]:
    """Every request at t=0, as mode=offline sends them (a trace's ``arrival_s`` are replayed by
    mode=online and simulate only)."""
    return [dataclasses.replace(s, arrival_s=0.0) if s.arrival_s else s for s in specs]
