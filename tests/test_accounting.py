"""Memory accounting against closed forms (README, "Results").

N identical requests (prompt P, output O) that fit at once: step k (1..O) holds
``P + k - 1`` tokens per request; the accountant's final length is F = P + O. With a
capacity of ``cap(u)`` slots at ``u`` tokens, per request and step:
token_states = u, reservation = min(cap, F) - u, internal_frag = max(0, cap - F).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from allocators import KVCacheSpec, create_allocator
from allocators.stats import STAT_FIELDS
from engine import LLMEngine, SamplingParams
from engine.accounting import MemoryAccountant
from engine.config import EngineConfig

N, P, O, M, C = 4, 10, 8, 64, 512  # requests, prompt, output, max_model_len, pool tokens
F = P + O
TINY = dict(num_layers=2, num_kv_heads=2, head_dim=16)  # tiny-llama: 128 B per token per layer and K/V


def closed_form(cap) -> dict[str, float]:
    """Step-averaged fractions of the pool for capacity function ``cap(tokens)``."""
    steps = [P + k - 1 for k in range(1, O + 1)]
    ts = sum(steps)
    rs = sum(min(cap(u), F) - u for u in steps)
    inf = sum(max(0, cap(u) - F) for u in steps)
    return {"token_states": N * ts / O / C, "reservation": N * rs / O / C, "internal_frag": N * inf / O / C}


def up(b: int):
    return lambda u: math.ceil(u / b) * b


CASES = {
    "contiguous-max": ("contiguous", {"policy": "max"}, lambda u: M),
    "contiguous-pow2": ("contiguous", {"policy": "pow2"}, lambda u: P + 8),  # P + next pow2 of O=8
    "contiguous-oracle": ("contiguous", {"policy": "oracle"}, lambda u: F),
    "contiguous-max-buddy": ("contiguous", {"policy": "max", "arena": "buddy"}, lambda u: M),
    "paged-b1": ("paged", {"block_size": 1}, up(1)),
    "paged-b4": ("paged", {"block_size": 4}, up(4)),
    "paged-b16": ("paged", {"block_size": 16}, up(16)),
    # 4 KiB pages: 8 tokens of all layers (shared), 32 tokens of one layer's K or V (per_layer)
    "virtual-shared": ("virtual", {"page_size": 4096, "layout": "shared", "prefetch": False}, up(8)),
    "virtual-per-layer": ("virtual", {"page_size": 4096, "layout": "per_layer", "prefetch": False}, up(32)),
}


def run_engine(allocator: str, args: dict, n: int = N, **config) -> LLMEngine:
    e = LLMEngine(EngineConfig(model="tiny-llama", allocator=allocator, allocator_args=args,
                               kv_cache_tokens=C, max_model_len=M, device="cpu", **config))
    for i in range(n):
        e.add_request(str(i), list(range(1, P + 1)), SamplingParams(max_tokens=O, ignore_eos=True, temperature=0))
    while e.has_unfinished_requests():
        e.step()
    return e


@pytest.mark.parametrize("case", list(CASES))
def test_identical_requests_match_the_closed_form(case):
    allocator, args, cap = CASES[case]
    e = run_engine(allocator, args)
    acc = e.accountant
    assert acc.num_steps == O
    rows = acc.table()
    assert (rows.sum(axis=1) == C * acc.bpt).all() and (rows >= 0).all()
    assert (rows[:, STAT_FIELDS.index("external_frag")] == 0).all()
    assert (rows[:, STAT_FIELDS.index("idle_mapped")] == 0).all()  # every slot is live at every step
    got, want = acc.summary(), closed_form(cap)
    for f, v in want.items():
        assert got[f] == pytest.approx(v, abs=1e-12), f
    assert got["free"] == pytest.approx(1 - sum(want.values()), abs=1e-12)
    assert sum(got[f"{f}_peak"] for f in STAT_FIELDS) == pytest.approx(1.0)
    # all done: nothing in use; the virtual allocator keeps each slot's pages mapped (idle_mapped),
    # the pages that held the request's KV (F - 1 tokens: the last token is sampled, never stored)
    end = e.allocator.stats()
    end.check()
    assert end.token_states == end.reservation == end.internal_frag == end.external_frag == 0
    idle = N * cap(F - 1) * acc.bpt if allocator == "virtual" else 0
    assert end.idle_mapped == idle and end.free == C * acc.bpt - idle
    if allocator == "virtual":
        assert idle > 0


# -- exactness where the final length is below the bound (a minimal driver) ------------------------
_ids = itertools.count()


@dataclass(eq=False)
class FakeSeq:
    token_ids: list[int]
    max_len: int
    final: int
    seq_id: int = field(default_factory=lambda: next(_ids))
    prompt_len: int = 0
    oracle_len: int = 0

    def __post_init__(self):
        self.prompt_len = len(self.token_ids)
        self.oracle_len = self.max_len


def drive(alloc, seqs: list[FakeSeq]) -> tuple[MemoryAccountant, list[list[tuple[int, int]]]]:
    """Engine-like: prefill then one token per step; a request stops at its final length,
    which the allocator does not know (it sees max_len). Returns the accountant and, per
    step, (tokens, capacity) of each live sequence."""
    acc = MemoryAccountant(alloc.bytes_per_token)
    live, seen = list(seqs), []
    first = True
    while live:
        for s in live:
            alloc.allocate(s, s.prompt_len if first else 1)
        first = False
        acc.record(alloc.stats(), [(s.seq_id, alloc.seq_capacity(s), s.max_len) for s in live])
        seen.append([(alloc.num_tokens(s), alloc.seq_capacity(s), s.final) for s in live])
        for s in list(live):
            if alloc.num_tokens(s) + 1 == s.final:  # its last token was just sampled
                alloc.free(s)
                acc.finish(s.seq_id, s.final)
                live.remove(s)
    return acc, seen


@pytest.mark.parametrize("allocator,args", [
    ("contiguous", {"policy": "max"}), ("contiguous", {"policy": "pow2"}), ("paged", {"block_size": 4}),
    ("virtual", {"page_size": 8 * 256, "layout": "shared", "backend": "sim", "prefetch": False}),
])
def test_early_finish_moves_reservation_to_internal_fragmentation(allocator, args):
    spec = KVCacheSpec(**TINY, device=None)
    alloc = create_allocator(allocator, spec=spec, capacity_tokens=C, max_num_seqs=8, max_model_len=M, **args)
    seqs = [FakeSeq([1] * 6, max_len=40, final=9), FakeSeq([1] * 3, max_len=30, final=20),
            FakeSeq([1] * 12, max_len=60, final=13)]
    acc, seen = drive(alloc, seqs)
    rows = acc.table()
    assert (rows.sum(axis=1) == C * acc.bpt).all() and (rows >= 0).all()
    for step, live in enumerate(seen):
        res = sum(min(cap, final) - used for used, cap, final in live)
        frag = sum(max(0, cap - final) for used, cap, final in live)
        assert rows[step, STAT_FIELDS.index("token_states")] == sum(u for u, _, _ in live) * acc.bpt
        assert rows[step, STAT_FIELDS.index("reservation")] == res * acc.bpt, step
        assert rows[step, STAT_FIELDS.index("internal_frag")] == frag * acc.bpt, step


# -- sharing is counted once --------------------------------------------------------------------
def test_prefix_sharing_counts_shared_blocks_once():
    e = run_engine("paged", {"block_size": 4}, enable_prefix_caching=True)
    # the first request registers its prompt's full blocks; the other three hit 8 of 10 tokens
    assert e.allocator.prefix_cache_hit_rate == pytest.approx(3 * 8 / (4 * P))
    rows = e.accountant.table() / e.accountant.bpt
    ts = rows[:, STAT_FIELDS.index("token_states")]
    assert (rows.sum(axis=1) == C).all()
    assert ts[0] == N * P - 3 * 8  # two shared blocks held once, not four times
    assert ts[-1] == N * (F - 1) - 3 * 8


def test_fork_shares_then_copies_on_write_in_the_accounts():
    spec = KVCacheSpec(**TINY, device=None)
    a = create_allocator("paged", spec=spec, capacity_tokens=64, max_num_seqs=4, max_model_len=M, block_size=4)
    parent = FakeSeq(list(range(1, 7)), max_len=20, final=20)
    a.allocate(parent, 6)
    kids = [FakeSeq(list(parent.token_ids), max_len=20, final=20) for _ in range(2)]
    for kid in kids:
        a.fork(parent, kid)
    s = a.stats()
    s.check()
    bpt = a.bytes_per_token
    assert s.token_states == 6 * bpt and s.reservation == 2 * bpt  # 2 blocks, once
    assert [a.seq_capacity(x) for x in (parent, *kids)] == [8, 6, 6]
    for x in (parent, *kids):
        a.allocate(x, 1)
    s = a.stats()
    s.check()
    # the full first block is shared by three; each sample has its own second block now
    assert s.token_states == (4 + 3 * 3) * bpt and s.reservation == 3 * bpt
    assert a.num_free_blocks == 16 - 4


def test_virtual_pages_a_live_sequence_cannot_use_are_external_fragmentation():
    """Requests arrive one after another: each finished slot keeps its pages for the next one;
    pages it holds beyond what its new sequence can use are external fragmentation."""
    e = LLMEngine(EngineConfig(model="tiny-llama", allocator="virtual", kv_cache_tokens=C, max_model_len=M,
                               device="cpu", allocator_args={"page_size": 4096, "layout": "shared",
                                                             "prefetch": False}))
    e.add_request("a", list(range(1, 25)), SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    while e.has_unfinished_requests():
        e.step()
    e.add_request("b", list(range(1, 5)), SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    while e.has_unfinished_requests():
        e.step()
    rows = e.accountant.table() / e.accountant.bpt
    ext = rows[:, STAT_FIELDS.index("external_frag")]
    assert (ext[:4] == 0).all()
    # b (at most 8 tokens: one page of 8) inherits a's 4 pages: 3 it can never use
    assert (ext[4:] == 3 * 8).all()
    assert (rows[:, STAT_FIELDS.index("idle_mapped")] == 0).all()  # b took a's slot before any step ran
    assert np.allclose(rows.sum(axis=1), C)
    end = e.allocator.stats()  # b done: its slot keeps a's 4 pages, idle, not fragmentation
    assert end.idle_mapped == 4 * 8 * e.accountant.bpt and end.external_frag == 0
    assert end.token_states == end.reservation == end.internal_frag == 0


def test_virtual_idle_slots_are_idle_mapped_in_the_summary():
    """x finishes after 2 tokens while y runs on: x's slot keeps its pages (deferred reclamation),
    held by no live sequence, reported as idle_mapped and neither as usage nor as fragmentation."""
    e = LLMEngine(EngineConfig(model="tiny-llama", allocator="virtual", kv_cache_tokens=C, max_model_len=M,
                               device="cpu", allocator_args={"page_size": 4096, "layout": "shared",
                                                             "prefetch": False}))  # pages of 8 tokens
    px, ox, py, oy = 8, 2, 8, 10
    e.add_request("x", list(range(1, px + 1)), SamplingParams(max_tokens=ox, ignore_eos=True, temperature=0))
    e.add_request("y", list(range(1, py + 1)), SamplingParams(max_tokens=oy, ignore_eos=True, temperature=0))
    while e.has_unfinished_requests():
        e.step()
    acc = e.accountant
    rows = acc.table() / acc.bpt
    assert len(rows) == oy and np.allclose(rows.sum(axis=1), C)
    col = {f: rows[:, j] for j, f in enumerate(STAT_FIELDS)}
    x_pages = math.ceil((px + ox - 1) / 8)  # x's KV: its prompt and all but its last token
    assert (col["idle_mapped"][:ox] == 0).all()  # x is live through step ox
    assert (col["idle_mapped"][ox:] == x_pages * 8).all()
    assert (col["external_frag"] == 0).all()
    # from then on only y is live: token states are its tokens alone
    assert list(col["token_states"][ox:]) == [py + k - 1 for k in range(ox + 1, oy + 1)]
    got = acc.summary()
    assert got["idle_mapped"] == pytest.approx(x_pages * 8 * (oy - ox) / oy / C)
    assert sum(got[f] for f in STAT_FIELDS) == pytest.approx(1.0)
    # peak use is held by live sequences: step 2 (both live, 2 pages each), not the last step,
    # whose pages only add up to more with x's idle ones
    assert got["idle_mapped_peak"] == 0 and got["token_states_peak"] == pytest.approx(2 * (px + 1) / C)
    end = e.allocator.stats()
    assert end.token_states == end.reservation == end.internal_frag == end.external_frag == 0
    assert end.idle_mapped == (x_pages + math.ceil((py + oy - 1) / 8)) * 8 * acc.bpt
    assert e.allocator.num_idle_groups * 8 * acc.bpt == end.idle_mapped
