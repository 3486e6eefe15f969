"""Iteration-level continuous batching with a token budget and chunked prefill.

Each step: running sequences first (decode tokens and unfinished prefill chunks, in
arrival order), preempting from the back when the allocator is full; then waiting
sequences are admitted while the token budget, ``max_num_seqs`` and the allocator allow.
The scheduler knows nothing of the model, so simulate mode runs it unchanged.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from allocators.base import KVAllocator
from engine.sequence import SeqStatus, Sequence


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
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


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: KVAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and give back its memory."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        # recompute: drop the KV, recompute prompt + outputs when readmitted
        self.allocator.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        i = 0
        allocator = self.allocator
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            while not allocator.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                allocator.allocate(seq, n)
                batch.add(seq, n)
                budget -= n
                i += 1
        if not batch.preempted:
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self.config.enable_prefix_caching and seq.num_computed_tokens == 0:
                # leave at least one token to compute: its logits give the next token
                cached = min(self.allocator.match_prefix(seq), seq.num_tokens - 1)
                seq.num_computed_tokens = seq.num_cached_tokens = cached
            n = min(seq.num_pending_tokens, budget)
            if n < seq.num_pending_tokens and not self.config.enable_chunked_prefill:
                break
            if not self.allocator.can_allocate(seq, n):
                break
            self.allocator.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
