"""The sampled tokens of a launched step (``StepHandle``), copied to pinned host memory without
waiting; read back when the engine resolves the step, or waited for by the allocator's fence."""
from __future__ import annotations

import torch

from engine.sampler import unpack_logprobs
from engine.sequence import Sequence

Sampled = list[tuple[Sequence, int, "float | None"]]


class StepHandle:
    """The sampled tokens of a launched step, copied to pinned host memory without waiting."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor | None = None,
                 logprobs: torch.Tensor | None = None, ready: list | None = None, on_cuda: bool = False):
        """``on_cuda``: a CUDA step that samples nothing still gets an event, so that ``wait``
        waits for it (the allocator's fence, the reuse of its pinned inputs)."""
        self.seqs = seqs
        self.rows = {s.seq_id: i for i, s in enumerate(seqs)}
        self.tokens = tokens
        self.positions: list[int] = []  # where each sample goes in its sequence (set by the engine)
        self._ready = ready
        self.complete = ready is not None  # the device has finished the step (wait() returned)
        self._host = self._lp_host = self._event = None
        cuda = tokens is not None and tokens.is_cuda
        if cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            if logprobs is not None:
                self._lp_host = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
                self._lp_host.copy_(logprobs, non_blocking=True)
        else:
            self._host, self._lp_host = tokens, logprobs
        if cuda or on_cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    @classmethod
    def done(cls, sampled: Sampled) -> "StepHandle":
        """A handle over results already on the host (runners without ``launch``)."""
        return cls([s for s, _, _ in sampled], ready=[(t, lp, None) for _, t, lp in sampled])

    def wait(self) -> None:
        """Return once the device has finished the step."""
        if self._event is not None and not self.complete:
            self._event.synchronize()
        self.complete = True

    def results(self) -> list[tuple[int, float | None, list | None]]:
        """(token, logprob or None, top logprobs or None) per sampled sequence; waits for the
        device if needed."""
        if self._ready is not None:
            return self._ready
        if not self.seqs:
            return []
        self.wait()
        tokens = self._host.tolist()
        if self._lp_host is None:
            return [(t, None, None) for t in tokens]
        out = []
        for t, row, s in zip(tokens, self._lp_host.tolist(), self.seqs):
            k = s.params.logprobs
            if k is None:
                out.append((t, None, None))
            else:
                lp, top = unpack_logprobs(row, k)
                out.append((t, lp, top if k > 0 else None))
        return out
