"""Iteration-level continuous batching with a token budget and chunked prefill.

Each step: running sequences first (decode tokens and unfinished prefill chunks, in
arrival order), preempting from the back when the allocator is full (by swapping to host
memory where the allocator can and ``preemption_mode='swap'``, else by recompute); then
swapped sequences come back, then waiting ones are admitted, while the token budget,
``max_num_seqs`` and the allocator allow. The scheduler knows nothing of the model, so
simulate mode runs it unchanged.

The samples of a request (n > 1) are preempted together, as vLLM preempts sequence groups:
by recompute, one of them (the leader) goes back to the queue with the others parked on it
(``Sequence.followers``), so that when its prompt is computed again they fork from it and
share the prompt once more; by swap, their blocks go out and come back together, shared
blocks once (the allocator's ``swap_out_group`` / ``swap_in_group``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from allocators.base import KVAllocator
from engine.preemption import PreemptionMixin, group_kv_tokens
from engine.sequence import SeqStatus, Sequence

__all__ = ["PREEMPTION_MODES", "ScheduledBatch", "Scheduler", "SchedulerConfig", "group_kv_tokens"]

PREEMPTION_MODES = ("recompute", "swap")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False
    preemption_mode: str = "recompute"

    def __post_init__(self) -> None:
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode '{self.preemption_mode}': choose one of {PREEMPTION_MODES}")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    swapped_out: int = 0
    swapped_in: int = 0
    # one entry per host<->device copy this step made: ("d2h" | "h2d", blocks); a group's
    # shared blocks travel once (simulate charges these)
    swap_transfers: list[tuple[str, int]] = field(default_factory=list)
    # the host KV tier's memcpys of this step (allocators.host_tier.Transfer); simulate charges these
    tier_transfers: list = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        # a decode token extends a sequence whose prompt and outputs are all cached
        if n == 1 and seq.output_token_ids and len(seq.token_ids) - seq.num_computed_tokens == 1:
            self.num_decode_tokens += 1
        else:
            self.num_prefill_tokens += n

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler(PreemptionMixin):
    def __init__(self, config: SchedulerConfig, allocator: KVAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.num_swaps = 0
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found in the prefix cache
        self.prefix_host_hits = 0  # of prefix_hits, loaded from the host KV tier
        self.recomputed_tokens = 0  # prompt tokens computed again only because their cached KV was evicted
        self._swap = config.preemption_mode == "swap" and allocator.supports_swap
        # groups swap where the allocator can keep their shared blocks shared; else they recompute
        self._group_swap = self._swap and hasattr(allocator, "swap_out_group")
        # set by the engine while a beam-search request lives: its beams then run in lockstep
        # (every live beam in the same step, the same tokens each; see _beam_cap)
        self.has_beams = False

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and give back its memory (before its status
        changes: the status names its queue)."""
        queue = {SeqStatus.RUNNING: self.running, SeqStatus.WAITING: self.waiting,
                 SeqStatus.SWAPPED: self.swapped}.get(seq.status)
        if queue is not None and seq in queue:  # identity comparison (Sequence has eq=False)
            queue.remove(seq)
        self.allocator.free(seq)
        if seq.followers:  # samples parked on it still need a prompt to fork from
            self._promote(seq)

    def _promote(self, leader: Sequence) -> None:
        """The first follower of a leader that leaves becomes the group's leader, at the head of
        the queue with the others parked on it."""
        heir, rest = leader.followers[0], leader.followers[1:]
        heir.followers, heir.fork_pending = rest, leader.fork_pending - 1
        leader.followers, leader.fork_pending = [], 0
        heir.status = SeqStatus.WAITING
        self.waiting.appendleft(heir)

    def requeue(self, seqs: list[Sequence]) -> None:
        """Put running sequences back at the head of the queue, KV dropped (as a recompute
        preemption, without counting one): a failed step is undone this way."""
        for seq in reversed(seqs):
            if seq.status != SeqStatus.RUNNING:
                continue
            self.running.remove(seq)
            self.allocator.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SeqStatus.WAITING
            self.waiting.appendleft(seq)

    @staticmethod
    def _decode_run(running: list[Sequence], i: int, limit: int, only: set[str] | None) -> list[Sequence]:
        """The sequences from ``running[i]`` on (at most ``limit``) that each compute just their
        last sampled token: a decode token, with no chunk, fork or stop to decide."""
        run = []
        for seq in running[i:i + limit]:
            out = seq.output_token_ids
            if (not out or seq.fork_pending or len(out) >= seq.done_at
                    or len(seq.token_ids) - seq.num_computed_tokens != 1
                    or (only is not None and seq.request_id not in only)):
                break
            run.append(seq)
        return run

    @staticmethod
    def _beam_cap(running: list[Sequence], i: int, n: int, budget: int) -> tuple[int, int]:
        """Beam search reads every live beam's token of a step together (LLMEngine._beam_step),
        so the beams of ``running[i]``'s request (next to each other in ``running``, with as
        many tokens to compute each) compute the same tokens in the same step: at most ``n``
        each, all within ``budget``. Returns (tokens each, 0: not this step; the group's size)."""
        rid, j = running[i].request_id, i
        while j < len(running) and running[j].request_id == rid:
            j += 1
        size = j - i
        return min(n, budget // size), size

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> int:
        """Tokens to compute for ``seq`` now; a request about to fork stops one short of its
        prompt, so each sample computes (and samples from) the last prompt token itself."""
        pending = len(seq.token_ids) - seq.num_computed_tokens
        if seq.fork_pending:
            pending = seq.prompt_len - 1 - seq.num_computed_tokens
        return min(pending, budget)

    @staticmethod
    def _count_tokens(batch: ScheduledBatch) -> tuple[int, int]:
        """(prefill, decode) tokens of the batch, classified as ``ScheduledBatch.add`` does."""
        prefill = decode = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if n == 1 and seq.output_token_ids and len(seq.token_ids) - seq.num_computed_tokens == 1:
                decode += 1
            else:
                prefill += n
        return prefill, decode

    def schedule(self, only: set[str] | None = None) -> ScheduledBatch:
        """``only``: schedule just these requests (the engine isolating a fault); no swap-in."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        allocator = self.allocator
        can_allocate, allocate, allocate_batch = allocator.can_allocate, allocator.allocate, allocator.allocate_batch
        running = self.running
        seqs, news = batch.seqs, batch.num_new_tokens
        prefill = decode = 0
        regrouped = False  # a group preemption took back sequences already in the batch
        # the running loop runs once per sequence per step: _chunk, length_done and
        # ScheduledBatch.add inlined (simulate mode spends most of its time here). Preemption
        # pops from the back, which ends the iteration early, as it should
        beams = self.has_beams
        cap, cap_rid = 0, None  # beam search: the tokens each beam of request cap_rid computes now
        i = 0
        while i < len(running) and budget > 0:
            # a run of sequences that each decode one token grows in one allocator call; the
            # first of them that does not fit, and every other sequence, takes the general
            # path below (the same decisions, in the same order)
            run = [] if beams else self._decode_run(running, i, budget, only)
            if run:
                k = allocate_batch(run)
                seqs += run[:k] if k < len(run) else run
                news += [1] * k
                decode += k
                budget -= k
                i += k
                if k == len(run):
                    continue
            seq = running[i]
            i += 1
            out = seq.output_token_ids
            # done (finished when its token is read), or not among the requests to run
            if len(out) >= seq.done_at or (only is not None and seq.request_id not in only):
                continue
            left = len(seq.token_ids) - seq.num_computed_tokens
            n = seq.prompt_len - 1 - seq.num_computed_tokens if seq.fork_pending else left
            if n > budget:
                n = budget
            if beams and seq.params.beam_width > 1:
                if seq.request_id != cap_rid:
                    cap_rid, cap, size = seq.request_id, *self._beam_cap(running, i - 1, n, budget)
                    if not cap:  # the beams wait together: skip them all
                        i += size - 1
                        continue
                n = min(n, cap)
            if n <= 0:
                continue
            while not can_allocate(seq, n):
                victim = running[-1]
                if victim.params.num_seqs > 1:  # its request's samples go together
                    before, hit, returned = self._preempt_group(victim, batch, i - 1)
                    i -= before + hit  # the members removed ahead of the next sequence
                    budget += returned
                    regrouped = regrouped or returned > 0
                    if hit:
                        break
                    continue
                running.pop()
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                allocate(seq, n)
                seqs.append(seq)
                news.append(n)
                if n == 1 and out and left == 1:  # as ScheduledBatch.add
                    decode += 1
                else:
                    prefill += n
                budget -= n
        if regrouped:
            prefill, decode = self._count_tokens(batch)
        batch.num_prefill_tokens, batch.num_decode_tokens = prefill, decode
        if not batch.preempted:
            if only is None:
                budget = self._swap_in(batch, budget)
            if not self.swapped or only is not None:
                self._admit(batch, budget, only)
        # host-tier copies of this schedule start now, before the step writes the blocks they read
        batch.tier_transfers = allocator.flush_transfers()
        return batch

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens found in the prefix cache over those looked up, per admitted request (a
        request tried again while it waits is looked up again: the allocator's own count has it)."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def _unmatch(self, seq: Sequence) -> None:
        """Give back the cached blocks a waiting request was matched to (they stay cached)."""
        self.allocator.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def _admit(self, batch: ScheduledBatch, budget: int, only: set[str] | None = None) -> None:
        queue = self.waiting if only is None else deque(s for s in self.waiting if s.request_id in only)
        # beams still to fork from running prompts hold their places in the batch
        held = sum(s.fork_pending for s in self.running if s.params.beam_width > 1) if self.has_beams else 0
        while queue and budget > 0 and len(self.running) + held < self.config.max_num_seqs:
            seq = queue[0]
            beams = seq.fork_pending if seq.params.beam_width > 1 else 0
            if beams and len(self.running) + held + 1 + beams > self.config.max_num_seqs:
                break  # room for every beam it will fork, or it waits
            matched = False
            if (self.config.enable_prefix_caching and seq.num_computed_tokens == 0
                    and seq.params.prompt_logprobs is None):  # prompt logprobs need every prompt token computed
                # match_prefix leaves at least one token to compute; a request about to fork
                # keeps its last two prompt tokens (one before the fork, one after)
                cached = self.allocator.match_prefix(seq)
                if seq.fork_pending and cached > seq.prompt_len - 2:
                    self.allocator.free(seq)
                    cached = 0
                seq.num_computed_tokens = seq.num_cached_tokens = cached
                m = self.allocator.last_match
                # a request tried again finds on the device what its first try loaded from the host
                seq.num_host_cached_tokens = min(cached, max(seq.num_host_cached_tokens, m.host))
                seq.num_recomputed_tokens = max(0, min(m.ideal, seq.prompt_len - 1) - cached)
                matched = cached > 0
            n = self._chunk(seq, budget)
            full = (seq.prompt_len - 1 if seq.fork_pending else len(seq.token_ids)) - seq.num_computed_tokens
            if ((seq.followers and not self._group_fits(seq))  # its parked samples rejoin it at the fork
                    or (n < full and not self.config.enable_chunked_prefill)
                    or not self.allocator.can_allocate(seq, n)):
                if matched:  # a waiting request holds no blocks: else requests put back in front of it
                    self._unmatch(seq)  # by preemption could pin the whole pool in the queue
                break
            self.allocator.allocate(seq, n)
            queue.popleft()
            if queue is not self.waiting:
                self.waiting.remove(seq)
            if self.config.enable_prefix_caching:
                self.prefix_queries += seq.prompt_len
                self.prefix_hits += seq.num_cached_tokens
                self.prefix_host_hits += seq.num_host_cached_tokens
                self.recomputed_tokens += seq.num_recomputed_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
            held += beams
