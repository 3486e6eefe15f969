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
    "total_output_tokens": "tokens", "saturated_steps": "fraction", "sharing_saving": "fraction",
    "simulated_busy_s": "s", "wall_time_s": "s", "mean_output_len": "tokens", "mean_prompt_len": "tokens",
}
for _f in STAT_FIELDS:
    UNITS[_f] = UNITS[f"{_f}_peak"] = UNITS[f"{_f}_saturated"] = "fraction"
for _l in LATENCIES:
    for _s in ("mean", *(f"p{p}" for p in PERCENTILES)):
        UNITS[f"{_s}_{_l}_ms"] = "ms"


def requests_frame(finished, t0: float) -> pd.DataFrame:
    """One row per request.

    Timelines are those of the request: ``first_token`` the earliest first token of its
    samples, ``finish`` the latest finish. ``output_len`` is the tokens *one sample*
    produced (the longest sample), ``num_output_tokens`` what all ``n`` samples produced
    together (throughput counts those). ``tpot``, ``itl`` and ``normalized_latency`` are per
    sample: (e2el - ttft) / (output_len - 1), gaps between the tokens of the first sample,
    e2el / output_len (the PagedAttention paper's normalized latency).
    """
    rows = []
    for req in finished:
        seqs = req.seqs
        s0 = seqs[0]
        out_len = max(s.num_output_tokens for s in seqs)
        first = min((s.first_token_time for s in seqs if s.first_token_time is not None), default=math.nan)
        finish = max((s.finish_time for s in seqs if s.finish_time is not None), default=math.nan)
        times = s0.token_times
        itl = np.diff(times) if len(times) > 1 else np.array([])
        ttft = first - req.arrival_time
        e2el = finish - req.arrival_time
        rows.append(dict(
            request_id=req.request_id,
            prompt_len=len(req.prompt_token_ids),
            output_len=out_len,
            num_output_tokens=sum(s.num_output_tokens for s in seqs),
            n=len(seqs),
            arrival=req.arrival_time - t0,
            first_scheduled=(s0.first_scheduled_time if s0.first_scheduled_time is not None else math.nan) - t0,
            first_token=first - t0,
            finish=finish - t0,
            ttft=ttft,
            tpot=(e2el - ttft) / (out_len - 1) if out_len > 1 else math.nan,
            itl_mean=float(itl.mean()) if len(itl) else math.nan,
            e2el=e2el,
            normalized_latency=e2el / out_len if out_len else math.nan,
            preemptions=sum(s.num_preemptions for s in seqs),
            cached_tokens=s0.num_cached_tokens,
            finish_reason=s0.finish_reason,
            itl=itl.tolist(),
        ))
    return pd.DataFrame(rows)


def steps_frame(records, memory: np.ndarray, capacity: int, t0: float,
                logical_tokens: dict[int, int] | None = None) -> pd.DataFrame:
    """One row per engine step: the step record, the memory fields (STAT_FIELDS, bytes) and capacity.

    ``logical_tokens`` (step -> tokens the live sequences hold, shared ones counted once per
    holder) adds a column of that name where given.
    """
    df = pd.DataFrame([r.__dict__ for r in records])
    if df.empty:
        return df
    df.insert(0, "step", np.arange(len(df)))
    df["time"] = df["time"] - t0
    if len(memory) == len(df):
        for j, f in enumerate(STAT_FIELDS):
            df[f] = memory[:, j]
        df["capacity"] = capacity
    if logical_tokens:
        df["logical_tokens"] = pd.Series(logical_tokens, dtype="float64").reindex(df["step"]).to_numpy()
    return df


def _latency_stats(values: np.ndarray, name: str) -> dict[str, float]:
    v = values[~np.isnan(values)] * 1000.0
    out = {f"mean_{name}_ms": float(v.mean()) if len(v) else math.nan}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(v, p)) if len(v) else math.nan
    return out


def saturated_steps(steps: pd.DataFrame, max_num_batched_tokens: int | None = None,
                    max_num_seqs: int | None = None) -> pd.Series:
    """Steps where requests wait for KV memory: a sequence was preempted, or requests stayed
    waiting although the step left token budget and batch slots unused (so the allocator
    refused them). Without the limits, every step with waiting requests counts."""
    waiting = steps["waiting"] > 0
    if max_num_batched_tokens:
        waiting &= (steps["prefill_tokens"] + steps["decode_tokens"]) < max_num_batched_tokens
    if max_num_seqs:
        waiting &= steps["num_seqs"] < max_num_seqs
    return waiting | (steps["preempted"] > 0)


def memory_summary(steps: pd.DataFrame, bytes_per_token: int | None = None,
                   max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None) -> dict[str, float]:
    """Memory figures the accountant does not give.

    - ``<field>_saturated``: mean fraction over the steps where requests wait for KV memory
      (``saturated_steps``): the serving regime of the PagedAttention paper's Fig. 2, without
      the ramp-up and the drain at the end of a run; ``saturated_steps`` is their share.
    - ``sharing_saving``: 1 - token-state bytes / bytes the live sequences' tokens would
      take unshared (prefix caching, forked samples), mean over steps with live tokens;
      only where steps carry ``logical_tokens``.
    """
    out: dict[str, float] = {}
    if steps.empty or "capacity" not in steps:
        return out
    cap = steps["capacity"].astype(float)
    sat = saturated_steps(steps, max_num_batched_tokens, max_num_seqs)
    out["saturated_steps"] = float(sat.mean())
    for f in STAT_FIELDS:
        out[f"{f}_saturated"] = float((steps.loc[sat, f] / cap[sat]).mean()) if sat.any() else math.nan
    if bytes_per_token and "logical_tokens" in steps:
        logical = steps["logical_tokens"].astype(float) * bytes_per_token
        ok = logical > 0
        if ok.any():
            out["sharing_saving"] = float((1 - steps.loc[ok, "token_states"] / logical[ok]).mean())
    return out


def summarize(requests: pd.DataFrame, steps: pd.DataFrame, duration: float) -> dict[str, float]:
    """Throughput and latency of DESIGN.md over ``duration`` (wall or simulated seconds)."""
    out: dict[str, float] = {"duration": duration, "num_requests": len(requests)}
    if requests.empty:
        return out
    total_in = int(requests["prompt_len"].sum())
    out_col = "num_output_tokens" if "num_output_tokens" in requests else "output_len"
    total_out = int(requests[out_col].sum())
    out.update(
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        mean_prompt_len=float(requests["prompt_len"].mean()),
        mean_output_len=float(requests["output_len"].mean()),
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
