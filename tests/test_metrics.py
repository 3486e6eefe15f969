"""/metrics under vLLM V1's names: families, types, meanings, histograms, escaping, monotonic counters.

No server and no model: EngineStats and RequestOutput objects are built directly and served by a
fake engine with the three things ServingMetrics uses (stats, add_finish_listener, is_running).
"""
from __future__ import annotations

import dataclasses
import math
import re
import threading

import pytest

pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev, which has it)")

from allocators.stats import STAT_FIELDS, MemoryStats
from engine.engine_core import EngineStats
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.serving import metrics as M
from engine.serving.limits import InFlight
from engine.serving.metrics import CONTENT_TYPE, ServingMetrics


MODEL = "tiny-llama"
MAX_MODEL_LEN = 4096

GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
          "vllm:gpu_cache_usage_perc", "kvlab:kv_cache_capacity_tokens", "kvlab:kv_cache_capacity_bytes",
          "kvlab:kv_cache_bytes", "kvlab:kv_cache_idle_mapped_perc", "kvlab:prefix_cache_hit_rate",
          "kvlab:num_seqs_running", "kvlab:num_seqs_waiting", "kvlab:num_seqs_swapped", "kvlab:engine_up"]
COUNTERS = ["vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
            "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
            "kvlab:engine_steps_total", "kvlab:recomputed_prompt_tokens_total"]  # host-tier families only with a tier
# the HTTP server's concurrency limiter: only with limits.max_concurrency set
LIMITER_GAUGES = ["kvlab:http_requests_in_flight", "kvlab:http_max_concurrency"]
LIMITER_COUNTERS = ["kvlab:http_requests_overloaded_total"]
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": M.TTFT_BUCKETS,
    "vllm:time_per_output_token_seconds": M.TOKEN_LATENCY_BUCKETS,
    "vllm:inter_token_latency_seconds": M.TOKEN_LATENCY_BUCKETS,
    "vllm:request_time_per_output_token_seconds": M.TOKEN_LATENCY_BUCKETS,
    "vllm:e2e_request_latency_seconds": M.REQUEST_LATENCY_BUCKETS,
    "vllm:request_queue_time_seconds": M.REQUEST_LATENCY_BUCKETS,
    "vllm:request_prefill_time_seconds": M.REQUEST_LATENCY_BUCKETS,
    "vllm:request_decode_time_seconds": M.REQUEST_LATENCY_BUCKETS,
    "vllm:request_inference_time_seconds": M.REQUEST_LATENCY_BUCKETS,
    "vllm:request_prompt_tokens": M.buckets_1_2_5(MAX_MODEL_LEN),
    "vllm:request_generation_tokens": M.buckets_1_2_5(MAX_MODEL_LEN),
    "vllm:request_max_num_generation_tokens": M.buckets_1_2_5(MAX_MODEL_LEN),
    "vllm:request_params_n": M.N_BUCKETS,
    "vllm:request_params_max_tokens": M.buckets_1_2_5(MAX_MODEL_LEN),
}
# vLLM V1's boundaries, written out here so that a change to the module's constants shows
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
             40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0]
VLLM_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


def memory(capacity=1 << 20, **fields) -> MemoryStats:
    m = MemoryStats(capacity=capacity, **fields)
    m.free = capacity - sum(getattr(m, f) for f in STAT_FIELDS if f != "free")
    m.check()
    return m


def stats(**kw) -> EngineStats:
    base = dict(num_requests_running=0, num_requests_waiting=0, num_seqs_running=0, num_seqs_waiting=0,
                num_seqs_swapped=0, memory=memory(), kv_capacity_tokens=8192, prefix_cache_queries_total=0,
                prefix_cache_hits_total=0, prompt_tokens_total=0, generation_tokens_total=0,
                num_preemptions_total=0, finished_total={}, steps_total=0)
    return EngineStats(**(base | kw))


