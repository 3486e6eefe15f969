"""Per-request sampling parameters, validated up front (vLLM's names and meanings).

Every field is checked against the range the sampler and the engine can really honour, so
that a hostile value is refused with an error naming the field before any work is queued,
never inside a shared step. What depends on the model (token ids against the vocabulary,
lengths against the context) is checked by ``LLMEngine.validate``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from allocators.checks import is_int, is_real

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (as in vLLM): 1/T would overflow
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; seed + sample index must stay in range
MAX_TOP_K = 2**31 - 1  # larger values mean "no limit" in effect; beyond int32 they overflow tensors
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's limit)
MAX_N = 1024
OUTPUT_KINDS = ("cumulative", "delta", "final_only")
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.001, 1000  # see _problems


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    min_tokens: int = 0
    max_tokens: int | None = 16  # None: up to max_model_len; 0 only with prompt_logprobs (scoring)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the k most likely
    prompt_logprobs: int | None = None  # None, or k: logprob of every prompt token and the k most likely
    # what step() returns for this request while it runs: everything so far, only what is new
    # since the last output (O(new tokens) per step: streaming), or nothing until it finishes
    output_kind: str = "cumulative"
    # beam search: k > 1 keeps the k most likely continuations by cumulative logprob (see
    # ``LLMEngine._beam_step``); the output is the ``n`` best beams (n <= k), best first.
    # As in vLLM's beam search: greedy only (temperature 0, no top_p / top_k); no stop strings
    # (a beam's text changes when it is replaced) and no delta outputs.
    beam_width: int = 1
    # vLLM's penalties (OpenAI's definition for presence / frequency, applied to the output tokens
    # so far: logits -= frequency_penalty * count + presence_penalty * (count > 0); HF's / CTRL's
    # repetition_penalty over prompt and output tokens: a positive logit divided by it, a negative
    # one multiplied) and min_p (after temperature, tokens less likely than min_p times the
    # likeliest are dropped). See ``Sampler``.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    # the stop string that ends a sample stays at the end of its text (and a stop token's or
    # EOS's text, as in vLLM; a special token's text is empty)
    include_stop_str_in_output: bool = False
    # the text of special tokens (BOS, EOS, a chat template's markers) is left out of the output
    # text; false keeps it (vLLM's skip_special_tokens). A stop token's or EOS's text that ends a
    # sample is left out either way, unless include_stop_str_in_output
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):  # a list of them (a lone id or a number is a mistake)
            v = getattr(self, name)
            if v is not None and not isinstance(v, (list, tuple, set, frozenset)):
                raise ValueError(f"invalid SamplingParams: {name} must be a list, got {v!r}")
            setattr(self, name, list(v or []))
        problems = self._problems()
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))
        if self.top_k == 0:
            self.top_k = -1
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            setattr(self, name, float(getattr(self, name)))
        # whether the sampler must count this sample's tokens (a penalty that is not neutral): read
        # per sequence per step, so kept as a plain attribute (set, as the checks run, at construction)
        self.penalized = bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def _problems(self) -> list[str]:
        out: list[str] = []

        def integer(name: str, lo: int, hi: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if not is_int(v) or not lo <= v <= hi:
                out.append(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

        def real(name: str, ok, rng: str) -> None:
            v = getattr(self, name)
            if not is_real(v) or not math.isfinite(v) or not ok(v):
                out.append(f"{name} must be a finite number {rng}, got {v!r}")

        def boolean(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")

        integer("n", 1, MAX_N)
        real("temperature", lambda v: v >= 0, ">= 0")
        real("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        if not is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOP_K:
            out.append(f"top_k must be -1 or 0 (no limit) or an integer in [1, {MAX_TOP_K}], got {self.top_k!r}")
        integer("max_tokens", 0, 2**31 - 1, optional=True)
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            out.append("max_tokens must be >= 1 (0 is only allowed with prompt_logprobs, to score a prompt)")
        hi = self.max_tokens if is_int(self.max_tokens) and self.max_tokens >= 0 else 2**31 - 1  # (one error)
        integer("min_tokens", 0, hi)
        integer("seed", -MAX_SEED - 1, MAX_SEED, optional=True)
        integer("logprobs", 0, MAX_LOGPROBS, optional=True)
        integer("prompt_logprobs", 0, MAX_LOGPROBS, optional=True)
        boolean("ignore_eos")
        if not all(isinstance(s, str) and s for s in self.stop):
            out.append("stop must be a list of non-empty strings")
        if not all(is_int(t) and 0 <= t < 2**31 for t in self.stop_token_ids):
            out.append("stop_token_ids must be non-negative token ids")
        if self.output_kind not in OUTPUT_KINDS:
            out.append(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        real("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        real("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        # vLLM takes any value > 0; beyond these bounds float32 logits divided or multiplied by it
        # overflow (a NaN or infinite row), and 1000 already makes every seen token's logit ~0 or ~-inf
        real("repetition_penalty", lambda v: MIN_REPETITION_PENALTY <= v <= MAX_REPETITION_PENALTY,
             f"in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]")
        real("min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
        boolean("include_stop_str_in_output")
        boolean("skip_special_tokens")
        integer("beam_width", 1, MAX_N)
        if is_int(self.beam_width) and self.beam_width > 1 and not out:
            k = self.beam_width
            if self.n > k:
                out.append(f"n must be <= beam_width with beam search (the n best of {k} beams), got n={self.n}")
            if self.temperature >= SAMPLING_EPS or self.top_p != 1.0 or self.top_k not in (-1, 0):
                out.append("beam search is greedy: it needs temperature=0, top_p=1 and top_k=-1")
            if self.logprobs:
                out.append("beam search gives each token's logprob only: logprobs must be None or 0")
            if self.stop:
                out.append("stop strings are not supported with beam search (use stop_token_ids)")
            if self.output_kind == "delta":
                out.append("output_kind='delta' is not supported with beam search (a beam's tokens can be replaced)")
            if self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1:
                # as vLLM's BeamSearchParams, which has none: beams are ranked by the model's logprobs
                out.append("penalties are not supported with beam search (presence_penalty=0, "
                           "frequency_penalty=0, repetition_penalty=1)")
        return out

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def num_seqs(self) -> int:
        """Sequences the request runs: its beams, or its n samples."""
        return self.beam_width if self.beam_width > 1 else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def generator_seed(self, index: int) -> int:
        """The seed of sample ``index``: distinct per sample, always a valid 64-bit seed."""
        return (self.seed + index) % 2**64
