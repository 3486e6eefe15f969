"""``kvlab reproduce PAPER``: every figure of a paper, kvlab's value beside the paper's.

    kvlab reproduce pagedattention [--quick] [--repeats N] [--mode simulate|offline|online]
                                   [--runs DIR] [--out DIR]
    kvlab reproduce vattention ...

Each figure is a study: a few runs (``experiments.run.run_experiment``, ``repeats=N`` seeds
each) into ``runs/reproduce/<paper>/<study>/`` (rerunning skips finished runs), then one
number per claim of the paper with its 95% CI over the seeds, the ratio to the paper's value,
a verdict (``verdict``) and a plot with the paper's values marked (hollow black markers).
The page goes to ``results/reproduction/<paper>/README.md`` with ``results.csv`` and the PNGs.

The studies use the papers' settings: online at fixed request rates (Poisson arrivals), the
KV pool the simulated device leaves after the weights (``engine.kv_cache_tokens=null``),
Orca-Pow2 as the paper defines it. Figures measured on a GPU by other kvlab commands
(kernels, VMM driver calls) are quoted from ``results/`` rather than re-measured.

``--mode offline|online`` runs the real engine instead, where a paper's models have weights
(vAttention's Llama-3-8B preset; PagedAttention's OPT-13B and LLaMA-13B are simulate-only shapes,
refused before any run). Offline sends every request at t=0: a study's rate does not apply.
"""
from __future__ import annotations

from experiments.reproduce.core import (PAPER_VALUES, PAPERS, paper_value, ratio, ratio_row, row,
                                        sustainable_rate, verdict)
from experiments.reproduce.page import STUDIES, main

__all__ = ["PAPERS", "PAPER_VALUES", "STUDIES", "main", "paper_value", "ratio", "ratio_row", "row",
           "sustainable_rate", "verdict"]
