"""Host time per decode step at 256 running sequences, per allocator (target: <= 1 ms).

The model is replaced by ``experiments.host_runner.HostOnlyRunner`` (all host-side work of
the real runner, no model), so the figure is scheduler + allocator + accounting + input
preparation + output handling. ``pytest tests/benchmarks/test_bench_host.py --benchmark-enable``.
"""
import pytest

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from experiments.host_runner import HostOnlyRunner

NUM_SEQS = 256
PROMPT = 512


ALLOCATORS = [("paged", {"block_size": 16}), ("contiguous", {"policy": "max"}),
              ("virtual", {"backend": "sim", "page_size": 64 * 1024})]


def _decoding_engine(allocator, args, record_memory):
    cfg = EngineConfig(model="tiny-llama", allocator=allocator, allocator_args=dict(args), max_model_len=4096,
                       max_num_seqs=NUM_SEQS, max_num_batched_tokens=NUM_SEQS * PROMPT,
                       kv_cache_tokens=NUM_SEQS * 4096, record_memory=record_memory, detokenize=False,
                       stream_outputs=False, async_scheduling=False)  # host work of synchronous steps
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


@pytest.mark.parametrize("outputs", [100, 1500])
def test_host_time_per_streaming_step(benchmark, outputs):
    """256 streamed requests (delta outputs, text, a stop string watched): the host time per step
    must not grow with the outputs' length (experiments/bench_stream_host.py tabulates it)."""
    from experiments.bench_stream_host import NUM_SEQS as N
    from experiments.bench_stream_host import streaming_engine

    engine = streaming_engine("delta", max_len=outputs + 256)
    while not engine.scheduler.running or engine.scheduler.running[0].num_output_tokens < outputs:
        engine.step()
    outs = benchmark.pedantic(engine.step, rounds=30, iterations=1, warmup_rounds=2)
    assert len(outs) == N and all(len(o.outputs[0].token_ids) == 1 for o in outs)  # one new token each, no more
