"""Simulate mode's runners: what stands in for the model runner, on a virtual clock.

``SimRunner`` "computes" a scheduled batch by advancing a ``VirtualClock`` by the cost model's
step time and emits a token wherever the real runner would sample one; ``AsyncSimRunner`` does
the same for asynchronous scheduling (a step launched before the one in flight is read back,
``SimStepHandle``). ``MapCounter`` counts the VMM calls a virtual allocator makes on a step's
critical path, which the cost model charges. Built by ``experiments.simulate.simulated_engine``.
"""
from __future__ import annotations

from experiments.costmodel import RooflineCostModel


class VirtualClock:
    """Simulated seconds; the engine calls it like ``time.perf_counter``."""

    __slots__ = ("t",)

    def __init__(self, start: float = 0.0):
        self.t = float(start)

    def __call__(self) -> float:
        return self.t

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self.t += seconds


class SimRunner:
    """Stands in for ``ModelRunner``: a step costs ``cost_model.step_time`` of its batch."""

    def __init__(self, cost_model: RooflineCostModel, clock: VirtualClock, vocab_size: int,
                 eos_token_ids: list[int] | None = None, allocator=None, pcie_bandwidth: float = 0.0,
                 transfer_latency_s: float = 0.0):
        self.cost_model = cost_model
        self.clock = clock
        self.vocab_size = vocab_size
        self.eos = set(eos_token_ids or ())
        self.allocator = allocator
        self.pcie_bandwidth = pcie_bandwidth
        self.transfer_latency_s = transfer_latency_s
        self.kv_bytes_per_token = cost_model.model.kv_bytes_per_token
        self.profiled = getattr(cost_model, "name", "") == "profiled"
        self.vmm_counter = (MapCounter(allocator) if self.profiled and getattr(allocator, "backend", None) is not None
                            else None)
        self.num_steps = 0
        self.busy_s = 0.0
        self.swap_s = 0.0

    def _token(self, seq) -> int:
        # a deterministic, sequence-specific id (never EOS): samples of one request diverge, as
        # they would when sampled, so prefix caching only shares what real runs share
        t = 4 + (seq.seq_id * 7919 + seq.num_tokens * 104729) % (self.vocab_size - 4)
        return t if t not in self.eos else 4 + (t + 1 - 4) % (self.vocab_size - 4)

    # beam search without logits: every ``beam_period``-th output token (the first included) the
    # best beam's continuations take all k places, so the other beams are dropped and forked
    # again from it; on the other tokens every beam keeps its own best continuation (no fork)
    beam_period = 4
    _BEAM_GAP = 1000.0  # a logprob gap no accumulated difference between beams reaches

    def beam_candidates(self, seq, k: int) -> list[tuple[int, float]]:
        """``seq``'s k continuations (token, logprob), most likely first, by the fixed rule above:
        on a fork token beam ``i`` (``seq.index``; beam 0 holds the best) proposes logprobs
        ``-i * GAP - j`` (j = 0 .. k-1), so beam 0 takes every place; on the others each beam
        proposes ``0, -GAP, -GAP - 1, ..``, so each keeps its own first token. Token ids are
        deterministic, distinct, never EOS."""
        fork = (seq.num_output_tokens - 1) % self.beam_period == 0
        gap = self._BEAM_GAP
        lps = ([-seq.index * gap - j for j in range(k)] if fork else
               [0.0] + [-gap - j for j in range(k - 1)])
        span = self.vocab_size - 4
        x = 4 + (seq.seq_id * 7919 + seq.num_tokens * 104729) % span
        tokens: list[int] = []
        while len(tokens) < min(k, span):
            if x not in self.eos and x not in tokens:
                tokens.append(x)
            x = 4 + (x + 1 - 4) % span
        return list(zip(tokens, lps))

    def _swap_time(self, batch) -> float:
        """PCIe time of this step's host<->device copies, as the scheduler made them (one per
        sequence or per group of samples, whose shared blocks travel once; whole blocks)."""
        if not batch.swap_transfers:
            return 0.0
        block_bytes = getattr(self.allocator, "block_size", 1) * self.kv_bytes_per_token
        if self.profiled:  # measured copies, by size and direction
            return sum(self.cost_model.swap_time([n * block_bytes], way) for way, n in batch.swap_transfers)
        blocks = sum(n for _, n in batch.swap_transfers)
        return blocks * block_bytes / self.pcie_bandwidth if self.pcie_bandwidth else 0.0

    def _copy_time(self, nbytes: int, direction: str) -> float:
        """One host<->device memcpy: measured by size and direction where profiled, else a fixed
        cost per transfer plus its bytes over the PCIe bandwidth."""
        if self.profiled:
            return self.cost_model.swap_time([nbytes], direction)
        return self.transfer_latency_s + (nbytes / self.pcie_bandwidth if self.pcie_bandwidth else 0.0)

    def _tier_time(self, batch, compute_s: float) -> float:
        """Seconds the host tier's copies add to this step. Loads are issued when the step is
        scheduled and the step waits for them (exposed); stores run on the copy stream beside the
        step's compute and are exposed only beyond it. The copy times go into the tier's stats."""
        transfers = getattr(batch, "tier_transfers", None)
        if not transfers:
            return 0.0
        load = store = 0.0
        for t in transfers:
            dt = self._copy_time(t.nbytes, t.direction)
            if t.direction == "h2d":
                load += dt
            else:
                store += dt
        exposed = load + max(0.0, store - compute_s)
        stats = self.allocator.host_tier.stats
        stats.load_s += load
        stats.store_s += store
        stats.exposed_s += exposed
        return exposed

    def execute(self, batch) -> list:
        sampled, work = self._sample(batch)
        swap = self._swap_time(batch)
        self.swap_s += swap
        if self.profiled:
            maps, unmaps = self.vmm_counter.take() if self.vmm_counter is not None else (0, 0)
            dt = self.cost_model.step_time(work, len(sampled), maps, unmaps) + swap
        else:
            dt = self.cost_model.step_time(work) + swap
        dt += self._tier_time(batch, dt)
        self.clock.advance(dt)
        self.num_steps += 1
        self.busy_s += dt
        return sampled

    def _sample(self, batch) -> tuple[list, list[tuple[int, int]]]:
        """The (seq, token, None) samples of a step and its (new tokens, context) work."""
        # comprehensions, not one loop with appends: this runs once per sequence per step
        seqs, news = batch.seqs, batch.num_new_tokens
        ends = [seq.num_computed_tokens + n for seq, n in zip(seqs, news)]
        work = list(zip(news, ends))
        span, eos = self.vocab_size - 4, self.eos
        # a sequence whose new tokens reach its end samples one: _token inlined
        sampled = [(seq, self._token(seq) if (t := 4 + (seq.seq_id * 7919 + end * 104729) % span) in eos else t, None)
                   for seq, end in zip(seqs, ends) if end == len(seq.token_ids)]
        return sampled, work


