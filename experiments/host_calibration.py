"""Host time per step of the profiled cost model: a mixin of ``ProfiledCostModel``
(experiments/profiled_costmodel.py) that calibrates its host tables from the profile's host
steps (the real engine's steps minus their modelled device time; with asynchronous scheduling,
their CPU time and the period term) and looks them up by step kind, with the fits and warnings
the calibration uses."""
from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import pandas as pd

from experiments.device_profile import (HOST_BINS, TRIM, DeviceProfile, HostTable, default_host_model,
                                        host_model_of, host_scheduling_of, recorded_graph_mode,
                                        recorded_setting)
from experiments.profile_lookup import _shape

log = logging.getLogger("kvlab.sim")


class HostCalibrationMixin:
    """The host part of ``ProfiledCostModel``: it reads the model's profile, graph sizes and device
    time, and sets ``host_tables``, ``token_slope``, ``period_table``, ``vmm_scale`` and
    ``host_scheduling`` (and ``ragged`` None where the host steps cannot take its term out)."""

    def _calibrate_host(self, profile, allocator, paged, block_size, max_graph_batch, enforce_eager) -> None:
        """Host time = the real engine's step time minus what this model says its device did.

        The steps come from ``kvlab profile``'s runs of the real engine with this allocator, on
        this model where it has some (``--host-model``), else on the profile's host model; their
        device time is modelled with that model's own tables, so the two add up to the measured
        steps by construction."""
        host = profile.table("host")
        if host.empty:
            return
        models = host_model_of(profile, host)
        # this model's own steps where profiled (the residual also absorbs what its device tables
        # miss), else the default host model's: scheduling and launches do not grow with size
        name = self.profiled_model if self.profiled_model in set(models) else default_host_model(profile)
        if name not in set(models) or name not in profile.models():
            name = models.iloc[0]
        host = host[(models == name).to_numpy()]
        host, self.host_scheduling = _host_rows_for(host, self.overlapped, profile, name)
        if (self.ragged is not None and self.host_scheduling == "sync"
                and ("max_context" not in host or host["max_context"].isna().any())):
            # the residual of such steps holds their ragged excess already: it would count twice
            _warn_no_max_context(profile.path, name)
            self.ragged = None
        # model the recorded steps' device time as the engine that ran them ran them: its graph
        # settings (recorded with the steps), not the simulated config's
        cap = recorded_setting(host, "graph_max_tokens", 0)
        batch_cap = recorded_setting(host, "max_graph_batch", 0 if enforce_eager else max_graph_batch)
        mode = recorded_graph_mode(host)
        span = int(profile.meta.get("max_model_len") or self.span)  # the host steps' engine's
        settings = (self.profiled_model, self.piecewise_sizes[-1] if self.piecewise_sizes else 0,
                    self.graph_sizes[-1] if self.graph_sizes else 0, self.graph_mode, self.span)
        from experiments.profiled_costmodel import ProfiledCostModel  # not at the top: it imports this module

        ref = self if (name, cap, batch_cap, mode, span) == settings else ProfiledCostModel(
            profile, _shape(name), model=name, paged=paged, block_size=block_size,
            max_graph_batch=max(batch_cap, 1), enforce_eager=batch_cap == 0, calibrate_host=False,
            graph_max_tokens=cap, graph_mode=mode, max_model_len=span)
        if self.ragged is None:  # the device part taken out is the one simulated
            ref.ragged = None
        key = (name, self.host_scheduling, paged, self.block_size, cap, batch_cap, mode, span, ref.ragged is None)

        def device() -> np.ndarray:
            """The device time ``ref`` models for each step: a few seconds for a profile's thousands
            of steps, so once per profile and settings (every simulated run builds a model)."""
            if key not in profile.host_device:
                profile.host_device[key] = np.array([ref.device_time(_calibration_work(r))
                                                     for r in host.itertuples()])
            return profile.host_device[key]

        if self.host_scheduling == "async":  # the CPU's own time: nothing of the device's to take out
            rest = host["value"].to_numpy(float).copy()
        else:
            rest = host["duration"].to_numpy(float) - device()
        if "gap" in host:  # the driver's time between steps: a run's wall clock holds it too
            rest += host["gap"].fillna(0).to_numpy(float)
        kinds = ref.step_kinds(host["batch"].to_numpy(), host["prefill_tokens"].to_numpy(),
                               host["decode_tokens"].to_numpy())
        if self.host_scheduling == "async" and self.overlapped:
            self._calibrate_period(profile, name, host, device, rest.copy(), kinds, allocator)
        if "vmm_maps" in host:  # the VMM calls of the step's path are charged apart (step_time)
            driver = (host["vmm_maps"].fillna(0).to_numpy(float) * self.map_s
                      + host["vmm_unmaps"].fillna(0).to_numpy(float) * self.unmap_s)
            self.vmm_scale = _vmm_scale(rest, driver, kinds, host["batch"].to_numpy())
            rest -= driver * self.vmm_scale
        mine = (host["allocator"] == allocator).to_numpy() if "allocator" in host else np.ones(len(host), bool)
        batch = host["batch"].to_numpy(float)
        tokens = (host["prefill_tokens"] + host["decode_tokens"]).to_numpy(float)
        # this allocator's steps; where they are too few to say anything, every allocator's
        for kind in self.host_tables:
            of = kinds == kind
            table = HostTable(batch[of & mine], rest[of & mine])
            rows = of & mine if not table.empty else of
            # prefill/mixed steps: what the device tables miss varies with the step's tokens as well
            slope = _token_slope(batch[rows], tokens[rows], rest[rows]) if kind != "graph" else 0.0
            if slope or table.empty:  # a bin's base may be negative then: host_time clamps the sum
                table = HostTable(batch[rows], rest[rows] - slope * tokens[rows], signed=bool(slope))
            self.host_tables[kind] = table
            self.token_slope[kind] = slope
        # steps run with other graph settings than simulated (no prefill/mixed graphs), or too few
        # of a kind to fill a bin (eager steps are only the full-budget prefills of a large batch):
        # the other kind of prefill step stands in
        for kind, other in (("mixed_graph", "eager"), ("eager", "mixed_graph")):
            if self.host_tables[kind].empty:
                self.host_tables[kind] = self.host_tables[other]
                self.token_slope[kind] = self.token_slope[other]

    def _calibrate_period(self, profile, name, host, device, cpu, kinds, allocator) -> None:
        """What a device-bound asynchronous decode graph step's period holds beyond this model's
        device time of the step (input copies, event records, the bubble between one step's graph
        and the next), per batch-size bin: the profile's asynchronous steps, each paired with the
        step before it (a step's wall time holds its wait for the previous one), where the CPU's
        part (``cpu``: host work, launch, the driver's gap) was under 3/4 of that device time, and
        the two steps before were decode graph steps (a prefill's heavier output handling falls in
        its successor's iteration). With the ragged term, it needs each step's longest context
        (else a ragged batch's excess would count twice: the term is then left out, with a warning).
        ``device()``: this model's device time of each step."""
        if self.ragged is not None and ("max_context" not in host or host["max_context"].isna().any()
                                        or not (host["max_context"] > 0).any()):
            _warn_no_period(profile.path, name)
            return
        n = len(host)
        period = host["duration"].to_numpy(float) + (host["gap"].fillna(0).to_numpy(float) if "gap" in host else 0.0)
        run = list(zip(host["allocator"] if "allocator" in host else [""] * n,
                       host["repeat"].fillna(0) if "repeat" in host else [0] * n))
        same = np.array([False] + [a == b for a, b in zip(run[1:], run[:-1])])
        if "step" in host and host["step"].notna().all():  # a left-out step (an idle one) breaks the pair
            same[1:] &= np.diff(host["step"].to_numpy(float)) == 1
        prev = np.r_[np.inf, device()[:-1]]
        waited = same & (cpu < 0.75 * prev)
        # steady: the step before waited for the device too (its own start did not wait on the CPU)
        bound = waited & np.r_[False, waited[:-1]]
        graph = kinds == "graph"
        bound &= np.r_[False, graph[:-1]] & np.r_[False, False, graph[:-2]]
        excess = period - prev
        batch = np.r_[0, host["batch"].to_numpy(float)[:-1]]  # the step whose period it is: the one before
        mine = bound & (np.array([r[0] for r in run], dtype=object) == allocator)  # a pair is one run's
        table = HostTable(batch[mine], excess[mine], signed=True)
        self.period_table = table if not table.empty else HostTable(batch[bound], excess[bound], signed=True)

    def _graph_limits(self) -> tuple[int, int]:
        """The largest decode batch a decode graph takes and the most tokens a prefill/mixed graph
        takes (0: none)."""
        graph_max = self.graph_sizes[-1] if self.graph_sizes else 0
        mixed_max = self.piecewise_sizes[-1] if self.piecewise_sizes and self.piecewise_forward is not None else 0
        return graph_max, mixed_max

    def step_kind(self, batch: int, prefill_tokens: int, decode_tokens: int) -> str:
        """How the engine runs a step (``ModelRunner.forward``): ``graph`` (a decode graph),
        ``mixed_graph`` (the prefill/mixed graphs, a decode batch beyond the decode graphs too) or
        ``eager``; host work differs between them (a mixed graph step copies its metadata into
        static buffers, an eager one launches every kernel)."""
        graph_max, mixed_max = self._graph_limits()
        if prefill_tokens == 0 and batch <= graph_max:
            return "graph"
        return "mixed_graph" if prefill_tokens + decode_tokens <= mixed_max else "eager"

    def step_kinds(self, batch: np.ndarray, prefill_tokens: np.ndarray, decode_tokens: np.ndarray) -> np.ndarray:
        """``step_kind`` of many steps at once (a profile's host steps: ~100k of them)."""
        graph_max, mixed_max = self._graph_limits()
        tokens = np.asarray(prefill_tokens) + np.asarray(decode_tokens)
        mixed = np.where(tokens <= mixed_max, "mixed_graph", "eager")
        return np.where((np.asarray(prefill_tokens) == 0) & (np.asarray(batch) <= graph_max), "graph", mixed)

    def host_time(self, work: list[tuple[int, int]], padded: int | None | bool = False) -> float:
        if not work:
            return 0.0
        if padded is False:
            padded = self.graph_batch(work)
        if padded is not None:
            return self.host_tables["graph"](len(work))
        return self._mixed_host(len(work), sum(q for q, _ in work), sum(1 for q, _ in work if q == 1))

    def _mixed_host(self, num: int, tokens: int, decodes: int) -> float:
        kind = self.step_kind(num, tokens - decodes, decodes)
        return max(0.0, self.host_tables[kind](num) + self.token_slope[kind] * tokens)


