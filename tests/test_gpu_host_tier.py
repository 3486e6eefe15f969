"""The host KV tier on a GPU: copies on their own stream (pinned host memory, CUDA events), data
intact after offload and reload, greedy outputs identical with the tier on and off."""
import pytest
import torch

from allocators import KVCacheSpec
from allocators.paged import PagedAllocator
from conftest import FakeSeq
from engine import LLM

pytestmark = pytest.mark.gpu


def _write(alloc, seq, gen):
    alloc.flush_transfers()  # as the scheduler, before the step writes
    slots = torch.tensor(alloc.slot_mapping(seq, 0, len(seq.token_ids)), device="cuda")
    for layer in range(alloc.spec.num_layers):
        k, v = alloc.kv_cache(layer)
        k[slots] = torch.randn(k[slots].shape, generator=gen, device="cuda", dtype=k.dtype)
        v[slots] = torch.randn(v[slots].shape, generator=gen, device="cuda", dtype=v.dtype)


def _content(alloc, seq, n):
    slots = torch.tensor(alloc.slot_mapping(seq, 0, n), device="cuda")
    return [torch.stack([k[slots], v[slots]]).clone() for k, v in (alloc.kv_cache(i) for i in range(alloc.spec.num_layers))]


@pytest.mark.parametrize("transfer_blocks", [1, 4])
def test_offload_and_reload_on_a_side_stream_keeps_the_data(transfer_blocks):
    spec = KVCacheSpec(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda")
    bs, gen = 16, torch.Generator(device="cuda").manual_seed(0)
    alloc = PagedAllocator(spec, 48 * bs, 8, 4096, block_size=bs, host_tier_tokens=256 * bs,
                           host_transfer_blocks=transfer_blocks)
    tier = alloc.host_tier
    assert tier._host.is_pinned() and tier._stream != torch.cuda.current_stream()
    convs = [FakeSeq([c * 1000 + i + 1 for i in range(20 * bs + 3)], 4096) for c in range(3)]
    want = []
    for seq in convs:  # 3 x 21 blocks; the pool holds 48: most of the first conversation is evicted
        alloc.allocate(seq, len(seq.token_ids))
        _write(alloc, seq, gen)
        want.append(_content(alloc, seq, 20 * bs))
        alloc.free(seq)
    alloc.flush_transfers()
    assert tier.stats.stored_blocks >= 10
    again = FakeSeq(list(convs[0].token_ids), 4096)
    cached = alloc.match_prefix(again)
    assert cached == 20 * bs and alloc.last_match.host > 0  # loaded back, not recomputed
    got = _content(alloc, again, 20 * bs)  # read on the compute stream: after its wait for the load
    for a, b in zip(got, want[0]):
        assert torch.equal(a, b)
    tier.poll(wait=True)
    s = tier.stats
    assert s.store_s > 0 and s.load_s > 0 and s.pending_timings == 0
    assert s.store_transfers <= -(-s.stored_blocks // transfer_blocks) + 3  # batched per chunk
    alloc.free(again)
    assert alloc.num_free_blocks == alloc.num_blocks


def test_greedy_outputs_identical_with_the_tier_on_and_off_on_cuda():
    from test_host_tier import _conversations

    def run(**kw):
        llm = LLM("tiny-llama", allocator="paged", allocator_args={"block_size": 16}, device="cuda", dtype="float32",
                  max_model_len=256, kv_cache_tokens=160, max_num_seqs=2, enable_prefix_caching=True, **kw)
        return llm, _conversations(llm)[0]

    _, off = run(async_scheduling=False)
    for kw in (dict(host_kv_cache_tokens=2048), dict(host_kv_cache_tokens=2048, async_scheduling=True,
                                                     host_transfer_blocks=4)):
        llm, on = run(**kw)
        assert on == off, kw
        tier = llm.engine.allocator.host_tier
        tier.poll(wait=True)
        assert tier.stats.hits > 0 and tier.stats.load_s > 0