class AsyncSimRunner(SimRunner):
    """``SimRunner`` for ``async_scheduling``: the engine launches a step, then reads back the
    previous one's tokens while it runs. The host's part of a step (scheduling, input
    preparation, VMM calls on its thread) takes the clock forward; its device part starts once
    the host has launched it and the device has finished the step before, and its tokens are
    known when it ends (``SimStepHandle``): host work hides behind the device's previous step,
    and a step period is the longer of the two."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.device_free_at = 0.0

    def launch(self, batch, inflight=None):
        sampled, work = self._sample(batch)
        swap = self._swap_time(batch)
        self.swap_s += swap
        maps, unmaps = self.vmm_counter.take() if self.vmm_counter is not None else (0, 0)
        host, device = self.cost_model.host_device_time(work, len(sampled), maps, unmaps)
        device += swap
        device += self._tier_time(batch, device)
        self.clock.advance(host)
        start = max(self.clock(), self.device_free_at)
        self.device_free_at = start + device
        self.num_steps += 1
        self.busy_s += host + device  # what the step costs, as in SimRunner (overlapped or not)
        return SimStepHandle(sampled, self.device_free_at, self.clock)


class SimStepHandle:
    """A simulated step's tokens, known at ``ready_at`` on the virtual clock: reading them moves
    the clock there (the wait for the device), as ``StepHandle.results`` waits for an event."""

    __slots__ = ("seqs", "positions", "_ready", "ready_at", "clock")

    def __init__(self, sampled: list, ready_at: float, clock: VirtualClock):
        self.seqs = [s for s, _, _ in sampled]
        self.positions: list[int] = []
        self._ready = [(t, lp, None) for _, t, lp in sampled]
        self.ready_at, self.clock = ready_at, clock

    @classmethod
    def pending(cls, seqs: list, ready: list, positions: list[int], ready_at: float,
                clock: VirtualClock) -> SimStepHandle:
        """A launched step as ``LLMEngine._step`` leaves it (its places set), from lists made
        already (simulate's bulk path)."""
        handle = cls.__new__(cls)
        handle.seqs, handle._ready, handle.positions = seqs, ready, positions
        handle.ready_at, handle.clock = ready_at, clock
        return handle

    @property
    def complete(self) -> bool:
        return self.clock() >= self.ready_at

    def wait(self) -> None:
        self.clock.advance(self.ready_at - self.clock())

    def results(self) -> list:
        if self.seqs:  # a step that samples nothing is not waited for (StepHandle.results)
            self.wait()
        return self._ready


class MapCounter:
    """VMM driver calls a virtual allocator makes on a step's critical path: page maps of groups
    not mapped ahead (the real engine maps those on a background thread), one per range, and
    every unmap (reclaiming). In simulate its backend maps nothing; the counts are the real
    engine's, decision for decision."""

    def __init__(self, allocator):
        self.allocator = allocator
        self.sync_maps = self._synchronous()
        self.unmaps = 0
        backend = allocator.backend
        inner = backend.unmap

        def counted(*args, **kwargs):
            self.unmaps += 1
            return inner(*args, **kwargs)

        backend.unmap = counted

    def _synchronous(self) -> int:
        """Groups mapped on the caller's thread so far: growth and admission, and pages shared
        from another slot's prefix."""
        a = self.allocator
        return a.num_sync_maps + getattr(a, "num_shared_maps", 0)

    def peek(self) -> tuple[int, int]:
        """(page maps, page unmaps) since the last ``take``, which it leaves counted."""
        return (self._synchronous() - self.sync_maps) * self.allocator.num_ranges, self.unmaps

    def take(self) -> tuple[int, int]:
        """(page maps, page unmaps) since the last call."""
        counts = self.peek()
        self.sync_maps, self.unmaps = self._synchronous(), 0
        return counts
