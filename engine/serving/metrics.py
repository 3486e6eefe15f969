"""/metrics in Prometheus' text exposition format (0.0.4), written by hand: a few gauges from the
engine's stats snapshot, counters, and latency histograms fed as requests finish."""
from __future__ import annotations

import threading
from typing import Iterable

from allocators.stats import STAT_FIELDS
from engine.async_engine import AsyncLLMEngine
from engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


def _fmt(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: Iterable[float]):
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets)) + (float("inf"),)
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self, labels: dict[str, str]) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for le, c in zip(self.buckets, self.counts):
            cumulative += c
            lines.append(f"{self.name}_bucket{_labels({**labels, 'le': _fmt(le)})} {cumulative}")
        lines.append(f"{self.name}_sum{_labels(labels)} {_fmt(self.sum)}")
        lines.append(f"{self.name}_count{_labels(labels)} {self.count}")
        return lines


class ServingMetrics:
    """Everything /metrics shows for one engine; histograms are fed on the engine thread."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}
        self._lock = threading.Lock()
        self.ttft = Histogram("kvlab_time_to_first_token_seconds", "Time from arrival to first token.",
                              TTFT_BUCKETS)
        self.tpot = Histogram("kvlab_time_per_output_token_seconds",
                              "Mean time per output token after the first, per sample.", TPOT_BUCKETS)
        self.e2e = Histogram("kvlab_e2e_request_latency_seconds", "Time from arrival to finish.", E2E_BUCKETS)
        engine.add_finish_listener(self.observe)

    def observe(self, out: RequestOutput) -> None:
        m = out.metrics
        with self._lock:
            if m.ttft is not None:
                self.ttft.observe(m.ttft)
            if m.e2el is not None:
                self.e2e.observe(m.e2el)
            for c in out.outputs:
                if len(c.token_times) > 1:
                    self.tpot.observe((c.token_times[-1] - c.token_times[0]) / (len(c.token_times) - 1))

    def render(self) -> str:
        s = self.engine.stats()
        lab = self.labels
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{_labels({**lab, **extra})} {_fmt(v)}" for extra, v in samples)

        metric("kvlab_num_requests_running", "gauge", "Sequences in the running batch.", [({}, s.num_running)])
        metric("kvlab_num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", [({}, s.num_waiting)])
        metric("kvlab_kv_cache_usage_perc", "gauge", "Share of the KV pool that is not free (0 to 1).",
               [({}, s.kv_usage)])
        metric("kvlab_kv_cache_capacity_tokens", "gauge", "Tokens the KV pool holds.",
               [({}, s.kv_capacity_tokens)])
        metric("kvlab_kv_cache_capacity_bytes", "gauge", "Bytes of the KV pool.", [({}, s.memory.capacity)])
        metric("kvlab_kv_cache_bytes", "gauge",
               "KV pool bytes by state (MemoryStats; the states sum to the capacity).",
               [({"state": f}, getattr(s.memory, f)) for f in STAT_FIELDS])
        metric("kvlab_prefix_cache_hit_rate", "gauge", "Share of prompt tokens found in the prefix cache.",
               [({}, s.prefix_cache_hit_rate)])
        metric("kvlab_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
               [({}, s.prompt_tokens_total)])
        metric("kvlab_generation_tokens_total", "counter", "Tokens generated.", [({}, s.generation_tokens_total)])
        metric("kvlab_request_success_total", "counter", "Requests ended, by finish reason (abort included).",
               [({"finished_reason": r}, n) for r, n in sorted(s.finished_total.items())] or
               [({"finished_reason": "stop"}, 0)])
        metric("kvlab_engine_steps_total", "counter", "Engine iterations run.", [({}, s.steps_total)])
        metric("kvlab_engine_up", "gauge", "1 while the engine loop serves requests.",
               [({}, int(self.engine.is_running))])
        with self._lock:
            for h in (self.ttft, self.tpot, self.e2e):
                lines.extend(h.render(lab))
        return "\n".join(lines) + "\n"
