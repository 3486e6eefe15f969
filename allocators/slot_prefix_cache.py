"""Prefix caching for the virtual allocator: reuse in place (``SlotPrefixCache``) and page
sharing between slots (``PageIndex``).

In place: a finished request's slot keeps its pages mapped (deferred reclamation), so its KV is
still there. A new request whose prompt begins with those tokens is admitted *into that slot*,
and the common prefix is a hit with no copy, no map and no recompute: a conversation's next turn
lands in the slot its last turn left. Hits are token-granular (the memory holds every token),
capped to the pages the slot still maps: when another slot needs memory, pages are reclaimed
from idle slots' tails (least recently used slot first, whole pages), so a cached prefix loses
its end first and keeps its head.

Sharing: every *whole* page of computed tokens of any slot, live or idle, is indexed by a hash
chained over the pages before it (as paged's block hashes, at page granularity). A request
whose prompt starts with indexed pages gets those physical page groups mapped at the first
pages of its own slot (the backend maps one physical page at several addresses; the allocator
reference-counts the groups), so concurrent requests with a common prefix compute it once. A
page is shared only when all its tokens are part of the prompt's prefix, and a shared page is
never written (the allocator drops it from a slot before that slot could write it), so there is
no copy-on-write. The allocator takes the longer of the two hits; in place wins ties (no map).
``ideal`` (``PrefixMatch``) counts what an unbounded cache would have held, so tokens recomputed
because the cache lost them are measured.
"""
from __future__ import annotations

import os
from typing import Sequence

from allocators.prefix_cache import ROOT_HASH, block_keys

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


PageKey = tuple[int, tuple[int, ...]]  # (chained hash of the pages before, this page's tokens)


def page_key(parent: int, tokens: Sequence[int]) -> PageKey:
    return parent, tuple(tokens)


class PageIndex:
    """Whole pages of computed KV by content: chained page key -> page groups holding it.

    Keys keep the page's tokens, so a lookup compares them exactly (only the parent hash could
    collide). A group has at most one key; several groups may hold the same content (computed
    twice before either was indexed): the first indexed is found first."""

    def __init__(self) -> None:
        self._groups: dict[PageKey, dict[int, None]] = {}
        self._key_of: dict[int, PageKey] = {}

    def __len__(self) -> int:
        return len(self._key_of)

    def add(self, key: PageKey, group: int) -> None:
        if group in self._key_of:  # a shared group, indexed by the slot it came from
            return
        self._key_of[group] = key
        self._groups.setdefault(key, {})[group] = None

    def drop(self, group: int) -> None:
        """``group``'s content is about to change or it went back to the free pool."""
        key = self._key_of.pop(group, None)
        if key is not None:
            groups = self._groups[key]
            del groups[group]
            if not groups:
                del self._groups[key]

    def key_of(self, group: int) -> PageKey | None:
        return self._key_of.get(group)

    def match(self, tokens: Sequence[int], page_tokens: int, max_pages: int) -> tuple[list[int], list[int]]:
        """Groups holding the longest run of whole pages of ``tokens`` from its start (at most
        ``max_pages``), and the chained hash of each."""
        groups, hashes, parent = [], [], ROOT_HASH
        for i in range(max_pages):
            key = page_key(parent, tokens[i * page_tokens:(i + 1) * page_tokens])
            found = self._groups.get(key)
            if not found:
                break
            groups.append(next(iter(found)))
            parent = hash(key)
            hashes.append(parent)
        return groups, hashes
