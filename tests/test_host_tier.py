"""The host tier (allocators/host_tier.py) under the paged allocator.

Property tests drive the allocator as the engine does (admit with prefix matching, grow,
fork, free; the schedule's pending copies flushed before any KV is written) on a pool small
enough that cached blocks are evicted to the host and loaded back all the time, and check:
- every block the host tier holds has exactly the KV of its prefix (no loss, no mix-up),
  and a key lives in one host slot only (no duplication);
- every live sequence reads back exactly its own KV, loaded blocks included;
- reference counts equal the holders, shared blocks stay shared across eviction and reload;
- once everything is freed all device blocks are free, and clearing the tier frees every chunk.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule, run_state_machine_as_test

from allocators import KVCacheSpec
from allocators.host_tier import HostTierConfig, LFUPolicy, LRUPolicy
from allocators.paged import PagedAllocator
from allocators.prefix_cache import ROOT_HASH, block_keys
from conftest import FakeSeq, come_back
from test_allocator_properties import BASES, MAX_LEN, SPEC, AllocatorMachine, kv_values


class HostTierMachine(AllocatorMachine):
    block_size = 4
    pool_tokens = 32
    tier_tokens = 24
    policy = "lru"
    transfer_blocks = 1

    def make(self):
        self.prefix_of: dict[int, list[int]] = {ROOT_HASH: []}  # chained hash -> tokens up to it
        self.loads_seen = 0
        return PagedAllocator(SPEC, self.pool_tokens, 8, MAX_LEN, block_size=self.block_size,
                              host_tier_tokens=self.tier_tokens, host_tier_policy=self.policy,
                              host_transfer_blocks=self.transfer_blocks)

    def _write(self, seq, start, end):
        self.alloc.flush_transfers()  # as the scheduler at the end of a schedule, before the step writes
        super()._write(seq, start, end)
        bs = self.alloc.block_size
        toks = seq.token_ids
        keys, hashes = block_keys(toks, bs, len(toks) // bs)
        for i, h in enumerate(hashes):
            self.prefix_of.setdefault(h, toks[:(i + 1) * bs])

    @rule(base=st.integers(0, len(BASES) - 1), shared=st.integers(8, 40),
          extra=st.lists(st.integers(51, 99), min_size=1, max_size=4))
    def readmit(self, base, shared, extra):
        """A follow-up turn: a long shared prefix, always matched (the host tier's case)."""
        before = self.alloc.host_tier.stats.hits
        self.admit(base, min(shared, 27), extra, True)
        self.loads_seen += self.alloc.host_tier.stats.hits - before

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.lists(st.integers(51, 99), min_size=1, max_size=6))
    def next_turn(self, data, extra):
        """A conversation's next turn: it finishes, then comes back with its tokens and more."""
        new, tokens, cached = come_back(self.alloc, self.live, data.draw(st.sampled_from(self.live)), extra, MAX_LEN)
        assert cached < len(tokens) and cached == self.alloc.num_tokens(new)
        m = self.alloc.last_match  # never more than was ever cached; device + host = what it found
        assert cached <= m.ideal and m.device + m.host == cached and cached % self.alloc.block_size == 0
        new.token_ids = tokens[:cached]
        if self._grow(new, tokens[cached:]):
            self.live.append(new)
        else:
            self.alloc.free(new)

    @invariant()
    def host_blocks_hold_their_prefix(self):
        tier, bs = self.alloc.host_tier, self.alloc.block_size
        tier.check()
        for key in tier.keys():
            parent, toks = key
            want = torch.tensor(kv_values(self.prefix_of[parent] + list(toks))[-bs:])
            data = tier.read(key)
            for layer in range(SPEC.num_layers):
                assert torch.equal(data[layer, 0, :, 0, 0], want + layer), (key, layer)
                assert torch.equal(data[layer, 1, :, 0, 0], -(want + layer)), (key, layer)

    @invariant()
    def cached_blocks_are_indexed_once(self):
        a = self.alloc
        keys = [a.cache.key_of(b) for b in range(a.num_blocks) if a.cache.is_cached(b)]
        assert len(keys) == len(set(keys))

    totals = {"stored": 0, "loaded": 0}  # over every example run (the coverage check below)

    def teardown(self):
        stats = self.alloc.host_tier.stats
        HostTierMachine.totals["stored"] += stats.stored_blocks
        HostTierMachine.totals["loaded"] += stats.loaded_blocks
        super().teardown()
        tier = self.alloc.host_tier
        tier.check()
        tier.clear()
        assert tier.used_blocks == tier.used_chunks == 0 and len(tier._free) == tier.num_chunks