def _token_slope(batch: np.ndarray, tokens: np.ndarray, rest: np.ndarray) -> float:
    """Seconds per token of what prefill/mixed steps took beyond their modelled device time, at
    a given batch size: the least-squares slope within each batch-size bin (HOST_BINS), the 1%
    tails left out. Light load runs mixed steps of a few short prompts, a saturated pool ones of
    full budgets: a table by batch size alone would charge each the other's mean. 0 with too few
    steps to say (fewer than HostTable.MIN_STEPS, or no spread of tokens within bins)."""
    if len(rest) < HostTable.MIN_STEPS:
        return 0.0
    lo, hi = np.quantile(rest, [TRIM, 1 - TRIM])
    keep = (rest >= lo) & (rest <= hi)
    b, t, r = pd.cut(batch[keep], HOST_BINS).codes, tokens[keep], rest[keep]  # HostTable's bins
    dt, dr = t.copy(), r.copy()
    for c in np.unique(b):
        s = b == c
        dt[s] -= t[s].mean()
        dr[s] -= r[s].mean()
    var = float((dt * dt).sum())
    return float((dt * dr).sum()) / var if var > 0 else 0.0


def _vmm_scale(rest: np.ndarray, driver: np.ndarray, kinds: np.ndarray, batch: np.ndarray) -> float:
    """What a VMM call on a step's path costs the host, as a multiple of the driver call's own time
    (the ``vmm`` table): beyond the call, the allocator's work around it (reclaiming a slot's
    pages, the fence before an unmap). Per step kind and batch-size bin, steps that made calls
    against steps that made none; weighted by the steps with calls; 1 where too few say."""
    bins = np.digitize(batch, HOST_BINS)
    num = den = 0.0
    for kind in np.unique(kinds):
        for b in np.unique(bins):
            of = (kinds == kind) & (bins == b)
            made, none = of & (driver > 0), of & (driver == 0)
            if made.sum() >= 5 and none.sum() >= HostTable.MIN_STEPS:
                num += made.sum() * (rest[made].mean() - rest[none].mean())
                den += made.sum() * driver[made].mean()
    return max(1.0, num / den) if den > 0 else 1.0


