"""`kvlab report` on hostile input: a rate sweep with inf (offline) among more than ten runs, damaged
run folders (a corrupt parquet table, a summary.json that is not an object or not kvlab's), a
folder that does not exist. Each is one line naming the input and the fix (exit code 2 for a user
error), or a run left out with a warning as a truncated summary.json is; never a traceback, and a
report that fails leaves no part of itself behind."""
from __future__ import annotations

import json
import math
import shutil

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from experiments import report
from experiments.run import cli

RATES = "1,2,3,4,5,6,7,8,9,10,inf"  # eleven runs: more than the ten colours of the cycle


@pytest.fixture(scope="module")
def inf_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("inf_sweep")
    code = cli(["-m", "mode=simulate", "workload.num_requests=4", f"workload.request_rate={RATES}",
                f"hydra.sweep.dir={root}", "progress=false", "report=false"])
    assert code == 0
    assert len(list(root.glob("*/summary.json"))) == 11
    return root


def _copy(src, dst, n=None):
    """``dst`` with the first ``n`` runs of ``src`` (all where None), no report."""
    dirs = sorted((p for p in src.iterdir() if (p / "summary.json").exists()), key=lambda p: int(p.name.split("-")[0]))
    dst.mkdir()
    for d in dirs[:n]:
        shutil.copytree(d, dst / d.name)
    return dst


def _run_dir(root, i):
    return next(root.glob(f"{i}-*"))


def _report(capsys, *argv):
    code = report.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# ---------------------------------------------------------------------------- 1. inf in a long rate sweep

def test_a_rate_sweep_of_eleven_runs_with_inf_is_reported_and_drawn(inf_sweep, tmp_path, capsys):
    out = tmp_path / "rep"
    code, stdout, err = _report(capsys, inf_sweep, "--out", out)
    assert code == 0, err
    assert "report written to" in stdout
    for png in ("throughput.png", "memory_breakdown.png", "latency_cdf.png", "kv_usage_over_time.png",
                "rate_curves.png"):
        assert (out / png).stat().st_size > 5000, png
    wide = pd.read_csv(out / "summary.csv")
    assert len(wide) == 11
    # summary.json stores the offline rate as null: it is inf again, named and sorted last
    rates = wide["cfg.workload.request_rate"].tolist()
    assert rates[-1] == math.inf and rates[:-1] == list(range(1, 11))
    assert wide["label"].iloc[-1] == "paged-b16, rate=inf"
    assert "rate=inf" in (out / "report.md").read_text()
    assert not (inf_sweep / "report").exists()  # --out: nothing under the sweep


def test_inf_is_the_darkest_curve_and_no_shade_is_nan(inf_sweep):
    wide = report.order_runs(report.collect(inf_sweep))
    styles, handles, note = report._styles(wide)
    alphas = [styles[r]["alpha"] for r in wide["run_id"]]
    assert all(0.25 <= a <= 1 for a in alphas), alphas
    assert alphas == sorted(alphas) and alphas[-1] == 1.0 and alphas[-2] < 1.0  # inf: the largest rate
    assert note.endswith("1 to inf)")
    # a run without a value on the axis (NaN) is drawn in full, not with alpha NaN
    wide.loc[0, "cfg.workload.request_rate"] = math.nan
    styles, _, _ = report._styles(wide)
    assert styles[wide["run_id"].iloc[0]]["alpha"] == 1.0
    fig = report.plot_latency_cdfs(wide, report._read_runs(wide, "requests.parquet"))
    plt.close(fig)


# ---------------------------------------------------------------------------- atomic: nothing half-written