def machine(name: str, **attrs) -> type:
    cls = type(name, (HostTierMachine,), attrs)
    cls.TestCase.settings = settings(max_examples=30, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
    return cls


TestTierLRU = machine("TierLRU").TestCase
TestTierLFUChunks = machine("TierLFUChunks", policy="lfu", transfer_blocks=2, tier_tokens=32).TestCase
TestTierB1 = machine("TierB1", block_size=1, pool_tokens=20, tier_tokens=12, transfer_blocks=3).TestCase


def test_the_machine_really_moves_blocks_between_tiers():
    """The properties above are only worth something if blocks do go to the host and come back."""
    HostTierMachine.totals.update(stored=0, loaded=0)
    run_state_machine_as_test(machine("TierCoverage"), settings=settings(
        max_examples=30, stateful_step_count=40, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow]))
    assert HostTierMachine.totals["stored"] > 50 and HostTierMachine.totals["loaded"] > 10, HostTierMachine.totals


# -- deterministic checks -------------------------------------------------------------------
def _fill(alloc: PagedAllocator, seq: FakeSeq) -> None:
    alloc.flush_transfers()
    slots = torch.tensor(alloc.slot_mapping(seq, 0, len(seq.token_ids)), dtype=torch.int64)
    vals = torch.tensor(kv_values(seq.token_ids))
    for layer in range(SPEC.num_layers):
        k, v = alloc.kv_cache(layer)
        k[slots] = (vals + layer)[:, None, None]
        v[slots] = -(vals + layer)[:, None, None]


def _run(alloc: PagedAllocator, tokens: list[int]) -> tuple[FakeSeq, int]:
    seq = FakeSeq(list(tokens), 64)
    cached = alloc.match_prefix(seq)
    alloc.allocate(seq, len(tokens) - cached)
    _fill_from(alloc, seq, cached)
    return seq, cached


def _fill_from(alloc: PagedAllocator, seq: FakeSeq, start: int) -> None:
    alloc.flush_transfers()
    slots = torch.tensor(alloc.slot_mapping(seq, 0, len(seq.token_ids)), dtype=torch.int64)
    vals = torch.tensor(kv_values(seq.token_ids))
    for layer in range(SPEC.num_layers):
        k, _ = alloc.kv_cache(layer)
        if start:  # the cached part must already hold exactly what would have been computed
            assert torch.equal(k[slots[:start]][:, 0, 0], vals[:start] + layer)
    for layer in range(SPEC.num_layers):
        k, v = alloc.kv_cache(layer)
        k[slots[start:]] = (vals[start:] + layer)[:, None, None]
        v[slots[start:]] = -(vals[start:] + layer)[:, None, None]


def test_evicted_prefix_comes_back_from_host_with_its_kv():
    alloc = PagedAllocator(SPEC, 16, 4, 64, block_size=4, host_tier_tokens=32)
    a = list(range(1, 14))  # 13 tokens: 3 full blocks cached
    seq, cached = _run(alloc, a)
    assert cached == 0
    alloc.free(seq)
    other, _ = _run(alloc, list(range(100, 116)))  # 16 tokens: the whole pool, evicting a's blocks
    alloc.free(other)
    assert alloc.host_tier.used_blocks == 3 and alloc.host_tier.stats.stored_blocks == 3
    again, cached = _run(alloc, a)  # a's prefix: 12 tokens from the host tier (its values checked)
    assert cached == 12
    assert alloc.last_match.host == 12 and alloc.last_match.device == 0 and alloc.last_match.recomputed == 0
    assert alloc.host_tier.stats.hits == 3 and alloc.host_tier.stats.loaded_blocks == 3
    alloc.free(again)
    assert alloc.num_free_blocks == alloc.num_blocks


def test_without_tier_the_same_prefix_is_recomputed():
    alloc = PagedAllocator(SPEC, 16, 4, 64, block_size=4)
    seq, _ = _run(alloc, list(range(1, 14)))
    alloc.free(seq)
    other, _ = _run(alloc, list(range(100, 116)))
    alloc.free(other)
    again, cached = _run(alloc, list(range(1, 14)))
    assert cached == 0 and alloc.last_match.recomputed == 12 and alloc.last_match.ideal == 12