@lru_cache(maxsize=None)
def _warn_no_period(path: str, model: str) -> None:
    log.warning("profile %s: the asynchronous host steps of %s do not record their longest context, so what a "
                "step's period holds beyond its device time cannot be told from its ragged excess: simulating "
                "without it (rerun `kvlab profile --host-scheduling async --merge %s`)", path, model, path)


@lru_cache(maxsize=None)
def _warn_no_max_context(path: str, model: str) -> None:
    log.warning("profile %s: the synchronous host steps of %s do not record their longest context, so their "
                "calibration cannot take out the ragged decode term: simulating without it (rerun `kvlab profile "
                "--host-scheduling sync --merge %s`)", path, model, path)


def _host_rows_for(host: pd.DataFrame, overlapped: bool, profile: DeviceProfile,
                   model: str) -> tuple[pd.DataFrame, str]:
    """One model's host steps to calibrate with, and their scheduling: the engine's own
    (asynchronous for an overlapped engine), else the other kind with a warning (profiles made
    before rows named their scheduling: synchronous)."""
    sched = host_scheduling_of(host)
    want = "async" if overlapped else "sync"
    if not (sched == want).any():
        want = "sync" if overlapped else "async"
        _warn_host_fallback(profile.path, model, overlapped)
    return host[(sched == want).to_numpy()], want


