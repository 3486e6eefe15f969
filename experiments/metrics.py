"""Per-request and per-step tables, and the summary metrics (README, "Results")."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    "duration": "s", "num_requests": "count", "num_failed_requests": "count", "total_input_tokens": "tokens",
    "total_output_tokens": "tokens", "saturated_steps": "fraction", "sharing_saving": "fraction",
    "sharing_saving_tw": "fraction",
    "simulated_busy_s": "s", "wall_time_s": "s", "mean_output_len": "tokens", "mean_prompt_len": "tokens",
}
UNITS |= {"gpu_prefix_hit_rate": "fraction", "host_prefix_hit_rate": "fraction", "recomputed_tokens": "tokens",
          "mean_recomputed_tokens": "tokens", "host_tier_capacity_blocks": "blocks",
          "host_tier_block_hit_rate": "fraction", "host_tier_stored_bytes": "bytes",
          "host_tier_loaded_bytes": "bytes", "host_tier_transfers": "count", "host_tier_evicted_blocks": "count",
          "host_tier_dropped_stores": "count", "host_tier_transfer_s": "s", "host_tier_exposed_s": "s",
          "host_tier_hidden_s": "s", "host_tier_hidden_fraction": "fraction", "host_tier_unused_slots": "blocks"}
UNITS |= {"mean_batch_size_tw": "seqs", "steady_state_start_s": "s", "steady_state_end_s": "s",
          "steady_state_steps": "count"}
# layer groups' held bytes (mean and peak over steps) and virtual's shared page maps depend on the
# seed's requests: measurements, so repeats average them (with a CI) like every other figure; without a
# unit they were metadata and a repeated row kept its first run's value (kv_grouping.png drew that)
UNITS |= {f"kv_{kind}_groups_{stat}_bytes": "bytes" for kind in ("full", "windowed") for stat in ("mean", "peak")}
UNITS |= {"kv_padding_mean_bytes": "bytes", "kv_shared_page_maps": "count"}
for _f in STAT_FIELDS:
    UNITS[_f] = UNITS[f"{_f}_peak"] = UNITS[f"{_f}_saturated"] = UNITS[f"{_f}_tw"] = "fraction"
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
    for req in finished:  # RequestState or the engine's compact FinishedRequest
        seqs = req.seqs
        s0 = seqs[0]
        out_len = max(s.num_output_tokens for s in seqs)
        first = min((s.first_token_time for s in seqs if s.first_token_time is not None), default=math.nan)
        finish = max((s.finish_time for s in seqs if s.finish_time is not None), default=math.nan)
        itl = getattr(s0, "itl", None)  # the engine's FinishedSeq keeps the gaps only
        if itl is None:
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
            host_cached_tokens=getattr(s0, "num_host_cached_tokens", 0),  # of cached_tokens, from the host tier
            recomputed_tokens=getattr(s0, "num_recomputed_tokens", 0),  # cached once, evicted, computed again
            finish_reason=s0.finish_reason,
            itl=itl,  # float64 array (a list<double> column in parquet)
        ))
    return pd.DataFrame(rows)


def steps_frame(records, memory: np.ndarray, capacity: int, t0: float,
                logical_tokens=None) -> pd.DataFrame:
    """One row per engine step: the step record, the memory fields (STAT_FIELDS, bytes) and capacity.

    ``records``: the engine's ``step_records`` (a StepLog) or a list of StepRecord.
    ``logical_tokens`` (step -> tokens the live sequences hold, shared ones counted once per
    holder; a dict, or a ``(steps, counts)`` pair of arrays) adds a column of that name where given.
    The whole table in memory: ``write_steps`` streams it to parquet instead.
    """
    parts = list(_record_columns(records))
    if not parts:
        return pd.DataFrame()
    df = pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return _step_rows(df, 0, memory if len(memory) == len(df) else None, capacity, t0,
                      _logical_index(logical_tokens))


def _record_columns(records) -> Iterator[dict[str, np.ndarray]]:
    if hasattr(records, "iter_columns"):
        yield from records.iter_columns()
    elif len(records):
        df = pd.DataFrame([r.__dict__ for r in records])
        yield {c: df[c].to_numpy() for c in df.columns}


def _logical_index(logical_tokens) -> tuple[np.ndarray, np.ndarray] | None:
    """Sorted (steps, counts) arrays of a dict or pair; None where there is nothing."""
    if logical_tokens is None:
        return None
    if hasattr(logical_tokens, "iter_chunks"):  # the engine's ChunkedRows of (step, count)
        parts = list(logical_tokens.iter_chunks())
        if not parts:
            return None
        rows = np.concatenate(parts)
        steps, counts = rows[:, 0], rows[:, 1]
    elif isinstance(logical_tokens, dict):
        if not logical_tokens:
            return None
        steps = np.fromiter(logical_tokens.keys(), dtype=np.int64, count=len(logical_tokens))
        counts = np.fromiter(logical_tokens.values(), dtype=np.float64, count=len(logical_tokens))
    else:
        steps, counts = (np.asarray(a) for a in logical_tokens)
    if not len(steps):
        return None
    order = np.argsort(steps, kind="stable")
    return steps[order], counts[order].astype(np.float64)


def _step_rows(df: pd.DataFrame, k0: int, memory: np.ndarray | None, capacity: int, t0: float,
               logical: tuple[np.ndarray, np.ndarray] | None) -> pd.DataFrame:
    """Steps ``k0 ..`` of the table: the record columns in ``df`` plus step, memory, logical tokens."""
    n = len(df)
    df.insert(0, "step", np.arange(k0, k0 + n))
    df["time"] = df["time"] - t0
    if memory is not None:
        for j, f in enumerate(STAT_FIELDS):
            df[f] = memory[:, j]
        df["capacity"] = capacity
    if logical is not None:
        steps, counts = logical
        col = np.full(n, np.nan)
        a, b = np.searchsorted(steps, [k0, k0 + n])
        col[steps[a:b] - k0] = counts[a:b]
        df["logical_tokens"] = col
    return df


def _aligned(a: Iterator[dict[str, np.ndarray]], b: Iterator[np.ndarray] | None):
    """Pairs of equal-length pieces of two chunked streams of the same rows (``b`` may be None)."""
    if b is None:
        for part in a:
            yield part, None
        return
    rest_b = None
    for part in a:
        n = len(next(iter(part.values())))
        pieces, have = [], 0
        while have < n:
            if rest_b is None or not len(rest_b):
                rest_b = next(b)
            take = min(n - have, len(rest_b))
            pieces.append(rest_b[:take])
            rest_b = rest_b[take:]
            have += take
        yield part, pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def write_steps(path: str | Path, records, accountant, t0: float, logical_tokens=None,
                max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                window: WindowRule | None = None) -> dict[str, float]:
    """``steps.parquet`` written chunk by chunk (atomically), and the figures of the steps that
    ``summarize`` (batch sizes) and ``memory_summary`` give, from the same pass: memory stays at
    one chunk of steps however long the run (``accountant.summary()`` streams too). With
    ``window``, the steady-state window and the time-weighted means over it too (``SteadyState``).

    The file equals ``steps_frame(...)`` written whole; the figures equal those computed from
    it (means from exact integer sums where the columns are integers).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from experiments.atomic import PARQUET_COMPRESSION, atomic_path

    n_steps = len(records)
    with_memory = accountant is not None and accountant.num_steps == n_steps and n_steps > 0
    memory = accountant.iter_table() if with_memory else None
    capacity = accountant.capacity if accountant is not None else 0
    logical = _logical_index(logical_tokens)
    acc = _StepFigures(STAT_FIELDS, max_num_batched_tokens, max_num_seqs,
                       accountant.bpt if accountant is not None else None)
    steady = SteadyState(window, max_num_batched_tokens, max_num_seqs,
                         accountant.bpt if accountant is not None else None) if window is not None else None
    k0 = 0
    with atomic_path(path) as tmp:
        writer = None
        try:
            for cols, mem in _aligned(_record_columns(records), memory):
                df = _step_rows(pd.DataFrame(cols), k0, mem, capacity, t0, logical)
                k0 += len(df)
                acc.add(df, mem, capacity)
                if steady is not None:
                    steady.add(df, mem, capacity if with_memory else None)
                table = pa.Table.from_pandas(df, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression=PARQUET_COMPRESSION)
                writer.write_table(table)
            if writer is None:  # no steps: an empty table, as DataFrame().to_parquet writes it
                pd.DataFrame().to_parquet(tmp, index=False, compression=PARQUET_COMPRESSION)
        finally:
            if writer is not None:
                writer.close()
    return acc.result() | (steady.result() if steady is not None else {})


