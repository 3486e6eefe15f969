"""How sequences and requests end: the stop checks of a resolved token (EOS, stop tokens,
lengths), stop strings found by the output processor or a front end, a sequence finished
(in-flight tokens past its end dropped, its KV freed) and a request retired.

A mixin of ``LLMEngine``: it reads the engine's scheduler, runner, requests, accountant,
output processor and clock.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.outputs import FinishedRequest, RequestOutput
from engine.sequence import PENDING, SeqStatus, Sequence

if TYPE_CHECKING:
    from engine.llm_engine import RequestState


class FinishingMixin:
    def _check_stop(self, seq: Sequence, pos: int) -> None:
        """Whether the token at ``pos`` ends ``seq``; later (in-flight) tokens do not count.
        Stop strings are found by the output processor, which sees the text."""
        p, token = seq.params, seq.token_ids[pos]
        n_out = pos + 1 - seq.prompt_len
        if p.max_tokens == 0:  # scoring a prompt: the sampled token is not part of the answer
            self._finish_seq(seq, "length", pos - 1)
            return
        length = (p.max_tokens is not None and n_out >= p.max_tokens) or pos + 1 >= self.max_model_len
        if p.ignore_eos and not p.stop_token_ids:  # the benchmark path: lengths only
            if length:
                self._finish_seq(seq, "length", pos)
            return
        reason = None
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                reason, seq.stop_reason = "stop", token
            elif not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
        if reason is None and length:
            reason = "length"
        if reason:
            self._finish_seq(seq, reason, pos)

    def finish_on_stop_string(self, seq: Sequence, stop: str, num_tokens: int | None = None) -> None:
        """The output processor found ``stop`` in the text of the first ``num_tokens`` output
        tokens (default: all resolved): the sequence ends there; later tokens are dropped."""
        if not seq.finished:
            seq.stop_reason = stop
            keep = seq.num_resolved if num_tokens is None else min(num_tokens, seq.num_resolved)
            self._finish_seq(seq, "stop", seq.prompt_len + keep - 1)

    def stop_sample(self, request_id: str, index: int, stop: str, num_tokens: int) -> RequestOutput | None:
        """A front end that detokenizes found ``stop`` in sample ``index``'s first ``num_tokens``
        tokens: end that sample; returns the request's final output if that was its last one."""
        req = self.requests.get(request_id)
        if req is None or not 0 <= index < len(req.seqs):
            return None
        self.finish_on_stop_string(req.seqs[index], stop, num_tokens)
        return self.output_processor.process([req], self)[0] if not req.unborn and all(
            s.finished for s in req.seqs) else None

    def _finish_seq(self, seq: Sequence, reason: str, pos: int | None = None) -> None:
        """``pos``: its last token; any sampled after it (in flight) is dropped."""
        if pos is not None:
            seq.truncate(pos)
        elif seq.output_token_ids and seq.output_token_ids[-1] == PENDING:
            seq.truncate(len(seq.token_ids) - 2)
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = self.clock()
        self.accountant.finish(seq.seq_id, seq.num_tokens)
        if hasattr(self.runner, "forget"):
            self.runner.forget(seq)

    def _retire(self, req: RequestState) -> None:
        req.finished = True
        if self.requests.pop(req.request_id, None) is not None and req.params.beam_width > 1:
            self._beam_requests -= 1
            self.scheduler.has_beams = self._beam_requests > 0
        self.finished_requests.append(FinishedRequest.of(req))
