"""Host time per decode step at 256 running sequences, per allocator (DESIGN: target <= 1 ms).

The model is replaced by a runner that does all host-side work of the real one
(BatchInputs: token ids, positions, slots, block-table rows) and returns a token per
sequence, so the figure is scheduler + allocator + accounting + input preparation +
output handling. ``pytest tests/benchmarks/test_bench_host.py --benchmark-enable``.
"""
import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.block_table import PersistentBlockTable
from engine.config import EngineConfig
from engine.runner import BatchInputs
from engine.staging import HostStaging
from kernels.metadata import Addressing

NUM_SEQS = 256
PROMPT = 512


class HostOnlyRunner:
    def __init__(self, allocator, max_num_seqs, max_model_len):
        self.allocator = allocator
        self.staging = HostStaging(torch.device("cpu"))
        self.table = None
        if allocator.mode == Addressing.PAGED:
            self.table = PersistentBlockTable(max_num_seqs + 1, -(-max_model_len // allocator.block_size),
                                              torch.device("cpu"))

    def execute(self, batch):
        inputs = BatchInputs(batch, self.allocator, self.table)
        if self.table is not None:
            self.table.sync(self.staging)
        return [(s, 7, None) for s in inputs.sample_seqs]

    def release(self, seq):
        if self.table is not None:
            self.table.release(seq.seq_id)

    forget = release


ALLOCATORS = [("paged", {"block_size": 16}), ("contiguous", {"policy": "max"}),
              ("virtual", {"backend": "sim", "page_size": 64 * 1024})]


def _decoding_engine(allocator, args, record_memory):
    cfg = EngineConfig(model="tiny-llama", allocator=allocator, allocator_args=dict(args), max_model_len=4096,
                       max_num_seqs=NUM_SEQS, max_num_batched_tokens=NUM_SEQS * PROMPT,
                       kv_cache_tokens=NUM_SEQS * 4096, record_memory=record_memory, detokenize=False,
                       stream_outputs=False)
    engine = LLMEngine(cfg, runner_factory=lambda a: HostOnlyRunner(a, NUM_SEQS, 4096))
    for i in range(NUM_SEQS):
        engine.add_request(str(i), [5 + (i + j) % 500 for j in range(PROMPT)],
                           SamplingParams(max_tokens=3000, ignore_eos=True, temperature=0))
    engine.step()  # all prompts in one step
    assert engine.num_running == NUM_SEQS
    return engine


@pytest.mark.parametrize("record_memory", [False, True], ids=["serving", "with-accounting"])
@pytest.mark.parametrize("allocator,args", ALLOCATORS, ids=[a for a, _ in ALLOCATORS])
def test_host_time_per_decode_step(benchmark, allocator, args, record_memory):
    engine = _decoding_engine(allocator, args, record_memory)
    benchmark.pedantic(engine.step, rounds=200, iterations=1, warmup_rounds=10)
    rec = engine.step_records[-1]
    assert rec.num_seqs == NUM_SEQS and rec.decode_tokens == NUM_SEQS and rec.prefill_tokens == 0