def step_savings(token_states, logical_tokens, bytes_per_token: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step: 1 - token-state bytes / bytes the live sequences' tokens would take unshared, and
    which steps hold live tokens (the saving of the others is undefined: 0 here, never counted)."""
    logical = np.asarray(logical_tokens, dtype=float) * bytes_per_token
    live = logical > 0
    ts = np.asarray(token_states, dtype=float)
    return np.where(live, 1 - ts / np.where(live, logical, 1), 0.0), live


class _StepFigures:
    """Running sums of the per-step figures of ``summarize`` and ``memory_summary``."""

    def __init__(self, fields, max_num_batched_tokens, max_num_seqs, bytes_per_token):
        self.fields, self.mnbt, self.mns, self.bpt = fields, max_num_batched_tokens, max_num_seqs, bytes_per_token
        self.n = self.busy = self.busy_seqs = self.n_sat = 0
        self.max_seqs = None
        self.sat_sums = [0] * len(fields)
        self.capacity = None
        self.saving_sum, self.saving_n = 0.0, 0
        self.logical = False

    def add(self, df: pd.DataFrame, mem: np.ndarray | None, capacity: int) -> None:
        seqs = df["num_seqs"].to_numpy()
        self.n += len(df)
        busy = seqs > 0
        self.busy += int(busy.sum())
        self.busy_seqs += int(seqs[busy].sum())
        m = int(seqs.max())
        self.max_seqs = m if self.max_seqs is None else max(self.max_seqs, m)
        if mem is None:
            return
        self.capacity = capacity
        sat = saturated_steps(df, self.mnbt, self.mns).to_numpy()
        self.n_sat += int(sat.sum())
        for j, s in enumerate(mem[sat].sum(axis=0).tolist()):
            self.sat_sums[j] += s
        if self.bpt and "logical_tokens" in df:
            self.logical = True
            saving, live = step_savings(df["token_states"], df["logical_tokens"], self.bpt)
            self.saving_sum += float(saving[live].sum())
            self.saving_n += int(live.sum())

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if not self.n:
            return out
        out["mean_batch_size"] = self.busy_seqs / self.busy if self.busy else 0.0
        out["max_concurrency"] = int(self.max_seqs)
        if self.capacity is None:
            return out
        out["saturated_steps"] = self.n_sat / self.n
        for j, f in enumerate(self.fields):
            out[f"{f}_saturated"] = self.sat_sums[j] / (self.n_sat * self.capacity) if self.n_sat else math.nan
        if self.logical and self.saving_n:
            out["sharing_saving"] = self.saving_sum / self.saving_n
        return out


@dataclass(frozen=True)
class WindowRule:
    """How a run's steady-state window is chosen (docs/ARCHITECTURE.md, "Measurement protocol");
    times in seconds from t0.

    ``last_arrival_s``: when the last request arrived; 0 for an offline run (all at t=0).
    ``warmup_s``: a stated warm-up; where given, the window starts there instead of at saturation.
    """
    last_arrival_s: float
    warmup_s: float | None = None

    @property
    def offline(self) -> bool:
        return not self.last_arrival_s > 0


TW_FIELDS = STAT_FIELDS  # memory fractions with a time-weighted mean (``<field>_tw``)


def busy_steps(steps: pd.DataFrame, max_num_batched_tokens: int | None = None,
               max_num_seqs: int | None = None) -> pd.Series:
    """Steps where the pool or the batch is saturated: requests wait for memory
    (``saturated_steps``), every batch slot is taken, or the token budget is spent."""
    full = saturated_steps(steps, max_num_batched_tokens, max_num_seqs)
    if max_num_seqs:
        full |= steps["num_seqs"] >= max_num_seqs
    if max_num_batched_tokens:
        full |= (steps["prefill_tokens"] + steps["decode_tokens"]) >= max_num_batched_tokens
    return full


class SteadyState:
    """The steady-state window of a run and the time-weighted means over it, chunk by chunk.

    Start: ``warmup_s`` where the rule states one ("warmup"), else the start of the first step
    where the pool or the batch saturates (``busy_steps``: "saturated").
    End: the last arrival ("last_arrival"). An offline run has every arrival at t=0, so that
    would be no window at all; it ends instead with the last step where requests still waited
    (the end of that step: "queue_drained"), after which the batch only drains.
    Each step is weighted by the part of its duration inside the window; gaps between steps
    (an idle engine) weigh nothing.
    """

    def __init__(self, rule: WindowRule, max_num_batched_tokens: int | None = None,
                 max_num_seqs: int | None = None, bytes_per_token: int | None = None):
        self.rule, self.mnbt, self.mns, self.bpt = rule, max_num_batched_tokens, max_num_seqs, bytes_per_token
        self.saving = False  # steps with logical_tokens: sharing_saving_tw too (weighted by steps with live tokens)
        self.start = rule.warmup_s if rule.warmup_s is not None else math.inf
        self.end = math.inf if rule.offline else rule.last_arrival_s  # offline: set by the last waiting step
        self.sums: np.ndarray | None = None  # weighted [num_seqs, *memory] up to here, and the weight
        self.at_end: np.ndarray | None = None  # offline: the sums at the end of the last waiting step
        self.steps = self.steps_at_end = 0
        self.drained_s = math.nan  # offline: the end of the last step where requests waited
        self.fields: tuple[str, ...] = ()

    def add(self, df: pd.DataFrame, mem: np.ndarray | None, capacity: int | None) -> None:
        """The next chunk of steps (``_step_rows`` columns) and its memory rows (bytes) if any."""
        t, d = df["time"].to_numpy(float), df["duration"].to_numpy(float)
        if math.isinf(self.start):
            first = np.flatnonzero(busy_steps(df, self.mnbt, self.mns).to_numpy())
            if len(first):
                self.start = float(t[first[0]])
        w = np.clip(np.minimum(t + d, self.end) - np.maximum(t, self.start), 0.0, None)
        cols = [df["num_seqs"].to_numpy(float)]
        if mem is not None and capacity:
            self.fields = TW_FIELDS
            cols += [mem[:, STAT_FIELDS.index(f)] / capacity for f in TW_FIELDS]
            if self.bpt and "logical_tokens" in df:
                self.saving = True
                saving, live = step_savings(mem[:, STAT_FIELDS.index("token_states")], df["logical_tokens"], self.bpt)
                cols += [saving, live.astype(float)]
        values = np.column_stack([*cols, np.ones(len(df))]) * w[:, None]
        run = np.cumsum(values, axis=0)
        before = self.sums if self.sums is not None else np.zeros(values.shape[1])
        steps_before = self.steps
        self.sums = before + run[-1]
        inside = np.cumsum(w > 0)
        self.steps += int(inside[-1])
        if self.rule.offline:
            waited = np.flatnonzero(df["waiting"].to_numpy() > 0)
            if len(waited):
                j = waited[-1]
                self.at_end, self.steps_at_end = before + run[j], steps_before + int(inside[j])
                self.drained_s = float(t[j] + d[j])

    def result(self) -> dict[str, float | str | None]:
        rule = self.rule
        sums, steps = (self.at_end, self.steps_at_end) if rule.offline else (self.sums, self.steps)
        end = self.drained_s if rule.offline else rule.last_arrival_s
        start = self.start if math.isfinite(self.start) else math.nan
        out: dict[str, float | str | None] = {
            "steady_state_start_s": start, "steady_state_end_s": end,
            "steady_state_start_rule": "warmup" if rule.warmup_s is not None else "saturated",
            "steady_state_end_rule": "queue_drained" if rule.offline else "last_arrival",
            "steady_state_steps": steps, "steady_state_reason": None}
        weighted = ["mean_batch_size_tw", *(f"{f}_tw" for f in self.fields)]  # sums' columns, in add's order
        if sums is None or not sums[-1] > 0:
            out["steady_state_reason"] = self._why_empty(start, end)
            out["steady_state_steps"] = 0
            return out | {n: math.nan for n in weighted + (["sharing_saving_tw"] if self.saving else [])}
        out |= {n: float(v / sums[-1]) for n, v in zip(weighted, sums)}
        if self.saving:  # the two columns after those: weighted by the window's time with live tokens only,
            # as sharing_saving counts steps
            saved, live = sums[len(weighted)], sums[len(weighted) + 1]
            out["sharing_saving_tw"] = float(saved / live) if live > 0 else math.nan
        return out

    def _why_empty(self, start: float, end: float) -> str:
        if math.isnan(start):
            return "the pool and the batch never saturated (no request waited, no batch was full)"
        if math.isnan(end):
            return "offline run in which no request ever waited: no steady state before the drain"
        return f"the window starts at {start:.6g} s, not before it ends at {end:.6g} s"


def _latency_stats(values: np.ndarray, name: str) -> dict[str, float]:
    v = values[~np.isnan(values)]  # a copy: scaled and partitioned in place (ITL of a long run is large)
    v *= 1000.0
    out = {f"mean_{name}_ms": float(v.mean()) if len(v) else math.nan}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(v, p, overwrite_input=True)) if len(v) else math.nan
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
        saving, live = step_savings(steps["token_states"], steps["logical_tokens"], bytes_per_token)
        if live.any():
            out["sharing_saving"] = float(saving[live].mean())
    return out


def host_tier_summary(scheduler, tier) -> dict[str, float]:
    """Prefix reuse by tier and the host tier's traffic (``tier``: the allocator's HostKVTier or
    None). Hit rates are shares of the prompt tokens looked up at admission (as
    ``prefix_cache_hit_rate``, which is their sum); ``recomputed_tokens`` are prompt tokens computed
    again although an earlier request had cached them (an unbounded cache would have held them).
    The transfer times are measured (CPU, CUDA events) or charged (simulate); ``hidden`` is the
    copy time compute did not wait for."""
    q = scheduler.prefix_queries
    out: dict[str, float] = dict(
        gpu_prefix_hit_rate=(scheduler.prefix_hits - scheduler.prefix_host_hits) / q if q else 0.0,
        host_prefix_hit_rate=scheduler.prefix_host_hits / q if q else 0.0,
        recomputed_tokens=int(scheduler.recomputed_tokens),
        host_tier_enabled=tier is not None,
    )
    if tier is None:
        return out
    tier.flush()
    tier.poll(wait=True)
    s = tier.stats
    out.update(
        host_tier_capacity_blocks=tier.num_blocks,
        host_tier_policy=tier.config.policy,
        host_transfer_blocks=tier.T,
        host_tier_block_hit_rate=s.hits / s.lookups if s.lookups else 0.0,
        host_tier_stored_bytes=s.stored_bytes,
        host_tier_loaded_bytes=s.loaded_bytes,
        host_tier_transfers=s.store_transfers + s.load_transfers,
        host_tier_evicted_blocks=s.evicted_blocks,
        host_tier_dropped_stores=s.dropped_stores,
        host_tier_unused_slots=tier.unused_slots,
        host_tier_transfer_s=s.transfer_s,
        host_tier_exposed_s=min(s.exposed_s, s.transfer_s) if s.transfer_s else s.exposed_s,
        host_tier_hidden_s=s.hidden_s,
        host_tier_hidden_fraction=s.hidden_s / s.transfer_s if s.transfer_s else math.nan,
    )
    return out


def summarize(requests: pd.DataFrame, steps: pd.DataFrame | None, duration: float) -> dict[str, float]:
    """Throughput and latency over ``duration`` (wall or simulated seconds)."""
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
        # the requests' own column: NaN (no output token) left out, as in TPOT; older tables lack it
        normalized_latency=float(requests["normalized_latency"].mean() if "normalized_latency" in requests
                                 else (requests["e2el"] / requests["output_len"]).mean()),
        preemptions=int(requests["preemptions"].sum()),
    )
    if "finish_reason" in requests:  # ended by a fault of their own (fault isolation): still counted above
        out["num_failed_requests"] = int((requests["finish_reason"] == "error").sum())
    if "recomputed_tokens" in requests:
        out["mean_recomputed_tokens"] = float(requests["recomputed_tokens"].mean())
    itl = np.concatenate([np.asarray(x, dtype=float) for x in requests["itl"]]) if len(requests) else np.array([])
    for name, values in (("ttft", requests["ttft"].to_numpy(float)), ("tpot", requests["tpot"].to_numpy(float)),
                         ("itl", itl), ("e2el", requests["e2el"].to_numpy(float))):
        out.update(_latency_stats(values, name))
    if steps is not None and not steps.empty:  # None: write_steps gives these figures
        busy = steps[steps["num_seqs"] > 0]
        out["mean_batch_size"] = float(busy["num_seqs"].mean()) if len(busy) else 0.0
        out["max_concurrency"] = int(steps["num_seqs"].max())
    return out
