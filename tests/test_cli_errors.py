"""`kvlab run` user errors: found before torch is imported, one or two lines naming the key, the
allowed values and a close match, exit code 2, no traceback (unless --verbose)."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import preflight
from experiments.run import cli

ROOT = Path(__file__).resolve().parent.parent


def kvlab_run(capsys, *args: str) -> tuple[int, str]:
    code = cli(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["mode=ofline"], ["mode=ofline", "offline, online, simulate", "did you mean mode=offline?"]),
    (["workload.num_request=64"], ["workload.num_request: no such key", "did you mean workload.num_requests?"]),
    (["engine.max_num_seq=8"], ["engine.max_num_seq", "did you mean engine.max_num_seqs?"]),
    (["allocator=pagd"], ["allocator=pagd", "contiguous, paged, virtual", "did you mean allocator=paged?"]),
    (["-m", "allocator=paged,contigous"], ["allocator=contigous", "did you mean allocator=contiguous?"]),
    (["workload=sharegtp"], ["workload=sharegtp", "did you mean workload=sharegpt?"]),
    (["allocator.args.blok_size=8"], ["allocator.args.blok_size", "paged: block_size",
                                      "did you mean allocator.args.block_size?"]),
    (["allocator=contiguous", "allocator.args.policy=pow"], ["allocator.args.policy=pow", "max, pow2, oracle",
                                                             "did you mean allocator.args.policy=pow2?"]),
    (["engine.preemption_mode=swapp"], ["recompute, swap", "did you mean engine.preemption_mode=swap?"]),
    (["workload.num_requests=many"], ["workload.num_requests=many: expects a number"]),
    (["mode=online"], ["mode=online needs arrivals", "workload.request_rate"]),
    (["model=opt-13b"], ["simulate-only", "mode=simulate"]),
    (["model=tiny-lama"], ["model=tiny-lama", "did you mean model=tiny-llama?"]),
    (["model=hf_dir"], ["model=hf_dir needs model.path"]),
])
def test_user_errors_are_short_and_name_the_fix(capsys, args, expected):
    code, err = kvlab_run(capsys, *args)
    assert code == 2
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert "+workload" not in err  # Hydra's hint to append a new key is wrong for a misspelt one


def test_missing_model_directory_is_no_such_directory(capsys, tmp_path):
    for args in (["model.path=/no/such/model"], [f"model={tmp_path}/missing"], ["model=./not-here"]):
        code, err = kvlab_run(capsys, *args)
        assert code == 2 and "no such directory" in err and "unknown model" not in err, err


def test_a_directory_without_config_json_is_named(capsys, tmp_path):
    code, err = kvlab_run(capsys, f"model={tmp_path}")
    assert code == 2 and "config.json" in err


def test_errors_come_before_torch_and_fast():
    """In a fresh interpreter: refused without importing torch (or pandas)."""
    code = ("import sys; from experiments.cli import main; rc = main(['run', 'mode=ofline']); "
            "print(rc, 'torch' in sys.modules, 'pandas' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert "did you mean mode=offline?" in proc.stderr


def test_help_imports_nothing_heavy():
    code = ("import sys; from experiments.cli import main; main(['--help']); from experiments import report; "
            "print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert "validate-sim" in proc.stdout and "profile" in proc.stdout


def test_verbose_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code, err = kvlab_run(capsys, "--verbose", "mode=ofline")
    assert code == 2 and "Traceback" in err and "did you mean mode=offline?" in err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    code, err = kvlab_run(capsys, "mode=ofline")
    assert code == 2 and "Traceback" in err


def test_a_run_that_fails_is_one_line_and_leaves_no_folder(tmp_path):
    """An error the engine finds (block size 0) after the checks: its message, exit 2, no folder."""
    run_dir = tmp_path / "bad"
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "run", "allocator.args.block_size=0",
                           "workload.num_requests=4", "progress=false", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "block_size=0" in out and "Traceback" not in out
    assert not run_dir.exists()


def test_a_failed_run_in_the_default_layout_leaves_no_dated_folder(tmp_path):
    """runs/DATE/TIME-NAME: the run's folder and the date's (Hydra made both) go; runs/ may stay."""
    import os

    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "run", "mode=simulate", "engine.async_scheduling=maybe",
                           "workload.num_requests=4", "progress=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "async_scheduling must be true, false or auto" in out, out[-2000:]
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_unknown_command(capsys):
    from experiments.cli import main

    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_choices_agree_with_the_code():
    """preflight keeps its own copy of closed value sets (no torch there): they must match."""
    from allocators.contiguous import POLICIES
    from allocators.virtual import LAYOUTS
    from experiments.run import MODES

    assert set(preflight.CHOICES["allocator.args.policy"]) == set(POLICIES)
    assert set(preflight.CHOICES["allocator.args.layout"]) == set(LAYOUTS)
    assert preflight.CHOICES["mode"] == MODES
    # the options read from the sources without importing them are the constructors' own
    from allocators.registry import allocator_class

    for name, options in preflight.allocator_options().items():
        params = set(inspect.signature(allocator_class(name).__init__).parameters) - preflight.ENGINE_PROVIDED
        assert set(options) == params, name


def test_model_directory_runs_labelled_by_its_name(tmp_path):
    """model=DIR (relative) works like a preset; the run is named after the directory."""
    from conftest import make_hf_checkpoint

    make_hf_checkpoint(tmp_path / "my-llama", "llama")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "run", "model=./my-llama",
                           "workload.num_requests=4", "progress=false", "report=false", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == "my-llama" and summary["cfg.model.path"] == str(tmp_path / "my-llama")
    assert "paged-b16-my-llama-uniform" in proc.stdout + proc.stderr  # run_name


def test_a_sweep_over_directories_names_each_run(tmp_path):
    from conftest import make_hf_checkpoint

    for name in ("a-model", "b model"):
        make_hf_checkpoint(tmp_path / name, "llama")
    prepared = preflight.prepare(["model=./a-model,./b model"], cwd=tmp_path)
    assert prepared.overrides[0] == "model=hf_dir" and prepared.num_runs == 2
    combos = preflight._combinations(preflight._parse(prepared.overrides))
    assert [preflight.compose(c).model.name for c in combos] == ["a-model", "b model"]
    with pytest.raises(preflight.UserError, match="presets or directories, not both"):
        preflight.prepare(["model=tiny-llama,./a-model"], cwd=tmp_path)


def test_hydra_flags_keep_their_values():
    flags, overrides = preflight.split_args(["allocator=paged", "--cfg", "job", "-m", "seed=1,2", "--info",
                                             "defaults", "--verbose"])
    assert flags == ["--cfg", "job", "-m", "--info", "defaults", "--verbose"]
    assert overrides == ["allocator=paged", "seed=1,2"]


def test_serve_takes_a_model_directory_too(capsys):
    from experiments.cli import main

    assert main(["serve", "model=/no/such/dir"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_serve_without_the_serve_extra_says_how_to_install_it(monkeypatch, capsys):
    from experiments import serve

    monkeypatch.setattr(serve, "missing_serve_extra", lambda: ["fastapi"])
    assert serve.main() == 2
    err = capsys.readouterr().err
    assert "serve extra" in err and "pip install -e '.[serve]'" in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_a_bad_port_in_one_line():
    import subprocess
    import sys

    pytest.importorskip("fastapi", reason="kvlab serve needs the serve extra")
    r = subprocess.run([sys.executable, "-m", "experiments.cli", "serve", "port=99999"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "port=99999" in r.stderr and "[0, 65535]" in r.stderr
