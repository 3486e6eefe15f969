"""Prefix caching for the virtual allocator: idle slots remember the tokens whose KV they hold.

A finished request's slot keeps its pages mapped (deferred reclamation), so its KV is still
there. A new request whose prompt begins with those tokens is admitted *into that slot*, and
the common prefix is a hit with no copy and no recompute: a conversation's next turn lands in
the slot its last turn left. Hits are token-granular (the memory holds every token), capped to
the pages the slot still maps: when another slot needs memory, pages are reclaimed from idle
slots' tails (least recently used slot first, whole pages), so a cached prefix loses its end
first and keeps its head.

What this does not do: share one prefix between *live* slots (vAttention's validation hook; it
needs a backend that maps one physical page into several slots). Concurrent requests with a
common prefix each compute it; ``ideal`` (``PrefixMatch``) counts what an unbounded cache
would have held, so the tokens recomputed for that reason are measured.
"""
from __future__ import annotations

import os
from typing import Sequence

from allocators.prefix_cache import block_keys

IDEAL_BLOCK = 16  # granularity of the "ever computed" index behind the recomputed-token count


class SlotPrefixCache:
    def __init__(self) -> None:
        self._tokens: dict[int, list[int]] = {}  # idle slot -> tokens whose KV it holds at [0, n)
        self._by_first: dict[tuple[int, ...], set[int]] = {}  # first IDEAL_BLOCK tokens -> slots
        self._seen: set[int] = set()  # chained hashes of every full block ever cached
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def __len__(self) -> int:
        return len(self._tokens)

    def cached(self, slot: int) -> int:
        return len(self._tokens.get(slot, ()))

    def remember(self, slot: int, tokens: Sequence[int]) -> None:
        """``slot`` is idle and holds the KV of ``tokens`` (cut at the first not-yet-known id)."""
        self.forget(slot)
        tokens = list(tokens)
        pending = next((i for i, t in enumerate(tokens) if t < 0), None)
        if pending is not None:
            tokens = tokens[:pending]
        if not tokens:
            return
        self._tokens[slot] = tokens
        self._by_first.setdefault(tuple(tokens[:IDEAL_BLOCK]), set()).add(slot)
        self._seen.update(block_keys(tokens, IDEAL_BLOCK, len(tokens) // IDEAL_BLOCK)[1])

    def forget(self, slot: int) -> None:
        """``slot`` is taken (its content is about to be overwritten) or has no pages left."""
        tokens = self._tokens.pop(slot, None)
        if tokens is not None:
            key = tuple(tokens[:IDEAL_BLOCK])
            slots = self._by_first[key]
            slots.discard(slot)
            if not slots:
                del self._by_first[key]

    def truncate(self, slot: int, n: int) -> None:
        """Pages reclaimed from ``slot``'s tail: only its first ``n`` tokens are left."""
        tokens = self._tokens.get(slot)
        if tokens is None or len(tokens) <= n:
            return
        if n <= 0:
            self.forget(slot)
        elif n < IDEAL_BLOCK:  # the first-block index key changes
            self.remember(slot, tokens[:n])
        else:
            del tokens[n:]

    def best(self, tokens: Sequence[int]) -> tuple[int | None, int]:
        """The idle slot holding the longest prefix of ``tokens`` and its length (at most
        ``len(tokens) - 1``: the last token is computed for its logits)."""
        limit = len(tokens) - 1
        if limit <= 0:
            return None, 0
        first = tuple(tokens[:IDEAL_BLOCK])
        # slots whose first tokens agree with the prompt's (one comparison per idle slot's key)
        candidates = [s for k, ss in self._by_first.items() if k[:len(first)] == first[:len(k)] for s in ss]
        best, best_n = None, 0
        for slot in candidates:
            n = min(len(os.path.commonprefix([self._tokens[slot], list(tokens[:limit])])), limit)
            if n > best_n:
                best, best_n = slot, n
        return best, best_n

    def ideal(self, tokens: Sequence[int]) -> int:
        """Tokens of ``tokens``' prefix an unbounded cache would hold (whole IDEAL_BLOCK blocks)."""
        n = (len(tokens) - 1) // IDEAL_BLOCK
        hashes = block_keys(tokens, IDEAL_BLOCK, n)[1]
        i = 0
        while i < n and hashes[i] in self._seen:
            i += 1
        return i * IDEAL_BLOCK

    def record(self, queried: int, hit: int) -> None:
        self.query_tokens += queried
        self.hit_tokens += hit
