"""Making a planned bulk run of decode steps (``experiments.sim_fastpath``): the allocator's
change with the scheduler's own preemptions and admissions and the engine's own finishes, each
member's tokens, the memory rows (``_MemoryRows``) and the step records. A mixin of
``DecodeFastForward``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from engine.scheduler import ScheduledBatch
from engine.sequence import PENDING

if TYPE_CHECKING:
    from allocators.base import DecodeRun
    from engine.llm_engine import LLMEngine
    from experiments.sim_fastpath_steps import _Steps


class AdvanceMixin:
    """``DecodeFastForward``'s making of a planned run: ``_advance`` and the pieces it calls."""

    # -- the run -------------------------------------------------------------------------------
    def _advance(self, plan: DecodeRun, steps: _Steps) -> int:
        """Make the planned steps: the allocator's change (``DecodeRun.commit``) with the
        scheduler's own preemptions and admissions and the engine's own finishes in their
        order, the memory rows up to each finish, each member's tokens, the step records."""
        e = self.engine
        sched, runner = e.scheduler, e.runner
        members, nums, times = steps.members, steps.nums, steps.times
        k = len(nums)
        overlap = e.config.async_scheduling
        tokens = self._tokens(steps, k)
        inflight = e._inflight if overlap else None
        first_held = len(inflight.seqs) if overlap else 0  # members whose last token is in flight now
        rows = _MemoryRows(e, plan, steps) if e.config.record_memory else None
        if runner.profiled and runner.vmm_counter is not None:
            runner.vmm_counter.take()  # charged to the run's first step (before its finishes unmap)
        batch = ScheduledBatch()
        finished = 0

        def append(j: int) -> None:
            self._append(steps, j, tokens[j], inflight if j < first_held else None, overlap)

        def preempt(j: int) -> None:  # its tokens first: it may be admitted again in the run
            victim = sched.running.pop()
            assert victim is members[j], "a run preempts from the back"
            append(j)
            sched._preempt(victim, batch)

        def admit(step: int) -> None:
            admitted = ScheduledBatch()
            sched._admit(admitted, sched.config.max_num_batched_tokens - steps.decoding[step - 1])
            assert list(zip(admitted.seqs, admitted.num_new_tokens)) == steps.admitted[step], \
                "the run's admissions are the scheduler's"
            for seq in admitted.seqs:  # as _advance and the read-back of its first token
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = times[step - 1]
                if seq.first_token_time is None and (step < k or not overlap):
                    seq.first_token_time = times[step + 1 if overlap else step]

        def finish(step: int, done: list[int]) -> None:
            nonlocal finished
            if rows is not None:
                rows.upto(step)  # the accountant ends their intervals at the rows so far
            e.clock.t = times[step]
            finished += self._finish(steps, done, step, append)

        last = steps.finished.get(k) if k not in steps.modelled else None  # the plan does not free them
        plan.commit(k, preempt, admit, skipped=last if overlap and last else (), finish=finish)
        if rows is not None:
            rows.upto(k)
        # the members live at the end (they computed the last step; asynchronous: its tokens pending)
        live = [j for j, c in enumerate(steps.count) if c < 0]
        for j in live:
            append(j)
        busy = runner.busy_s
        for dt in steps.busy:
            busy += dt
        runner.busy_s = busy
        runner.num_steps += k
        e.clock.t = times[-1]
        if last:
            finished += self._finish(steps, last, k, append)
        if overlap:
            from experiments.simulate import SimStepHandle

            e.num_generation_tokens += first_held + sum(nums[:-1])
            seqs = [members[j] for j in live]
            handle = SimStepHandle.pending(seqs, [(tokens[j][k - 1], None, None) for j in live],
                                           [len(seq.token_ids) - 1 for seq in seqs], steps.device_free, e.clock)
            e._inflight = e._launched = handle
            runner.device_free_at = steps.device_free
            e._wait_s = steps.last_wait
        else:
            e.num_generation_tokens += sum(nums)
            e._wait_s = 0.0
        admitted = steps.admitted
        e.step_records.extend([
            (times[i], times[i + 1] - times[i], steps.running[i], steps.waiting[i], nums[i],
             sum(n for _, n in admitted.get(i + 1, ())), steps.decoding[i], steps.preempted[i], 0.0,
             steps.contexts[i], 0, 0, 0, 0.0, 0.0) for i in range(k)])
        e.isolator.step_succeeded()
        return finished

    def _tokens(self, steps: _Steps, k: int) -> list[list[int]]:
        """The ids SimRunner samples for each member at each of the k steps (used at the steps it
        computes in): a formula of its seq_id and length, EOS ids replaced as the runner does."""
        runner = self.engine.runner
        ends = np.array(steps.computed, dtype=np.int64)[:, None] + np.arange(1, k + 1)
        ids = np.array([s.seq_id for s in steps.members], dtype=np.int64)[:, None]
        span = runner.vocab_size - 4
        tokens = 4 + (ids * 7919 + ends * 104729) % span
        eos = [t for t in runner.eos if 4 <= t < runner.vocab_size]  # ids the formula can give
        if eos:
            # a model's few EOS ids: comparisons (np.isin costs ~70 us a run on a tiny set)
            hit = np.isin(tokens, eos) if len(eos) > 8 else tokens == eos[0]
            for t in eos[1:] if len(eos) <= 8 else ():
                hit |= tokens == t
            if hit.any():
                tokens[hit] = 4 + (tokens[hit] + 1 - 4) % span
        return tokens.tolist()

    @staticmethod
    def _append(steps: _Steps, j: int, row: list[int], inflight, overlap: bool) -> None:
        """Member j's tokens of the steps it computed in, at the times they were read back:
        synchronous steps at each step's end; asynchronous ones at the next step's (the first
        step reads back the step launched before it, ``inflight``: its last token, as
        ``LLMEngine._resolve``; no token ends its sequence, ``_decode_state`` saw to it), the last
        step's still in flight (a pending place, as ``Sequence.append_pending``)."""
        seq, first, count, times = steps.members[j], steps.first[j], steps.count[j], steps.times
        ids, out, at = seq.token_ids, seq.output_token_ids, seq.token_times
        if inflight is not None:  # Sequence.resolve of its token in flight (the last place)
            token, logprob, top = inflight._ready[j]
            ids[-1] = out[-1] = token
            if logprob is not None:
                seq.output_logprobs.append(logprob)
            if top is not None:
                seq.output_top_logprobs.append(top)
            if seq.first_token_time is None:
                seq.first_token_time = times[1]
            at.append(times[1])
        k = len(steps.nums)
        if count < 0:  # live at the end
            count = k - first + 1
            seq.num_computed_tokens = steps.computed[j] + k
        toks = row[first - 1:first - 1 + count]
        if overlap:
            if first + count > k:  # the last step's token: pending
                toks[-1] = PENDING
            at += times[first + 1:first + 1 + count]
        else:
            at += times[first:first + count]
        ids += toks
        out += toks

    def _finish(self, steps: _Steps, done: list[int], step: int, append) -> int:
        """The stop checks of ``step`` (``_resolve_sampled``, or ``_resolve`` reading back the
        last tokens of those it skipped): ``done`` finish, in batch order; their requests go to
        the output stage, which retires them (their outputs are not built: the driver only
        counts them). Returns that count."""
        e = self.engine
        touched = {}
        for j in done:
            seq = steps.members[j]
            append(j)
            seq.num_computed_tokens = steps.computed[j] + step - e.config.async_scheduling
            e._finish_seq(seq, "length", len(seq.token_ids) - 1)
            touched[seq.request_id] = e.requests[seq.request_id]
        return e.output_processor.retire_quiet(touched.values(), e)


