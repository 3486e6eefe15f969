"""/metrics: Prometheus text exposition (format 0.0.4) under vLLM V1's metric names.

A Grafana dashboard or alert written for vLLM works unchanged: the ``vllm:*`` families below
carry vLLM V1's names, types, label names (``model_name`` and ``engine``; ``finished_reason``
on ``vllm:request_success_total``), meanings and histogram buckets. kvlab's own figures,
which vLLM lacks (the KV pool by MemoryStats field, ``idle_mapped`` included), are the
``kvlab:*`` families, the HTTP server's concurrency limiter's among them (with a limit set):
``kvlab:http_requests_in_flight`` and ``kvlab:http_requests_overloaded_total`` (503
``server_overloaded``), read from its ``InFlight`` counts.

Gauges and counters come from the engine's latest ``EngineStats`` snapshot, so rendering
never touches the engine; a counter never goes down from one render to the next. Histograms
are fed once per finished request (``add_finish_listener``, called on the engine thread) from
its ``RequestMetrics``:

- ``time_to_first_token``: first token - arrival; ``e2e_request_latency``: finish - arrival;
- ``request_queue_time``: first scheduled - arrival; ``request_prefill_time``: first token -
  first scheduled; ``request_decode_time``: finish - first token; ``request_inference_time``:
  finish - first scheduled;
- ``inter_token_latency`` and ``time_per_output_token``: every gap between consecutive tokens
  of every sample, one observation each (what vLLM V1 records under both names);
  ``request_time_per_output_token``: decode time / (tokens of the longest sample - 1);
- ``request_prompt_tokens``, ``request_generation_tokens`` (all samples),
  ``request_max_num_generation_tokens`` (the longest sample), ``request_params_n``,
  ``request_params_max_tokens`` (only where set).

The text is written by hand (no client library at run time).
"""
from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Iterable

from allocators.stats import STAT_FIELDS
from engine.outputs import RequestOutput

if TYPE_CHECKING:
    from engine.serving.limits import InFlight

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ENGINE_INDEX = "0"  # one engine core per server: vLLM labels its series engine="0" then
FINISH_REASONS = ("stop", "length", "abort", "error")  # vLLM creates every series at start-up

# vLLM V1's bucket boundaries (seconds, or counts)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                         7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's buckets for token counts)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


