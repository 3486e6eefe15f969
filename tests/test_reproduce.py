"""``kvlab reproduce``: the verdict logic on hand-made numbers, and both papers' pages end to end at
quick sizes (every figure section present, the paper's values on the page, resumable)."""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

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



# ---------------------------------------------------------------- each row from its definition
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764}  # Student t, 97.5% quantile, by degrees of freedom


def _seeds(folder: Path) -> list[dict]:
    """One configuration's per-seed summaries, in repeat order."""
    paths = sorted(folder.glob("rep*/summary.json"), key=lambda p: int(p.parent.name[3:]))
    assert paths, folder
    return [json.loads(p.read_text()) for p in paths]


def _metric(folder: Path, key: str, scale: float = 1.0) -> list[float]:
    return [scale * float(s[key]) for s in _seeds(folder)]


def _rate_at_limit(rates: list[float], lat: list[float], limit: float = 0.2) -> float:
    """The highest rate whose normalized latency stays below ``limit``, linear in between (as
    the paper's 'throughput at equal latency'; the top rate if never above, the lowest if always)."""
    prev = None
    for r, x in sorted(zip(rates, lat)):
        if not x <= limit:
            if prev is None:
                return r
            return prev[0] + (r - prev[0]) * (limit - prev[1]) / (x - prev[1]) if math.isfinite(x) else prev[0]
        prev = (r, x)
    return max(rates)


def _check_ratio(row: dict, folders: dict[str, dict[float, Path]], num: str = "vLLM", den: str = "Orca-Oracle"):
    """A rate-at-equal-latency row: not measured exactly where some seed of ``den`` stays below the
    latency limit at the sweep's top rate; else the mean over seeds of num's rate / den's."""
    rates = sorted(folders[den])
    lat = {k: [_metric(folders[k][r], "normalized_latency") for r in rates] for k in (num, den)}
    if any(x <= 0.2 for x in lat[den][-1]):
        assert row["verdict"] == "not measured" and math.isnan(float(row["kvlab"])), row
        return None
    per_seed = [_rate_at_limit(rates, [lat[num][i][s] for i in range(len(rates))])
                / _rate_at_limit(rates, [lat[den][i][s] for i in range(len(rates))])
                for s in range(len(lat[den][0]))]
    return per_seed


