"""Simulate mode in bulk: runs of decode steps in which the schedule is plain.

Most steps of a saturated simulation are alike: every running sequence computes its one
decode token and the allocator only grows each sequence by a token; now and then the pool runs
out and the scheduler preempts the last ones, or a request finishes and the queue's head is
admitted. :class:`DecodeFastForward` plans the run of such steps that starts now, step by step
but on sums and per-event lists (the cost model's step time from the batch's sums, the
allocator's ``DecodeRun``: who takes a block when, who is preempted, what the first step
admits), then applies it at once: the sampled tokens appended to each sequence as one list,
the step records, memory rows and live-token counts appended per run, the allocator changed
once (``DecodeRun.commit``), the victims and admissions made by the scheduler's own
``_preempt`` and ``_admit``. At the run's last step the sequences that reach their length
finish through the engine's own code.

Asynchronous scheduling (``AsyncSimRunner``): a run starts with a step in flight that sampled
the last token of every running sequence. Each step launches (the host's part moves the clock,
the device's starts when the device is free), then reads back the step before it (the clock
waits for the device); the first step reads back the step in flight, and the last one is left
in flight, its tokens pending, as ``LLMEngine._step`` leaves it. A sequence whose last token is
in flight is not scheduled again and finishes when it is read back: a run that samples a last
token goes on for one more step, in which the others decode and those finish, if that step is
plain (it preempts nothing and the queue's head could not be admitted), and stops there. The
cost model gives each step's host and device parts from the sums.

A run stops before the first step that could differ from that pattern, and that step goes
through ``LLMEngine.step`` as always:

- an arrival (the driver adds requests before a step whose clock has passed their time);
- a step in which the allocator would have to decide something it has no model of
  (``KVAllocator.decode_run``): copy-on-write, mapping a page, a region that is full. A paged
  pool that runs out is modelled: the scheduler preempts from the back (by recompute), the
  victims' blocks go back to the pool, as ``Scheduler.schedule`` does it;
- a waiting request that could be admitted, but at the run's first step: the queue's head is
  checked there, at the next step after admissions (its budget is whole again) and after each
  preemption (a victim heads the queue); in between, steps only take memory and keep the
  budget, so a head that cannot be admitted stays so. At the first step the admissions are
  modelled where the allocator can (a paged pool: plain requests whose whole prompt fits the
  step's budget): they prefill and sample in that step and decode in the next ones;
- anything outside the plain case: a sequence that is not one decode token, stop tokens or
  text to check, streamed outputs, beams, forks, prefix caching at admission, a host tier,
  windowed attention, fault isolation; with the profiled cost model, a decode step that no
  decode CUDA graph takes (its time needs more than the batch's sums).

The run then makes the same decisions and the same figures as its steps one by one; the
test-suite runs both and compares every step (tests/test_sim_fastpath.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np

from allocators.stats import STAT_FIELDS, MemoryStats
from engine.scheduler import ScheduledBatch
from engine.sequence import PENDING

if TYPE_CHECKING:
    from allocators.base import DecodeRun
    from engine.llm_engine import LLMEngine
    from engine.sequence import Sequence

_BLOCKED, _ADMIT, _UNKNOWN = range(3)  # what Scheduler._admit would do with the queue's head


@dataclass
class _Steps:
    """The steps of a run, as planned. ``members``: the running sequences, then those admitted
    at the first step (a step computes the first ``nums[i]`` of them); ``computed``: their
    computed tokens before the run (one admitted with n tokens: n - 1, as if it decoded its
    last one in the first step)."""
    members: list
    computed: list[int]
    left: list[int]  # steps until each samples its last token
    times: list[float]  # the clock at each step's start, and after the last
    nums: list[int] = field(default_factory=list)  # sequences each step computes
    decoding: list[int] = field(default_factory=list)  # ... of them decoding (the others are admitted)
    preempted: list[int] = field(default_factory=list)
    contexts: list[int] = field(default_factory=list)  # tokens the batch's sequences hold after the step
    admitted: list[tuple] = field(default_factory=list)  # (seq, tokens) admitted at the first step
    busy: list[float] = field(default_factory=list)  # what each step adds to the runner's busy time
    # asynchronous steps: the device's end of the last step launched, the ready time of the step
    # the next one reads back, and the wait for it, as the engine's last read-back measured it
    device_free: float = 0.0
    ready: float = 0.0
    last_wait: float = 0.0
    # asynchronous steps: the members the last step skipped, their last token sampled by the step
    # before (it reads that back, and they finish), and the tokens the live members hold after it
    done: list[int] = field(default_factory=list)
    held_last: int = 0


class DecodeFastForward:
    """``engine.decode_fast_forward`` of a simulated engine; the driver calls it before each step."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.runs = 0  # runs taken
        self.steps = 0  # steps they advanced
        # a run of an allocator that models no admission ends where the next step likely admits:
        # that one goes through engine.step() without being looked at again
        self._after_run = False
        self._plain_types: tuple | None = None
        self.finishing_preemptions = 0  # asynchronous runs whose finishing step preempted

    def __call__(self, t0: float, next_arrival_s: float = math.inf) -> int | None:
        """Advance the run of decode steps that starts now, if there is one, and return how many
        requests finished in it (their outputs are not built); None if the next step must go
        through ``engine.step()``. ``next_arrival_s``: the next request's arrival, as the driver
        compares it (seconds after ``t0`` on the engine's clock)."""
        if self._after_run:
            self._after_run = False
            return None
        e = self.engine
        sched = e.scheduler
        running = sched.running
        if (not running or sched.swapped or e.isolator.active or not self._plain_engine()
                or len(running) > sched.config.max_num_batched_tokens):
            return None
        inflight = e._inflight if e.config.async_scheduling else None
        if e.config.async_scheduling and not _inflight_decodes(e, inflight):
            return None
        left, computed = _decode_state(running, pending=inflight is not None)
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
        self._after_run = not plan.admits
        return self._advance(plan, steps)

    def _plain_engine(self) -> bool:
        """The simulated engine as it was built: its own runner (not wrapped: tests count its
        calls; ``AsyncSimRunner`` with asynchronous steps), the roofline or the profiled model of full
        attention, no host tier."""
        if self._plain_types is None:
            from experiments.costmodel import RooflineCostModel
            from experiments.profiled_costmodel import ProfiledCostModel
            from experiments.simulate import AsyncSimRunner, SimRunner

            self._plain_types = (SimRunner, AsyncSimRunner, RooflineCostModel, ProfiledCostModel)
        e = self.engine
        runner = e.runner
        sync_runner, async_runner, roofline, profiled = self._plain_types
        cost = runner.cost_model
        if type(runner) is not (async_runner if e.config.async_scheduling else sync_runner) or not cost.full_attention:
            return False
        # the profiled model times decode steps from sums where they replay a decode graph
        timed = (type(cost) is profiled and runner.profiled and bool(cost.graph_sizes)
                 or type(cost) is roofline and not runner.profiled)
        # beam search anywhere turns asynchronous steps synchronous (LLMEngine._step)
        return timed and e.allocator.host_tier is None and not (e.config.async_scheduling and e._beam_requests)

    # -- the plan: the steps as Scheduler.schedule would make them ------------------------------
    def _plan(self, plan: DecodeRun, left: list[int], computed: list[int], t0: float,
              next_arrival_s: float) -> _Steps | None:
        """The run's steps: each computes the decode tokens of the first ``num`` members,
        preempting from the back where the pool runs out; the first may admit. The run ends at
        the first step where a sequence finishes (included; asynchronous: the step that samples
        a last token, then the one that skips and finishes it, ``_finishing_step``), before a step
        whose schedule would differ or before which the driver would add a request."""
        e = self.engine
        sched = e.scheduler
        limit = plan.limit()
        if not limit:
            return None
        steps = _Steps(list(sched.running), list(computed), list(left), [e.clock()])
        members, left = steps.members, steps.left  # both grow with the first step's admissions
        num = len(members)
        context = [0, *accumulate(computed)]  # context[n]: computed tokens of the first n members
        longest = [0, *accumulate(computed, max)]  # longest[n]: the most any of them has computed (ragged term)
        first_done = min(left)  # step at which the first of the first ``num`` finishes
        # the head of the queue and its tokens (a victim has the tokens of the steps it was in)
        head = sched.waiting[0] if sched.waiting else None
        head_len = len(head.token_ids) if head is not None else 0
        head_computed = head.num_computed_tokens if head is not None else 0
        check = True  # admission to check: at the first step, and after each preemption
        runner = e.runner
        cost = runner.cost_model
        # the profiled model charges VMM calls made since the last step to the next one
        vmm = runner.vmm_counter.peek() if runner.profiled and runner.vmm_counter is not None else (0, 0)
        overlap = e.config.async_scheduling
        if overlap:
            steps.device_free, steps.ready = runner.device_free_at, e._inflight.ready_at
        for step in range(1, limit + 1):
            if step > plan.room or (step > 1 and next_arrival_s <= steps.times[-1] - t0):
                break
            before = num
            num = self._preempt_to_fit(plan, members, step, num)
            if num is None:
                return self._planned(steps)  # the exact step decides
            admitted = []
            if num < before:  # no admission this step; the last victim heads the queue now
                head, check = members[num], True
                head_len, head_computed = len(head.token_ids) + step - 1, 0
                first_done = min(left[:num])
            elif check:
                verdict, _ = self._admission(plan, head, head_len, head_computed, num)
                # a head held back by memory stays so until a step frees some; by the token
                # budget, until fewer sequences decode
                check = False
                if verdict != _BLOCKED:
                    admitted = self._admissions(plan, num) if step == 1 else None
                    if not admitted:  # one it cannot model, or later than the first step
                        break
                    # the next head was held back by what the admitted took of this step's
                    # budget: the next step's is whole again
                    waiting = sched.waiting
                    head = waiting[len(admitted)] if len(waiting) > len(admitted) else None
                    head_len = len(head.token_ids) if head is not None else 0
                    head_computed = head.num_computed_tokens if head is not None else 0
                    check = True
            held = context[num] + num * step
            maps, unmaps = vmm if step == 1 else (0, 0)
            if admitted:  # they prefill all their tokens, and sample
                ns = [n for _, n in admitted]
                if runner.profiled:  # SimRunner.execute's work: the decodes, then the admitted prompts
                    split = cost.admission_host_device(num, held, ns, maps, unmaps)
                    if split is None:
                        work = [(1, c + 1) for c in computed[:num]] + [(n, n) for n in ns]
                        split = cost.host_device_time(work, len(work), maps, unmaps)
                else:
                    split = cost.sums_host_device(num + sum(ns), num + len(ns),
                                                  held + sum(n * (n + 1) // 2 for n in ns), held + sum(ns))
                steps.admitted = admitted
                for seq, n in admitted:
                    members.append(seq)
                    steps.computed.append(n - 1)
                    left.append(seq.done_at - len(seq.output_token_ids))
                    context.append(context[-1] + n - 1)
                    longest.append(max(longest[-1], n - 1))
                first_done = min(first_done, *left[num:])
                held += sum(ns)
            else:
                split = cost.decode_host_device(num, held, longest[num] + step, maps, unmaps)
                if split is None:  # the step is not timed from sums (an eager decode step): it goes alone
                    break
            _clock(steps, *split, overlap)
            steps.nums.append(num + len(admitted))
            steps.decoding.append(num)
            steps.preempted.append(before - num)
            steps.contexts.append(held)
            num += len(admitted)
            if first_done <= step:
                if overlap and step < limit and step < plan.room and next_arrival_s > steps.times[-1] - t0:
                    self._finishing_step(plan, steps, num, step + 1, head, head_len, head_computed)
                break
        return self._planned(steps)

    def _finishing_step(self, plan: DecodeRun, steps: _Steps, num: int, step: int, head: Sequence | None,
                        head_len: int, head_computed: int) -> None:
        """Asynchronous steps: the step after one that sampled a last token, if it is plain. The
        scheduler skips the members whose last token is in flight (they hold their blocks), the
        others decode, preempting from the back where the pool runs out; it reads those last tokens
        back, and they finish. Not planned (the engine makes it) where nothing would decode, where a
        victim would be one of the skipped (or one the run cannot preempt), or where the queue's head
        could be admitted (the budget is larger by the members skipped; a step that preempts admits
        nothing)."""
        left, computed = steps.left, steps.computed
        done = [j for j in range(num) if left[j] < step]
        gone = set(done)
        before = num
        num = self._preempt_to_fit(plan, steps.members, step, num, done)
        if num is None:
            return  # the plan's state past the run's steps is never committed
        batch = num - len(done)
        if not batch:
            return
        budget = self.engine.scheduler.config.max_num_batched_tokens - batch
        if num == before and self._admission(plan, head, head_len, head_computed, num, budget)[0] != _BLOCKED:
            return
        kept = [c for j, c in enumerate(computed[:num]) if j not in gone]
        held = sum(kept) + batch * step  # the tokens of the batch's sequences after it
        split = self.engine.runner.cost_model.decode_host_device(batch, held, max(kept) + step, 0, 0)
        if split is None:
            return
        _clock(steps, *split, True)
        steps.nums.append(batch)
        steps.decoding.append(batch)
        steps.preempted.append(before - num)
        steps.contexts.append(held)
        steps.done = done
        steps.held_last = held + sum(computed[j] + step - 1 for j in done)
        self.finishing_preemptions += before > num

    def _preempt_to_fit(self, plan: DecodeRun, members: list, step: int, num: int,
                        skip: list[int] = ()) -> int | None:
        """``Scheduler.schedule`` at ``step`` (the first ``num`` members decoding, ``skip`` left
        out): the last one preempted by recompute until the one that could not grow fits. The
        members left, or None where a victim is not modelled (the only one, a skipped one, a
        request's group, a swap, blocks shared with another)."""
        j = plan.allocate(step, num, skip=skip)
        while j is not None:
            victim = num - 1
            if (not victim or victim in skip or self.engine.scheduler._swap
                    or members[victim].params.num_seqs > 1 or not plan.release(victim, step)):
                return None
            num -= 1
            if victim == j:
                break
            j = plan.allocate(step, num, start=j, skip=skip)
        return num

    @staticmethod
    def _planned(steps: _Steps) -> _Steps | None:
        return steps if steps.nums else None

    def _admission(self, plan: DecodeRun, head: Sequence | None, head_len: int, computed: int,
                   num: int, budget: int | None = None) -> tuple[int, int]:
        """What ``Scheduler._admit`` would do with ``head`` (``head_len`` tokens, ``computed`` of
        them computed) at this step, ``num`` sequences in the batch: (_BLOCKED | _ADMIT |
        _UNKNOWN, tokens it would compute)."""
        if head is None:
            return _BLOCKED, 0
        cfg = self.engine.scheduler.config
        if budget is None:
            budget = cfg.max_num_batched_tokens - num
        if budget <= 0 or num >= cfg.max_num_seqs:
            return _BLOCKED, 0  # no admission is tried
        if cfg.enable_prefix_caching or head.followers:
            return _UNKNOWN, 0  # a prefix lookup (it changes the cache's counts) or a group: not modelled
        full = (head.prompt_len - 1 if head.fork_pending else head_len) - computed
        n = min(full, budget)  # Scheduler._chunk
        if n <= 0:
            return _UNKNOWN, 0
        if n < full and not cfg.enable_chunked_prefill:
            return _BLOCKED, 0  # it waits for a budget that decode tokens keep taken
        if not plan.may_admit(head, n):
            return _BLOCKED, 0
        plain = (n == full and not computed and not head.fork_pending and head.params.num_seqs == 1
                 and head.length_only and head.quiet and head.params.beam_width == 1)
        return (_ADMIT if plain else _UNKNOWN), n

    def _admissions(self, plan: DecodeRun, num: int) -> list[tuple] | None:
        """The first step's admissions (``Scheduler._admit``'s loop over the queue), each made in
        ``plan``; None if one of them is not modelled."""
        if not plan.admits:
            return None
        budget = self.engine.scheduler.config.max_num_batched_tokens - num
        out: list[tuple] = []
        for head in self.engine.scheduler.waiting:
            verdict, n = self._admission(plan, head, len(head.token_ids), head.num_computed_tokens,
                                         num + len(out), budget)
            if verdict == _BLOCKED:
                break
            if verdict == _UNKNOWN or not plan.admit(head, n):
                return None
            out.append((head, n))
            budget -= n
        return out

    # -- the run -------------------------------------------------------------------------------
    def _advance(self, plan: DecodeRun, steps: _Steps) -> int:
        e = self.engine
        sched, runner = e.scheduler, e.runner
        members, nums, times = steps.members, steps.nums, steps.times
        k = len(nums)
        if e.config.record_memory:
            self._record_memory(plan, steps)
        # the allocator and the scheduler's queues: the victims preempted and the first step's
        # admissions made by the scheduler's own code, in their order
        batch = ScheduledBatch()

        def preempt(j: int) -> None:
            victim = sched.running.pop()
            assert victim is members[j], "a run preempts from the back"
            sched._preempt(victim, batch)

        def admit() -> None:
            admitted = ScheduledBatch()
            sched._admit(admitted, sched.config.max_num_batched_tokens - steps.decoding[0])
            assert [(s, n) for s, n in zip(admitted.seqs, admitted.num_new_tokens)] == steps.admitted, \
                "the run's admissions are the scheduler's"

        waiting = len(sched.waiting) - len(steps.admitted)  # after the first step's admissions
        done = steps.done
        plan.commit(k, preempt, admit, skipped=done)
        # the sequences: one token per step in the batch, the ids SimRunner gives; the victims
        # until their step (the scheduler has set them back to nothing computed), the members
        # the last step skipped until the step before
        ins = [k] * len(members)
        for step, j in plan.released:
            if step > k:
                break
            ins[j] = step - 1
        for j in done:
            ins[j] = k - 1
        ends = np.array(steps.computed, dtype=np.int64)[:, None] + np.arange(1, k + 1)
        ids = np.array([s.seq_id for s in members], dtype=np.int64)[:, None]
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
        overlap = e.config.async_scheduling
        if overlap:
            handle = self._append_pending(steps, tokens.tolist(), ins, e._inflight)
        else:
            self._append_tokens(steps, tokens.tolist(), ins)
        for j in done:
            members[j].num_computed_tokens = steps.computed[j] + k - 1
        for seq, _ in steps.admitted:  # as _advance and _resolve_sampled of the first step
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = times[0]
            if seq.first_token_time is None and (k > 1 or not overlap):  # asynchronous: read back a step later
                seq.first_token_time = times[2 if overlap else 1]
        # the runner and the clock, as k launches (or calls of execute) leave them
        busy = runner.busy_s
        for dt in steps.busy:
            busy += dt
        runner.busy_s = busy
        runner.num_steps += k
        if runner.profiled and runner.vmm_counter is not None:
            runner.vmm_counter.take()  # charged to the run's first step (before its finishes unmap)
        e.clock.t = times[-1]
        # step records (the last one after the finishes: it counts the sequences left)
        context, records = steps.contexts, []
        admitted_tokens = sum(n for _, n in steps.admitted)
        # asynchronous: all k here (the sequences running after a finishing step are its batch,
        # nums[-1]); synchronous: the last one after the finishes below
        for i in range(k if overlap else k - 1):
            waiting += steps.preempted[i]
            records.append((times[i], times[i + 1] - times[i], nums[i], waiting, nums[i], 0 if i else admitted_tokens,
                            steps.decoding[i], steps.preempted[i], 0.0, context[i], 0, 0, 0, 0.0, 0.0))
        if overlap:
            e.num_generation_tokens += sum(nums[:-1])
            e._inflight = e._launched = handle
            runner.device_free_at = steps.device_free
            e._wait_s = steps.last_wait
            # the last step read back the last tokens of those it skipped (LLMEngine._resolve)
            finished = self._finish([members[j] for j in done]) if done else 0
        else:
            e.num_generation_tokens += sum(nums)
            finished = self._finish(members[:nums[-1]])
            e._wait_s = 0.0
            records.append((times[k - 1], times[k] - times[k - 1], len(sched.running), len(sched.waiting), nums[-1],
                            admitted_tokens if k == 1 else 0, steps.decoding[-1], steps.preempted[-1], 0.0,
                            context[-1], 0, 0, 0, 0.0, 0.0))
        e.step_records.extend(records)
        e.isolator.step_succeeded()
        return finished

    @staticmethod
    def _append_tokens(steps: _Steps, tokens: list[list[int]], ins: list[int]) -> None:
        """Synchronous steps: each member's tokens of the ``ins[j]`` steps it took part in, each
        read at its step's end."""
        times, k = steps.times, len(steps.nums)
        after = times[1:]
        for seq, toks, n, c in zip(steps.members, tokens, ins, steps.computed):
            if n < k:  # preempted before step n + 1
                toks = toks[:n]
                seq.token_ids += toks
                seq.output_token_ids += toks
                seq.token_times += after[:n]
            else:
                seq.num_computed_tokens = c + k
                seq.token_ids += toks
                seq.output_token_ids += toks
                seq.token_times += after

    def _append_pending(self, steps: _Steps, tokens: list[list[int]], ins: list[int], inflight):
        """Asynchronous steps, in one pass over the members: the run's first step reads back the
        step launched before it (``LLMEngine._resolve``: the pending last token of each running
        member, no token ends its sequence, ``_decode_state`` saw to it); each step's tokens are
        read back at the next step; the last step's stay in flight (a pending place, as
        ``Sequence.append_pending``), in the handle returned, as ``AsyncSimRunner.launch`` and
        ``LLMEngine._step`` leave it."""
        from experiments.simulate import SimStepHandle

        times, k = steps.times, len(steps.nums)
        now, read = times[1], times[1:]  # the read-back times of the step in flight, then the run's
        ready = inflight._ready
        held = len(inflight.seqs)  # the first ``held`` members (``_inflight_decodes``)
        self.engine.num_generation_tokens += held
        seqs, last, positions = [], [], []  # the last step's batch, its tokens and their places
        for j, (seq, toks, n, c) in enumerate(zip(steps.members, tokens, ins, steps.computed)):
            ids, out, at = seq.token_ids, seq.output_token_ids, seq.token_times
            if j < held:  # Sequence.resolve of its token in flight (the last place)
                token, logprob, top = ready[j]
                ids[-1] = out[-1] = token
                if logprob is not None:
                    seq.output_logprobs.append(logprob)
                if top is not None:
                    seq.output_top_logprobs.append(top)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                at.append(now)
            if n < k:  # preempted before step n + 1 (or skipped by the last): its tokens of n steps
                toks = toks[:n]
                ids += toks
                out += toks
                at += read[1:n + 1]
            else:
                seq.num_computed_tokens = c + k
                seqs.append(seq)
                last.append((toks[-1], None, None))
                toks[-1] = PENDING
                ids += toks
                out += toks
                at += read[1:]
                positions.append(len(ids) - 1)
        return SimStepHandle.pending(seqs, last, positions, steps.device_free, self.engine.clock)

    def _record_memory(self, plan: DecodeRun, steps: _Steps) -> None:
        """What ``_record_memory`` and ``_advance`` record at each step of the run: the stats
        row, the live sequences' capacities (the accountant's intervals) and the tokens they hold."""
        e = self.engine
        acc, logical = e.accountant, e.logical_tokens
        members, nums, held = steps.members, steps.nums, steps.contexts
        if steps.done:  # the members the last step skipped are live until it reads them back
            nums, held = nums[:-1] + [nums[-1] + len(steps.done)], held[:-1] + [steps.held_last]
        capacity, rows = plan.stats_rows(steps.decoding)
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
                    acc.record_run(seg_rows, members, seg_changes)
                    seg_rows, seg_changes = [], []
                acc.record_seqs(MemoryStats(capacity, **dict(zip(STAT_FIELDS, row))), members[:num], caps[:num])
            else:
                seg_rows.append(row)
                seg_changes.append(changed)
        if seg_rows:
            acc.record_run(seg_rows, members, seg_changes)
        if logical.extend([(step0 + i, h) for i, h in enumerate(held)]):
            logical.spill_before(len(logical.chunks))

    def _finish(self, batch: list) -> int:
        """The last step's stop checks (``_resolve_sampled``): the sequences whose length is
        reached finish, in batch order; their requests go to the output stage, which retires
        them (their outputs are not built: the driver only counts them). Returns that count."""
        e = self.engine
        touched = {}
        for seq in batch:
            if len(seq.output_token_ids) >= seq.done_at:
                e._finish_seq(seq, "length", len(seq.token_ids) - 1)
                touched[seq.request_id] = e.requests[seq.request_id]
        return e.output_processor.retire_quiet(touched.values(), e) if touched else 0


def _clock(steps: _Steps, host: float, device: float, overlap: bool) -> None:
    """The clock after a step of ``host`` and ``device`` seconds: synchronous, the runner's
    ``execute`` (the cost model's step time); asynchronous, ``AsyncSimRunner.launch`` (the host's
    part moves the clock, the device's starts when the device is free), then the read-back of the
    step before (``SimStepHandle.wait``: the clock waits for its device end)."""
    t = steps.times[-1]
    if overlap:
        if host > 0:  # VirtualClock.advance
            t += host
        launched = t
        free = steps.device_free = max(t, steps.device_free) + device
        wait = steps.ready - t
        if wait > 0:  # t + wait, as VirtualClock.advance adds it (not always steps.ready)
            t += wait
        steps.last_wait = t - launched
        steps.ready = free
        steps.busy.append(host + device)
    else:
        dt = device + host
        if dt > 0:
            t += dt
        steps.busy.append(dt)
    steps.times.append(t)


def _decode_state(running: list, pending: bool = False) -> tuple[list[int], list[int]]:
    """(steps until each of ``running`` samples its last token, the tokens each has computed)
    if every one is in the plain decode case (one token to compute, no stop but its length,
    nothing to report before its end); else two empty lists. ``pending``: asynchronous steps,
    each one's last token still in flight (``_inflight_decodes``; its first may be too)."""
    left, computed = [], []
    for seq in running:
        out = seq.output_token_ids
        if (not out or seq.fork_pending or not seq.length_only or not seq.quiet or seq.params.beam_width > 1
                or len(seq.token_ids) - seq.num_computed_tokens != 1
                or (seq.first_token_time is None and not pending)
                or seq.first_scheduled_time is None or len(out) >= seq.done_at):
            return [], []
        left.append(seq.done_at - len(out))
        computed.append(seq.num_computed_tokens)
    return left, computed


def _inflight_decodes(e: LLMEngine, handle) -> bool:
    """Asynchronous steps: the step in flight (launched, not read back) sampled the last token
    of every running sequence, in their order, and of no other: the state a run starts from."""
    running = e.scheduler.running
    if (handle is None or handle is not e._launched or len(handle.seqs) != len(running)
            or len(handle.positions) != len(running)):
        return False
    for seq, other, pos in zip(running, handle.seqs, handle.positions):
        if seq is not other or pos != len(seq.token_ids) - 1 or seq.token_ids[pos] != PENDING:
            return False
    return True
