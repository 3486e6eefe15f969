"""The paged allocator's decode run: the pool's blocks stepped through a run of decode steps
without touching the allocator (a free block taken each ``block_size`` steps, blocks given back
on preemption or finish, admissions), then committed in one go."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence as Seq

from allocators.base import DecodeRun, SequenceLike
from allocators.stats import MemoryStats

if TYPE_CHECKING:
    from allocators.paged import PagedAllocator, _SeqBlocks


def _split(max_len: int, used: int, cap: int) -> tuple[int, int]:
    """A sequence's (reservation, internal fragmentation) in tokens: its capacity beyond its
    tokens up to its max_len (the bound, within what it holds) is reserved, the rest internal."""
    bound = min(max_len, cap)
    if bound < used:
        bound = used
    return bound - used, cap - bound


_TAKE, _FREE, _ADMIT, _FINISH = range(4)  # the events of a paged decode run


class _PagedDecodeRun(DecodeRun):
    """Each sequence takes a free block at the step its last block is full, then every
    ``block_size`` steps; a preempted or finished one gives back all its blocks (only private
    ones are modelled); one admitted takes the blocks of its tokens."""

    takes_free = True
    admits = True

    def __init__(self, allocator: PagedAllocator, seqs: Seq[SequenceLike], sts: list[_SeqBlocks], used: list[int]):
        bs = self.bs = allocator.block_size
        # one pass: capacities, the room to max_len, and the sequences that take a block at a
        # step, by the step's residue (one whose last block is full takes one at step 1, one
        # holding r tokens of it at step bs - r + 1: residue (1 - used) % bs)
        caps, room = [], 1 << 62
        takers: list[list[int]] = [[] for _ in range(bs)]
        for j, (seq, st, u) in enumerate(zip(seqs, sts, used)):
            caps.append(len(st.table) * bs)
            takers[(1 - u) % bs].append(j)
            if seq.max_len - u < room:
                room = seq.max_len - u
        super().__init__(allocator, seqs, used, caps, room)
        self._takers = takers
        self.sts: list[_SeqBlocks | None] = sts  # None: admitted in the run (known at commit)
        self.plain = len(sts)  # the sequences running before the run
        self.base = list(used)  # tokens the pool's fill count has for each
        self.free = allocator.pool.num_free
        self._caps = list(caps)  # as the steps so far leave them
        self._gone: set[int] = set()  # seq ids preempted so far
        self._out: set[int] = set()  # indices preempted or finished so far
        self._events: list[tuple] = []  # (step, index or indices, _TAKE | _FREE | _ADMIT | _FINISH), in order

    def _limit(self) -> int:
        return 1 << 62  # the free pool is stepped (allocate)

    def allocate(self, step: int, num: int, start: int = 0, skip: Seq[int] = ()) -> int | None:
        # a sequence holding u tokens before a step takes a block there if u is a multiple of
        # bs: one that held ``used`` before the first, at the steps of residue (1 - used) % bs
        caps, bs, out = self._caps, self.bs, self._out
        for j in self._takers[step % bs]:
            if j < start or j in skip or j in out:
                continue
            if j >= num:
                break
            if not self.free:
                return j
            self.free -= 1
            caps[j] += bs
            self.growth.append((step, j, caps[j]))
            self._events.append((step, j, _TAKE))
        return None

    def release(self, index: int, step: int) -> bool:
        st = self.sts[index]
        if st is not None and any(self.allocator.pool.ref[b] != 1 for b in st.table):
            return False  # blocks shared with another sequence stay held: not modelled
        self.free += self._caps[index] // self.bs
        self.released.append((step, index))
        self._events.append((step, index, _FREE))
        self._gone.add(self.seqs[index].seq_id)
        self._out.add(index)
        return True

    def finish(self, indices: list[int], step: int, held: list[int]) -> bool:
        ref, sts = self.allocator.pool.ref, self.sts
        if any(sts[j] is not None and any(ref[b] != 1 for b in sts[j].table) for j in indices):
            return False  # as release
        for j, n in zip(indices, held):
            self.free += self._caps[j] // self.bs
            self.finished.append((step, j, n))
            self._out.add(j)
        self._events.append((step, tuple(indices), _FINISH))
        return True

    def _holds(self, seq: SequenceLike) -> bool:
        return seq.seq_id in self.allocator._seqs and seq.seq_id not in self._gone

    def may_admit(self, seq: SequenceLike, num_new_tokens: int) -> bool:
        if self._holds(seq):
            return True  # it holds blocks: not the plain case
        return -(-num_new_tokens // self.bs) <= self.free

    def admit(self, seq: SequenceLike, num_new_tokens: int, step: int = 1) -> bool:
        bs, n = self.bs, num_new_tokens
        blocks = -(-n // bs)
        if self._holds(seq) or blocks > self.free or n < 1:
            return False
        if not self.joined or self.joined[-1][0] != step:
            self._events.append((step, -1, _ADMIT))  # the scheduler admits a step's all at once
        self.free -= blocks
        j = len(self.seqs)
        # from the next step on it decodes as one that held n - step tokens before the first
        used = n - step
        self.seqs.append(seq)
        self.used.append(used)
        self.base.append(n)
        self.caps.append(blocks * bs)
        self._caps.append(blocks * bs)
        self.sts.append(None)
        self.joined.append((step, j, n))
        self._takers[(1 - used) % bs].append(j)
        self.room = min(self.room, seq.max_len - used)
        return True

    def _stats(self) -> MemoryStats:
        # where the allocator holds only the run's sequences (``decode_run``: no window, no
        # shared tail), ``stats()``'s split from the plan's figures, without its own pass
        alloc, plain = self.allocator, self.plain
        if len(alloc._seqs) != plain:
            return alloc.stats()
        reserved = internal = 0
        for st, used, cap in zip(self.sts[:plain], self.used, self.caps):
            r, i = _split(st.seq.max_len, used, cap)
            reserved += r
            internal += i
        return alloc._stats_of(reserved, internal)

    def commit(self, k: int, preempt: Callable[[int], None], admit: Callable[[int], None],
               skipped: Seq[int] = (), finish: Callable[[int, list[int]], None] | None = None) -> None:
        bs, alloc = self.bs, self.allocator
        pool = alloc.pool
        fill, sts, used, base = pool.fill, self.sts, self.used, self.base
        added = 0  # tokens the run adds to the pool's fill count (a freed block takes its fill away)

        def catch_up(j: int, steps: int) -> int:  # seqs[j]'s tokens and fills after ``steps`` steps
            st = sts[j]
            total = st.num_tokens = used[j] + steps
            table = st.table
            for i in range(base[j] // bs, len(table)):  # blocks below the first it grew into are full
                fill[table[i]] = min(bs, total - i * bs)
            return total - base[j]

        held = {j: n for _, j, n in self.finished}
        # the new blocks, admissions, preemptions and finishes in the order the steps make them
        for step, j, kind in self._events:
            if step > k:
                break
            if kind == _TAKE:
                sts[j].table.append(pool.take())  # ref 1, fill 0
            elif kind == _FREE:
                added += catch_up(j, step - 1)
                preempt(j)
            elif kind == _ADMIT:
                admit(step)
                for s, i, _ in self.joined:
                    if s == step:
                        sts[i] = alloc._seqs[self.seqs[i].seq_id]
            else:  # j: the step's finished ones
                for i in j:
                    added += catch_up(i, held[i] - used[i])
                finish(step, list(j))
        gone = {j for step, j in self.released if step <= k} | {j for step, j, _ in self.finished if step <= k}
        plain = self.plain  # the ones running before the run
        joined = {j: step for step, j, _ in self.joined}
        for j in range(len(self.seqs)):
            if j in gone or joined.get(j, 1) > k:
                continue
            st, u = sts[j], used[j]
            table = st.table
            last = len(table) - 1
            n = k - 1 if skipped and j in skipped else k
            if j < plain and last * bs < u:  # no new block: the last one takes the n tokens
                st.num_tokens = u + n
                fill[table[last]] += n
                added += n
            else:
                added += catch_up(j, n)
        pool.filled_total += added
