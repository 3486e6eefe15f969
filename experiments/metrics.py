"""Per-request and per-step tables, and the summary metrics of DESIGN.md."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from allocators.stats import STAT_FIELDS

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")

# unit of each summary metric, for the long table and plot axes
UNITS = {
    "request_throughput": "req/s", "output_throughput": "tok/s", "total_token_throughput": "tok/s",
    "normalized_latency": "s/token", "kv_capacity_tokens": "tokens", "max_concurrency": "seqs",
    "mean_batch_size": "seqs", "preemptions": "count", "prefix_cache_hit_rate": "fraction",
    "duration": "s", "num_requests": "count", "total_input_tokens": "tokens",
    "total_output_tokens": "tokens",
}
for _f in STAT_FIELDS:
    UNITS[_f] = UNITS[f"{_f}_peak"] = "fraction"
for _l in LATENCIES:
    for _s in ("mean", *(f"p{p}" for p in PERCENTILES)):
        UNITS[f"{_s}_{_l}_ms"] = "ms"


def requests_frame(finished, t0: float) -> pd.DataFrame:
    """One row per request (the first sample's timeline; lengths summed over samples)."""
    rows = []
    for req in finished:
        seqs = req.seqs
        s0 = seqs[0]
        out_len = sum(s.num_output_tokens for s in seqs)
        first = min((s.first_token_time for s in seqs if s.first_token_time is not None), default=math.nan)
        finish = max((s.finish_time for s in seqs if s.finish_time is not None), default=math.nan)
        times = s0.token_times
        itl = np.diff(times) if len(times) > 1 else np.array([])
        ttft = first - req.arrival_time
        e2el = finish - req.arrival_time
        per_seq_out = s0.num_output_tokens
        rows.append(dict(
            request_id=req.request_id,
            prompt_len=len(req.prompt_token_ids),
            output_len=out_len,
            n=len(seqs),
            arrival=req.arrival_time - t0,
            first_scheduled=(s0.first_scheduled_time or math.nan) - t0,
            first_token=first - t0,
            finish=finish - t0,
            ttft=ttft,
            tpot=(e2el - ttft) / (per_seq_out - 1) if per_seq_out > 1 else math.nan,
            itl_mean=float(itl.mean()) if len(itl) else math.nan,
            e2el=e2el,
            preemptions=sum(s.num_preemptions for s in seqs),
            cached_tokens=s0.num_cached_tokens,
            finish_reason=s0.finish_reason,
            itl=itl.tolist(),
        ))
    return pd.DataFrame(rows)


def steps_frame(records, memory: np.ndarray, capacity: int, t0: float) -> pd.DataFrame:
    df = pd.DataFrame([r.__dict__ for r in records])
    if df.empty:
        return df
    df.insert(0, "step", np.arange(len(df)))
    df["time"] = df["time"] - t0
    if len(memory) == len(df):
        for j, f in enumerate(STAT_FIELDS):
            df[f] = memory[:, j]
        df["capacity"] = capacity
    return df


def _latency_stats(values: np.ndarray, name: str) -> dict[str, float]:
    v = values[~np.isnan(values)] * 1000.0
    out = {f"mean_{name}_ms": float(v.mean()) if len(v) else math.nan}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(v, p)) if len(v) else math.nan
    return out


def summarize(requests: pd.DataFrame, steps: pd.DataFrame, duration: float) -> dict[str, float]:
    """Throughput and latency of DESIGN.md over ``duration`` (wall or simulated seconds)."""
    out: dict[str, float] = {"duration": duration, "num_requests": len(requests)}
    if requests.empty:
        return out
    total_in = int(requests["prompt_len"].sum())
    total_out = int(requests["output_len"].sum())
    out.update(
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(requests) / duration,
        output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
        normalized_latency=float((requests["e2el"] / requests["output_len"]).mean()),
        preemptions=int(requests["preemptions"].sum()),
    )
    itl = np.concatenate([np.asarray(x, dtype=float) for x in requests["itl"]]) if len(requests) else np.array([])
    for name, values in (("ttft", requests["ttft"].to_numpy(float)), ("tpot", requests["tpot"].to_numpy(float)),
                         ("itl", itl), ("e2el", requests["e2el"].to_numpy(float))):
        out.update(_latency_stats(values, name))
    if not steps.empty:
        busy = steps[steps["num_seqs"] > 0]
        out["mean_batch_size"] = float(busy["num_seqs"].mean()) if len(busy) else 0.0
        out["max_concurrency"] = int(steps["num_seqs"].max())
    return out
