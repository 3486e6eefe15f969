"""Reported figures against their written definitions (README "Results", docs/ARCHITECTURE.md),
each checked by an oracle that does not use the code under test."""
from __future__ import annotations

import pytest


def test_memory_breakdown_draws_the_time_weighted_steady_state():
    """README: figures compared with the papers use the time-weighted steady-state values. The
    report's memory bars (the PagedAttention paper's Fig. 2) drew the mean over all steps and
    over saturated steps only; the `_tw` means the run wrote were in no figure."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from allocators.stats import STAT_FIELDS
    from experiments import report

    row = {"label": "paged-b16", "model": "opt-13b", "workload": "sharegpt"}
    row |= {f: 0.0 for f in STAT_FIELDS} | {"token_states": 0.6, "free": 0.4}
    row |= {f"{f}_tw": 0.0 for f in STAT_FIELDS} | {"token_states_tw": 0.9, "reservation_tw": 0.05,
                                                    "free_tw": 0.05}
    fig = report.plot_memory(pd.DataFrame([row]))
    try:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        tw = next((ax for t, ax in panels.items() if "time-weighted" in t), None)
        assert tw is not None, list(panels)
        # the bars stack to the run's _tw fractions (in %), token states at the bottom
        heights = [p.get_height() for p in tw.patches]
        assert heights[0] == pytest.approx(90.0) and sum(heights) == pytest.approx(100.0)
    finally:
        plt.close(fig)


def test_latency_cdf_leaves_out_requests_without_an_output_token():
    """normalized latency is e2el / output_len: a request with no output token has none (the
    summary's column is NaN there); the CDF drew it as infinity, counted in every fraction."""
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from experiments import report

    wide = pd.DataFrame([{"run_id": "r", "label": "paged", "model": "m", "workload": "w"}])
    req = pd.DataFrame({"ttft": [0.1, 0.2, 0.3], "e2el": [1.0, 2.0, 0.5], "output_len": [10, 20, 0]})
    fig = report.plot_latency_cdfs(wide, {"r": [req]})
    try:
        lines = fig.axes[2].get_lines()
        assert len(lines) == 1
        x, y = lines[0].get_data()
        assert np.isfinite(x).all() and list(x) == [0.1, 0.1] and y[-1] == 1.0
    finally:
        plt.close(fig)