def test_loaded_blocks_are_shared_by_a_second_reader():
    alloc = PagedAllocator(SPEC, 24, 4, 64, block_size=4, host_tier_tokens=32)
    a = list(range(1, 10))
    s, _ = _run(alloc, a)
    alloc.free(s)
    o, _ = _run(alloc, list(range(100, 124)))
    alloc.free(o)
    r1, c1 = _run(alloc, a)
    r2, c2 = _run(alloc, a)  # now on the device: shared, no second load
    assert c1 == c2 == 8 and alloc.host_tier.stats.loaded_blocks == 2
    assert alloc.block_ids(r1)[:2] == alloc.block_ids(r2)[:2]
    assert all(alloc.pool.ref[b] == 2 for b in alloc.block_ids(r1)[:2])
    alloc.free(r1)
    alloc.free(r2)
    assert alloc.num_free_blocks == alloc.num_blocks


def test_transfer_granularity_batches_one_schedule_into_chunks():
    alloc = PagedAllocator(SPEC, 16, 4, 64, block_size=4, host_tier_tokens=32, host_transfer_blocks=4)
    s, _ = _run(alloc, list(range(1, 17)))  # 4 full blocks: the whole pool
    assert alloc.flush_transfers() == []
    alloc.free(s)
    o = FakeSeq(list(range(200, 216)), 64)
    alloc.match_prefix(o)
    alloc.allocate(o, 16)  # evicts the 4 cached blocks in one schedule
    transfers = alloc.flush_transfers()
    assert [(t.direction, t.blocks) for t in transfers] == [("d2h", 4)]
    assert transfers[0].nbytes == 4 * 4 * SPEC.bytes_per_token
    assert alloc.host_tier.stats.store_transfers == 1


def test_lfu_keeps_the_hot_chunk():
    lru, lfu = LRUPolicy(), LFUPolicy()
    for p in (lru, lfu):
        for c in range(3):
            p.insert(c)
        p.touch(0)
        p.touch(0)
        p.touch(1)
        p.touch(1)
        p.touch(1)
        p.touch(2)
    assert lru.victim(set()) == 0  # least recently touched
    assert lfu.victim(set()) == 2  # hit twice: fewer than 0 (3) and 1 (4)
    assert lfu.victim({2}) == 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_blocks=4, policy="fifo"), "host_tier_policy"),
    (dict(num_blocks=4, transfer_blocks=0), "host_transfer_blocks"),
    (dict(num_blocks=2, transfer_blocks=4), "host_transfer_blocks"),
])
def test_hostile_tier_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HostTierConfig(**kwargs)


# -- through the engine: greedy outputs identical with the tier on and off -------------------
from engine import LLM, SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402


def _conversations(llm: LLM, turns: int = 3) -> tuple[list[list[int]], list[int]]:
    """Four conversations, each turn = the last prompt + its answer + new tokens, one generate
    call per turn: between a conversation's turns the others push its blocks out of the pool."""
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[(c * 31 + i * 7) % 200 + 3 for i in range(40)] for c in range(4)]
    tokens, cached = [], []
    for t in range(turns):
        outs = llm.generate(prompts, p)
        tokens += [o.token_ids for o in outs]
        cached += [o.metrics.num_cached_tokens for o in outs]
        prompts = [q + o.token_ids + [(t * 13 + c) % 200 + 3 for c in range(5)] for q, o in zip(prompts, outs)]
    return tokens, cached


def _llm(**kw) -> LLM:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("kv_cache_tokens", 160)  # 10 blocks of 16: about one conversation at a time
    kw.setdefault("max_num_seqs", 2)
    return LLM("tiny-llama", allocator="paged", allocator_args={"block_size": 16}, device="cpu", **kw)


@pytest.fixture(scope="module")
def without_tier():
    llm = _llm(enable_prefix_caching=True)
    tokens, cached = _conversations(llm)
    return tokens, cached, llm.engine.scheduler.recomputed_tokens


@pytest.mark.parametrize("kw", [dict(), dict(host_tier_policy="lfu", host_transfer_blocks=4),
                                dict(async_scheduling=True)], ids=["lru", "lfu-chunks4", "async"])
