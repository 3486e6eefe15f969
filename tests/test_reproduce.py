"""``kvlab reproduce``: the verdict logic on hand-made numbers, and both papers' pages end to end at
quick sizes (every figure section present, the paper's values on the page, resumable)."""
from __future__ import annotations

import csv
import math

import pytest

from experiments import reproduce as rp
from experiments.cli import main as kvlab


@pytest.mark.parametrize("kvlab_value, ci, paper, expected", [
    (10.0, 1.0, 10.5, "within CI"),          # the interval meets the value
    (10.0, 0.2, 10.5, "within 10%"),         # it does not, but the mean is 4.8% off
    (20.0, 1.0, 10.0, "differs"),
    (7.0, 0.0, (6.1, 9.8), "within CI"),     # inside a range
    (5.0, 1.2, (6.1, 9.8), "within CI"),     # the interval reaches the range
    (5.8, 0.1, (6.1, 9.8), "within 10%"),    # 4.9% below its low end
    (11.0, 0.5, (6.1, 9.8), "differs"),      # 12% above its high end
    (3.0, math.nan, (6.1, 9.8), "differs"),  # one sample: no interval
    (10.4, math.nan, 10.0, "within 10%"),
    (math.nan, 1.0, 10.0, "not measured"),
    (5.0, 1.0, None, "no paper number"),
])
def test_verdict(kvlab_value, ci, paper, expected):
    assert rp.verdict(kvlab_value, ci, paper) == expected


def test_ratio_and_rows():
    assert rp.ratio(5.0, 10.0) == pytest.approx(0.5)
    assert rp.ratio(8.0, (6.0, 10.0)) == pytest.approx(1.0)  # a range: its midpoint
    assert math.isnan(rp.ratio(1.0, None))
    r = rp.row("pagedattention", "Fig. 2", "token states, vLLM", [95.0, 97.0, 96.0])
    assert (r.kvlab, r.n, r.paper) == (pytest.approx(96.0), 3, 96.3)
    assert r.ci95 == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)  # t(2) x s / sqrt(n)
    assert r.verdict == "within CI"
    forced = rp.row("pagedattention", "Fig. 15b", "memory saving, beam search, Alpaca", forced="not yet measurable")
    assert forced.verdict == "not yet measurable"


def test_sustainable_rate():
    rates = [1.0, 2.0, 4.0]
    assert rp.sustainable_rate(rates, [0.05, 0.1, 0.3], limit=0.2) == pytest.approx(3.0)  # halfway from 2 to 4
    assert rp.sustainable_rate(rates, [0.05, 0.1, 0.15], limit=0.2) == 4.0  # never above: the top rate
    assert rp.sustainable_rate(rates, [0.5, 0.6, 0.7], limit=0.2) == 1.0
    assert rp.sustainable_rate([2.0, 1.0], [math.inf, 0.1], limit=0.2) == 1.0  # sorted by rate; inf is above


def test_paper_table_covers_every_figure():
    figures = {r["figure"].split()[1].rstrip("ab") for r in rp.PAPER_VALUES if r["paper"] == "pagedattention"}
    assert {"2", "12", "13", "14", "15", "16", "17", "18", "19"} <= figures
    v = {r["figure"] for r in rp.PAPER_VALUES if r["paper"] == "vattention"}
    assert {"page size", "allocation latency"} <= v


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    out = {}
    for paper in rp.PAPERS:
        args = [paper, "--quick", "--repeats", "2", "--runs", str(tmp / "runs" / paper), "--out", str(tmp / paper)]
        assert kvlab(["reproduce", *args]) == 0
        out[paper] = tmp / paper
    return tmp, out


