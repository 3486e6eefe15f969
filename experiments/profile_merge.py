"""``kvlab profile --merge``: what a run that adds to an earlier device profile starts from.

A merge keeps the earlier profile's rows of the tables this run does not re-measure (the parts it
skips; other models' per-model tables and GEMM shapes; host steps of other models and schedulings,
or with ``--host-add`` all of them, this run's steps following as further repeats), refuses a profile
of another device or, with ``--host-add``, host steps of another graph setting or timer, and stamps
the metadata with the tables this run re-measures (``updated``) and the switches they were timed
under. ``experiments/profile_device.py`` (``kvlab profile``) calls it and keeps its names importable.
"""
from __future__ import annotations

import numpy as np

from experiments.profile_cases import _gemm_shapes

__all__ = ["merge_base", "_same_device_kind", "_check_same_host_engine"]


def _same_device_kind(profiled: str | None, now: str) -> bool:
    """Whether a run on ``now`` may merge into a profile of ``profiled`` (the device names kvlab
    profile writes; every CPU is "cpu (machine)", some older profiles say "cpu"; no name: unknown)."""
    def kind(name: str) -> str:
        return "cpu" if name.startswith("cpu") else name

    return not profiled or kind(str(profiled)) == kind(now)


def _check_same_host_engine(ap, prior, cuda: bool, events: bool = False) -> None:
    """``--host-add`` pools host steps only of engines with this one's graphs: the cost model models
    a pool's steps with one graph setting (the profile's host engine: ``HOST_MAX_NUM_BATCHED_TOKENS``, defaults);
    and only of one timer: steps with CUDA events around each launch (``--host-events``; every step on a
    GPU before the ``events`` column) took longer before the device's wait than steps without."""
    from engine.config import EngineConfig, graph_token_bound
    from engine.piecewise_graphs import token_sizes
    from experiments.profile_host import HOST_MAX_NUM_BATCHED_TOKENS

    cap = (token_sizes(graph_token_bound(EngineConfig.cuda_graph_max_tokens, HOST_MAX_NUM_BATCHED_TOKENS))[-1]
           if cuda else 0)  # none on a CPU
    for key, now in (("graph_max_tokens", cap), ("graph_mode", EngineConfig.cuda_graph_mode)):
        if key in prior and prior[key].notna().any():
            old = sorted(set(prior[key].dropna()) - {now})
            if old:
                ap.error(f"--host-add: the profile's host steps were recorded with {key} {old}, this engine's is "
                         f"{now!r}; pooled, the cost model would model them as one: record them again without "
                         "--host-add")
    if len(prior):
        was = prior["events"].tolist() if "events" in prior else [None] * len(prior)
        was = {bool(v) if v == v and v is not None else cuda for v in was}
        if was != {cuda and events}:
            ap.error(f"--host-add: the profile's host steps were recorded {'with' if True in was else 'without'} the "
                     f"launch timer's CUDA events, these {'with' if cuda and events else 'without'}; pooled, two "
                     "timings would be averaged: give the same --host-events, or record them again without "
                     "--host-add")


def merge_base(ap, a, meta: dict, skip: set[str], models: list[str], host_models: list[str], schedulings: list[str],
               cuda: bool) -> tuple[list[dict], dict, int]:
    """What ``--merge`` (``a.merge``) starts this run from: the earlier profile's rows that this run does
    not re-measure, the merged metadata (``meta``, this run's, stamped into the earlier profile's), and
    the repeat number of this run's first host steps (after the kept ones with ``--host-add``). A profile
    that must not be merged is ``ap.error``."""
    from experiments.device_profile import host_model_of, host_scheduling_of, load_profile
    # not at the top: profile_device imports this module
    from experiments.profile_device import PART_TABLES, metadata_switch

    first_repeat = 0
    old = load_profile(a.merge)
    if not _same_device_kind(old.meta.get("device"), meta["device"]):  # its times would be named the other's
        ap.error(f"--merge {a.merge}: measured on {old.meta['device']}, this run is on {meta['device']}: a "
                 "profile holds one device's tables (simulate names them by it): profile this device into a "
                 "new file (--out without --merge)")
    redo = set().union(*(t for k, t in PART_TABLES.items() if k not in skip))
    per_model = redo & (PART_TABLES["models"] | PART_TABLES["ragged"] | PART_TABLES["graphs"])
    keep = ~old.df["table"].isin(redo)
    if "model" in old.df:  # a model's tables measured now replace that model's: the others' stay
        keep |= old.df["table"].isin(per_model) & old.df["model"].notna() & ~old.df["model"].isin(models)
    if "gemm" in redo:  # GEMM shapes of models not measured now stay
        shapes = _gemm_shapes(models)
        if {"n", "k"} <= set(old.df.columns):
            timed_now = [(n, k) in shapes for n, k in zip(old.df["n"], old.df["k"])]
            keep |= (old.df["table"] == "gemm") & ~np.array(timed_now, dtype=bool)
    if "host" in redo:  # host steps are per model and scheduling: those not re-measured now stay
        remeasured = (host_model_of(old).reindex(old.df.index).isin(host_models)
                      & host_scheduling_of(old.df).isin(schedulings))
        keep |= (old.df["table"] == "host") & (~remeasured | a.host_add)
        if a.host_add:  # this run's repeats follow the kept ones (a run is a repeat's steps in order)
            prior = old.df[(old.df["table"] == "host") & remeasured]
            _check_same_host_engine(ap, prior, cuda, a.host_events)
            if len(prior):  # rows from before the column: one run, repeat 0
                first_repeat = (int(prior["repeat"].fillna(0).max()) if "repeat" in prior else 0) + 1
    rows = [{k: v for k, v in r.items() if v == v and v is not None}
            for r in old.df[keep].to_dict("records")]
    stamp = {k: meta[k] for k in ("commit", "created", "command")}
    kept = {k: v for k, v in old.meta.items() if k != "partial"}  # this run's own end says whether it is
    # the SM count sets the ragged decode term's split rule: the device's that measured the tables
    sms = meta["num_sms"] if redo & {"ragged", "decode_graph"} else old.meta.get("num_sms", meta["num_sms"])
    names = [m for m in str(kept.get("models", "")).split(",") if m]
    names += [m for m in models if m not in names and per_model]
    if redo & (PART_TABLES["models"] | PART_TABLES["ragged"]):  # decode launches timed under this process's switch
        kept["seq_major_min_seqs"] = metadata_switch()
    meta = {**kept, "num_sms": sms, "models": ",".join(names),
            "updated": {**old.meta.get("updated", {}), **{t: stamp for t in sorted(redo)}}}
    if a.host_add and "host" in redo:  # the pooled runs' stamps, each (the last one is "host")
        before = old.meta.get("updated", {})
        # the first run: the merged profile's own, or its own merge's
        runs = before.get("host_runs") or [before.get("host") or {k: old.meta.get(k) for k in stamp}]
        meta["updated"]["host_runs"] = [*runs, {**stamp, "first_repeat": first_repeat}]
    return rows, meta, first_repeat