def _expected_rows(paper: str, runs: Path, repeats: int) -> dict[tuple[str, str, str], object]:
    """(figure, quantity, setting) -> the per-seed values the row is the mean of, a (value, n)
    pair where the row is one number, or a function checking a ratio row: from the runs'
    summary.json files and the definitions of the papers' figures (quick sizes)."""
    out: dict = {}
    if paper == "pagedattention":
        sweep = runs / "rate_sweep"
        for k in ("Orca-Max", "Orca-Pow2", "Orca-Oracle", "vLLM"):
            # Fig. 2: % of the KV pool holding token states, time-weighted, at the top rate (4 req/s)
            out[("Fig. 2", f"token states, {k}", "OPT-13B, A100-40GB, ShareGPT")] = _metric(
                sweep / f"{k}-r4", "token_states_tw", 100)
            # Fig. 13: time-weighted mean batch at 2 req/s
            out[("Fig. 13", f"batched requests, {k}", "OPT-13B, ShareGPT, 2 req/s")] = _metric(
                sweep / f"{k}-r2", "mean_batch_size_tw")
        rs = {k: {r: sweep / f"{k}-r{r:g}" for r in (1.0, 2.0, 4.0)} for k in ("Orca-Oracle", "Orca-Max", "vLLM")}
        for den in ("Orca-Oracle", "Orca-Max"):
            out[("Fig. 12", f"vLLM / {den} rate at equal latency", "OPT-13B, ShareGPT, rate sweep")] = (
                lambda row, den=den: _check_ratio(row, rs, den=den))
        for n in (2, 6):
            out[("Fig. 15a", f"memory saving, parallel sampling n={n}", f"OPT-13B, Alpaca, parallel n={n}")] = _metric(
                runs / "parallel" / f"vLLM-n{n}", "sharing_saving_tw", 100)
            pr = {k: {r: runs / "parallel_rates" / f"n{n}" / f"{k}-r{r:g}" for r in (8.0, 32.0)}
                  for k in ("Orca-Oracle", "vLLM")}
            out[("Fig. 14", f"vLLM / Orca-Oracle rate at equal latency, parallel n={n}",
                 f"OPT-13B, Alpaca, parallel n={n}")] = lambda row, pr=pr: _check_ratio(row, pr)
        for wl, name, rate, nreq in (("alpaca", "Alpaca", 8, 40), ("sharegpt", "ShareGPT", 1, 30)):
            for k in (2, 6):
                out[("Fig. 15b", f"memory saving, beam search k={k}, {name}",
                     f"OPT-13B, {name}, beam width {k}, {rate} req/s, {nreq} requests")] = _metric(
                    runs / "beam" / f"{wl}-k{k}", "sharing_saving_tw", 100)
        for shots, plen in (("1-shot", 80), ("5-shot", 341)):
            sp = {k: {r: runs / "shared_prefix" / shots / f"{k}-r{r:g}" for r in (4.0, 16.0, 64.0)}
                  for k in ("Orca-Oracle", "vLLM")}
            setting = f"LLaMA-13B, WMT16-like, {shots} prefix ({plen} tok)"
            out[("Fig. 16", f"vLLM / Orca-Oracle rate at equal latency, {shots}", setting)] = (
                lambda row, sp=sp: _check_ratio(row, sp))
        cb = {k: {r: runs / "chatbot" / f"{k}-r{r:g}" for r in (0.5, 1.0, 2.0)} for k in ("Orca-Oracle", "vLLM")}
        out[("Fig. 17", "vLLM / Orca-Oracle rate at equal latency", "OPT-13B, chatbot (history 1024)")] = (
            lambda row: _check_ratio(row, cb))
        for wl, rate in (("sharegpt", 3), ("alpaca", 30)):
            # Fig. 18b: the block size whose mean normalized latency over the seeds is lowest
            means = {b: statistics.fmean(_metric(runs / "block_size" / wl / f"b{b}", "normalized_latency"))
                     for b in (4, 16, 64)}
            out[("Fig. 18b", "best block size", f"OPT-13B, {wl}, {rate} req/s")] = (float(min(means, key=means.get)),
                                                                                  repeats)
        # Fig. 19: swap / recompute normalized latency at block 16, seed by seed
        swap = _metric(runs / "preemption" / "swap-b16", "normalized_latency")
        rec = _metric(runs / "preemption" / "recompute-b16", "normalized_latency")
        out[("Fig. 19", "swap / recompute normalized latency (comparable at 16-64)", "OPT-13B, ShareGPT, block 16")] = [
            s / r for s, r in zip(swap, rec)]
    else:
        # page size: (reservation + internal fragmentation) of the pool, in MiB per running
        # request, per_layer 2 MiB pages; the pool's bytes from the run's own bytes per token
        per_req = [(s["reservation_tw"] + s["internal_frag_tw"]) * s["kv_capacity_tokens"] * s["kv_bytes_per_token"]
                   / s["mean_batch_size_tw"] / 2**20
                   for s in _seeds(runs / "page_size" / "per_layer" / "p2097152")]
        out[("page size", "KV mapped beyond tokens per request, at most 1 page per K/V per layer",
             "Llama-3-8B, A100-80GB, ShareGPT, 2 MiB pages")] = per_req
        # allocation latency: quoted from the committed VMM benchmark (median, n samples)
        md = Path(rp.__file__).resolve().parents[2] / "results" / "vmm" / "vmm.md"
        if md.exists():
            m = re.search(r"^\| cuMemMap\+cuMemSetAccess \| (\d+) \| ([\d.]+) \|", md.read_text(), re.M)
            out[("allocation latency", "map one 2 MiB page", "cuMemMap + cuMemSetAccess")] = (float(m.group(2)),
                                                                                              int(m.group(1)))
    return out


@pytest.mark.parametrize("paper", ["pagedattention", "vattention"])
def test_quick_rows_are_their_figures_metric(pages, paper):
    """Each row the page reports is its figure's quantity as defined, recomputed here from the
    runs' per-seed summary.json files: the mean over the seeds (n = the repeats) and its 95% CI
    (e.g. Fig. 2's token states = 100 x mean of token_states_tw at the top rate), not another
    metric of the same runs."""
    tmp, out = pages
    repeats = 2  # the fixture's --repeats
    rows = {(r["figure"], r["quantity"], r["setting"]): r for r in csv.DictReader(open(out[paper] / "results.csv"))}
    expected = _expected_rows(paper, tmp / "runs" / paper, repeats)
    missing = set(expected) - set(rows)
    assert not missing, missing
    checked = set()
    for key, want in expected.items():
        row = rows[key]
        kvlab, ci, n = float(row["kvlab"]), float(row["ci95"]), int(row["n"])
        if callable(want):
            want = want(row)
            if want is None:  # not measured, as the definition says
                continue
        if isinstance(want, tuple):
            assert (kvlab, n) == (pytest.approx(want[0], rel=1e-12), want[1]), key
        else:
            assert len(want) == n == repeats, key
            assert kvlab == pytest.approx(statistics.fmean(want), rel=1e-9, abs=1e-12), key
            assert ci == pytest.approx(T975[n - 1] * statistics.stdev(want) / math.sqrt(n), rel=1e-4, abs=1e-12), key
        checked.add(key[0])
    # a row of every figure whose value the quick runs give (a ratio row may be 'not measured')
    want_figs = ({"Fig. 2", "Fig. 13", "Fig. 15a", "Fig. 15b", "Fig. 18b", "Fig. 19"} if paper == "pagedattention"
                 else {"page size"})
    assert want_figs <= checked, want_figs - checked

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
