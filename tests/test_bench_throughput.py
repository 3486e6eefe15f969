"""kvlab bench throughput's summary over repeated rounds (the runs themselves need a GPU)."""
import math

import pandas as pd
import pytest

from experiments.bench import async_value, repeat_summary


def _rows():
    rows = []
    for rep, drift in ((1, 1.0), (2, 0.9), (3, 1.1)):  # the machine drifts; virtual stays 2% behind paged
        rows.append(dict(model="m", engine="kvlab-async", tensor_parallel_size=1, allocator="paged", repeat=rep,
                         output_tok_s=1000 * drift, decode_step_ms=10 / drift, phase_floor_frac=0.8 * drift))
        rows.append(dict(model="m", engine="kvlab-async", tensor_parallel_size=1, allocator="virtual", repeat=rep,
                         output_tok_s=980 * drift, decode_step_ms=10.2 / drift, phase_floor_frac=0.78 * drift))
    rows.append(dict(model="m", engine="kvlab-async", tensor_parallel_size=1, allocator="contiguous", repeat=1,
                     error="RuntimeError('out of memory')"))
    rows.append(dict(model="m", engine="hf-generate_batch", repeat=1, output_tok_s=40.0))
    return pd.DataFrame(rows)


def test_repeat_summary_pairs_rounds_against_the_base_allocator():
    s = repeat_summary(_rows(), "paged").set_index("allocator")
    assert list(s.index) == ["paged", "virtual"]  # the failed run and HF are not summarized
    assert s.loc["paged", "rounds"] == 3 and s.loc["paged", "output_tok_s"] == pytest.approx(1000)
    # unpaired, the drift makes the CI wide; paired round by round it cancels: exactly -2%
    assert s.loc["virtual", "output_tok_s_ci95"] > 100
    assert s.loc["virtual", "vs_paged"] == pytest.approx(-0.02) and s.loc["virtual", "vs_paged_ci95"] < 1e-9
    assert math.isnan(s.loc["paged", "vs_paged"])


def test_async_flag_values():
    assert async_value("auto") == "auto" and async_value("true") is True and async_value("false") is False