@lru_cache(maxsize=None)
def _warn_host_fallback(path: str, model: str, overlapped: bool) -> None:
    if overlapped:
        log.warning("profile %s has no asynchronous host steps of %s: simulated asynchronous steps take host "
                    "time from synchronous ones, which leave out the CPU time of launching the step (rerun "
                    "`kvlab profile --host-scheduling async --merge %s`)", path, model, path)
    else:
        log.warning("profile %s has only asynchronous host steps of %s: simulated synchronous steps take "
                    "their CPU time, launch included, as host time (an overestimate: rerun `kvlab profile "
                    "--host-scheduling sync --merge %s`)", path, model, path)


def _calibration_work(row) -> list[tuple[int, int]]:
    """A recorded step as (new tokens, context) pairs: its prefill as one chunk without cached
    context, the rest decode tokens sharing the remaining context (a decode step that recorded
    its longest context: that one, the others sharing the rest)."""
    batch, prefill = int(row.batch), int(row.prefill_tokens)
    longest = getattr(row, "max_context", None)
    if not prefill and batch > 1 and longest == longest and longest:
        rest = max(batch - 1, int(row.context) - int(longest))
        return [(1, int(longest))] + [(1, max(1, rest // (batch - 1)))] * (batch - 1)
    if not prefill:
        return [(1, max(1, int(row.context) // batch))] * batch
    rest = batch - 1
    ctx = max(rest, int(row.context) - prefill)
    return [(prefill, prefill)] + ([(1, max(1, ctx // rest))] * rest if rest else [])
