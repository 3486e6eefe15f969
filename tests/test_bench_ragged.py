"""experiments.bench_ragged's host-side parts: the batches it draws and the split rule it models."""
import numpy as np
import pytest

from experiments.bench_ragged import contexts
from experiments.ragged_decode import program_keys


@pytest.mark.parametrize("dist", ["uniform", "lognormal", "twopoint"])
def test_contexts_keep_the_mean_within_bounds(dist):
    c = contexts(dist, 64, 700, 2048, np.random.default_rng(0))
    assert len(c) == 64 and min(c) >= 16 and max(c) <= 2048
    assert abs(np.mean(c) - 700) < 5
    assert (max(c) > 2 * 700) == (dist != "uniform")  # ragged ones hold long sequences


@pytest.mark.parametrize("even", [True, False])
def test_program_keys_cover_each_sequence_once(even):
    ctxs = [1, 63, 64, 65, 300, 2047, 2048, 3000]  # 3000: beyond the span (a stale bound)
    keys = program_keys(ctxs, 5, even, 64, 2048).reshape(len(ctxs), 5)
    assert keys.sum(axis=1).tolist() == ctxs
    assert (keys >= 0).all()


def test_even_parts_are_balanced_and_fixed_ones_are_not():
    even = program_keys([2000, 300], 4, True, 64, 2048).reshape(2, 4)
    fixed = program_keys([2000, 300], 4, False, 64, 2048).reshape(2, 4)
    assert even[0].max() == 512 and even[1].max() == 128  # each sequence's own quarter, tile-aligned
    assert fixed[1].tolist() == [300, 0, 0, 0]  # a short sequence: one program does all its keys