def test_greedy_outputs_identical_with_tier_on_and_off(without_tier, kw):
    ref_tokens, ref_cached, ref_recomputed = without_tier
    llm = _llm(enable_prefix_caching=True, host_kv_cache_tokens=2048, **kw)
    tokens, cached = _conversations(llm)
    assert tokens == ref_tokens
    tier, sched = llm.engine.allocator.host_tier, llm.engine.scheduler
    assert tier.stats.hits > 0 and tier.stats.stored_blocks > 0  # blocks really went out and came back
    assert sum(cached) > sum(ref_cached)  # the tier found what the device pool had lost
    assert sched.prefix_host_hits > 0 and sched.recomputed_tokens < ref_recomputed
    alloc = llm.engine.allocator
    assert alloc.num_free_blocks == alloc.num_blocks and alloc.pool.filled_total == 0


def test_greedy_outputs_identical_without_prefix_caching(without_tier):
    tokens, _ = _conversations(_llm())
    assert tokens == without_tier[0]


@pytest.mark.parametrize("kw, field", [
    (dict(host_kv_cache_memory=-1), "host_kv_cache_memory"),
    (dict(host_kv_cache_memory=float("nan")), "host_kv_cache_memory"),
    (dict(host_kv_cache_memory="4GB"), "host_kv_cache_memory"),
    (dict(host_kv_cache_tokens=-5), "host_kv_cache_tokens"),
    (dict(host_tier_policy="arc"), "host_tier_policy"),
    (dict(host_transfer_blocks=0), "host_transfer_blocks"),
    (dict(host_transfer_blocks=2.5), "host_transfer_blocks"),
    (dict(host_kv_cache_memory=1, enable_prefix_caching=False), "enable_prefix_caching"),
])
def test_hostile_engine_values_name_the_field_and_the_fix(kw, field):
    kw.setdefault("enable_prefix_caching", True)
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kw)


def test_an_allocator_without_a_host_tier_says_which_has_one():
    with pytest.raises(ValueError, match="allocator=paged"):
        LLM("tiny-llama", allocator="contiguous", device="cpu", enable_prefix_caching=True, host_kv_cache_tokens=512,
            kv_cache_tokens=1024, max_model_len=256)


def test_host_tier_figures_reach_metrics_and_the_tables():
    """/metrics (Prometheus text), requests.parquet columns and steps columns carry the tier."""
    from prometheus_client import parser

    from engine.engine_core import EngineCore
    from engine.serving.metrics import ServingMetrics
    from experiments.metrics import host_tier_summary, requests_frame

    llm = _llm(enable_prefix_caching=True, host_kv_cache_tokens=2048)
    _conversations(llm)
    core = EngineCore(llm.engine, emit=lambda msg: None)

    class Front:  # what ServingMetrics reads of the async engine
        is_running = True
        max_model_len = 256

        def stats(self):
            return core.stats()

        def add_finish_listener(self, fn):
            pass

    text = ServingMetrics(Front(), "tiny").render()
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    sched, tier = llm.engine.scheduler, llm.engine.allocator.host_tier
    assert families["kvlab:host_tier_hits"].samples[0].value == sched.prefix_host_hits > 0
    moved = {s.labels["direction"]: s.value for s in families["kvlab:host_tier_bytes"].samples}
    assert moved == {"d2h": tier.stats.stored_bytes, "h2d": tier.stats.loaded_bytes} and moved["h2d"] > 0
    assert families["kvlab:recomputed_prompt_tokens"].samples[0].value == sched.recomputed_tokens
    assert 0 < families["kvlab:host_tier_usage_perc"].samples[0].value <= 1
    secs = {s.labels["kind"]: s.value for s in families["kvlab:host_tier_transfer_seconds"].samples}
    assert secs["exposed"] > 0  # CPU: plain synchronous copies, all exposed

    req = requests_frame(llm.engine.finished_requests, 0.0)
    # per request: its last admission (the scheduler counts a preempted request's every admission)
    assert 0 < req["host_cached_tokens"].sum() <= sched.prefix_host_hits
    assert (req["host_cached_tokens"] <= req["cached_tokens"]).all()
    assert req["recomputed_tokens"].sum() <= sched.recomputed_tokens
    summary = host_tier_summary(sched, tier)
    assert summary["host_prefix_hit_rate"] == pytest.approx(sched.prefix_host_hits / sched.prefix_queries)
    assert summary["host_tier_loaded_bytes"] == tier.stats.loaded_bytes
    assert summary["host_tier_hidden_fraction"] == pytest.approx(0.0)  # CPU: nothing overlaps
    steps = list(llm.engine.step_records)
    assert sum(r.tier_loaded_blocks for r in steps) == tier.stats.loaded_blocks
    assert sum(r.tier_stored_blocks for r in steps) == tier.stats.stored_blocks
