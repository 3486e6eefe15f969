"""A sequence: the tokens of one sample of a request, and how far its KV is computed."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams

_ids = itertools.count()
PENDING = -1  # a sampled token not yet read back from the device (asynchronous scheduling)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: list.remove / `in` on the batch must not compare every field
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_model_len: int
    arrival_time: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_ids))
    index: int = 0  # sample index within its request (n > 1)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of those, found in the prefix cache at admission
    num_host_cached_tokens: int = 0  # of those, loaded from the host KV tier
    num_recomputed_tokens: int = 0  # prompt tokens computed although cached once (evicted since)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    oracle_len: int = 0  # exact final length where known; else max_len
    fork_pending: int = 0  # n > 1: samples still to fork from this one when its prompt is computed
    followers: list = field(default_factory=list)  # samples preempted with this one, forked from it again
    output_top_logprobs: list = field(default_factory=list)  # per token, when params.logprobs > 0
    detok: object = None  # IncrementalDetokenizer, where text is needed
    num_sent: int = 0  # output tokens already handed out (delta outputs)
    num_decoded: int = 0  # output tokens fed to ``detok``
    final_sent: bool = False  # its finish has been reported (delta outputs)
    prompt_logprobs: list = field(default_factory=lambda: [None])  # per prompt token (params.prompt_logprobs)
    prompt_top_logprobs: list = field(default_factory=lambda: [None])
    cum_logprob: float = 0.0  # beam search: sum of the output tokens' logprobs
    quiet: bool = False  # its request needs no output stage until a sample finishes (set by the engine)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.prompt_len = len(self.prompt_token_ids)
        p = self.params
        cap = self.max_model_len if p.max_tokens is None else self.prompt_len + p.max_tokens
        self.max_len = min(cap, self.max_model_len)
        if self.oracle_len <= 0:
            self.oracle_len = self.max_len
        # output tokens that end it by length (max_tokens=0 still samples one token, then drops it);
        # token_ids is always the prompt followed by output_token_ids
        out_cap = self.max_model_len if p.max_tokens is None else max(p.max_tokens, 1)
        self.done_at = min(out_cap, self.max_model_len - self.prompt_len)
        # only lengths can end it (the benchmark path): no token needs looking at
        self.length_only = p.ignore_eos and not p.stop_token_ids and p.max_tokens != 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def length_done(self) -> bool:
        """Its last token (maybe still pending) ends it by max_tokens or max_model_len."""
        return len(self.output_token_ids) >= self.done_at

    def append_pending(self) -> int:
        """Room for the token being sampled; returns its position."""
        self.token_ids.append(PENDING)
        self.output_token_ids.append(PENDING)
        return len(self.token_ids) - 1

    def resolve(self, pos: int, token_id: int, logprob: float | None, top: list | None, now: float) -> None:
        """The token at ``pos`` is known."""
        self.token_ids[pos] = token_id
        self.output_token_ids[pos - self.prompt_len] = token_id
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if top is not None:
            self.output_top_logprobs.append(top)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)

    def append_token(self, token_id: int, logprob: float | None, now: float) -> int:
        """``append_pending`` and ``resolve`` in one (the token is known at once: synchronous
        runners without a device); returns its position."""
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        return len(self.token_ids) - 1

    def truncate(self, pos: int) -> None:
        """Drop every token after ``pos`` (sampled ahead of a stop found late)."""
        del self.token_ids[pos + 1:]
        n_out = max(pos + 1 - self.prompt_len, 0)
        del self.output_token_ids[n_out:]
        del self.output_logprobs[n_out:]
        del self.output_top_logprobs[n_out:]
        del self.token_times[n_out:]

    def drop_pending(self) -> None:
        """Forget tokens sampled but not read back (a failed step): they will be sampled again."""
        while self.output_token_ids and self.output_token_ids[-1] == PENDING:
            self.output_token_ids.pop()
            self.token_ids.pop()

    def record_prompt_logprobs(self, first: int, logprobs: list[float], top: list | None) -> None:
        """Logprobs of prompt tokens ``first ..``; positions known already (a recompute) are kept."""
        skip = len(self.prompt_logprobs) - first
        if skip < 0:
            raise AssertionError(f"prompt logprobs from {first} but only {len(self.prompt_logprobs)} known")
        self.prompt_logprobs.extend(logprobs[skip:])
        self.prompt_top_logprobs.extend((top or [None] * len(logprobs))[skip:])

    @property
    def num_resolved(self) -> int:
        """Output tokens read back (at most the last one is still in flight)."""
        out = self.output_token_ids
        return len(out) - 1 if out and out[-1] == PENDING else len(out)

    def resolved_output(self) -> list[int]:
        out = self.output_token_ids
        return out[:-1] if out and out[-1] == PENDING else list(out)
