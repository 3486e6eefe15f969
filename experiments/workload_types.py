"""What a workload is (``experiments.workloads``): the requests it makes (:class:`RequestSpec`),
its configuration (:class:`WorkloadConfig`), what a generator draws from (:class:`WorkloadContext`),
and the registry of generators (``register_workload``, ``WORKLOADS``) with the optional config
fields each one reads."""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass
class RequestSpec:
    request_id: str
    prompt_token_ids: list[int]   # random ids in [low, vocab_size) unless the trace gave text
    output_len: int               # max_tokens; run with ignore_eos, so the exact output length
    arrival_s: float = 0.0        # offset from run start
    n: int = 1                    # parallel samples
    prompt_text: str | None = None  # trace replay with text prompts (ids empty until tokenized)
    beam_width: int = 1           # beam search width (1: none)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class WorkloadConfig:
    """Mirrors the Hydra group ``conf/workload/*.yaml``."""

    name: str = "uniform"          # fixed | uniform | sharegpt | alpaca | shared_prefix | parallel | trace
    #                                | chatbot | multi_turn
    num_requests: int = 32
    input_len: int = 64            # fixed: exact; uniform: mean when input_len_min/max are unset
    output_len: int = 32
    input_len_min: int | None = None
    input_len_max: int | None = None
    output_len_min: int | None = None
    output_len_max: int | None = None
    prefix_len: int = 0            # shared_prefix: tokens shared by every request of a group
    num_prefixes: int = 1          # shared_prefix: number of groups (distinct prefixes)
    n: int = 1                     # parallel samples per request (any workload)
    beam_width: int = 1            # beam search of this width per request (any workload; 1: none)
    turns: int = 1                 # chatbot, multi_turn: requests per conversation
    history_len: int | None = None  # chatbot: a prompt keeps the last history_len tokens (default 1024)
    prefix_hit_rate: float | None = None  # multi_turn: share of a follow-up prompt repeating the last one
    trace_path: str | None = None  # trace: local JSONL
    request_rate: float = float("inf")  # req/s; inf = all at t=0 (offline)
    arrival: str = "poisson"       # poisson | gamma
    burstiness: float = 1.0        # gamma shape; 1.0 == poisson
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Mapping) -> WorkloadConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                hint = difflib.get_close_matches(str(key), names, n=1)
                fix = f"did you mean workload.{hint[0]}?" if hint else f"valid keys: {names}"
                raise ValueError(f"unknown workload field '{key}': {fix}")
        return cls(**{str(k): v for k, v in d.items()})


@dataclass
class WorkloadContext:
    vocab_size: int
    max_model_len: int
    lengths_rng: np.random.Generator
    tokens_rng: np.random.Generator
    low: int = 4

    def tokens(self, length: int) -> list[int]:
        return self.tokens_rng.integers(self.low, self.vocab_size, size=int(length)).tolist()

    def clip(self, prompt_len, output_len):
        """Clip (vectorised) so that prompt >= 1, output >= 1, prompt + output <= max_model_len."""
        prompt = np.clip(prompt_len, 1, self.max_model_len - 1)
        return prompt, np.clip(output_len, 1, self.max_model_len - prompt)

    def specs(self, prompts: list[list[int]], outputs, n: int) -> list[RequestSpec]:
        return [RequestSpec("", p, int(o), n=n) for p, o in zip(prompts, outputs)]


Generator = Callable[[WorkloadConfig, WorkloadContext], list[RequestSpec]]
WORKLOADS: dict[str, Generator] = {}
_USES: dict[str, frozenset[str]] = {}
# optional fields: a workload that does not read one must not see it set
_OPTIONAL = {"input_len_min": None, "input_len_max": None, "output_len_min": None,
             "output_len_max": None, "prefix_len": 0, "num_prefixes": 1, "trace_path": None,
             "turns": 1, "history_len": None, "prefix_hit_rate": None}
_RANGES = ("input_len_min", "input_len_max", "output_len_min", "output_len_max")


def register_workload(name: str, uses: tuple[str, ...] = ()) -> Callable[[Generator], Generator]:
    def deco(fn: Generator) -> Generator:
        WORKLOADS[name] = fn
        _USES[name] = frozenset(uses)
        return fn

    return deco


def available_workloads() -> list[str]:
    return sorted(WORKLOADS)
