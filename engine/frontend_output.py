"""The front end's output stage: text for the token ids the engine core streams (as vLLM V1 does).

The core behind an AsyncLLMEngine emits token ids only (``EngineCore`` turns its engine's
detokenization off), so that decoding text never lengthens an engine step; here each
request's samples are detokenized incrementally, stop strings are found (the core is told to
end that sample at that token: ``stop_commands``) and outputs are shaped as the caller asked
(``output_kind``), at O(new tokens) per output for streams.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer, ended_on_token
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


def core_params(params: SamplingParams) -> SamplingParams:
    """What the core is asked for: no stop strings (found here), deltas unless the caller only
    wants the end and no stop string has to be watched."""
    kind = "final_only" if params.output_kind == "final_only" and not params.stop else "delta"
    return dataclasses.replace(params, stop=[], output_kind=kind)


@dataclass
class _Sample:
    detok: IncrementalDetokenizer | None
    num_tokens: int = 0
    done: bool = False  # its finish was handed out (a stop string may end it before the core knows)
    # everything so far, for callers that asked for cumulative outputs
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list | None = None
    token_times: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, c: CompletionOutput) -> None:
        self.token_ids += c.token_ids
        self.token_times += c.token_times
        self.text.append(c.text)
        if c.logprobs is not None:  # extended in place: no copy of everything so far per output
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += c.logprobs
        if c.top_logprobs is not None:
            if self.top_logprobs is None:
                self.top_logprobs = []
            self.top_logprobs += c.top_logprobs
        self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason

    def whole(self, index: int) -> CompletionOutput:
        if len(self.text) > 1:
            self.text = ["".join(self.text)]
        return CompletionOutput(index, list(self.token_ids), "".join(self.text), self.finish_reason,
                                self.stop_reason, None if self.logprobs is None else list(self.logprobs),
                                list(self.token_times), None if self.top_logprobs is None else list(self.top_logprobs))


class FrontendOutput:
    """One request's outputs, from the core's token-id outputs to what its caller asked for."""

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.params = params
        self.samples: dict[int, _Sample] = {}
        self.stop_commands: list[tuple[int, str, int]] = []  # (sample index, stop string, tokens kept)

    def _sample(self, index: int) -> _Sample:
        s = self.samples.get(index)
        if s is None:
            det = (IncrementalDetokenizer.for_params(self.tokenizer, self.prompt_ids, self.params)
                   if self.tokenizer is not None else None)
            s = self.samples[index] = _Sample(det)
        return s

    def process(self, out: RequestOutput) -> RequestOutput | None:
        """The caller's output for a core output (None: nothing new to hand out)."""
        p = self.params
        # whole outputs are kept here, except final-only ones the core sends whole (no stop string)
        accumulate = p.output_kind == "cumulative" or (p.output_kind == "final_only" and bool(p.stop))
        fresh = []
        for c in out.outputs:
            s = self._sample(c.index)
            if s.done:  # ended here by a stop string; what the core made after it is dropped
                continue
            s.num_tokens += len(c.token_ids)
            if s.detok is not None:
                stop = ended_on_token(c.finish_reason, c.stop_reason)  # its text left out unless asked for
                hit = s.detok.add(c.token_ids, stop_terminated=stop) if c.token_ids else None
                if hit is not None and c.finish_reason is None:
                    c.finish_reason, c.stop_reason = "stop", hit
                    self.stop_commands.append((c.index, hit, s.num_tokens))
                if c.finish_reason is not None:
                    s.detok.flush()
                c.text = s.detok.delta(c.finish_reason is not None)
            s.done = c.finish_reason is not None
            if accumulate:
                s.add(c)
            fresh.append(c)
        if p.output_kind == "final_only" and not out.finished:
            return None
        outputs = [s.whole(i) for i, s in sorted(self.samples.items())] if accumulate else fresh
        if not outputs and not out.finished:
            return None
        return dataclasses.replace(out, outputs=outputs)


def merge_deltas(items: list[RequestOutput]) -> RequestOutput:
    """Several delta outputs of one request as one (for a consumer that fell behind)."""
    if len(items) == 1:
        return items[0]
    last = items[-1]
    merged: dict[int, _Sample] = {}
    for out in items:
        for c in out.outputs:
            merged.setdefault(c.index, _Sample(None)).add(c)
    first_plp = next((o for o in items if o.prompt_logprobs is not None), None)
    return RequestOutput(last.request_id, last.prompt_token_ids, [merged[i].whole(i) for i in sorted(merged)],
                         last.finished, last.metrics, last.prompt,
                         first_plp.prompt_logprobs if first_plp else None,
                         first_plp.prompt_top_logprobs if first_plp else None, last.error)
