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
- a step in which the allocator would have to decide something it has no model of
  (``KVAllocator.decode_run``): copy-on-write, mapping a page, a region that is full. A paged
  pool that runs out is modelled: the scheduler preempts from the back (by recompute), the
  victims' blocks go back to the pool, as ``Scheduler.schedule`` does it;
- a waiting request that could be admitted: the queue's head is checked at the run's first
  step and after each preemption (a victim heads the queue); in between, steps only take
  memory, so a head that cannot be admitted stays so;
- anything outside the plain case: a sequence that is not one decode token, stop tokens or
  text to check, streamed outputs, beams, forks, prefix caching at admission, a host tier,
  a profiled cost model, windowed attention, asynchronous scheduling, fault isolation.

The run then makes the same decisions and the same figures as its steps one by one; the
test-suite runs both and compares every step (tests/test_sim_fastpath.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from allocators.stats import STAT_FIELDS, MemoryStats
from engine.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from allocators.base import DecodeRun
    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestOutput
    from engine.sequence import Sequence


@dataclass
class _Steps:
    """The steps of a run, as planned: the clock at each one's start (and after the last), each
    one's time, how many of the running sequences (the first ones) it computes, how many it
    preempted, their context."""
    times: list[float]
    durations: list[float] = field(default_factory=list)
    nums: list[int] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    contexts: list[int] = field(default_factory=list)  # tokens the batch's sequences hold after it


class DecodeFastForward:
    """``engine.decode_fast_forward`` of a simulated engine; the driver calls it before each step."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.runs = 0  # runs taken
        self.steps = 0  # steps they advanced
        # a run ends where the next step differs (an admission, an arrival, what the allocator
        # has no model of): that one goes through engine.step() without being looked at again
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
        if (not running or sched.swapped or e.isolator.active or not self._plain_engine()
                or len(running) > sched.config.max_num_batched_tokens):
            return None
        left, computed = _decode_state(running)
        if not left:
            return None
        plan = e.allocator.decode_run(running)
        if plan is None:
            return None
        steps = self._plan(plan, left, computed, t0, next_arrival_s)
        if steps is None:
            return None
        self.runs += 1
        self.steps += len(steps.nums)
        self._after_run = True
        return self._advance(plan, steps, computed)

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

    # -- the plan: the steps as Scheduler.schedule would make them ------------------------------
    def _plan(self, plan: DecodeRun, left: list[int], computed: list[int], t0: float,
              next_arrival_s: float) -> _Steps | None:
        """The run's steps: each computes the first ``num`` running sequences' decode tokens,
        preempting from the back where the pool runs out; the run ends at the first step where
        a sequence finishes (included), before a step whose schedule would differ or before
        which the driver would add a request."""
        e = self.engine
        sched = e.scheduler
        running = sched.running
        limit = plan.limit()
        if not limit:
            return None
        num = len(running)
        context = [0]  # context[n]: computed tokens of the first n sequences
        for c in computed:
            context.append(context[-1] + c)
        first_done = min(left)  # step at which the first of the first ``num`` finishes
        # the head of the queue and its tokens (a victim has the tokens of the steps it was in)
        head = sched.waiting[0] if sched.waiting else None
        head_len = len(head.token_ids) if head is not None else 0
        head_computed = head.num_computed_tokens if head is not None else 0
        check = True  # admission to check: at the first step, and after each preemption
        can_preempt = not sched._swap  # a victim that swaps: not modelled
        cost = e.runner.cost_model.decode_step_time
        t = e.clock()
        steps = _Steps([t])
        for step in range(1, limit + 1):
            if step > 1 and next_arrival_s <= t - t0:
                break
            before = num
            j = plan.allocate(step, num)
            while j is not None:  # Scheduler.schedule: preempt the last until ``j`` fits
                victim = num - 1
                if (not victim or not can_preempt or running[victim].params.num_seqs > 1
                        or not plan.release(victim, step)):
                    return self._planned(steps)  # the exact step decides
                num -= 1
                if victim == j:
                    break
                j = plan.allocate(step, num, start=j)
            if num < before:  # no admission this step; the last victim heads the queue now
                head, check = running[num], True
                head_len, head_computed = len(head.token_ids) + step - 1, 0
                first_done = min(left[:num])
            elif check:
                if self._may_admit(plan, head, head_len, head_computed, num):
                    break
                check = False
            held = context[num] + num * step
            dt = cost(num, held)
            if dt > 0:  # VirtualClock.advance
                t += dt
            steps.times.append(t)
            steps.durations.append(dt)
            steps.nums.append(num)
            steps.preempted.append(before - num)
            steps.contexts.append(held)
            if first_done <= step:
                break
        return self._planned(steps)

    @staticmethod
    def _planned(steps: _Steps) -> _Steps | None:
        return steps if steps.nums else None

    def _may_admit(self, plan: DecodeRun, head: Sequence | None, head_len: int, computed: int, num: int) -> bool:
        """Whether ``Scheduler._admit`` could admit ``head`` (``head_len`` tokens, ``computed`` of
        them computed) at this step, ``num`` sequences decoding; True when in doubt."""
        if head is None:
            return False
        cfg = self.engine.scheduler.config
        budget = cfg.max_num_batched_tokens - num
        if budget <= 0 or num >= cfg.max_num_seqs:
            return False  # no admission is tried
        if cfg.enable_prefix_caching or head.followers:
            return True  # a prefix lookup (it changes the cache's counts) or a group: not modelled
        full = (head.prompt_len - 1 if head.fork_pending else head_len) - computed
        n = min(full, budget)  # Scheduler._chunk
        if n <= 0:
            return True
        if n < full and not cfg.enable_chunked_prefill:
            return False  # it waits for a budget that decode tokens keep taken
        return plan.may_admit(head, n)

    # -- the run -------------------------------------------------------------------------------
    def _advance(self, plan: DecodeRun, steps: _Steps, computed: list[int]) -> list[RequestOutput]:
        e = self.engine
        sched, runner = e.scheduler, e.runner
        running = list(sched.running)
        nums, times = steps.nums, steps.times
        k = len(nums)
        context = steps.contexts
        if e.config.record_memory:
            self._record_memory(plan, running, nums, context)
        # steps each sequence was in: the first nums[-1] all of them, the victims until theirs
        ins = [k] * len(running)
        for step, j in plan.released:
            if step > k:
                break
            ins[j] = step - 1
        # the tokens: one per step in the batch, the ids SimRunner gives
        ends = np.array(computed, dtype=np.int64)[:, None] + np.arange(1, k + 1)
        ids = np.array([s.seq_id for s in running], dtype=np.int64)[:, None]
        span = runner.vocab_size - 4
        tokens = 4 + (ids * 7919 + ends * 104729) % span
        eos = [t for t in runner.eos if 4 <= t < runner.vocab_size]  # ids the formula can give
        if eos:
            hit = np.isin(tokens, eos)
            tokens[hit] = 4 + (tokens[hit] + 1 - 4) % span
        after = times[1:]
        for seq, toks, n in zip(running, tokens.tolist(), ins):
            if n < k:
                toks = toks[:n]
            seq.num_computed_tokens += n
            seq.token_ids += toks
            seq.output_token_ids += toks
            seq.token_times += after if n == k else after[:n]
        e.num_generation_tokens += sum(nums)
        # the runner and the clock, as k calls of execute leave them
        busy = runner.busy_s
        for dt in steps.durations:
            busy += dt
        runner.busy_s = busy
        runner.num_steps += k
        e.clock.t = times[-1]
        # the allocator; the victims preempted by the scheduler's own code, in their order
        batch = ScheduledBatch()

        def preempt(j: int) -> None:
            victim = sched.running.pop()
            assert victim is running[j], "a run preempts from the back"
            sched._preempt(victim, batch)

        plan.commit(k, preempt)
        # step records (the last one after the finishes: it counts the sequences left)
        append = e.step_records.append
        waiting = len(sched.waiting) - len(batch.preempted)
        for i in range(k - 1):
            waiting += steps.preempted[i]
            append((times[i], times[i + 1] - times[i], nums[i], waiting, nums[i], 0, nums[i], steps.preempted[i],
                    0.0, context[i], 0, 0, 0, 0.0))
        outputs = self._finish(running[:nums[-1]])
        e._wait_s = 0.0
        append((times[k - 1], times[k] - times[k - 1], len(sched.running), len(sched.waiting), nums[-1], 0, nums[-1],
                steps.preempted[-1], 0.0, context[-1], 0, 0, 0, 0.0))
        e.isolator.step_succeeded()
        return outputs

    def _record_memory(self, plan: DecodeRun, running: list, nums: list[int], context: list[int]) -> None:
        """What ``_record_memory`` and ``_advance`` record at each step of the run: the stats
        row, the live sequences' capacities (the accountant's intervals) and the tokens they hold."""
        e = self.engine
        acc, logical = e.accountant, e.logical_tokens
        capacity, rows = plan.stats_rows(nums)
        caps = list(plan.caps)
        growth, g = plan.growth, 0
        step0 = acc.num_steps
        seg_rows: list[tuple] = []  # steps with the live sequences of the step before
        seg_changes: list[list[tuple[int, int]]] = []
        for step, (num, row) in enumerate(zip(nums, rows), 1):
            changed = []
            while g < len(growth) and growth[g][0] == step:
                _, j, cap = growth[g]
                caps[j] = cap
                changed.append((j, cap))
                g += 1
            if step == 1 or num != nums[step - 2]:  # other live sequences: as the engine records
                if seg_rows:
                    acc.record_run(seg_rows, running, seg_changes)
                    seg_rows, seg_changes = [], []
                acc.record_seqs(MemoryStats(capacity, **dict(zip(STAT_FIELDS, row))), running[:num], caps[:num])
            else:
                seg_rows.append(row)
                seg_changes.append(changed)
        if seg_rows:
            acc.record_run(seg_rows, running, seg_changes)
        for i, held in enumerate(context):
            if logical.append((step0 + i, held)):
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


def _decode_state(running: list) -> tuple[list[int], list[int]]:
    """(steps until each of ``running`` samples its last token, the tokens each has computed)
    if every one is in the plain decode case (one token to compute, no stop but its length,
    nothing to report before its end); else two empty lists."""
    left, computed = [], []
    for seq in running:
        out = seq.output_token_ids
        if (not out or seq.fork_pending or not seq.length_only or not seq.quiet or seq.params.beam_width > 1
                or len(seq.token_ids) - seq.num_computed_tokens != 1 or seq.first_token_time is None
                or seq.first_scheduled_time is None or len(out) >= seq.done_at):
            return [], []
        left.append(seq.done_at - len(out))
        computed.append(seq.num_computed_tokens)
    return left, computed