class FakeEngine:
    def __init__(self, snapshot: EngineStats | None = None):
        self.snapshot = snapshot or stats()
        self.listeners = []
        self.is_running = True
        self.max_model_len = MAX_MODEL_LEN

    def stats(self) -> EngineStats:
        return self.snapshot

    def add_finish_listener(self, fn) -> None:
        self.listeners.append(fn)

    def finish(self, out: RequestOutput) -> None:
        for fn in self.listeners:
            fn(out)


def output(arrival=100.0, scheduled=100.5, first=101.0, finish=103.0, prompt=12, gen=5, n=1, max_tokens=5,
           itl=(0.25, 0.5, 0.5, 0.75), reason="length", samples=None) -> RequestOutput:
    samples = samples if samples is not None else [gen // n] * n
    outs = [CompletionOutput(index=i, token_ids=list(range(k)), text="", finish_reason=reason)
            for i, k in enumerate(samples)]
    m = RequestMetrics(arrival_time=arrival, first_scheduled_time=scheduled, first_token_time=first,
                       finish_time=finish, num_prompt_tokens=prompt, num_generation_tokens=gen, n=n,
                       max_tokens=max_tokens, inter_token_latencies=list(itl))
    return RequestOutput(request_id="r", prompt_token_ids=list(range(prompt)), outputs=outs, finished=True,
                         metrics=m)


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$')


def samples(text: str) -> dict[str, float]:
    """{name{labels but model_name and engine, sorted}: value}: a parser independent of prometheus_client."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, labels, value = SAMPLE.match(line).groups()
        pairs = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or "")
        rest = ",".join(f'{k}="{v}"' for k, v in sorted(pairs) if k not in ("model_name", "engine"))
        out[name + (f"{{{rest}}}" if rest else "")] = float(value)
    return out


def families(text: str) -> dict:
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client: the dev extra (make setup)")
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


# -- names, types, format ----------------------------------------------------------------------

def test_every_family_is_there_with_its_type_and_vllm_labels():
    sm = ServingMetrics(FakeEngine(), MODEL, in_flight=InFlight(64))
    sm.observe(output())
    text = sm.render()
    fams = families(text)
    gauges, counters = GAUGES + LIMITER_GAUGES, COUNTERS + LIMITER_COUNTERS
    for name in gauges:
        assert fams[name].type == "gauge", name
    for name in counters:  # exposed with _total; the parser names the family without it
        fam = fams[name[: -len("_total")]]
        assert fam.type == "counter", name
        assert {s.name for s in fam.samples} == {name}
        assert f"# TYPE {name} counter" in text
    for name in HISTOGRAMS:
        assert fams[name].type == "histogram", name
    assert set(fams) == set(gauges) | {c[:-6] for c in counters} | set(HISTOGRAMS)  # nothing unexpected
    # no concurrency limit (limits.max_concurrency=null): no limiter, none of its families
    unlimited = families(ServingMetrics(FakeEngine(), MODEL).render())
    assert set(unlimited) == set(GAUGES) | {c[:-6] for c in COUNTERS} | set(HISTOGRAMS)
    for fam in fams.values():
        for s in fam.samples:
            assert s.labels["model_name"] == MODEL and s.labels["engine"] == "0", s
    reasons = {s.labels["finished_reason"] for s in fams["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error"}  # present from the start, as in vLLM
    states = {s.labels["state"] for s in fams["kvlab:kv_cache_bytes"].samples}
    assert states == set(STAT_FIELDS) and "idle_mapped" in states


def test_histogram_buckets_are_vllms_and_cumulative():
    assert list(M.TTFT_BUCKETS) == VLLM_TTFT and list(M.TOKEN_LATENCY_BUCKETS) == VLLM_ITL
    assert list(M.REQUEST_LATENCY_BUCKETS) == VLLM_REQUEST and list(M.N_BUCKETS) == [1, 2, 5, 10, 20]
    assert M.buckets_1_2_5(100) == [1, 2, 5, 10, 20, 50, 100] and M.buckets_1_2_5(4096)[-1] == 2000
    engine = FakeEngine()
    sm = ServingMetrics(engine, MODEL)
    for i in range(30):
        engine.finish(output(first=100.0 + 0.01 * i ** 2, finish=110.0 + i, prompt=3 * i + 1, gen=i + 1,
                             max_tokens=i + 1, itl=[0.004 * i, 0.3 * i]))
    fams = families(sm.render())
    for name, bounds in HISTOGRAMS.items():
        buckets = [s for s in fams[name].samples if s.name == f"{name}_bucket"]
        les = [s.labels["le"] for s in buckets]
        assert les == [M.format_value(b) for b in bounds] + ["+Inf"], name
        values = [s.value for s in buckets]
        assert values == sorted(values), f"{name}: buckets not cumulative"
        count = next(s.value for s in fams[name].samples if s.name == f"{name}_count")
        assert values[-1] == count, name
    assert [s.labels["le"] for s in fams["vllm:request_params_n"].samples[:3]] == ["1.0", "2.0", "5.0"]


def test_content_type_and_value_format():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert [M.format_value(v) for v in (3, 0.25, 7680.0, 1e6, math.inf)] == ["3.0", "0.25", "7680.0", "1e+06",
                                                                             "+Inf"]


# -- meanings -------------------------------------------------------------------------------------

def test_running_and_waiting_count_requests_not_samples():
    snap = stats(num_requests_running=2, num_requests_waiting=3, num_seqs_running=9, num_seqs_waiting=12,
                 num_seqs_swapped=4)
    m = samples(ServingMetrics(FakeEngine(snap), MODEL).render())
    assert m["vllm:num_requests_running"] == 2 and m["vllm:num_requests_waiting"] == 3
    assert m["kvlab:num_seqs_running"] == 9 and m["kvlab:num_seqs_waiting"] == 12
    assert m["kvlab:num_seqs_swapped"] == 4


def test_idle_mapped_memory_is_not_usage():
    """An idle virtual-allocator server: every byte free or idle mapped; usage 0, idle shown apart."""
    cap = 1 << 20
    snap = stats(memory=memory(cap, idle_mapped=3 * cap // 8))
    text = ServingMetrics(FakeEngine(snap), MODEL).render()
    fams, m = families(text), samples(text)
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:gpu_cache_usage_perc"] == 0
    assert m["kvlab:kv_cache_idle_mapped_perc"] == pytest.approx(3 / 8)
    assert m['kvlab:kv_cache_bytes{state="idle_mapped"}'] == 3 * cap // 8 > 0
    assert m['kvlab:kv_cache_bytes{state="free"}'] == 5 * cap // 8
    states = {s.labels["state"]: s.value for s in fams["kvlab:kv_cache_bytes"].samples}
    assert sum(states.values()) == m["kvlab:kv_cache_capacity_bytes"] == cap


def test_kv_usage_counts_what_live_sequences_hold():
    cap = 1000
    snap = stats(memory=memory(cap, token_states=200, reservation=100, internal_frag=50, external_frag=50,
                               idle_mapped=300))
    m = samples(ServingMetrics(FakeEngine(snap), MODEL).render())
    assert m["vllm:kv_cache_usage_perc"] == pytest.approx(0.4) == m["vllm:gpu_cache_usage_perc"]
    assert m["kvlab:kv_cache_idle_mapped_perc"] == pytest.approx(0.3)
    assert m["kvlab:kv_cache_capacity_tokens"] == 8192


def test_counters_come_from_the_snapshot():
    snap = stats(prefix_cache_queries_total=400, prefix_cache_hits_total=100, prompt_tokens_total=1234,
                 generation_tokens_total=567, num_preemptions_total=3, steps_total=89,
                 finished_total={"stop": 4, "length": 6, "abort": 1})
    m = samples(ServingMetrics(FakeEngine(snap), MODEL).render())
    assert m["vllm:prefix_cache_queries_total"] == 400 and m["vllm:prefix_cache_hits_total"] == 100
    assert m["kvlab:prefix_cache_hit_rate"] == 0.25
    assert m["vllm:prompt_tokens_total"] == 1234 and m["vllm:generation_tokens_total"] == 567
    assert m["vllm:num_preemptions_total"] == 3 and m["kvlab:engine_steps_total"] == 89
    assert {r: m[f'vllm:request_success_total{{finished_reason="{r}"}}'] for r in M.FINISH_REASONS} == {
        "stop": 4, "length": 6, "abort": 1, "error": 0}


def test_limiter_counts_are_read_at_each_render():
    counts = InFlight(352)
    sm = ServingMetrics(FakeEngine(), MODEL, in_flight=counts)
    m = samples(sm.render())
    assert m["kvlab:http_requests_in_flight"] == 0 and m["kvlab:http_requests_overloaded_total"] == 0
    assert m["kvlab:http_max_concurrency"] == 352
    counts.count, counts.refused_total = 3, 7
    m = samples(sm.render())
    assert m["kvlab:http_requests_in_flight"] == 3 and m["kvlab:http_requests_overloaded_total"] == 7
    counts.count = 1  # a gauge goes down
    assert samples(sm.render())["kvlab:http_requests_in_flight"] == 1


def test_engine_up_follows_the_engine():
    engine = FakeEngine()
    sm = ServingMetrics(engine, MODEL)
    assert samples(sm.render())["kvlab:engine_up"] == 1
    engine.is_running = False
    assert samples(sm.render())["kvlab:engine_up"] == 0


def test_histogram_sums_and_counts_match_the_observations():
    engine = FakeEngine()
    sm = ServingMetrics(engine, MODEL)
    a = output(arrival=10.0, scheduled=10.5, first=11.0, finish=14.0, prompt=12, gen=5, max_tokens=5,
               itl=[0.5, 0.75, 0.75, 1.0])
    b = output(arrival=20.0, scheduled=22.0, first=22.25, finish=23.25, prompt=7, gen=6, n=2, max_tokens=None,
               itl=[0.25, 0.25, 0.5, 0.25], samples=[4, 2])
    c = output(arrival=30.0, scheduled=None, first=None, finish=30.5, prompt=3, gen=0, max_tokens=8, itl=[],
               reason="error", samples=[0])  # failed before it ran
    for out in (a, b, c):
        engine.finish(out)
    m = samples(sm.render())

    def h(name):
        return m[f"vllm:{name}_count"], m[f"vllm:{name}_sum"]

    assert h("time_to_first_token_seconds") == (2, pytest.approx(1.0 + 2.25))
    assert h("e2e_request_latency_seconds") == (3, pytest.approx(4.0 + 3.25 + 0.5))
    assert h("request_queue_time_seconds") == (2, pytest.approx(0.5 + 2.0))
    assert h("request_prefill_time_seconds") == (2, pytest.approx(0.5 + 0.25))
    assert h("request_decode_time_seconds") == (2, pytest.approx(3.0 + 1.0))
    assert h("request_inference_time_seconds") == (2, pytest.approx(3.5 + 1.25))
    gaps = [0.5, 0.75, 0.75, 1.0, 0.25, 0.25, 0.5, 0.25]  # every gap, once, into both names
    assert h("inter_token_latency_seconds") == (8, pytest.approx(sum(gaps)))
    assert h("time_per_output_token_seconds") == (8, pytest.approx(sum(gaps)))
    # per request: decode time / (tokens of the longest sample - 1)
    assert h("request_time_per_output_token_seconds") == (2, pytest.approx(3.0 / 4 + 1.0 / 3))
    assert h("request_prompt_tokens") == (3, 12 + 7 + 3)
    assert h("request_generation_tokens") == (3, 5 + 6 + 0)
    assert h("request_max_num_generation_tokens") == (3, 5 + 4 + 0)
    assert h("request_params_n") == (3, 1 + 2 + 1)
    assert h("request_params_max_tokens") == (2, 5 + 8)  # only where the request set it
    # buckets: le is inclusive; TTFT 1.0 falls in le="1.0", 2.25 in le="2.5"
    assert m['vllm:time_to_first_token_seconds_bucket{le="0.75"}'] == 0
    assert m['vllm:time_to_first_token_seconds_bucket{le="1.0"}'] == 1
    assert m['vllm:time_to_first_token_seconds_bucket{le="2.5"}'] == 2
    assert m['vllm:time_to_first_token_seconds_bucket{le="+Inf"}'] == 2
    assert m['vllm:request_params_n_bucket{le="1.0"}'] == 2 and m['vllm:request_params_n_bucket{le="2.0"}'] == 3


def test_label_values_are_escaped():
    name = 'my "model"\\v2\nfinal'
    sm = ServingMetrics(FakeEngine(), name)
    text = sm.render()
    assert 'model_name="my \\"model\\"\\\\v2\\nfinal"' in text
    assert all(line.count("\n") == 0 for line in text.splitlines())
    for fam in families(text).values():
        for s in fam.samples:
            assert s.labels["model_name"] == name


def test_counters_never_decrease_across_renders():
    engine = FakeEngine(stats(prompt_tokens_total=10, generation_tokens_total=5, steps_total=3,
                              finished_total={"stop": 1}))
    sm = ServingMetrics(engine, MODEL)
    engine.finish(output())
    first = samples(sm.render())
    engine.snapshot = stats(prompt_tokens_total=25, generation_tokens_total=9, steps_total=8,
                            finished_total={"stop": 2, "length": 1})
    engine.finish(output())
    second = samples(sm.render())
    engine.snapshot = stats(prompt_tokens_total=20, steps_total=8)  # a snapshot behind the last: held
    third = samples(sm.render())
    counters = [k for k in first if k.split("{")[0] in COUNTERS or k.endswith(("_count", "_sum"))
                or "_bucket" in k]
    assert counters
    for k in counters:
        assert first[k] <= second[k] <= third[k], k
    assert second["vllm:prompt_tokens_total"] == 25 == third["vllm:prompt_tokens_total"]
    assert second['vllm:request_success_total{finished_reason="length"}'] == 1


def test_observations_from_another_thread_while_rendering():
    engine = FakeEngine()
    sm = ServingMetrics(engine, MODEL)
    stop = threading.Event()

    def feed():
        while not stop.is_set():
            engine.finish(output())

    t = threading.Thread(target=feed)
    t.start()
    try:
        for _ in range(50):
            fams = families(sm.render())
            h = {s.name: s.value for s in fams["vllm:e2e_request_latency_seconds"].samples
                 if s.name.endswith(("_count", "_sum"))}
            assert h["vllm:e2e_request_latency_seconds_sum"] == pytest.approx(
                3.0 * h["vllm:e2e_request_latency_seconds_count"])  # a consistent histogram
    finally:
        stop.set()
        t.join()


def test_stats_fields_match_the_contract():
    """The fields this module reads from EngineStats and RequestMetrics exist."""
    names = {f.name for f in dataclasses.fields(EngineStats)}
    assert {"num_requests_running", "num_requests_waiting", "num_seqs_running", "num_seqs_waiting",
            "num_seqs_swapped", "memory", "kv_capacity_tokens", "prefix_cache_queries_total",
            "prefix_cache_hits_total", "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
            "finished_total", "steps_total"} <= names
    assert {f.name for f in dataclasses.fields(RequestMetrics)} >= {
        "arrival_time", "first_scheduled_time", "first_token_time", "finish_time", "num_prompt_tokens",
        "num_generation_tokens", "n", "max_tokens", "inter_token_latencies"}
