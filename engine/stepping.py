"""One scheduling iteration of ``LLMEngine``: ``step`` schedules and launches a batch, advances
its sequences before their tokens are known, reads back sampled tokens (this step's, or with
``async_scheduling`` the step in flight's) and records the step; the allocator's fence and the
host tier's exposed copy time.

A mixin of ``LLMEngine``: it reads the engine's scheduler, allocator, runner, requests, config,
accountant, output processor, fault isolator and clock.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.fault_isolation import FatalEngineError, FaultIsolator
from engine.outputs import RequestOutput
from engine.sequence import SeqStatus, Sequence
from engine.step_handle import StepHandle

if TYPE_CHECKING:
    from engine.llm_engine import RequestState


class StepMixin:
    # -- one iteration -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one batch, then read back sampled tokens: this step's, or with
        ``async_scheduling`` the previous step's, while this one runs on the device (a stop
        is then seen one step late, and the token sampled past it is dropped).

        A step that raises is undone and its requests are retried in groups until the one(s)
        that make it fail are found and failed alone (``FaultIsolator``); the others go on.
        """
        only = self.isolator.begin_step()
        self._earlier = []
        try:
            outputs = self._step(only)
        except FatalEngineError:
            raise
        except Exception as e:
            if FaultIsolator.is_fatal(e):
                raise FatalEngineError(f"unrecoverable device error: {e!r}") from e
            # outputs of the step in flight, read before this one failed (requests may have retired)
            return self._earlier + self.isolator.step_failed(e)
        self.isolator.step_succeeded()
        return outputs

    def _step(self, only: set[str] | None) -> list[RequestOutput]:
        start = self.clock()
        self._fence_s = 0.0
        self._batch = None  # until scheduled: a failure in schedule() blames no batch
        batch = self._batch = self.scheduler.schedule(only)
        if self.config.record_memory:
            self._record_memory()
        overlap = self.config.async_scheduling and not self._beam_requests
        t_exec = self.clock()
        handle = self._launch(batch, overlap) if batch.seqs else None
        if handle is not None and type(handle) is not list:
            self._launched = handle
        t_launched = self.clock()
        context = self._advance(batch, start)
        sampled = None
        if type(handle) is list:  # a runner without a device, synchronous: tokens known already
            sampled, handle = handle, None
        elif handle is not None:
            handle.positions = [seq.append_pending() for seq in handle.seqs]
        earlier_wait = 0.0
        if overlap:
            handle, self._inflight = self._inflight, handle
        elif self._inflight is not None:  # back to synchronous steps: the one in flight is read first
            self._earlier = self._resolve(self._inflight)
            self._inflight, earlier_wait = None, self._wait_s
        t_post = self.clock()
        if sampled is not None:
            outputs = self._resolve_sampled(sampled)
        else:
            outputs = self._resolve(handle) if handle is not None else []
        if self._earlier:  # in order: a request may have an output of each step (deltas stay whole)
            outputs = self._earlier + outputs
        now = self.clock()
        host = ((t_exec - start) + getattr(self.runner, "last_prep_s", 0.0) + (t_post - t_launched) - earlier_wait
                - self._fence_s)
        # output handling: this step's tokens, or overlapped, the previous step's (its wait left out)
        host += now - t_post - (self._wait_s if handle is not None or sampled is not None else 0.0)
        sched = self.scheduler
        loaded = stored = 0
        for t in batch.tier_transfers:
            if t.direction == "h2d":
                loaded += t.blocks
            else:
                stored += t.blocks
        exposed = self._tier_exposed()
        launch = 0.0 if self.simulated else max(0.0, t_launched - t_exec - getattr(self.runner, "last_prep_s", 0.0))
        self.step_records.append((start, now - start, len(sched.running), len(sched.waiting), len(batch),
                                  batch.num_prefill_tokens, batch.num_decode_tokens, len(batch.preempted),
                                  host, context, loaded, stored, len(batch.tier_transfers), exposed, launch))
        return outputs

    def _fence(self) -> None:
        """The allocator's fence (``KVAllocator.set_fence``): waits for the newest launched step
        (the device runs steps in order: every earlier one is done then), read back or not,
        sampling or not, failed or not; the wait is device time, kept out of the step's host time."""
        handle = self._launched
        if handle is not None and not handle.complete:
            t0 = self.clock()
            handle.wait()
            self._fence_s += self.clock() - t0

    def _tier_exposed(self) -> float:
        """Seconds of host-tier copy time compute waited for, newly known at this step (CUDA:
        copies whose events completed by now; CPU and simulate: this step's)."""
        tier = self.allocator.host_tier
        if tier is None:
            return 0.0
        tier.poll()
        total = tier.stats.exposed_s
        delta, self._tier_exposed_seen = total - self._tier_exposed_seen, total
        return delta

    _tier_exposed_seen = 0.0

    def _launch(self, batch, overlap: bool):
        """A StepHandle; or, for a runner without a device (simulate) in synchronous mode, its
        list of (seq, token, logprob) as it is."""
        if hasattr(self.runner, "launch"):
            return self.runner.launch(batch, self._inflight)
        sampled = self.runner.execute(batch)
        return StepHandle.done(sampled) if overlap else sampled

    def _advance(self, batch, start: float) -> int:
        """What the launched batch changes before its tokens are known; returns its context."""
        context = 0
        forks = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens = computed = seq.num_computed_tokens + n
            context += computed
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = start
            if seq.fork_pending and computed == seq.prompt_len - 1:
                forks.append(seq)
        if self.config.record_memory and batch.seqs:
            # tokens the live sequences hold (one count per holder): what the allocator holds for
            # each, i.e. its computed tokens now that this step's are counted (forks come below)
            running = self.scheduler.running
            held = context if len(batch.seqs) == len(running) else sum(s.num_computed_tokens for s in running)
            if self.logical_tokens.append((self.accountant.num_steps - 1, held)):
                self.logical_tokens.spill_before(len(self.logical_tokens.chunks))
        release = getattr(self.runner, "release", None)
        if release is not None:
            for seq in batch.preempted:
                release(seq)
        for seq in forks:
            self._fork(seq)
        return context

    def _resolve(self, handle) -> list[RequestOutput]:
        t0 = self.clock()
        results = handle.results()
        now = self.clock()
        self._wait_s = now - t0
        touched: dict[str, RequestState] = {}
        requests, check_stop = self.requests, self._check_stop
        beams: dict[str, list[Sequence]] = {}
        for seq, pos, (token, logprob, top) in zip(handle.seqs, handle.positions, results):
            if seq.finished:  # stopped while this token was in flight
                continue
            seq.resolve(pos, token, logprob, top, now)
            if seq.params.beam_width > 1:  # stop checks once the beams are chosen
                beams.setdefault(seq.request_id, []).append(seq)
                continue
            check_stop(seq, pos)
            if not seq.quiet or seq.status is SeqStatus.FINISHED:
                touched[seq.request_id] = requests[seq.request_id]
        self.num_generation_tokens += len(results)
        for rid, group in beams.items():
            self._beam_step(group)
            if any(not s.quiet or s.status is SeqStatus.FINISHED for s in group):
                touched[rid] = requests[rid]
        return self.output_processor.process(touched.values(), self)

    def _resolve_sampled(self, sampled: list) -> list[RequestOutput]:
        """``_resolve`` for tokens known at launch: each appended and checked in one pass; a
        request that waits for its end (``Sequence.quiet``) reaches the output stage only then."""
        now = self.clock()
        self._wait_s = 0.0
        touched: dict[str, RequestState] = {}
        requests, check_stop, finish = self.requests, self._check_stop, self._finish_seq
        FINISHED = SeqStatus.FINISHED
        beams: dict[str, list[Sequence]] = {}
        for seq, token, logprob in sampled:
            if seq.status is FINISHED:
                continue
            if seq.params.beam_width > 1:  # stop checks once the beams are chosen
                seq.append_token(token, logprob, now)
                beams.setdefault(seq.request_id, []).append(seq)
                continue
            out = seq.output_token_ids
            if logprob is None:  # Sequence.append_token inlined: once per sequence per step
                seq.token_ids.append(token)
                out.append(token)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                seq.token_times.append(now)
            else:
                seq.append_token(token, logprob, now)
            if seq.length_only:  # as _check_stop, for requests that only lengths end
                if len(out) >= seq.done_at:
                    finish(seq, "length", len(seq.token_ids) - 1)
            else:
                check_stop(seq, len(seq.token_ids) - 1)
            if not seq.quiet or seq.status is FINISHED:
                touched[seq.request_id] = requests[seq.request_id]
        self.num_generation_tokens += len(sampled)
        for rid, group in beams.items():
            self._beam_step(group)
            if any(not s.quiet or s.status is FINISHED for s in group):
                touched[rid] = requests[rid]
        return self.output_processor.process(touched.values(), self) if touched else []

    def _record_memory(self) -> None:
        running = self.scheduler.running
        self.accountant.record_seqs(self.allocator.stats(), running, self.allocator.seq_capacities(running))
