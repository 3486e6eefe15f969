"""The virtual allocator over real OS paging (host backend): mmap reserve, mprotect map, madvise release."""
from __future__ import annotations


import pytest
import torch

import kernels
from allocators import KVCacheSpec
from allocators.virtual import VirtualAllocator
from allocators.vmm_backends import HostBackend
from engine import LLM, SamplingParams
from kernels.metadata import Addressing, AttentionMetadata
from conftest import FakeSeq





SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu")


def make(layout: str, capacity: int = 256, slots: int = 4, max_len: int = 128, **kw) -> VirtualAllocator:
    return VirtualAllocator(SPEC, capacity, slots, max_len, page_size=4096, layout=layout, backend="host", **kw)


def kv(seq: FakeSeq, start: int, end: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seq.seq_id * 1009 + layer)
    full = torch.randn(end, 2, SPEC.num_kv_heads, SPEC.head_dim, generator=g)
    return full[start:end, 0], full[start:end, 1]


def write(a: VirtualAllocator, seq: FakeSeq, start: int, end: int) -> None:
    slots = torch.tensor(a.slot_mapping(seq, start, end))
    for layer in range(SPEC.num_layers):
        k, v = kv(seq, start, end, layer)
        kernels.write_kv(*a.kv_cache(layer), k, v, slots)


def check(a: VirtualAllocator, seq: FakeSeq, n: int) -> None:
    slots = torch.tensor(a.slot_mapping(seq, 0, n))
    for layer in range(SPEC.num_layers):
        k, v = kv(seq, 0, n, layer)
        kc, vc = a.kv_cache(layer)
        assert torch.equal(kc[slots], k) and torch.equal(vc[slots], v), f"seq {seq.seq_id} layer {layer}"


def grow(a: VirtualAllocator, seq: FakeSeq, n: int) -> None:
    start = a.num_tokens(seq)
    assert a.can_allocate(seq, n)
    a.allocate(seq, n)
    write(a, seq, start, start + n)


@pytest.mark.parametrize("layout", ["per_layer", "shared"])
def test_contents_survive_growth(layout):
    a = make(layout, prefetch=False)
    s1, s2 = FakeSeq([], 128), FakeSeq([], 128)
    maps = []
    for step in range(40):  # interleaved growth, one token per step past the first chunk
        grow(a, s1, 5 if step == 0 else 1)
        grow(a, s2, 3 if step == 0 else 2)
        maps.append(a.num_sync_maps)
        check(a, s1, a.num_tokens(s1))
        check(a, s2, a.num_tokens(s2))
    assert maps[-1] > maps[0]  # pages were mapped under the live tensors as they grew
    a.stats().check()
    a.close()


@pytest.mark.parametrize("layout", ["per_layer", "shared"])
def test_contents_survive_reclamation(layout):
    tpp = make(layout).page_tokens
    a = make(layout, capacity=6 * tpp, max_len=4 * tpp, prefetch=False)  # 6 groups: reclamation is forced
    backend: HostBackend = a.backend
    s1, s2 = FakeSeq([], 4 * tpp), FakeSeq([], 4 * tpp)
    grow(a, s1, 3 * tpp)
    grow(a, s2, tpp // 2)
    slot1 = a.slot_of(s1) * a.pages_per_slot
    assert backend.resident_pages(0, slot1 + 2) > 0
    a.free(s1)  # deferred: s1's pages stay mapped (and resident) for the next request
    assert a.num_idle_groups == 3 and backend.resident_pages(0, slot1 + 2) > 0
    st = a.stats()
    st.check()
    assert st.idle_mapped == 3 * tpp * a.bytes_per_token and st.external_frag == 0  # kept for reuse
    grow(a, s2, tpp)
    grow(a, s2, tpp)  # the free pool is empty now
    assert a.num_free_groups == 0
    grow(a, s2, tpp)  # one group comes back from s1's idle slot: its last page, unmapped first
    assert a.num_idle_groups == 2 and backend.resident_pages(0, slot1 + 2) == 0
    check(a, s2, a.num_tokens(s2))
    # a new request lands in the recycled slot, reuses its two pages, reads what it writes
    s3 = FakeSeq([], 4 * tpp)
    maps = a.num_sync_maps
    grow(a, s3, tpp + 1)
    assert a.slot_of(s3) * a.pages_per_slot == slot1 and a.num_sync_maps == maps
    check(a, s3, tpp + 1)
    check(a, s2, a.num_tokens(s2))
    a.free(s2)
    a.free(s3)
    st = a.stats()
    st.check()
    assert a.num_idle_groups == 6
    assert st.idle_mapped == 6 * tpp * a.bytes_per_token and st.free == 0
    assert st.token_states == st.reservation == st.internal_frag == st.external_frag == 0
    a.close()


def test_released_pages_leave_ram():
    tpp = make("shared").page_tokens
    a = make("shared", capacity=6 * tpp, prefetch=False)
    backend: HostBackend = a.backend
    s, other = FakeSeq([], 128), FakeSeq([], 128)
    grow(a, s, 3 * tpp)
    grow(a, other, 1)
    pages = [(0, a.slot_of(s) * a.pages_per_slot + j) for j in range(3)]
    assert all(backend.resident_pages(*p) == 1 for p in pages)  # 4 KiB pages: one OS page each
    a.free(s)
    grow(a, other, 6 * tpp - 1)  # takes the two free groups, then s's three
    assert all(backend.resident_pages(*p) == 0 for p in pages)
    check(a, other, 6 * tpp)
    a.close()


def test_prefetch_maps_in_the_background():
    a = make("per_layer", prefetch=True, premap=0)  # growth alone (pre-mapping: test_allocators.py)
    s = FakeSeq([], 128)
    tpp = a.page_tokens
    grow(a, s, tpp)  # fills its first group: the next one is mapped ahead, off the critical path
    assert a.num_async_maps == 1
    sync = a.num_sync_maps
    a.wait_prefetch()
    grow(a, s, 1)
    assert a.num_sync_maps == sync  # the step did not map
    check(a, s, tpp + 1)
    a.close()


def test_linear_attention_reads_through_the_mapping():
    a = make("shared", prefetch=True)
    seqs = [FakeSeq([], 128) for _ in range(3)]
    lens = [37, 5, 64]
    for s, n in zip(seqs, lens):
        grow(a, s, n)
    q = torch.randn(3, 4, SPEC.head_dim)  # one decode query per sequence, GQA 4 -> 2
    meta = AttentionMetadata(
        mode=Addressing.LINEAR, query_start_loc=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), max_query_len=1, max_seq_len=max(lens),
        slot_mapping=torch.tensor([a.slot_mapping(s, n - 1, n)[0] for s, n in zip(seqs, lens)]),
        seq_base=torch.tensor([a.seq_base(s) for s in seqs]))
    out = kernels.attention(q, *a.kv_cache(1), meta)
    for i, (s, n) in enumerate(zip(seqs, lens)):  # against a dense copy of the same KV
        k, v = kv(s, 0, n, 1)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        p = torch.softmax(torch.einsum("hd,khd->hk", q[i], k) * SPEC.head_dim**-0.5, dim=-1)
        torch.testing.assert_close(out[i], torch.einsum("hk,khd->hd", p, v))
    a.close()


