"""The virtual allocator's ``cuda`` backend (driver VMM) on a GPU, and paged sharing on CUDA tensors.

Run: ``pytest tests/test_vmm_cuda.py -q`` on a machine with a CUDA device and
cuda-python (``cuda.bindings``); skipped elsewhere. ``experiments/bench_vmm.py`` records
the cost of mapping a page under results/vmm/.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

import kernels
from allocators import KVCacheSpec
from allocators.paged import PagedAllocator
from allocators.virtual import VirtualAllocator
from kernels.metadata import Addressing, AttentionMetadata
from conftest import FakeSeq

pytestmark = pytest.mark.gpu
MiB = 1 << 20




# K/V of one layer: 8 heads x 128 x bf16 = 2 KiB a token: a 2 MiB page holds 1024 tokens of one
# layer (per_layer) or 256 tokens of both layers' K and V (shared)
SPEC = KVCacheSpec(num_layers=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda")


@pytest.fixture(autouse=True)
def _needs_bindings():
    pytest.importorskip("cuda.bindings", reason="NVIDIA's cuda-python bindings: the gpu extra (make setup on a GPU machine)")


def values(seq: FakeSeq, start: int, end: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seq.seq_id * 101 + layer)
    full = torch.randn(end, 2, SPEC.num_kv_heads, SPEC.head_dim, generator=g, device="cuda")
    return full[start:end, 0].to(SPEC.dtype), full[start:end, 1].to(SPEC.dtype)


def grow(a, seq: FakeSeq, n: int) -> None:
    start = a.num_tokens(seq)
    assert a.can_allocate(seq, n)
    a.allocate(seq, n)
    slots = torch.tensor(a.slot_mapping(seq, start, start + n), device="cuda")
    for layer in range(SPEC.num_layers):
        k, v = values(seq, start, start + n, layer)
        kc, vc = a.kv_cache(layer)
        kc.index_put_((slots,), k)  # a kernel writes through the mapping
        vc.index_put_((slots,), v)


def check(a, seq: FakeSeq) -> None:
    n = a.num_tokens(seq)
    slots = torch.tensor(a.slot_mapping(seq, 0, n), device="cuda")
    for layer in range(SPEC.num_layers):
        k, v = values(seq, 0, n, layer)
        kc, vc = a.kv_cache(layer)
        assert torch.equal(kc.index_select(0, slots), k), f"seq {seq.seq_id} layer {layer} K"
        assert torch.equal(vc.index_select(0, slots), v), f"seq {seq.seq_id} layer {layer} V"


def swap_k_and_v_twice(a, seq: FakeSeq) -> None:
    """Kernels that read and write the mapped range in place; exact, so ``check`` still holds."""
    n, base = a.num_tokens(seq), a.seq_base(seq)
    for _ in range(2):
        for layer in range(SPEC.num_layers):
            kc, vc = a.kv_cache(layer)
            k = kc[base:base + n].clone()
            kc[base:base + n].copy_(vc[base:base + n])
            vc[base:base + n].copy_(k)


@pytest.mark.parametrize("layout", ["per_layer", "shared"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_mapping_grows_under_kernels_and_survives_reclamation(layout, prefetch):
    tpp = 1024 if layout == "per_layer" else 256
    a = VirtualAllocator(SPEC, capacity_tokens=6 * tpp, max_num_seqs=4, max_model_len=4 * tpp,
                         page_size=2 * MiB, layout=layout, backend="cuda", prefetch=prefetch)
    assert a.page_tokens == tpp and a.mode == Addressing.LINEAR
    s1, s2 = FakeSeq([], 4 * tpp), FakeSeq([], 4 * tpp)
    grow(a, s1, tpp // 2)
    grow(a, s2, 10)
    for _ in range(5):  # growth across page boundaries, pages mapped under live tensors
        grow(a, s1, tpp // 2)
        grow(a, s2, tpp // 3)
        check(a, s1)
        check(a, s2)
    swap_k_and_v_twice(a, s1)
    check(a, s1)
    while a.num_free_groups:
        grow(a, s2, tpp // 2)
    a.free(s1)  # deferred reclamation: s1's pages stay mapped, idle
    idle = a.num_idle_groups
    assert idle >= 3
    grow(a, s2, (tpp - a.num_tokens(s2) % tpp) % tpp + 1)  # into a new group: reclaimed from s1's slot
    if not prefetch:  # (with prefetch the group may have been mapped ahead already)
        assert a.num_idle_groups < idle
    check(a, s2)
    s3 = FakeSeq([], 4 * tpp)
    grow(a, s3, tpp + 7)  # lands in s1's old slot, on its remaining pages
    check(a, s3)
    check(a, s2)
    # the kernels read through the mapping: attention over LINEAR addressing vs a dense copy
    q = torch.randn(2, 16, SPEC.head_dim, device="cuda", dtype=SPEC.dtype)
    seqs = [s2, s3]
    lens = [a.num_tokens(s) for s in seqs]
    meta = AttentionMetadata(
        mode=Addressing.LINEAR, query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"), max_query_len=1, max_seq_len=max(lens),
        slot_mapping=torch.tensor([a.seq_base(s) + n - 1 for s, n in zip(seqs, lens)], device="cuda"),
        seq_base=torch.tensor([a.seq_base(s) for s in seqs], device="cuda"))
    out = kernels.attention(q, *a.kv_cache(1), meta)
    ref = kernels.reference.attention(q, *a.kv_cache(1), meta)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    a.free(s2)
    a.free(s3)
    a.stats().check()
    a.close()


def test_cost_of_mapping_one_page():
    from allocators.vmm_backends import CudaBackend

    b = CudaBackend(2 * MiB, 64 * 2 * MiB, 1, 64, "cuda")
    times = []
    for p in range(64):
        t0 = time.perf_counter_ns()
        b.map(p, 0, p)  # cuMemMap + cuMemSetAccess
        times.append((time.perf_counter_ns() - t0) / 1e3)
    x = b.tensor(0).view(torch.float32)
    x.fill_(3.0)  # every page is backed and writable
    assert bool((x == 3.0).all())
    for p in range(64):
        b.unmap(0, p)
    b.close()
    med = statistics.median(times)
    print(f"\nmap one 2 MiB page (cuMemMap + cuMemSetAccess) on {torch.cuda.get_device_name()}: "
          f"median {med:.1f} us, max {max(times):.1f} us")


@pytest.mark.parametrize("layout", ["per_layer", "shared"])
def test_engine_on_vmm_matches_paged(layout):
    from engine import LLM, SamplingParams

    prompts = [[(11 * i + j) % 500 + 3 for j in range(7 + 5 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = LLM(model="tiny-llama", allocator="paged", device="cuda", max_model_len=128, kv_cache_tokens=8192,
              max_num_seqs=8, enforce_eager=True)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    llm = LLM(model="tiny-llama", allocator="virtual", device="cuda", max_model_len=128, max_num_seqs=8,
              kv_cache_tokens=4 * (32768 if layout == "per_layer" else 8192), enforce_eager=True,
              allocator_args=dict(page_size=2 * MiB, layout=layout, backend="cuda"))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want


def test_paged_copy_on_write_and_swap_on_cuda():
    a = PagedAllocator(SPEC, 256, 4, 128, block_size=16, swap_space_tokens=64)
    p = FakeSeq([], 128)
    grow(a, p, 20)
    c = FakeSeq([], 128)
    a.fork(p, c)
    grow(a, c, 3)  # copy-on-write of the shared second block (kernels.copy_blocks)
    assert a.block_ids(c)[0] == a.block_ids(p)[0] and a.block_ids(c)[1] != a.block_ids(p)[1]
    check(a, p)
    slots = torch.tensor(a.slot_mapping(c, 0, 20), device="cuda")
    k, _ = values(p, 0, 20, 0)
    assert torch.equal(a.kv_cache(0)[0].index_select(0, slots), k)
    a.swap_out(p)
    hog = FakeSeq([], 128)
    grow(a, hog, 256 - 16 * len(a.block_ids(c)))
    a.free(hog)
    a.swap_in(p)
    check(a, p)


def test_one_physical_page_mapped_at_two_addresses():
    """cuMemMap of one handle at two virtual addresses (a prefix page shared by two slots):
    a write through one is read through the other, and unmapping one leaves the other."""
    from allocators.vmm_backends import CudaBackend

    b = CudaBackend(2 * MiB, 8 * 2 * MiB, 2, 4, "cuda")
    per_page = 2 * MiB // 4

    def page(r: int, p: int) -> torch.Tensor:  # float32 view of page p of range r (after the anchor)
        start = (b.anchor_bytes + p * b.page_size) // 4
        return b.tensor(r).view(torch.float32)[start:start + per_page]

    b.map(1, 0, 2)
    b.map(1, 1, 5)  # the same handle in another range, at another page
    want = torch.arange(per_page, device="cuda", dtype=torch.float32)
    page(0, 2).copy_(want)
    torch.cuda.synchronize()
    assert torch.equal(page(1, 5), want)
    b.unmap(0, 2)
    torch.cuda.synchronize()
    assert torch.equal(page(1, 5), want)  # the other mapping is intact
    page(1, 5).mul_(2)
    b.map(1, 0, 3)  # mapped again elsewhere: the content is the handle's
    torch.cuda.synchronize()
    assert torch.equal(page(0, 3), want * 2)
    b.unmap(0, 3)
    b.unmap(1, 5)
    b.close()


@pytest.mark.parametrize("layout", ["per_layer", "shared"])
def test_live_slots_share_prefix_pages_on_vmm(layout):
    tpp = 1024 if layout == "per_layer" else 256
    a = VirtualAllocator(SPEC, capacity_tokens=6 * tpp, max_num_seqs=3, max_model_len=4 * tpp,
                         page_size=2 * MiB, layout=layout, backend="cuda", prefetch=False, enable_prefix_caching=True)
    prefix = [(7 * i) % 500 + 3 for i in range(2 * tpp + 5)]  # two whole pages and 5 tokens
    first = FakeSeq(prefix + [1, 2], 4 * tpp)
    grow(a, first, len(first.token_ids))
    second = FakeSeq(prefix + [9], 4 * tpp)
    assert a.match_prefix(second) == 2 * tpp and a.num_shared_maps == 2
    assert a.page_groups(second)[:2] == a.page_groups(first)[:2]

    def reads_firsts_prefix() -> None:  # second's own addresses show the KV first wrote
        slots = torch.tensor(a.slot_mapping(second, 0, 2 * tpp), device="cuda")
        for layer in range(SPEC.num_layers):
            k, v = values(first, 0, 2 * tpp, layer)
            kc, vc = a.kv_cache(layer)
            assert torch.equal(kc.index_select(0, slots), k) and torch.equal(vc.index_select(0, slots), v)

    reads_firsts_prefix()
    grow(a, second, 6)  # its own third page: the shared ones are never written
    assert a.page_groups(second)[2] != a.page_groups(first)[2]
    check(a, first)
    a.free(first)  # first's slot goes idle; the shared groups stay mapped in second's slot
    hog = FakeSeq([], 4 * tpp)
    grow(a, hog, 3 * tpp)  # takes the free groups, then first's private idle page: not the shared ones
    torch.cuda.synchronize()
    reads_firsts_prefix()
    refs = a.group_refs()
    assert all(refs[g] >= 1 for g in a.page_groups(second)[:2])
    for s in (second, hog):
        a.free(s)
    a.stats().check()
    assert a.num_free_groups + a.num_idle_groups == a.num_groups
    a.close()
