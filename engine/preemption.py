"""Preemption and swap for the scheduler: a sequence, or a request's samples together, swapped
to host memory where the allocator can and ``preemption_mode='swap'``, else dropped and queued
for recompute (one leader queued, the other samples parked on it to fork again); swapped
sequences brought back. A mixin of Scheduler."""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.sequence import SeqStatus, Sequence

if TYPE_CHECKING:
    from engine.scheduler import ScheduledBatch


def group_kv_tokens(prompt_len: int, sample_lens, block_size: int, share_prompt: bool = True) -> int:
    """KV tokens a request's samples (beams) hold together when each reaches its length in
    ``sample_lens``: the prompt's whole blocks once (``share_prompt``: forks share them), each
    sample's tail in blocks of its own."""
    bs = max(1, block_size)
    whole = (prompt_len - 1) // bs * bs if share_prompt else 0
    return whole + sum(-(-(n - whole) // bs) * bs for n in sample_lens)


class PreemptionMixin:
    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(seq)
        if self._swap and self.allocator.can_swap_out(seq):
            batch.swap_transfers.append(("d2h", len(self.allocator.swap_out(seq))))
            seq.status = SeqStatus.SWAPPED
            self.swapped.appendleft(seq)
            self.num_swaps += 1
            batch.swapped_out += 1
            return
        # recompute: drop the KV, recompute prompt + outputs when readmitted
        self.allocator.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    # -- groups: the samples of one request ------------------------------------------------
    def _preempt_group(self, victim: Sequence, batch: ScheduledBatch, pos: int) -> tuple[int, bool, int]:
        """Preempt every running sample of ``victim``'s request. ``pos``: the index in
        ``running`` of the sequence being scheduled. Returns how many members stood before
        it, whether it is one of them, and the batch tokens given back by members already
        scheduled this step."""
        rid, running = victim.request_id, self.running
        idx = [k for k, s in enumerate(running) if s.request_id == rid]
        group = [running[k] for k in idx]
        for k in reversed(idx):
            del running[k]
        returned = self._unschedule(group, batch)
        for seq in group:
            seq.num_preemptions += 1
            batch.preempted.append(seq)
        self.num_preemptions += len(group)
        if not (self._group_swap and self._swap_out_group(group, batch)):
            self._recompute_group(group)
        return sum(k < pos for k in idx), pos in idx, returned

    @staticmethod
    def _unschedule(group: list[Sequence], batch: ScheduledBatch) -> int:
        """Take ``group``'s members out of this step's batch; returns their tokens."""
        members = {id(s) for s in group}
        keep = [(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens) if id(s) not in members]
        returned = sum(batch.num_new_tokens) - sum(n for _, n in keep)
        if returned:
            batch.seqs[:] = [s for s, _ in keep]
            batch.num_new_tokens[:] = [n for _, n in keep]
        return returned

    def _swap_out_group(self, group: list[Sequence], batch: ScheduledBatch) -> bool:
        if not self.allocator.can_swap_out_group(group):
            return False
        batch.swap_transfers.append(("d2h", len(self.allocator.swap_out_group(group))))
        for seq in reversed(group):
            seq.status = SeqStatus.SWAPPED
            self.swapped.appendleft(seq)
        self.num_swaps += len(group)
        batch.swapped_out += len(group)
        return True

    def _recompute_group(self, group: list[Sequence]) -> None:
        """KV dropped; one leader goes back to the queue, the others parked on it fork from it
        again once its prompt is recomputed (so they share the prompt again)."""
        for seq in group:
            self.allocator.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SeqStatus.WAITING
        leader = next((s for s in group if s.fork_pending), group[0])  # it may have samples to fork already
        rest = [s for s in group if s is not leader]
        if not rest or leader.prompt_len < 2 or not self.allocator.supports_fork:
            for seq in reversed(group):
                self.waiting.appendleft(seq)
            return
        for seq in rest:
            leader.followers += [seq, *seq.followers]
            leader.fork_pending += 1 + seq.fork_pending
            seq.followers, seq.fork_pending = [], 0
        self.waiting.appendleft(leader)

    def _group_fits(self, leader: Sequence) -> bool:
        """Room in the batch for ``leader`` and its parked samples, and memory for their tokens
        (the prompt once, each sample's own tokens), asked as if one sequence held them all:
        admitting a group that cannot finish its recompute would only preempt it again.
        A need larger than any request can ever get is not waited for."""
        if len(self.running) + 1 + len(leader.followers) > self.config.max_num_seqs:
            return False
        need = group_kv_tokens(leader.prompt_len, [len(s.token_ids) + 1 for s in (leader, *leader.followers)],
                               self.allocator.block_size)
        need -= leader.num_computed_tokens  # found in the prefix cache: held already
        return need > self.allocator.max_fit_tokens() or self.allocator.can_allocate(leader, need)

    def _swap_in_group(self, head: Sequence, batch: ScheduledBatch, budget: int) -> tuple[int, bool]:
        """Bring back every swapped sample of ``head``'s request at once; False where they do
        not all fit yet."""
        rid = head.request_id
        group = [s for s in self.swapped if s.request_id == rid]
        if len(self.running) + len(group) > self.config.max_num_seqs:
            return budget, False
        news, left = [], budget
        for seq in group:
            n = max(self._chunk(seq, left), 0)
            news.append(n)
            left -= n
        if not self.allocator.can_swap_in_group(group, news):
            return budget, False
        batch.swap_transfers.append(("h2d", len(self.allocator.swap_in_group(group))))
        for seq, n in zip(group, news):
            self.swapped.remove(seq)
            self._running_again(seq, n, batch)
        return left, True

    def _swap_in(self, batch: ScheduledBatch, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.swapped[0]
            if self._group_swap and seq.params.num_seqs > 1:
                budget, back = self._swap_in_group(seq, batch, budget)
                if not back:
                    break
                continue
            if not self.allocator.can_swap_in(seq):
                break
            batch.swap_transfers.append(("h2d", len(self.allocator.swap_in(seq))))
            n = self._chunk(seq, budget)
            if n > 0 and not self.allocator.can_allocate(seq, n):
                # room for its KV but not its next token: back out, and wait
                batch.swap_transfers.append(("d2h", len(self.allocator.swap_out(seq))))
                break
            self.swapped.popleft()
            self._running_again(seq, n, batch)
            budget -= n
        return budget

    def _running_again(self, seq, n: int, batch: ScheduledBatch) -> None:
        """A sequence back from host memory runs again, its next ``n`` tokens in this batch."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        batch.swapped_in += 1
        if n > 0:
            self.allocator.allocate(seq, n)
            batch.add(seq, n)