@pytest.mark.parametrize("layout", ["per_layer", "shared"])
def test_engine_generates_the_same_tokens_as_paged(layout):
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + 4 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = LLM(model="tiny-llama", allocator="paged", device="cpu", max_model_len=64, kv_cache_tokens=4096)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    # a pool for about three requests at once: slots are recycled, idle pages reclaimed
    llm = LLM(model="tiny-llama", allocator="virtual", device="cpu", max_model_len=64, kv_cache_tokens=96,
              max_num_seqs=4, allocator_args=dict(page_size=4096, layout=layout, backend="host"))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    alloc = llm.engine.allocator
    assert alloc.num_idle_groups + alloc.num_free_groups == alloc.num_groups
    st = alloc.stats()  # every request done: what stays mapped is idle, nothing is in use
    st.check()
    bpg = alloc.page_tokens * alloc.bytes_per_token
    assert st.idle_mapped == alloc.num_idle_groups * bpg > 0 and st.free == alloc.num_free_groups * bpg
    assert st.token_states == st.reservation == st.internal_frag == st.external_frag == 0


def test_a_collected_allocators_finalizer_takes_no_lock():
    """The collector may finalize an allocator inside another executor's ``submit``, which holds
    concurrent.futures' global lock: the finalizer must not take it (it deadlocked the test
    suite), and what it leaves is released at the next safe point."""
    import concurrent.futures.thread as cft
    import threading

    from allocators.virtual import _UNCLOSED, reap_unclosed

    a = make("per_layer", prefetch=True)
    a.allocate(FakeSeq(list(range(10)), 128), 10)  # maps: the mapping thread exists
    closed = []
    close = a.backend.close
    a.backend.close = lambda: closed.append(True) or close()
    done = threading.Event()

    def collect():
        with cft._global_shutdown_lock:  # as inside another executor's submit
            a._finalizer()  # what the collector calls
        done.set()

    threading.Thread(target=collect, daemon=True).start()
    assert done.wait(10), "the finalizer blocked on concurrent.futures' lock"
    assert len(_UNCLOSED) == 1 and not closed
    reap_unclosed()
    assert closed == [True] and not _UNCLOSED


def test_driver_time_is_counted_where_it_is_spent():
    """Maps the step waits for count as critical-path time; maps made ahead count on the background
    thread (what `kvlab bench throughput` reports per step)."""
    sync = make("per_layer", prefetch=False, premap=0)
    s = FakeSeq([], 128)
    grow(sync, s, 40)
    assert sync.num_sync_maps > 0 and sync.vmm_critical_s > 0 and sync.vmm_background_s == 0
    sync.free(s)
    ahead = make("per_layer", prefetch=True, premap=0)
    t = FakeSeq([], 128)
    grow(ahead, t, 8)
    grow(ahead, t, 56)  # within a page's prefetch distance of its end: the next page is mapped ahead
    ahead.wait_prefetch()
    assert ahead.num_async_maps > 0 and ahead.vmm_background_s > 0
    for a in (sync, ahead):
        a.close()
