"""``kvlab reproduce`` and ``kvlab validate-sim``: a wrong flag, folder or override is one line
naming it and the fix, exit code 2, no traceback, found before any run (no folder left behind);
``reproduce --mode offline`` sends every request at t=0; a run's own crash still surfaces."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from experiments import validate_sim
from experiments.cli import main as kvlab
from experiments.preflight import UserError
from experiments.reproduce import page
from experiments.reproduce.core import Ctx, check_studies, run, run_overrides

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=tiny-llama", "device=cpu", "workload.num_requests=4", "engine.kv_cache_tokens=512"]


def one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------- reproduce

def test_reproduce_offline_sends_every_request_at_t0(tmp_path):
    """A study's rate is not an offline run's: the run gets request_rate=inf (no rate-based window)."""
    ctx = Ctx(paper="t", runs=tmp_path, out=tmp_path / "out", repeats=1, quick=True, mode="offline")
    ov = run_overrides(ctx, ["+experiment=page_size"], rate=8.0, num_requests=40)
    assert "workload.request_rate=inf" in ov and "mode=offline" in ov
    assert not any(o.startswith("measure.warmup_s") for o in ov)
    (summary,) = run(ctx, "s", "c", TINY, rate=2.0, num_requests=4)
    assert summary["request_rate"] == math.inf and summary["cfg.mode"] == "offline"
    # vAttention's model has weights (a preset): its studies pass in either real mode
    for mode in ("offline", "online"):
        check_studies(Ctx("vattention", tmp_path, tmp_path, 1, True, mode), page.BASES["vattention"])


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_reproduce_real_mode_of_simulate_only_models_is_one_line(tmp_path, capsys, mode):
    code = kvlab(["reproduce", "pagedattention", "--mode", mode, "--quick", "--repeats", "1",
                  "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and f"--mode {mode}" in err and "simulate-only" in err and "--mode simulate" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, bad, expected", [
    ("--out", "/dev/null", "--out /dev/null: not a folder"),
    ("--out", "FILE/x", "FILE is not a folder"),
    ("--runs", "FILE", "--runs FILE: not a folder"),
    ("--runs", "/proc/nope", "--runs /proc/nope: cannot make folders in /proc"),
])
def test_reproduce_bad_folders_are_one_line(tmp_path, capsys, flag, bad, expected):
    file = tmp_path / "file"
    file.write_text("x")
    bad, expected = bad.replace("FILE", str(file)), expected.replace("FILE", str(file))
    folders = {"--runs": str(tmp_path / "runs"), "--out": str(tmp_path / "out"), flag: bad}
    code = kvlab(["reproduce", "vattention", "--quick", "--repeats", "1", *[x for kv in folders.items() for x in kv]])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing made


def test_reproduce_study_error_leaves_out_as_it_was(tmp_path, capsys, monkeypatch):
    """A UserError from a study (after plots of earlier ones) is one line, rc 2, and OUT gets none
    of the study's files; a study's crash surfaces as itself, OUT untouched too."""
    def study(ctx):
        (ctx.out / "plot.png").write_text("half a page")
        raise failure

    monkeypatch.setitem(page.STUDIES, "vattention", [study])
    args = ["reproduce", "vattention", "--quick", "--repeats", "1", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]
    failure = UserError("a study's own complaint: fix it so")
    assert kvlab(args) == 2
    assert "kvlab reproduce: a study's own complaint" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    failure = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        kvlab(args)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- validate-sim

@pytest.mark.parametrize("overrides, flags, expected", [
    ([], ["--rates", "abc", "--sim-only"], ["--rates abc", "req/s > 0"]),
    (["workload.num_requests=4"], ["--rates", "-1", "--no-offline"], ["--rates -1", "req/s > 0"]),
    ([], ["--rates", "4,inf"], ["--rates 4,inf: inf is not a request rate"]),
    ([], ["--rates", "2", "--online-requests", "-5", "--no-offline"], ["--online-requests -5", "1 or more"]),
    ([], ["--sim", "tpu", "--sim-only"], ["--sim tpu", "conf/sim/tpu.yaml", "a100-40gb", "h200"]),
    ([], ["--sim", "h20", "--sim-only"], ["did you mean --sim h200?"]),
    ([], ["--no-offline"], ["nothing to validate: give --rates or drop --no-offline"]),
    ([], ["--real-repeats", "0"], ["--real-repeats 0", "1 or more"]),
    ([], ["--warmup", "-1"], ["--warmup -1", "0 or more"]),
    ([], ["--sim-only", "--real-only"], ["--sim-only and --real-only exclude each other"]),
    (["mode=simulate"], [], ["mode=simulate: validate-sim sets mode itself: drop it"]),
    (["sim=h100-sxm"], ["--sim-only"], ["give --sim h100-sxm instead"]),
    (["workload.request_rate=4"], [], ["give --rates 4 instead"]),
])
def test_validate_sim_bad_arguments_are_one_line(tmp_path, capsys, overrides, flags, expected):
    out = tmp_path / "v"
    code = validate_sim.main([*TINY, *overrides, *flags, "--out", str(out)])
    err = one_line(capsys.readouterr().err)
    assert code == 2
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert "without --sim-only" not in err  # (--real-repeats 0 once said so)
    assert not out.exists()


@pytest.mark.parametrize("extra, expected", [
    (["engine.max_num_seqs=0"], "engine.max_num_seqs=0"),
    (["workload.num_request=4"], "did you mean workload.num_requests?"),
    (["workload.input_len_min=-3"], "workload.input_len_min"),
    # only the online run is wrong (4 requests over ~46 days): refused before the offline one runs
    (["--rates", "1e-6"], "workload.request_rate=1e-06"),
])
def test_validate_sim_run_checks_come_before_any_run(tmp_path, capsys, extra, expected):
    out = tmp_path / "v"
    code = validate_sim.main([*TINY, *extra, "--real-only", "--out", str(out)])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and expected in err and "nothing has run" in err, err
    assert not out.exists()


def test_validate_sim_bad_out_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "v"):
        assert validate_sim.main([*TINY, "--real-only", "--out", str(bad)]) == 2
        assert "--out" in one_line(capsys.readouterr().err)
    assert validate_sim.main(["--collect", "--out", str(tmp_path)]) == 2
    assert "--collect: no */validation.csv under" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_validate_sim_crash_inside_a_run_surfaces(tmp_path, monkeypatch, error):
    """Only the checks' errors become one line: a run's own failure (a ValueError too) is a traceback."""
    import experiments.run

    def crash(cfg, out_dir, sweep_dir=None):
        raise error("inside the run")

    monkeypatch.setattr(experiments.run, "run_experiment", crash)
    with pytest.raises(error, match="inside the run"):
        validate_sim.main([*TINY, "--real-only", "--out", str(tmp_path / "v")])


def test_validate_sim_only_checks_every_mode_before_simulating(tmp_path, capsys):
    """--sim-only with a mode that has no real run: refused before any mode is simulated."""
    out = tmp_path / "v"
    assert validate_sim.main([*TINY, "--real-only", "--out", str(out)]) == 0
    code = validate_sim.main([*TINY, "--sim-only", "--rates", "40", "--out", str(out)])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and "online-40rps/summary.json: no real run there" in err
    assert not (out / "sim").exists()


def test_documented_sim_only_command_matches_the_committed_real_runs():
    """results/sim_validation/README.md's --sim-only command of the synchronous table composes the
    engine its committed real runs ran (an override they lack is refused)."""
    text = (ROOT / "results" / "sim_validation" / "README.md").read_text()
    m = re.search(r'^B="([^"]*)".*\nkvlab validate-sim model=M \$B allocator=A --rates R --online-requests N '
                  r'--sim-only --label M-A --out results/sim_validation/M-A$', text, re.M)
    assert m, "the documented --sim-only command"
    from experiments.run import compose

    folder = ROOT / "results" / "sim_validation" / "qwen3-0.6b-paged"
    real = json.loads((folder / "real" / "offline" / "summary.json").read_text())
    assert real["cfg.model.name"] == "qwen3-0.6b" and real["cfg.allocator.name"] == "paged"
    sim = compose(["progress=false", "model=qwen3-0.6b", *m.group(1).split(), "allocator=paged", "mode=simulate",
                   "sim=h200", "sim.cost_model=auto", "resume=false", "workload.request_rate=inf"])
    validate_sim._real_summaries(folder, "offline", sim)  # UserError where the settings differ
