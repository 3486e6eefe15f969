"""Simulate mode in bulk: runs of decode steps in which the schedule is plain.

Most steps of a saturated simulation are alike: every running sequence computes its one
decode token and the allocator only grows each sequence by a token; now and then the pool runs
out and the scheduler preempts the last ones, or a request finishes and the queue's head is
admitted. :class:`DecodeFastForward` plans the run of such steps that starts now, step by step
but on sums and per-event lists (the cost model's step time from the batch's sums, the
allocator's ``DecodeRun``: who takes a block when, who is preempted, who is admitted, who
finishes), then applies it at once: the sampled tokens appended to each sequence as one list,
the step records, memory rows and live-token counts appended per run, the allocator changed
once (``DecodeRun.commit``), the victims and admissions made by the scheduler's own
``_preempt`` and ``_admit``, and the sequences that reach their length finished by the engine's
own code, each in its place among them (the memory rows up to its step recorded first).

Where the allocator models finishes and admissions at any step (a paged pool: ``DecodeRun.finish``,
``DecodeRun.admit``), a run goes on past the steps at which sequences finish: their blocks go
back to the pool, and the next step admits from the queue (a victim of the run too, with the
tokens it had). Elsewhere a run ends with the first step at which some finish, and admits at
its first step only. A run makes ``MAX_STEPS`` steps at most.

Asynchronous scheduling (``AsyncSimRunner``): a run starts with a step in flight that sampled
the last token of every running sequence. Each step launches (the host's part moves the clock,
the device's starts when the device is free), then reads back the step before it (the clock
waits for the device); the first step reads back the step in flight, and the last one is left
in flight, its tokens pending, as ``LLMEngine._step`` leaves it. A sequence whose last token is
in flight is not scheduled again (it holds its KV; the step's token budget is larger by it) and
finishes when the step reads that token back. The cost model gives each step's host and device
parts from the sums.

A run stops before the first step that could differ from that pattern, and that step goes
through ``LLMEngine.step`` as always:

- an arrival (the driver adds requests before a step whose clock has passed their time);
- a step in which the allocator would have to decide something it has no model of
  (``KVAllocator.decode_run``): copy-on-write, mapping a page, a region that is full. A paged
  pool that runs out is modelled: the scheduler preempts from the back (by recompute), the
  victims' blocks go back to the pool, as ``Scheduler.schedule`` does it; a victim that would
  be an asynchronous step's skipped sequence is not;
- a waiting request that could be admitted where the allocator models no admission (or not
  this one: a paged pool admits plain requests whose whole prompt fits the step's budget; they
  prefill and sample in that step and decode in the next ones). The queue's head is checked at
  the first step, after admissions (the next step's budget is whole again), preemptions (a
  victim heads the queue), finishes (memory came back) and at steps that skip some; in
  between, steps only take memory and keep the budget, so a head that cannot be admitted
  stays so;
- anything outside the plain case: a sequence that is not one decode token, stop tokens or
  text to check, streamed outputs, beams, forks, prefix caching at admission, a host tier,
  windowed attention, fault isolation; with the profiled cost model, a decode step that no
  decode CUDA graph takes (its time needs more than the batch's sums).

The run then makes the same decisions and the same figures as its steps one by one; the
test-suite runs both and compares every step (tests/test_sim_fastpath.py).
"""
from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

from engine.sequence import PENDING
# the making of a planned run lives in sim_fastpath_advance.py, the run's records in sim_fastpath_steps.py
from experiments.sim_fastpath_advance import AdvanceMixin, _MemoryRows
from experiments.sim_fastpath_steps import _clock, _Queue, _Steps

if TYPE_CHECKING:
    from allocators.base import DecodeRun
    from engine.llm_engine import LLMEngine
    from engine.sequence import Sequence

__all__ = ["DecodeFastForward", "MAX_STEPS", "AdvanceMixin", "_MemoryRows", "_Queue", "_Steps", "_clock"]

_BLOCKED, _ADMIT, _UNKNOWN = range(3)  # what Scheduler._admit would do with the queue's head
MAX_STEPS = 64  # steps of one run at most: its token table is members x steps


