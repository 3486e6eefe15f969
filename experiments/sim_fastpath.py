"""Simulate mode in bulk: a run of decode steps in which nothing can change the schedule.

Most steps of a saturated simulation are alike: every running sequence computes its one
decode token, nobody is admitted, preempted or finished, and the allocator only grows each
sequence by a token. :class:`DecodeFastForward` finds how many such steps come next and
advances them at once: the cost model's step times from the batch's sums, the step records,
memory rows and live-token counts appended step by step, the sampled tokens appended to each
sequence as one list, the allocator changed once (``KVAllocator.decode_run``). At the run's
last step the sequences that reach their length finish through the engine's own code.

A run stops before the first step that could differ from that pattern, and that step goes
through ``LLMEngine.step`` as always:

- an arrival (the driver adds requests before a step whose clock has passed their time);
- a step in which the allocator would have to decide something: a block, page or region that
  might not be there, copy-on-write, mapping ahead (``DecodeRun.steps``);
- a waiting (or swapped) request that could be admitted: the run is taken only when the
  queue's head cannot be admitted at its first step, and its steps only ever take memory;
- anything outside the plain case: a sequence that is not one decode token, stop tokens or
  text to check, streamed outputs, beams, forks, prefix caching at admission, a host tier,
  a profiled cost model, windowed attention, asynchronous scheduling, fault isolation.

The run then makes the same decisions and the same figures as its steps one by one; the
test-suite runs both and compares every step (tests/test_sim_fastpath.py).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from allocators.stats import STAT_FIELDS, MemoryStats
from engine.scheduler import Scheduler

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestOutput


class DecodeFastForward:
    """``engine.decode_fast_forward`` of a simulated engine; the driver calls it before each step."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.runs = 0  # runs taken
        self.steps = 0  # steps they advanced
        # a run ends where the next step differs (a preemption, an admission, an arrival):
        # that one goes through engine.step() without being looked at again
        self._after_run = False
        self._plain_types: tuple | None = None

    def __call__(self, t0: float, next_arrival_s: float = math.inf) -> list[RequestOutput] | None:
        """Advance the run of decode steps that starts now, if there is one; None if the next
        step must go through ``engine.step()``. ``next_arrival_s``: the next request's arrival,
        as the driver compares it (seconds after ``t0`` on the engine's clock)."""
        if self._after_run:
            self._after_run = False
            return None
        e = self.engine
        sched = e.scheduler
        running = sched.running
        if not running or sched.swapped or e.isolator.active or not self._plain_engine():
            return None
        num = len(running)
        budget = sched.config.max_num_batched_tokens - num  # left after the decode tokens
        if budget < 0:
            return None
        steps, computed = _decode_steps(running)
        if not steps:
            return None
        plan = e.allocator.decode_run(running)
        if plan is None:
            return None
        steps = plan.steps(steps)
        if not steps or self._may_admit(plan, budget):
            return None
        times, durations = self._times(t0, next_arrival_s, num, sum(computed), steps)
        self.runs += 1
        self.steps += len(durations)
        self._after_run = True
        return self._advance(plan, computed, times, durations)

    def _plain_engine(self) -> bool:
        """The simulated engine as it was built: its own runner (not wrapped: tests count its
        calls), the roofline model of full attention, synchronous steps, no host tier."""
        if self._plain_types is None:
            from experiments.costmodel import RooflineCostModel
            from experiments.simulate import SimRunner

            self._plain_types = (SimRunner, RooflineCostModel)
        e = self.engine
        runner = e.runner
        return (type(runner) is self._plain_types[0] and type(runner.cost_model) is self._plain_types[1]
                and runner.cost_model.full_attention and not runner.profiled
                and not e.config.async_scheduling and e.allocator.host_tier is None)

    # -- what the run may be -----------------------------------------------------------------
    def _may_admit(self, plan, budget: int) -> bool:
        """Whether the queue's head could be admitted at the run's first step (``_admit``'s
        checks); True when in doubt."""
        sched = self.engine.scheduler
        if not sched.waiting or budget <= 0 or len(sched.running) >= sched.config.max_num_seqs:
            return False  # no admission is tried
        head = sched.waiting[0]
        if sched.config.enable_prefix_caching or head.followers:
            return True  # a prefix lookup (it changes the cache's counts) or a group: not modelled
        n = Scheduler._chunk(head, budget)
        if n <= 0:
            return True
        full = (head.prompt_len - 1 if head.fork_pending else len(head.token_ids)) - head.num_computed_tokens
        if n < full and not sched.config.enable_chunked_prefill:
            return False  # it waits for a budget that decode tokens keep taken
        return plan.may_admit(head, n)

    def _times(self, t0: float, next_arrival_s: float, num: int, context: int,
               steps: int) -> tuple[list[float], list[float]]:
        """The clock at the start of each step of the run and after its last, and each step's
        time (the cost model's, of the batch's sums), as the engine's steps advance it one after
        the other; a step starts only while the driver would add no request before it."""
        e = self.engine
        cost = e.runner.cost_model.decode_step_time
        t = e.clock()
        times, durations = [t], []
        for k in range(1, steps + 1):
            if k > 1 and next_arrival_s <= t - t0:
                break
            dt = cost(num, context + num * k)
            if dt > 0:  # VirtualClock.advance
                t += dt
            times.append(t)
            durations.append(dt)
        return times, durations

    # -- the run -------------------------------------------------------------------------------
    def _advance(self, plan, computed: list[int], times: list[float], durations: list[float]) -> list[RequestOutput]:
        e = self.engine
        sched, runner = e.scheduler, e.runner
        running = list(sched.running)
        num, k = len(running), len(durations)
        context0 = sum(computed)
        growth = plan.growth(k)
        if e.config.record_memory:
            self._record_memory(plan, running, growth, context0, k)
        plan.commit(k, growth)
        # the tokens: each sequence samples one per step, the id SimRunner gives it
        ends = np.array(computed, dtype=np.int64)[:, None] + np.arange(1, k + 1)
        ids = np.array([s.seq_id for s in running], dtype=np.int64)[:, None]
        span = runner.vocab_size - 4
        tokens = 4 + (ids * 7919 + ends * 104729) % span
        eos = [t for t in runner.eos if 4 <= t < runner.vocab_size]  # ids the formula can give
        if eos:
            hit = np.isin(tokens, eos)
            tokens[hit] = 4 + (tokens[hit] + 1 - 4) % span
        after = times[1:]
        for seq, toks in zip(running, tokens.tolist()):
            seq.num_computed_tokens += k
            seq.token_ids += toks
            seq.output_token_ids += toks
            seq.token_times += after
        e.num_generation_tokens += num * k
        # the runner and the clock, as k calls of execute leave them
        busy = runner.busy_s
        for dt in durations:
            busy += dt
        runner.busy_s = busy
        runner.num_steps += k
        e.clock.t = times[-1]
        # step records (the last one after the finishes: it counts the sequences left)
        waiting = len(sched.waiting)
        append = e.step_records.append
        for i in range(k - 1):
            append((times[i], times[i + 1] - times[i], num, waiting, num, 0, num, 0, 0.0,
                    context0 + num * (i + 1), 0, 0, 0, 0.0))
        outputs = self._finish(running)
        e._wait_s = 0.0
        append((times[k - 1], times[k] - times[k - 1], len(sched.running), len(sched.waiting), num,
                0, num, 0, 0.0, context0 + num * k, 0, 0, 0, 0.0))
        e.isolator.step_succeeded()
        return outputs

    def _record_memory(self, plan, running: list, growth: list[tuple[int, int, int]], context0: int,
                       k: int) -> None:
        """What ``_record_memory`` and ``_advance`` record at each step of the run: the stats
        row, the live sequences' capacities (the accountant's intervals) and the tokens they hold."""
        e = self.engine
        num, acc, logical = len(running), e.accountant, e.logical_tokens
        capacity, rows = plan.stats_rows(k, growth)
        # the first step as the engine records it (the live sequences may differ from the last
        # recorded ones); then only capacities that grow
        caps = list(plan.caps)
        changes: list[list[tuple[int, int]]] = [[] for _ in range(k)]
        for step, j, cap in growth:
            if step == 1:
                caps[j] = cap
            else:
                changes[step - 1].append((j, cap))
        step0 = acc.num_steps
        acc.record_seqs(MemoryStats(capacity, **dict(zip(STAT_FIELDS, rows[0]))), running, caps)
        acc.record_run(rows[1:], running, changes[1:])
        for i in range(k):
            if logical.append((step0 + i, context0 + num * (i + 1))):
                logical.spill_before(len(logical.chunks))

    def _finish(self, running: list) -> list[RequestOutput]:
        """The last step's stop checks (``_resolve_sampled``): the sequences whose length is
        reached finish, in batch order; their requests go to the output stage."""
        e = self.engine
        touched = {}
        for seq in running:
            if len(seq.output_token_ids) >= seq.done_at:
                e._finish_seq(seq, "length", len(seq.token_ids) - 1)
                touched[seq.request_id] = e.requests[seq.request_id]
        return e.output_processor.process(touched.values(), e) if touched else []


def _decode_steps(running: list) -> tuple[int, list[int]]:
    """(steps until the first of ``running`` samples its last token: the run's last step, the
    computed tokens of each) if every one of them is in the plain decode case; else (0, [])."""
    steps = None
    computed = []
    for seq in running:
        out = seq.output_token_ids
        if (not out or seq.fork_pending or not seq.length_only or not seq.quiet or seq.params.beam_width > 1
                or len(seq.token_ids) - seq.num_computed_tokens != 1 or seq.first_token_time is None
                or seq.first_scheduled_time is None):
            return 0, []
        left = seq.done_at - len(out)
        if steps is None or left < steps:
            steps = left
        computed.append(seq.num_computed_tokens)
    return max(steps or 0, 0), computed
