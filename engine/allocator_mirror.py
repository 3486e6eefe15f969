"""The same allocator on every tensor-parallel rank: decisions made once, replayed elsewhere.

Rank 0's scheduler drives its allocator as on one device; ``RecordingAllocator`` passes every
call through and logs the ones that change the allocator (allocate, free, fork, prefix match,
swap). The log goes to the other ranks with the next step, where ``AllocatorReplay`` makes the
same calls, in the same order, on an allocator of the same class, arguments and capacity over
the rank's own shard of KV heads. Allocators are deterministic, so every rank then holds the
same block tables / slots / mapped pages, and every data movement an allocator makes inside
its pool (copy-on-write, fork copies, swap to host, VMM maps) happens on every shard. Nothing in
an allocator knows about it.

A sequence travels as the fields an allocator reads (``SequenceLike``): id, lengths and, for an
allocator that hashes tokens (prefix caching), its token ids as a delta since the last call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from allocators.base import KVAllocator, SequenceLike

# (method, sequence refs, other arguments, refs passed as one list, result where it is a count)
Call = tuple[str, list[tuple], tuple, bool, "int | None"]
# a sequence: (seq_id, prompt_len, max_len, oracle_len, first changed token index, tokens from there | None)
SeqRef = tuple[int, int, int, int, int, "list[int] | None"]


class RecordingAllocator:
    """Rank 0's allocator, logging its state-changing calls for the other ranks."""

    def __init__(self, inner: KVAllocator):
        self._inner = inner
        self._log: list[Call] = []
        # only an allocator that indexes blocks by their tokens reads token ids
        self._send_tokens = bool(getattr(inner, "enable_prefix_caching", False))
        self._sent: dict[int, list[int]] = {}  # seq_id -> token ids the other ranks have

    @property
    def inner(self) -> KVAllocator:
        return self._inner

    def __getattr__(self, name: str):  # queries, addressing, stats: rank 0 answers alone
        return getattr(self._inner, name)

    # -- the log --------------------------------------------------------------------------------
    def take(self) -> list[Call]:
        """The calls since the last ``take`` (sent with the next step)."""
        log, self._log = self._log, []
        return log

    def forget(self, seq_id: int) -> None:
        """``seq_id`` is done for good: the other ranks drop their copy of it."""
        self._sent.pop(seq_id, None)
        self._log.append(("forget", [], (seq_id,), False, None))

    def _ref(self, seq: SequenceLike) -> SeqRef:
        start, tokens = 0, None
        if self._send_tokens:
            cur, old = seq.token_ids, self._sent.get(seq.seq_id)
            if old is None:
                old = self._sent[seq.seq_id] = []
            n = min(len(old), len(cur))
            if old[:n] != cur[:n]:  # a token changed in place (placeholder resolved, beam replaced)
                n = next(i for i in range(n) if old[i] != cur[i])
            start, tokens = n, list(cur[n:])
            del old[n:]
            old.extend(tokens)
        return (seq.seq_id, seq.prompt_len, seq.max_len, seq.oracle_len, start, tokens)

    def _call(self, name: str, seqs: list[SequenceLike], extra: tuple = (), as_list: bool = False):
        refs = [self._ref(s) for s in seqs]
        fn = getattr(self._inner, name)
        out = fn(seqs, *extra) if as_list else fn(*seqs, *extra)
        self._log.append((name, refs, extra, as_list, out if isinstance(out, int) else None))
        return out

    # -- calls that change the allocator ----------------------------------------------------------
    def allocate(self, seq, num_new_tokens: int) -> None:
        return self._call("allocate", [seq], (num_new_tokens,))

    def allocate_batch(self, seqs, num_new_tokens: int = 1) -> int:
        return self._call("allocate_batch", list(seqs), (num_new_tokens,), as_list=True)

    def free(self, seq) -> None:
        return self._call("free", [seq])

    def fork(self, parent, child) -> None:
        return self._call("fork", [parent, child])

    def match_prefix(self, seq) -> int:
        return self._call("match_prefix", [seq])

    def swap_out(self, seq):
        return self._call("swap_out", [seq])

    def swap_in(self, seq):
        return self._call("swap_in", [seq])

    def swap_out_group(self, seqs):
        return self._call("swap_out_group", list(seqs), as_list=True)

    def swap_in_group(self, seqs):
        return self._call("swap_in_group", list(seqs), as_list=True)


@dataclass(eq=False)
class ShadowSeq:
    """What an allocator on another rank reads of a sequence (kept in place: allocators hold it)."""

    seq_id: int
    prompt_len: int = 0
    max_len: int = 0
    oracle_len: int = 0
    token_ids: list[int] = field(default_factory=list)


class AllocatorReplay:
    """Applies rank 0's logged calls to this rank's allocator."""

    def __init__(self, allocator: KVAllocator):
        self.allocator = allocator
        self.seqs: dict[int, ShadowSeq] = {}

    def _seq(self, ref: SeqRef) -> ShadowSeq:
        seq_id, prompt_len, max_len, oracle_len, start, tokens = ref
        s = self.seqs.get(seq_id)
        if s is None:
            s = self.seqs[seq_id] = ShadowSeq(seq_id)
        s.prompt_len, s.max_len, s.oracle_len = prompt_len, max_len, oracle_len
        if tokens is not None:
            del s.token_ids[start:]
            s.token_ids.extend(tokens)
        return s

    def apply(self, log: list[Call]) -> None:
        for name, refs, extra, as_list, expected in log:
            if name == "forget":
                self.seqs.pop(extra[0], None)
                continue
            seqs = [self._seq(r) for r in refs]
            fn = getattr(self.allocator, name)
            out = fn(seqs, *extra) if as_list else fn(*seqs, *extra)
            if expected is not None and out != expected:
                raise RuntimeError(f"allocator replay diverged from rank 0: {name} of seqs "
                                   f"{[r[0] for r in refs]} gave {out}, rank 0 got {expected}")