def test_a_report_that_fails_leaves_no_folder_behind(inf_sweep, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(report, "plot_sweep", broken)  # after summary.csv and the first figures
    out = tmp_path / "new" / "deeper" / "rep"
    with pytest.raises(RuntimeError, match="drawing failed"):
        report.write_report(inf_sweep, out)
    assert not (tmp_path / "new").exists()  # nor the folders made for it
    with pytest.raises(RuntimeError):
        report.write_report(inf_sweep)  # the default, DIR/report
    assert not (inf_sweep / "report").exists()
    assert not [p.name for p in inf_sweep.iterdir() if p.name.startswith(".")]  # no temporary folder


def test_ctrl_c_leaves_no_report_and_no_traceback(inf_sweep, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_sweep", interrupt)
    code, _, err = _report(capsys, inf_sweep, "--out", tmp_path / "rep")
    assert code == 130 and err.strip() == "kvlab report: interrupted; no report written (an earlier one is as it was)"
    assert not any(tmp_path.iterdir())


def test_a_report_that_fails_keeps_the_earlier_one(inf_sweep, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    report.write_report(inf_sweep, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(report, "plot_sweep", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        report.write_report(inf_sweep, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_out_may_be_a_folder_that_holds_other_things(inf_sweep, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    report.write_report(_copy(inf_sweep, tmp_path / "two", 2), out)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "report.md").exists()
    report.write_report(tmp_path / "two", out)  # again, over the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "two"]  # no temporary folder left


# ---------------------------------------------------------------------------- 2. a corrupt parquet table

def test_a_corrupt_requests_parquet_is_left_out_of_the_figures_with_a_warning(inf_sweep, tmp_path, capsys):
    root = _copy(inf_sweep, tmp_path / "runs", 3)
    bad = _run_dir(root, 1) / "requests.parquet"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    bad_steps = _run_dir(root, 2) / "steps.parquet"
    bad_steps.write_text("not parquet")
    code, stdout, err = _report(capsys, root)
    assert code == 0, err
    lines = err.splitlines()
    assert "left 2 damaged table(s) out of the figures" in err
    line = next(ln for ln in lines if str(bad) in ln)  # one line: the file, what is wrong, the fix
    assert "unreadable" in line and "delete it and rerun that run" in line
    assert any(str(bad_steps) in ln and "unreadable" in ln for ln in lines)
    out = root / "report"
    assert len(pd.read_csv(out / "summary.csv")) == 3  # the run's summary is whole: it stays in the tables
    assert (out / "latency_cdf.png").exists() and (out / "kv_usage_over_time.png").exists()
    md = (out / "report.md").read_text()
    assert "## Damaged tables" in md and f"`{bad.parent.name}/requests.parquet`" in md


def test_a_removed_table_is_named_not_silently_left_out_of_the_figures(inf_sweep, tmp_path, capsys):
    """A finished run writes both tables before summary.json: one that is gone since (deleted, not
    copied) leaves its run out of the figures drawn from it, and the report says so."""
    root = _copy(inf_sweep, tmp_path / "runs", 3)
    gone = _run_dir(root, 1) / "requests.parquet"
    gone.unlink()
    (_run_dir(root, 2) / "steps.parquet").unlink()
    code, stdout, err = _report(capsys, root)
    assert code == 0, err
    assert "left 2 damaged table(s) out of the figures" in err
    line = next(ln for ln in err.splitlines() if str(gone) in ln)
    assert "missing" in line and "kvlab run --resume" in line
    md = (root / "report" / "report.md").read_text()
    assert "## Damaged tables" in md and f"`{gone.parent.name}/requests.parquet`: missing" in md
    assert f"`{_run_dir(root, 2).name}/steps.parquet`: missing" in md
    assert len(pd.read_csv(root / "report" / "summary.csv")) == 3  # still in the tables


def test_a_steps_table_without_the_columns_drawn_is_damaged(inf_sweep, tmp_path):
    root = _copy(inf_sweep, tmp_path / "runs", 2)
    steps = _run_dir(root, 0) / "steps.parquet"
    pd.read_parquet(steps).drop(columns=["num_seqs"]).to_parquet(steps)
    wide = report.order_runs(report.collect(root))
    damaged = []
    tables = report._read_runs(wide, "steps.parquet", damaged=damaged)
    assert len(tables) == 1 and len(damaged) == 1
    assert damaged[0].table == "steps.parquet" and "num_seqs" in damaged[0].reason


# ---------------------------------------------------------------------------- 3. summary.json not an object

@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ("42", "int"), ('"done"', "str"), ("null", "NoneType")])
def test_a_summary_json_that_is_not_an_object_is_skipped(inf_sweep, tmp_path, capsys, text, kind):
    root = _copy(inf_sweep, tmp_path / "runs", 2)
    (_run_dir(root, 1) / "summary.json").write_text(text)
    code, _, err = _report(capsys, root)
    assert code == 0, err
    assert "skipped 1 run folder(s)" in err
    assert f"summary.json unreadable (a JSON {kind}, not an object)" in err and "rerun" in err
    assert len(pd.read_csv(root / "report" / "summary.csv")) == 1
    assert "## Skipped" in (root / "report" / "report.md").read_text()


@pytest.mark.parametrize("summary, what", [({"output_throughput": "fast"}, "output_throughput is 'fast'"),
                                           ({"run_id": "x"}, "no metric in it"),
                                           ({}, "no metric in it")])
def test_a_summary_json_that_is_not_kvlabs_is_skipped(inf_sweep, tmp_path, capsys, summary, what):
    root = _copy(inf_sweep, tmp_path / "runs", 2)
    (_run_dir(root, 1) / "summary.json").write_text(json.dumps(summary))
    code, _, err = _report(capsys, root)
    assert code == 0, err
    assert f"summary.json damaged ({what}" in err


def test_only_damaged_summaries_report_nothing_and_write_nothing(inf_sweep, tmp_path, capsys):
    root = _copy(inf_sweep, tmp_path / "runs", 1)
    (_run_dir(root, 0) / "summary.json").write_text("[]")
    code, _, err = _report(capsys, root)
    assert code == 1 and "no run under" in err and "a JSON list, not an object" in err
    assert not (root / "report").exists()


# ---------------------------------------------------------------------------- 4. a folder that is not there

def test_a_folder_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, _, err = _report(capsys, missing)
    assert code == 2
    assert err.strip() == f"kvlab report: {missing} does not exist: give the folder of a run or a sweep " \
                          "(hydra.sweep.dir, e.g. multirun/DATE/TIME)"
    assert not missing.exists()


def test_a_file_instead_of_a_folder(inf_sweep, tmp_path, capsys):
    a_file = tmp_path / "multirun.yaml"
    a_file.write_text("x: 1\n")
    code, _, err = _report(capsys, a_file)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a folder" in err
    code, _, err = _report(capsys, inf_sweep, "--out", a_file)  # --out a file: refused, nothing written
    assert code == 2 and len(err.strip().splitlines()) == 1 and "give --out a folder" in err
    assert a_file.read_text() == "x: 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["multirun.yaml"]


# ---------------------------------------------------------------------------- categorical bars

def test_kv_dtype_bars_of_runs_whose_label_hides_an_allocator_argument(tmp_path, capsys):
    """A kv_cache_dtype sweep crossed with an allocator argument its label does not show (arena): two
    bars of one name and value made pandas refuse to reindex, and the report ended in a traceback."""
    root = tmp_path / "runs"
    assert cli(["-m", "mode=simulate", "workload.num_requests=2", "allocator=contiguous",
                "engine.kv_cache_dtype=auto,fp8", "allocator.args.arena=first_fit,buddy",
                f"hydra.sweep.dir={root}", "progress=false", "report=false"]) == 0
    capsys.readouterr()
    code, _, err = _report(capsys, root)
    assert code == 0, err
    assert (root / "report" / "kv_dtype.png").exists()
    from experiments.report_axes import _series_key

    wide = report.order_runs(report.collect(root))
    names = _series_key(wide, "cfg.engine.kv_cache_dtype", report.varying(wide))
    assert sorted(set(names)) == ["contiguous-max, arena=buddy", "contiguous-max, arena=first_fit"]
