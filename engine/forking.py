"""Requests of several sequences: ``n`` > 1 samples forked from one computed prompt, and beam
search's step (the k best continuations of each beam, the survivors, forks copy-on-write).

A mixin of ``LLMEngine``: it reads the engine's scheduler, allocator, runner, requests and config.
"""
from __future__ import annotations

from engine.sequence import SeqStatus, Sequence


class ForkingMixin:
    def _beam_candidates(self, seq: Sequence, k: int) -> list[tuple[int, float]]:
        """``seq``'s k best continuations (token, logprob) of this step: from the sampler's
        logits, or from a runner without logits (simulate) by its own rule."""
        rule = getattr(self.runner, "beam_candidates", None)
        if rule is not None:
            return rule(seq, k)
        return self.runner.sampler.pop_beam_candidates(seq, k)

    def _beam_step(self, beams: list[Sequence]) -> None:
        """One step of beam search over the live beams of a request that sampled this step.

        Each beam proposes its k best next tokens (k = beam_width); of these (at most k*k
        candidates) the ``len(beams)`` best by cumulative logprob survive (ties: the earlier
        beam, then the likelier token). A beam with at least one surviving child keeps its
        sequence for the best of them (its last token, not yet computed, is replaced); a beam
        with none is dropped: its blocks are freed and its sequence becomes another surviving
        child, forked from that child's parent (``allocator.fork``: the paged allocator shares
        the parent's blocks copy-on-write, contiguous ones copy). Right after the prompt every
        beam is the same sequence: only the first proposes. A beam whose chosen token ends it
        (EOS, stop token, length) finishes and keeps its place among the results; the search
        goes on with the others (the width shrinks, as no finished hypothesis is replaced).
        """
        beams.sort(key=lambda s: s.index)
        k = beams[0].params.beam_width
        cands = []
        proposers = beams[:1] if all(s.num_output_tokens == 1 for s in beams) else beams
        for b, seq in enumerate(proposers):
            for j, (tok, lp) in enumerate(self._beam_candidates(seq, k)):
                cands.append((-(seq.cum_logprob + lp), b, j, tok, lp))
        cands.sort()
        chosen = cands[:len(beams)]
        children: dict[int, list] = {}
        for c in chosen:
            children.setdefault(c[1], []).append(c)
        spare = [seq for b, seq in enumerate(beams) if b not in children]
        record_lp = beams[0].params.logprobs is not None
        alloc, release = self.allocator, getattr(self.runner, "release", None)
        for b, kids in children.items():
            parent = proposers[b]
            base_cum = parent.cum_logprob
            n_out = parent.num_output_tokens - 1
            for _, _, _, tok, lp in kids[1:]:  # forks first: they copy the parent's history
                child = spare.pop()
                alloc.free(child)
                if release is not None:
                    release(child)
                child.token_ids = parent.token_ids[:-1] + [tok]
                child.output_token_ids = parent.output_token_ids[:-1] + [tok]
                child.output_logprobs = parent.output_logprobs[:n_out] + ([lp] if record_lp else [])
                child.output_top_logprobs = []
                child.token_times = list(parent.token_times)
                child.first_token_time = parent.first_token_time
                child.cum_logprob = base_cum + lp
                child.detok, child.num_decoded, child.num_sent = None, 0, 0
                if alloc.can_fork(parent):
                    alloc.fork(parent, child)
                    child.num_computed_tokens = parent.num_computed_tokens
                else:  # nothing to share: it computes its history itself
                    child.num_computed_tokens = 0
            _, _, _, tok, lp = kids[0]
            parent.token_ids[-1] = tok
            parent.output_token_ids[-1] = tok
            del parent.output_logprobs[n_out:]
            if record_lp:
                parent.output_logprobs.append(lp)
            parent.cum_logprob = base_cum + lp
        for seq in spare:  # fewer candidates than beams (a vocabulary smaller than the width)
            self._finish_seq(seq, "length", len(seq.token_ids) - 2)
        for seq in beams:
            if seq.status is not SeqStatus.FINISHED:
                self._check_stop(seq, len(seq.token_ids) - 1)

    def _fork(self, parent: Sequence) -> None:
        """``parent``'s prompt (but its last token) is computed: the request's samples not yet
        born, and those preempted with it (``followers``), fork from it and share that prompt."""
        req = self.requests[parent.request_id]
        parent.fork_pending = 0
        children = [c for c in req.unborn + parent.followers if c.status is not SeqStatus.FINISHED]
        parent.followers = []
        sched, alloc = self.scheduler, self.allocator
        if parent.params.beam_width > 1 and children:
            if self._fork_beams(parent, children):
                req.unborn = []
                return
            if len(sched.running) == 1:  # nothing else holds memory that could be freed for them
                raise ValueError(f"request '{parent.request_id}': its {len(children) + 1} beams do not fit the KV "
                                 f"pool together (allocator '{self.config.allocator}'): lower beam_width or raise "
                                 "kv_cache_memory / kv_cache_tokens")
            # the beams start together or not at all: the prompt waits again, the beams parked on it
            sched.running.remove(parent)
            alloc.free(parent)
            parent.num_computed_tokens = 0
            parent.followers, parent.fork_pending = children, len(children)
            parent.status = SeqStatus.WAITING
            sched.waiting.appendleft(parent)
            req.unborn = []
            return
        at = sched.running.index(parent) + 1
        for child in children:
            if alloc.supports_fork and alloc.can_fork(parent) and len(sched.running) < self.config.max_num_seqs:
                alloc.fork(parent, child)
                child.num_computed_tokens = parent.num_computed_tokens
                child.status = SeqStatus.RUNNING
                sched.running.insert(at, child)
                at += 1
            else:
                sched.add(child)  # no room to share: it computes the prompt itself
        req.unborn = []

    def _fork_beams(self, parent: Sequence, children: list[Sequence]) -> bool:
        """Fork every beam from ``parent`` into the batch, or none (False): a beam that computed
        its prompt alone would sample out of step with the others."""
        sched, alloc = self.scheduler, self.allocator
        if not alloc.supports_fork or len(sched.running) + len(children) > self.config.max_num_seqs:
            return False
        forked = []
        for child in children:
            if not alloc.can_fork(parent):  # a copying allocator out of room
                for c in forked:
                    alloc.free(c)
                return False
            alloc.fork(parent, child)
            forked.append(child)
        at = sched.running.index(parent) + 1
        for child in children:
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SeqStatus.RUNNING
        sched.running[at:at] = children
        return True