@pytest.mark.parametrize("paper, titles, values", [
    ("pagedattention",
     ["Fig. 2:", "Fig. 12:", "Fig. 13:", "Fig. 14:", "Fig. 15:", "Fig. 16:", "Fig. 17:", "Fig. 18:", "Fig. 19:"],
     ["20.4", "26.8", "38.2", "96.3", "2-4 x", "30.4", "6.1-9.8", "37.6-55.2", "44.3-66.3", "1.67", "3.58",
      "20-26", "16 tokens", "Fig. 15b"]),
    ("vattention", ["Page size and fragmentation", "Allocation latency"], ["40 us", "1.97", "0-128 MiB"]),
])
def test_quick_pages(pages, paper, titles, values):
    _, out = pages
    page = (out[paper] / "README.md").read_text()
    for t in titles:
        assert f"## {t}" in page, t
    for v in values:
        assert v in page, v
    for png in page.split("](")[1:]:
        name = png.split(")")[0]
        assert (out[paper] / name).is_file(), name
    rows = list(csv.DictReader(open(out[paper] / "results.csv")))
    assert rows and all(r["verdict"] in ("within CI", "within 10%", "differs", "no paper number",
                                         "not yet measurable", "not measured", "inconclusive") for r in rows)
    measured = [r for r in rows if r["verdict"] not in ("not yet measurable", "not measured")]
    assert all(math.isfinite(float(r["kvlab"])) for r in measured)


def test_rerun_skips_finished_runs(pages):
    tmp, out = pages
    summaries = sorted((tmp / "runs" / "vattention").rglob("summary.json"))
    assert summaries and all(p.parent.name in ("rep0", "rep1") for p in summaries)
    before = {p: p.stat().st_mtime_ns for p in summaries}
    args = ["vattention", "--quick", "--repeats", "2", "--runs", str(tmp / "runs" / "vattention"),
            "--out", str(tmp / "again")]
    assert kvlab(["reproduce", *args]) == 0
    assert {p: p.stat().st_mtime_ns for p in summaries} == before
    assert (tmp / "again" / "README.md").read_text().count("## ") == out["vattention"].joinpath("README.md").read_text().count("## ")


def test_cli_lists_and_checks(capsys):
    assert kvlab(["--help"]) == 0
    assert "reproduce PAPER" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        kvlab(["reproduce", "nosuchpaper"])
    assert e.value.code == 2


def test_ratio_row_bounds():
    """vLLM below the latency limit at the top rate: a lower bound (inconclusive when below the
    paper's value); the baseline below it too: nothing to compare."""
    nl = lambda *v: [{"normalized_latency": x} for x in v]  # noqa: E731 - one seed per rate
    rates = [1.0, 2.0]
    data = {"vLLM": {1.0: nl(0.01), 2.0: nl(0.05)}, "Orca-Oracle": {1.0: nl(0.1), 2.0: nl(0.5)}}
    r = rp.ratio_row("pagedattention", "Fig. 17", "vLLM / Orca-Oracle rate at equal latency", data, rates)
    assert r.bound == ">= " and r.kvlab == pytest.approx(2.0 / 1.25)
    assert r.verdict == "inconclusive"
    data["Orca-Oracle"][2.0] = nl(0.15)
    r = rp.ratio_row("pagedattention", "Fig. 17", "vLLM / Orca-Oracle rate at equal latency", data, rates)
    assert r.verdict == "not measured" and math.isnan(r.kvlab)
    data = {"vLLM": {1.0: nl(0.01), 2.0: nl(0.3)}, "Orca-Oracle": {1.0: nl(0.3), 2.0: nl(0.5)}}
    r = rp.ratio_row("pagedattention", "Fig. 17", "vLLM / Orca-Oracle rate at equal latency", data, rates)
    assert r.bound == "" and r.kvlab == pytest.approx((1 + 0.19 / 0.29) / 1.0)
    assert r.verdict == "differs"  # 1.66 vs 2.0


def test_a_run_missing_its_tables_counts_as_ran_not_resumed(tmp_path):
    """``run`` counts a folder as resumed only where the run is finished (summary and tables): one
    whose tables were removed runs again and counts as made by this invocation."""
    from experiments.reproduce.core import Ctx, run

    ctx = Ctx(paper="t", runs=tmp_path, out=tmp_path / "out", repeats=1, quick=True, mode="simulate")
    over = ["model=tiny-llama", "workload.num_requests=6", "device=cpu"]
    run(ctx, "s", "c", over)
    assert (ctx.ran, ctx.resumed) == (1, 0)
    run(ctx, "s", "c", over)
    assert (ctx.ran, ctx.resumed) == (1, 1)
    next((tmp_path / "s" / "c").rglob("steps.parquet")).unlink()
    run(ctx, "s", "c", over)
    assert (ctx.ran, ctx.resumed) == (2, 1)