def format_value(v: float) -> str:
    """A number as Prometheus' Go clients (and prometheus_client) write it: ``3.0``, ``0.25``,
    ``+Inf``, ``1e+06``."""
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    s = repr(v)
    dot = s.find(".")
    if v > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def escape_label(v: object) -> str:
    return str(v).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def format_labels(labels: dict[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


def header(name: str, kind: str, help: str) -> list[str]:
    return [f"# HELP {name} {escape_help(help)}", f"# TYPE {name} {kind}"]


class Histogram:
    """One histogram series: per-bucket counts, rendered cumulative with ``+Inf`` last."""

    def __init__(self, name: str, help: str, buckets: Iterable[float]):
        self.name, self.help = name, help
        self.bounds = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, le in enumerate(self.bounds):
            if value <= le:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self, labels: dict[str, object]) -> list[str]:
        lines = header(self.name, "histogram", self.help)
        cumulative = 0
        for le, c in zip(self.bounds, self.counts):
            cumulative += c
            lines.append(f"{self.name}_bucket{format_labels({**labels, 'le': format_value(le)})} "
                         f"{format_value(cumulative)}")
        lines.append(f"{self.name}_count{format_labels(labels)} {format_value(self.count)}")
        lines.append(f"{self.name}_sum{format_labels(labels)} {format_value(self.sum)}")
        return lines


class ServingMetrics:
    """Everything /metrics shows for one engine. ``engine`` needs ``stats()``,
    ``add_finish_listener(fn)`` and ``is_running``; ``max_model_len`` (its attribute, or the
    argument) sets the buckets of the token-count histograms, as in vLLM. ``in_flight``: the
    concurrency limiter's counts (None: no limit, no such families)."""

    def __init__(self, engine, model_name: str, max_model_len: int | None = None, in_flight: InFlight | None = None):
        self.engine = engine
        self.in_flight = in_flight
        self.labels = {"model_name": model_name, "engine": ENGINE_INDEX}
        self._lock = threading.Lock()
        self._floor: dict[tuple[str, tuple], float] = {}  # counters: highest value rendered
        limit = max_model_len or getattr(engine, "max_model_len", None) or engine.stats().kv_capacity_tokens
        tokens = buckets_1_2_5(max(int(limit or 1), 1))
        H = Histogram
        self.ttft = H("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                      TTFT_BUCKETS)
        self.tpot = H("vllm:time_per_output_token_seconds",
                      "Histogram of time per output token in seconds (each gap between consecutive tokens; "
                      "vLLM's older name of vllm:inter_token_latency_seconds).", TOKEN_LATENCY_BUCKETS)
        self.itl = H("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                     TOKEN_LATENCY_BUCKETS)
        self.request_tpot = H("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", TOKEN_LATENCY_BUCKETS)
        self.e2e = H("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                     REQUEST_LATENCY_BUCKETS)
        self.queue = H("vllm:request_queue_time_seconds",
                       "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference = H("vllm:request_inference_time_seconds",
                           "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill = H("vllm:request_prefill_time_seconds",
                         "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode = H("vllm:request_decode_time_seconds",
                        "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = H("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.generation_tokens = H("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                   tokens)
        self.max_generation_tokens = H("vllm:request_max_num_generation_tokens",
                                       "Histogram of maximum number of requested generation tokens.", tokens)
        self.params_n = H("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.params_max_tokens = H("vllm:request_params_max_tokens",
                                   "Histogram of the max_tokens request parameter.", tokens)
        self.histograms = (self.ttft, self.tpot, self.itl, self.request_tpot, self.e2e, self.queue,
                           self.inference, self.prefill, self.decode, self.prompt_tokens,
                           self.generation_tokens, self.max_generation_tokens, self.params_n,
                           self.params_max_tokens)
        engine.add_finish_listener(self.observe)

    # -- fed on the engine thread ------------------------------------------------------------
    def observe(self, out: RequestOutput) -> None:
        """Record one finished request (any thread)."""
        m = out.metrics
        arrival, sched, first, finish = m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finish_time

        def gap(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else max(0.0, b - a)

        longest = _longest_sample(out)
        decode = gap(first, finish)
        timings = ((self.ttft, gap(arrival, first)), (self.e2e, gap(arrival, finish)),
                   (self.queue, gap(arrival, sched)), (self.prefill, gap(sched, first)),
                   (self.decode, decode), (self.inference, gap(sched, finish)),
                   (self.request_tpot, decode / (longest - 1) if decode is not None and longest and longest > 1
                    else None))
        with self._lock:
            for h, v in timings:
                if v is not None:
                    h.observe(v)
            for d in m.inter_token_latencies:
                self.itl.observe(d)
                self.tpot.observe(d)
            self.prompt_tokens.observe(m.num_prompt_tokens)
            self.generation_tokens.observe(m.num_generation_tokens)
            if longest is not None:
                self.max_generation_tokens.observe(longest)
            self.params_n.observe(m.n)
            if m.max_tokens:
                self.params_max_tokens.observe(m.max_tokens)

    # -- read by /metrics ---------------------------------------------------------------------
    def render(self) -> str:
        s = self.engine.stats()
        mem = s.memory
        lines: list[str] = []

        def gauge(name: str, help: str, samples: list[tuple[dict[str, object], float]] | float) -> None:
            if not isinstance(samples, list):
                samples = [({}, samples)]
            lines.extend(header(name, "gauge", help))
            lines.extend(f"{name}{format_labels({**self.labels, **extra})} {format_value(v)}" for extra, v in samples)

        def counter(name: str, help: str, samples: list[tuple[dict[str, object], float]] | float) -> None:
            if not isinstance(samples, list):
                samples = [({}, samples)]
            lines.extend(header(name, "counter", help))
            for extra, v in samples:
                key = (name, tuple(sorted(extra.items())))
                v = max(float(v), self._floor.get(key, 0.0))
                self._floor[key] = v
                lines.append(f"{name}{format_labels({**self.labels, **extra})} {format_value(v)}")

        capacity = mem.capacity
        usage = min(max(s.kv_usage, 0.0), 1.0)
        idle = getattr(mem, "idle_mapped", 0)
        finished = {r: 0 for r in FINISH_REASONS} | dict(s.finished_total)

        # vLLM V1 (scheduler state, KV cache, counters)
        gauge("vllm:num_requests_running", "Number of requests in model execution batches.", s.num_requests_running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_requests_waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        gauge("vllm:gpu_cache_usage_perc",
              "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
              usage)
        with self._lock:
            counter("vllm:prefix_cache_queries_total",
                    "Prefix cache queries, in terms of number of queried tokens.", s.prefix_cache_queries_total)
            counter("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.",
                    s.prefix_cache_hits_total)
            counter("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.",
                    s.num_preemptions_total)
            counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", s.prompt_tokens_total)
            counter("vllm:generation_tokens_total", "Number of generation tokens processed.",
                    s.generation_tokens_total)
            counter("vllm:request_success_total", "Count of successfully processed requests.",
                    [({"finished_reason": r}, n) for r, n in finished.items()])
            for h in self.histograms:
                lines.extend(h.render(self.labels))
            # kvlab's own
            counter("kvlab:engine_steps_total", "Engine iterations run.", s.steps_total)
            counter("kvlab:recomputed_prompt_tokens_total",
                    "Prompt tokens computed again because their cached KV had been evicted.",
                    getattr(s, "recomputed_tokens_total", 0))
            tier = getattr(s, "host_tier", None)
            if tier is not None:
                counter("kvlab:host_tier_hits_total",
                        "Prefix cache hits loaded from the host KV tier, in tokens (part of vllm:prefix_cache_hits_total).",
                        tier.hits_total)
                counter("kvlab:host_tier_bytes_total", "Bytes copied between the device and the host KV tier.",
                        [({"direction": "d2h"}, tier.stored_bytes_total), ({"direction": "h2d"}, tier.loaded_bytes_total)])
                counter("kvlab:host_tier_transfers_total", "Host<->device copies of the host KV tier.",
                        tier.transfers_total)
                counter("kvlab:host_tier_transfer_seconds_total",
                        "Copy time of the host KV tier: hidden behind compute, or exposed (compute waited).",
                        [({"kind": "hidden"}, tier.hidden_seconds_total), ({"kind": "exposed"}, tier.exposed_seconds_total)])
        if getattr(s, "host_tier", None) is not None:
            t = s.host_tier
            gauge("kvlab:host_tier_usage_perc", "Share of the host KV tier's blocks holding KV, 0 to 1.",
                  t.used_blocks / t.capacity_blocks if t.capacity_blocks else 0.0)
        gauge("kvlab:kv_cache_capacity_tokens", "Tokens the KV pool holds.", s.kv_capacity_tokens)
        gauge("kvlab:kv_cache_capacity_bytes", "Bytes of the KV pool.", capacity)
        gauge("kvlab:kv_cache_bytes",
              "KV pool bytes by state (MemoryStats: token_states, reservation, internal_frag, external_frag, "
              "idle_mapped, free); the states sum to the capacity.",
              [({"state": f}, getattr(mem, f, 0)) for f in STAT_FIELDS])
        gauge("kvlab:kv_cache_idle_mapped_perc",
              "Share of the KV pool held by no live sequence but kept mapped for reuse (idle virtual slots), "
              "0 to 1; not counted in vllm:kv_cache_usage_perc.", idle / capacity if capacity else 0.0)
        gauge("kvlab:prefix_cache_hit_rate", "Share of queried prompt tokens found in the prefix cache, 0 to 1.",
              s.prefix_cache_hit_rate)
        gauge("kvlab:num_seqs_running", "Sequences (samples) in the running batch.", s.num_seqs_running)
        gauge("kvlab:num_seqs_waiting", "Sequences (samples) waiting to be scheduled.", s.num_seqs_waiting)
        gauge("kvlab:num_seqs_swapped", "Sequences (samples) preempted with their KV swapped to host memory.",
              s.num_seqs_swapped)
        gauge("kvlab:engine_up", "1 while the engine loop serves requests.", int(bool(self.engine.is_running)))
        if self.in_flight is not None:  # the HTTP server's limiter (limits.max_concurrency), not the engine's queue
            gauge("kvlab:http_requests_in_flight",
                  "HTTP requests in flight, as limits.max_concurrency counts them (not /health, /metrics).",
                  self.in_flight.count)
            if self.in_flight.limit is not None:  # what the in-flight gauge is compared with on a dashboard
                gauge("kvlab:http_max_concurrency",
                      "HTTP requests served at once before 503 server_overloaded (limits.max_concurrency as served: "
                      "lowered at start to fit the open-file limit where it did not).", self.in_flight.limit)
            with self._lock:  # the counters' floors
                counter("kvlab:http_requests_overloaded_total",
                        "HTTP requests refused with 503 server_overloaded: limits.max_concurrency were in flight.",
                        self.in_flight.refused_total)
        return "\n".join(lines) + "\n"


def _longest_sample(out: RequestOutput) -> int | None:
    """Tokens of the request's longest sample: known where the output holds every sample's
    tokens (their lengths add up to the request's count) or there is one sample."""
    m = out.metrics
    lengths = [len(c.token_ids) for c in out.outputs]
    if lengths and sum(lengths) == m.num_generation_tokens:
        return max(lengths)
    if m.n == 1:
        return m.num_generation_tokens
    return None
