"""Stateless helpers over a device profile's tables for the profiled cost model
(experiments/profiled_costmodel.py): the nearest grid point, a decode-graph variant column, the
ragged decode term fitted to the ``ragged`` table, a model's config and shape by name."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from experiments.device_profile import DeviceProfile

log = logging.getLogger("kvlab.sim")


def _nearest(values, want: float) -> float:
    values = sorted(set(values))
    return min(values, key=lambda v: (abs(np.log2(max(v, 1)) - np.log2(max(want, 1))), v))


def _column(g: pd.DataFrame, name: str) -> pd.Series:
    """A decode-graph variant column (``gemv``, ``pdl``) with 0 where a row (or the profile) has none."""
    return g[name].fillna(0) if name in g else pd.Series(0, index=g.index)


def ragged_fit(profile: DeviceProfile, model: str, mode: str, block_size: int):
    """The critical-path term of ragged decode batches fitted to the profile's ``ragged`` table
    of ``model`` in ``mode`` (the nearest block size), or None where it has none."""
    key = (model, mode, block_size)
    fits = profile.ragged_fits
    if key in fits:
        return fits[key]
    from experiments.ragged_decode import fit, paired

    t = profile.table("ragged", model=model, mode=mode) if "dist" in profile.df else profile.df.iloc[:0]
    if t.empty or not profile.meta.get("num_sms"):
        fits[key] = None
        return None
    if mode == "paged":
        t = t[t["block_size"] == _nearest(t["block_size"], block_size)]
    if "ordered" in t:  # batches the engine orders take their uniform twin's time: no term to fit
        t = t[~t["ordered"].fillna(False).astype(bool)]
    rag, uni = paired(t, ["batch", "mean"], "value")
    fits[key] = None if rag.empty else fit(uni, rag["value"], rag["longest_bytes"], rag["uniform_bytes"],
                                          rag["programs"], rag["slots"])
    if fits[key] is not None:
        log.info("profile %s, %s %s: %s", profile.path, model, mode, fits[key].describe())
    return fits[key]


def _config(name: str):
    from engine.loader import resolve_config

    return resolve_config(name)


def _shape(name: str):
    from experiments.simulate import shape_of

    return shape_of(_config(name))