class _MemoryRows:
    """The run's memory rows (``LLMEngine._record_memory`` at each step: the stats row, the live
    sequences' capacities for the accountant's intervals), recorded up to a step on demand: a
    finish needs the rows up to its step first. The tokens the live ones hold (``_advance``'s
    logical count) go at once."""

    def __init__(self, engine: LLMEngine, plan: DecodeRun, steps: _Steps):
        self.acc, self.steps = engine.accountant, steps
        self.capacity, self.rows = plan.stats_rows(steps.decoding)
        self.caps, self.growth, self.g = list(plan.caps), plan.growth, 0
        self.made = 0  # steps recorded
        self.seqs: list = []  # the live sequences of the last row, and their places
        self.place: dict[int, int] = {}
        logical, step0 = engine.logical_tokens, self.acc.num_steps
        if logical.extend([(step0 + i, h) for i, h in enumerate(steps.held)]):
            logical.spill_before(len(logical.chunks))

    def upto(self, k: int) -> None:
        acc, caps, growth, lives, members = self.acc, self.caps, self.growth, self.steps.lives, self.steps.members
        seg_rows: list[tuple] = []  # steps with the live sequences of the step before
        seg_changes: list[list[tuple[int, int]]] = []
        for step in range(self.made + 1, k + 1):
            grew = []
            while self.g < len(growth) and growth[self.g][0] == step:
                _, j, cap = growth[self.g]
                caps[j] = cap
                grew.append(j)
                self.g += 1
            live = lives.get(step)
            if live is None:
                seg_rows.append(self.rows[step - 1])
                seg_changes.append([(self.place[j], caps[j]) for j in grew])
                continue
            if seg_rows:
                acc.record_run(seg_rows, self.seqs, seg_changes)
                seg_rows, seg_changes = [], []
            self.seqs = [members[j] for j in live]
            self.place = {j: i for i, j in enumerate(live)}
            acc.record_row(self.capacity, self.rows[step - 1], self.seqs, [caps[j] for j in live])
        if seg_rows:
            acc.record_run(seg_rows, self.seqs, seg_changes)
        self.made = k
