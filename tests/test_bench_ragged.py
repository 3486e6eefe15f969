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


@pytest.mark.parametrize("even", [True, False])
def test_longest_keys_is_the_longest_program(even):
    from experiments.ragged_decode import longest_keys

    for splits in (1, 2, 3, 5, 16):
        for span in (512, 2048):
            for c in (0, 1, 63, 64, 65, 300, 511, 512, 513, 2047, 2048, 3000):
                want = int(program_keys([c], splits, even, 64, span).max())
                assert longest_keys(c, splits, even, 64, span) == want, (splits, span, c)


def test_even_parts_are_balanced_and_fixed_ones_are_not():
    even = program_keys([2000, 300], 4, True, 64, 2048).reshape(2, 4)
    fixed = program_keys([2000, 300], 4, False, 64, 2048).reshape(2, 4)
    assert even[0].max() == 512 and even[1].max() == 128  # each sequence's own quarter, tile-aligned
    assert fixed[1].tolist() == [300, 0, 0, 0]  # a short sequence: one program does all its keys


def _rows(batch, variants):
    """Synthetic bench_ragged rows: per variant and distribution, a time that says which it is."""
    rows = []
    for mean in (300, 700):
        for dist in ("uniform", "lognormal", "twopoint"):
            for i, v in enumerate(variants):
                splits = {"fixed": 2, "even-x3": 3}.get(v, 1)
                us = 10.0 + (dist != "uniform") * (5.0 - i) + mean / 100
                rows.append(dict(model="m", mode="paged", block_size=16, batch=batch, dist=dist, variant=v,
                                 splits=splits, even=v != "fixed", mean_ctx=float(mean), max_ctx=2 * mean,
                                 p90_ctx=1.5 * mean, layers=32, us=us, contexts="[]"))
    return rows


def test_the_ordered_launches_are_tabled_and_kept_out_of_the_split_sweep():
    import pandas as pd

    from experiments.bench_ragged import ORDER_VARIANTS, order_table, split_sweep

    variants = ["fixed", "default", "even-x3", *ORDER_VARIANTS]
    df = pd.DataFrame(_rows(128, variants) + _rows(32, variants[:3]))
    table = order_table(df)
    lines = [ln for ln in table.splitlines() if ln.startswith("| m |")]
    assert len(lines) == 2  # batch 128, two means; batch 32 is below ORDER_MIN_BATCH
    # mean 300: uniform 13.0 everywhere; lognormal default 17 (i=1), longest-first 15, seq-major 14
    assert "| 13.0 / 13.0 / 13.0 | 17.0 / 15.0 / 14.0 |" in lines[0]
    assert lines[0].endswith("| 0.128 / 0.064 / 0.032 |")  # (lognormal - uniform) x 32 layers, ms
    sweep = split_sweep(df)
    # the default's one split is its own, not averaged with the ordered launches of the same count
    row = [ln for ln in sweep.splitlines() if ln.startswith("| m | paged | 128 | 300 |")][0]
    # weighted geometric means (lognormal twice): x1 = the default's 13, 17, 17, 17 -> 15.9; with the
    # ordered launches' 15 and 14 mixed in it would be lower
    assert "x1: 15.9" in row and "x3: 15.2" in row
    assert order_table(pd.DataFrame(_rows(128, variants[:3]))) == ""
    # summarize's best split count is a split count's (even-x3: 16.0), not an ordered launch's 14.0
    from experiments.bench_ragged import summarize

    row = [ln for ln in summarize(_rows(128, variants)).splitlines() if ln.startswith("| m | paged | 128 | 300 |")]
    assert row[0].endswith("| x3 even 16.0 |")


def test_a_first_runs_rows_read_as_this_versions():
    """The session of 2026-12-04's first run named the ordered sequence-by-sequence launch
    ``longest-first-seq-major`` and did not record how each launch went: read again, its tables come
    out as this version's, and the critical-path fit leaves its longest-first launches out."""
    import pandas as pd

    from experiments.bench_ragged import load_rows, order_table

    old = pd.DataFrame(_rows(128, ["fixed", "default", "even-x3", "longest-first", "longest-first-seq-major"]))
    new = pd.DataFrame(_rows(128, ["fixed", "default", "even-x3", "longest-first", "seq-major"]))
    got = load_rows(old)
    assert set(got["variant"]) == set(new["variant"])
    assert got["seq_major"].tolist() == (got["variant"] == "seq-major").tolist()
    assert got["longest_first"].tolist() == got["variant"].isin(["longest-first", "seq-major"]).tolist()
    assert order_table(got) == order_table(load_rows(new)) != ""



def test_a_cut_off_checkpoint_keeps_the_previous_complete_csv(tmp_path, monkeypatch):
    """``run`` rewrites ragged_decode.csv after each model and mode; a write cut short (Ctrl-C, a
    killed job) must leave the previous complete file and no partial or temporary file."""
    import pandas as pd

    from experiments.bench_ragged import save_rows

    first = _rows(4, ["fixed", "default"])
    path = save_rows(tmp_path, first)
    before = path.read_text()

    def cut(self, target, *args, **kwargs):  # half a file, then the interrupt
        with open(target, "w") as f:
            f.write("model,mo")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", cut)
    with pytest.raises(KeyboardInterrupt):
        save_rows(tmp_path, first + _rows(8, ["fixed", "default"]))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ragged_decode.csv"]
    monkeypatch.undo()
    assert len(pd.read_csv(path)) == len(first)
