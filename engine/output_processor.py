"""The output stage: what a step sampled becomes RequestOutputs, at O(new tokens) per request.

The engine core (scheduler, runner, stop tokens and lengths) hands over the requests that
got tokens this step; here they are detokenized incrementally, checked for stop strings (a
hit ends the sequence through ``LLMEngine.finish_on_stop_string``) and packed according to
their ``output_kind``: only the new part (``delta``), everything (``cumulative``) or nothing
until they finish (``final_only``). Work done here for one request cannot fail another: an
error fails that request alone.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import numpy as np

from engine.detokenizer import IncrementalDetokenizer, ended_on_token
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine, RequestState
    from engine.sequence import Sequence

log = logging.getLogger("kvlab.output")


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, packed: bool = False):
        """``tokenizer=None``: no text (``detokenize=False``). ``packed``: outputs as the tuples of
        ``engine_core.unpack_output`` reads (the engine core's messages) instead of RequestOutput objects."""
        self.tokenizer = tokenizer
        self.packed = packed
        # packed: one new token of a single-sample streamed request, as flat columns (request ids,
        # tokens, times) that ``take_fast`` hands out with the step's other outputs
        self.fast: tuple[list, list, list] = ([], [], [])

    def take_fast(self) -> tuple[list, list, list] | None:
        fast = self.fast
        if not fast[0]:
            return None
        self.fast = ([], [], [])
        return fast

    def add(self, req: RequestState) -> None:
        p = req.params
        if self.tokenizer is not None and (p.stop or p.output_kind != "final_only"):
            for seq in req.seqs:  # text as it comes: for stop strings and for streaming
                seq.detok = IncrementalDetokenizer.for_params(self.tokenizer, req.prompt_token_ids, p)

    def is_quiet(self, req: RequestState, stream_outputs: bool) -> bool:
        """Whether ``_process`` does nothing for ``req`` until one of its samples finishes: no
        text to follow (no stop strings) and no output before the end (``final_only``, or no
        streaming and no packed fast path). The engine then skips it on the other steps."""
        if any(s.detok is not None for s in req.seqs):
            return False
        kind = req.params.output_kind
        return kind == "final_only" or (not stream_outputs and not (self.packed and kind == "delta"))

    def process(self, requests: Iterable[RequestState], engine: LLMEngine) -> list[RequestOutput]:
        outputs = []
        for req in requests:
            try:
                out = self._process(req, engine)
            except Exception as e:  # this request's text or stop strings: fail it alone
                log.exception("output processing of %s failed", req.request_id)
                out = engine.fail_request(req.request_id, f"output processing failed: {type(e).__name__}")
            if out is not None:
                outputs.append(out)
        return outputs

    def retire_quiet(self, requests: Iterable[RequestState], engine: LLMEngine) -> int:
        """``process`` for quiet requests (``is_quiet``: no text, nothing before the end) whose
        outputs nobody reads (simulate's bulk steps count them only): the requests whose samples
        have all finished are retired, as ``_process`` does; returns how many."""
        done = 0
        for req in requests:
            req.finished = not req.unborn and all(s.finished for s in req.seqs)
            if req.finished:
                engine._retire(req)
                done += 1
        return done

    def _process(self, req: RequestState, engine: LLMEngine) -> RequestOutput | None:
        for seq in req.seqs:
            det = seq.detok
            if det is None:
                continue
            stop = self._decode_new(seq, det)
            if stop is not None:
                engine.finish_on_stop_string(seq, stop)
            if seq.finished:
                det.flush()
        req.finished = not req.unborn and all(s.finished for s in req.seqs)
        kind = req.params.output_kind
        if self.packed and kind == "delta" and not req.finished and len(req.seqs) == 1:
            seq = req.seqs[0]
            p = req.params
            if (seq.num_resolved == seq.num_sent + 1 and p.logprobs is None and p.prompt_logprobs is None
                    and seq.detok is None):
                # the common streamed case, one new token and nothing else: a row of flat lists
                token, t = seq.output_token_ids[seq.num_sent], seq.token_times[seq.num_sent]
                seq.num_sent += 1
                rids, tokens, times = self.fast
                rids.append(req.request_id)
                tokens.append(token)
                times.append(t)
                return None
        out = None
        if req.finished or (engine.config.stream_outputs and kind != "final_only"):
            out = self.output(req)
        if req.finished:
            engine._retire(req)
        return out

    def output(self, req: RequestState, error: str | None = None) -> RequestOutput | tuple:
        """The request's output now; for a failed request (``error``) without touching its text.
        A packed processor returns the tuple ``engine_core.unpack_output`` reads."""
        text = error is None
        if req.params.output_kind == "delta":
            samples = [self._delta(s, text) for s in req.seqs
                       if s.num_resolved > s.num_sent or (s.finished and not s.final_sent)]
        elif req.params.beam_width > 1:  # the n best beams, best first, numbered by rank
            ranked = sorted(req.seqs, key=lambda s: (-s.cum_logprob, s.index))[:req.params.n]
            samples = [(rank, *self._whole(s, text)[1:]) for rank, s in enumerate(ranked)]
        else:
            samples = [self._whole(s, text) for s in req.seqs]
        p, s0 = req.params, req.seqs[0]
        plp = ptop = None
        if p.prompt_logprobs is not None and len(s0.prompt_logprobs) == s0.prompt_len and not req.prompt_logprobs_sent:
            plp = list(s0.prompt_logprobs)
            ptop = list(s0.prompt_top_logprobs) if p.prompt_logprobs else None
            req.prompt_logprobs_sent = p.output_kind == "delta"  # delta: once; otherwise in every output
        if self.packed:  # the engine core's messages: no objects on the step's critical path
            metrics = self._metrics(req) if req.finished else None
            return (req.request_id, req.finished, samples, metrics, plp, ptop, error)
        # a streamed output that is not the last carries the request's times only; counts come at the end
        metrics = (RequestMetrics(*self._metrics(req)) if req.finished or p.output_kind != "delta" else
                   RequestMetrics(req.arrival_time, s0.first_scheduled_time, s0.first_token_time, None))
        return RequestOutput(req.request_id, req.prompt_token_ids, [CompletionOutput(*c) for c in samples],
                             req.finished, metrics, req.prompt, plp, ptop, error)

    def _text(self, seq: Sequence, finished: bool) -> str:
        """New text of ``seq`` (decoding everything at once for requests that never needed it before)."""
        if self.tokenizer is None:
            return ""
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer.for_params(self.tokenizer, seq.prompt_token_ids, seq.params)
        det = seq.detok
        self._decode_new(seq, det)
        if finished:
            det.flush()
        return det.delta(finished)

    @staticmethod
    def _decode_new(seq: Sequence, det: IncrementalDetokenizer) -> str | None:
        """The tokens resolved since the last call into ``det`` (a stop token's text left out):
        the stop string found in them, if any."""
        n = seq.num_resolved
        if n <= seq.num_decoded:
            return None
        stop = det.add(seq.output_token_ids[seq.num_decoded:n],
                       stop_terminated=ended_on_token(seq.finish_reason, seq.stop_reason))
        seq.num_decoded = n
        return stop

    # samples and metrics as tuples in the field order of CompletionOutput and RequestMetrics
    def _delta(self, seq: Sequence, text: bool = True) -> tuple:
        a, b = seq.num_sent, seq.num_resolved
        seq.num_sent = b
        seq.final_sent = seq.finished
        lp = seq.output_logprobs[a:b] if seq.params.logprobs is not None else None
        top = seq.output_top_logprobs[a:b] if seq.params.logprobs else None
        return (seq.index, seq.output_token_ids[a:b], self._text(seq, seq.finished) if text else "",
                seq.finish_reason, seq.stop_reason, lp, seq.token_times[a:b], top)

    def _whole(self, seq: Sequence, text: bool = True) -> tuple:
        if text:
            self._text(seq, seq.finished)
        text = seq.detok.text() if text and seq.detok is not None else ""
        lp = list(seq.output_logprobs) if seq.params.logprobs is not None else None
        top = list(seq.output_top_logprobs) if seq.params.logprobs else None
        return (seq.index, seq.resolved_output(), text, seq.finish_reason, seq.stop_reason, lp,
                list(seq.token_times), top)

    @staticmethod
    def _metrics(req: RequestState) -> tuple:
        s0 = req.seqs[0]
        first = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
        done = [s.finish_time for s in req.seqs if s.finish_time is not None]
        gaps: list[float] = []
        if req.finished:
            for s in req.seqs:
                if len(s.token_times) > 1:
                    gaps.extend(np.diff(s.token_times).tolist())  # the same differences, without a loop
        return (req.arrival_time, s0.first_scheduled_time, min(first) if first else None,
                max(done) if req.finished and done else None, sum(s.num_preemptions for s in req.seqs),
                s0.num_cached_tokens, len(req.prompt_token_ids), sum(s.num_resolved for s in req.seqs),
                req.params.n, req.params.max_tokens, gaps)
