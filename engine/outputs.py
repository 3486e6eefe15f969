"""What the engine hands back: one RequestOutput per request, one CompletionOutput per sample.

With ``SamplingParams.output_kind='delta'`` the per-sample lists and ``text`` hold only what
is new since the request's previous output (streaming at O(new tokens) per step); with
``cumulative`` and ``final_only`` they hold everything so far.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

import numpy as np

TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0  # all samples, so far
    n: int = 1
    max_tokens: int | None = None
    # gaps between consecutive tokens of each sample (seconds); filled on the finished output only
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2el(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None  # of each sampled token
    token_times: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] | None = None  # per token, when SamplingParams.logprobs = k > 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """vLLM's: the sum of the sampled tokens' logprobs, None unless SamplingParams.logprobs is
        set (it is the sum of ``logprobs``, so with output_kind='delta' it covers this output's
        tokens only, where vLLM's keeps the running total)."""
        return None if self.logprobs is None else math.fsum(self.logprobs)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt: str | None = None
    # per prompt token (the first is None: nothing predicts it) when SamplingParams.prompt_logprobs
    # is set; with output_kind='delta' only on the first output
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    error: str | None = None  # why the engine failed this request (finish_reason "error")

    # the single-sample case reads like vLLM's ``outputs[0]``
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text


@dataclass(slots=True)
class FinishedSeq:
    """What ``LLMEngine.finished_requests`` keeps of a finished sample: its times and counts
    (the per-request table of experiments), not its token ids."""

    seq_id: int
    index: int
    prompt_len: int
    num_output_tokens: int
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_preemptions: int
    num_cached_tokens: int
    finish_reason: str | None
    stop_reason: int | str | None
    itl: np.ndarray  # float64: the gaps between its consecutive tokens (seconds)
    num_host_cached_tokens: int = 0  # of num_cached_tokens, loaded from the host KV tier
    num_recomputed_tokens: int = 0  # prompt tokens computed again because their cached KV was evicted

    @classmethod
    def of(cls, seq) -> FinishedSeq:
        t = seq.token_times
        itl = np.diff(np.array(t, dtype=np.float64)) if len(t) > 1 else np.zeros(0)
        return cls(seq.seq_id, seq.index, seq.prompt_len, seq.num_output_tokens, seq.first_scheduled_time,
                   seq.first_token_time, seq.finish_time, seq.num_preemptions, seq.num_cached_tokens,
                   seq.finish_reason, seq.stop_reason, itl, seq.num_host_cached_tokens, seq.num_recomputed_tokens)


@dataclass(slots=True)
class FinishedRequest:
    """A retired request as ``LLMEngine.finished_requests`` keeps it: a few numbers per sample,
    so a long run does not hold every token it produced."""

    request_id: str
    prompt_token_ids: array  # 'i' (4 bytes per token)
    params: object  # SamplingParams
    seqs: list[FinishedSeq]
    arrival_time: float
    finished: bool = True

    @classmethod
    def of(cls, req) -> FinishedRequest:
        return cls(req.request_id, array("i", req.prompt_token_ids), req.params,
                   [FinishedSeq.of(s) for s in req.seqs], req.arrival_time, req.finished)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)