class DecodeFastForward(AdvanceMixin):
    """``engine.decode_fast_forward`` of a simulated engine; the driver calls it before each step."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.runs = 0  # runs taken
        self.steps = 0  # steps they advanced
        # a run of an allocator that models no admission ends where the next step likely admits:
        # that one goes through engine.step() without being looked at again
        self._after_run = False
        self._plain_types: tuple | None = None
        self.finishing_preemptions = 0  # asynchronous steps that finish some (skipped) and preempt
        self.finishes_within = 0  # steps after which a run went on past finishes (``DecodeRun.finish``)
        self.readmissions = 0  # sequences admitted again in the run that preempted them

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
        """The run's steps: each computes the decode tokens of the live members, preempting from
        the back where the pool runs out, and may admit (where the queue's head could be
        admitted: at the first step, after a preemption, an admission or a finish, and at a step
        that skips some); asynchronous steps skip a member whose last token is in flight (it
        finishes at the step's read-back). Where the plan models finishes (``DecodeRun.finish``)
        the run goes on past them, else it ends with the first step at which some finish. It
        ends before a step whose schedule is not modelled or before which the driver would add
        a request, and after ``MAX_STEPS``."""
        e = self.engine
        sched = e.scheduler
        cfg = sched.config
        limit = min(plan.limit(), MAX_STEPS)
        if not limit:
            return None
        overlap = e.config.async_scheduling
        running = sched.running
        steps = _Steps([], [], [], [e.clock()])
        for seq, c, l in zip(running, computed, left):
            steps.join(seq, c, l, 1, len(seq.token_ids), len(seq.output_token_ids))
        members, vc = steps.members, steps.computed
        live = list(range(len(members)))  # the running order
        alive = [True] * len(members)
        ending: dict[int, list[int]] = {}  # step -> members that sample their last token there
        for j, l in enumerate(left):
            ending.setdefault(l, []).append(j)
        queue = _Queue(sched.waiting)
        waiting = len(sched.waiting)
        # over the live members: their computed tokens, the most of them, and the steps to a
        # max_len (a heap of each one's, the left ones taken out where it matters)
        total, top, room = sum(computed), max(computed), plan.room
        rooms = [(seq.max_len - c, j) for j, (seq, c) in enumerate(zip(members, vc))]
        heapq.heapify(rooms)
        check = True  # admission to check: the head or the budget may have changed
        changed = True  # the live members changed since the last step's row
        runner = e.runner
        cost = runner.cost_model
        # the profiled model charges VMM calls made since the last step to the next one
        vmm = runner.vmm_counter.peek() if runner.profiled and runner.vmm_counter is not None else (0, 0)
        if overlap:
            steps.device_free, steps.ready = runner.device_free_at, e._inflight.ready_at
        for step in range(1, limit + 1):
            if not live or step > room or (step > 1 and next_arrival_s <= steps.times[-1] - t0):
                break
            skip = [j for j in ending.get(step - 1, ()) if alive[j]] if overlap else []
            victims = self._fit(plan, live, step, skip)
            if victims is None:
                break  # the exact step decides
            n_live = len(live) - len(victims)
            batch = n_live - len(skip)
            if not batch or batch > cfg.max_num_batched_tokens:
                break
            admitted: list[tuple] = []
            if victims:  # no admission this step; the last victim heads the queue now
                check = True
            elif check or skip:
                check = False
                head, tokens, done, _ = queue.head()
                budget = cfg.max_num_batched_tokens - batch
                if self._admission(plan, head, tokens, done, n_live, budget)[0] != _BLOCKED:
                    admitted = self._admissions(plan, queue, n_live, budget, step)
                    if not admitted:  # one it cannot model
                        break
                    check = True  # the next head was held back by this step's budget only
            if victims:
                top = max(vc[j] for j in live[:n_live])
            # the decoding members' computed tokens: their sum and the most (the ragged term)
            held = total - sum(vc[j] for j in live[n_live:]) - sum(vc[j] for j in skip) + batch * step
            longest = top
            if any(vc[j] == top for j in skip):
                longest = max(vc[j] for j in live[:n_live] if j not in skip)
            ns = [n for _, n, _ in admitted]
            maps, unmaps = vmm if step == 1 else (0, 0)
            if admitted:  # they prefill all their tokens, and sample
                if runner.profiled:  # SimRunner.execute's work: the decodes, then the admitted prompts
                    split = cost.admission_host_device(batch, held, ns, maps, unmaps)
                    if split is None:
                        work = [(1, vc[j] + step) for j in live[:n_live] if j not in skip] + [(n, n) for n in ns]
                        split = cost.host_device_time(work, len(work), maps, unmaps)
                else:
                    split = cost.sums_host_device(batch + sum(ns), batch + len(ns),
                                                  held + sum(n * (n + 1) // 2 for n in ns), held + sum(ns))
            else:
                split = cost.decode_host_device(batch, held, longest + step, maps, unmaps)
                if split is None:  # the step is not timed from sums (an eager decode step): it goes alone
                    break
            # the step is made
            _clock(steps, *split, overlap)
            for v in victims:  # (last first) each heads the queue in turn, with its tokens then
                alive[v] = False
                c = steps.count[v] = step - steps.first[v]
                tokens, out = steps.base[v]
                queue.front.append((members[v], tokens + c, 0, out + c))
            del live[n_live:]
            total -= sum(vc[v] for v in victims)
            self.readmissions += min(len(admitted), len(queue.front))  # the queue's head: the run's victims
            queue.take(len(admitted))
            for seq, n, out in admitted:  # each decodes from the next step on
                j = steps.join(seq, n - step, step - 1 + seq.done_at - out, step, n, out)
                alive.append(True)
                live.append(j)
                ending.setdefault(steps.left[j], []).append(j)
                total += vc[j]
                top = max(top, vc[j])
                room = min(room, seq.max_len - vc[j])
                heapq.heappush(rooms, (seq.max_len - vc[j], j))
            if admitted:
                steps.admitted[step] = [(seq, n) for seq, n, _ in admitted]
            if changed or victims or admitted:
                steps.lives[step] = list(live)
            steps.nums.append(batch + len(admitted))
            steps.decoding.append(batch)
            steps.preempted.append(len(victims))
            steps.contexts.append(held + sum(ns))
            steps.held.append(held + sum(ns) + sum(vc[j] + step - 1 for j in skip))
            waiting += len(victims) - len(admitted)
            self.finishing_preemptions += bool(skip and victims)
            # who finishes: synchronous, those that sampled their last token; asynchronous, those
            # the step skipped (it reads their last token back)
            done = skip if overlap else [j for j in ending.get(step, ()) if alive[j]]
            changed = bool(done)
            if done:
                steps.finished[step] = done
                for j in done:
                    alive[j] = False
                    steps.count[j] = step - steps.first[j] + (0 if overlap else 1)
                live = [j for j in live if alive[j]]
                total -= sum(vc[j] for j in done)
                top = max((vc[j] for j in live), default=0)
                modelled = plan.finish(done, step, [vc[j] + step - overlap for j in done])
                if modelled:
                    steps.modelled.add(step)
                    self.finishes_within += 1
                    while rooms and not alive[rooms[0][1]]:
                        heapq.heappop(rooms)
                    room = rooms[0][0] if rooms else room
            steps.running.append(len(live))
            steps.waiting.append(waiting)
            if done and not modelled:
                break
            if done:
                check = True  # their memory is free at the next step
        return steps if steps.nums else None

    def _fit(self, plan: DecodeRun, live: list[int], step: int, skip: list[int]) -> list[int] | None:
        """``Scheduler.schedule`` at ``step`` (the live members decoding, ``skip`` left out): the
        last one preempted by recompute until the one that could not grow fits. The victims, the
        last member first, or None where a victim is not modelled (the only one, a skipped one, a
        request's group, a swap, blocks shared with another)."""
        victims: list[int] = []
        j = plan.allocate(step, live[-1] + 1, skip=skip)
        while j is not None:
            left = len(live) - len(victims)
            victim = live[left - 1]
            if (left <= 1 or victim in skip or self.engine.scheduler._swap
                    or plan.seqs[victim].params.num_seqs > 1 or not plan.release(victim, step)):
                return None
            victims.append(victim)
            if victim == j:
                break
            j = plan.allocate(step, victim, start=j, skip=skip)
        return victims

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

    def _admissions(self, plan: DecodeRun, queue: _Queue, num: int, budget: int,
                    step: int) -> list[tuple] | None:
        """A step's admissions (``Scheduler._admit``'s loop over the queue), each made in
        ``plan``: (seq, tokens, its output tokens); None if one of them is not modelled."""
        if not plan.admits:
            return None
        out: list[tuple] = []
        for seq, tokens, computed, out_len in queue.entries():
            verdict, n = self._admission(plan, seq, tokens, computed, num + len(out), budget)
            if verdict == _BLOCKED:
                break
            if verdict == _UNKNOWN or not plan.admit(seq, n, step):
                return None
            out.append((seq, n, out_len))
            budget -= n
        return out


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
