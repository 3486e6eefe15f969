"""Simulate mode's cost model inputs as a hostile user gives them: a device profile that is not
one (another tool's parquet, missing tables, NaN, zero or negative times, a folder, a number), a
profile of another device or a cut-off run, the decode graph beyond the profile's grid, the
activation reserve, validate-sim's overrides after its flags, and an interrupted ``kvlab profile
--merge P --out P``."""
from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.device_profile import ROOT
from tests.test_simulate import config

PROFILE = ROOT / "results" / "profiles" / "nvidia-h200.parquet"


@pytest.fixture(scope="module")
def committed():
    t = pq.read_table(PROFILE)
    return t.to_pandas(), t.schema.metadata


def write(df, path, metadata=None):
    t = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(t.replace_schema_metadata(metadata) if metadata is not None else t, path)
    return path


def engine(*overrides):
    from experiments.run import build_engine

    return build_engine(config("mode=simulate", "model=llama3-8b", "workload.num_requests=4", *overrides))


@pytest.mark.parametrize("bad", [math.nan, 0.0, -1.0])
def test_a_profile_with_nan_zero_or_negative_times_is_refused(committed, tmp_path, bad):
    """A NaN decode graph made every decode step take no time (the clock skips it): 9x the output
    tok/s of the real profile, with nothing said."""
    df, meta = committed
    df = df.copy()
    df.loc[df["table"] == "decode_graph", "value"] *= bad if bad < 0 else 0.0
    if math.isnan(bad):
        df.loc[df["table"] == "decode_graph", "value"] = math.nan
    path = write(df, tmp_path / "bad.parquet", meta)
    with pytest.raises(ValueError, match=r"sim\.profile=.*bad\.parquet: not a device profile .*"
                                         r"of table 'decode_graph'"):
        engine("sim=h200", f"sim.profile={path}")


def test_a_parquet_file_of_another_tool_is_named_not_a_key_error(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2], "y": [3.0, 4.0]}), path)
    with pytest.raises(ValueError, match=r"sim\.profile=.*other\.parquet: not a device profile .*no 'table' or "
                                         r"'value' column"):
        engine("sim=h200", f"sim.profile={path}")


@pytest.mark.parametrize("table", ["sample", "eager_forward"])
def test_a_missing_table_is_named(committed, tmp_path, table):
    df, meta = committed
    path = write(df[df["table"] != table], tmp_path / f"no_{table}.parquet", meta)
    with pytest.raises(ValueError, match=f"has no {table} table for llama3-8b: rerun kvlab profile"):
        engine("sim=h200", f"sim.profile={path}")


def test_a_folder_as_the_profile_is_refused_not_the_roofline_unsaid(tmp_path):
    """`kvlab profile --out results/profiles` takes a folder; sim.profile=results/profiles fell back
    to the roofline with a warning that the folder did not exist."""
    with pytest.raises(ValueError, match=r"sim\.profile=.*: a folder, not a profile: name the \.parquet file"):
        engine("sim=h200", f"sim.profile={tmp_path}")
    with pytest.raises(ValueError, match=r"sim\.profile=results/profiles: a folder"):
        engine("sim=h200", "sim.profile=results/profiles")


@pytest.mark.parametrize("value", ["123", "true"])
def test_a_profile_that_is_not_a_path_is_named(value):
    with pytest.raises(ValueError, match=rf"sim\.profile={'True' if value == 'true' else value}: give the path"):
        engine("sim=h200", f"sim.profile={value}")


def test_a_profile_of_another_device_is_warned_about(caplog):
    from experiments.simulate import _same_device

    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        eng = engine("sim=a100-80gb", "sim.profile=results/profiles/nvidia-h200.parquet")
    assert eng.sim_summary["cost_model"] == "profiled"
    assert any("measured on NVIDIA H200, not the simulated a100-80gb" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        engine("sim=h200")
    assert not any("measured on" in r.getMessage() for r in caplog.records)
    assert _same_device("h100-sxm", "NVIDIA H100 80GB HBM3") and _same_device("a100-40gb", "NVIDIA A100-SXM4-40GB")
    assert not _same_device("a100-80gb", "NVIDIA A100-SXM4-40GB") and not _same_device("h200", "cpu (x86_64)")


def test_a_partial_profile_is_warned_about(committed, tmp_path, caplog):
    df, meta = committed
    m = json.loads(meta[b"kvlab_profile"])
    path = write(df, tmp_path / "cut.parquet", {**meta, b"kvlab_profile": json.dumps({**m, "partial": True}).encode()})
    with caplog.at_level(logging.WARNING, logger="kvlab.sim"):
        engine("sim=h200", f"sim.profile={path}")
    assert any("is partial" in r.getMessage() for r in caplog.records)


def test_decode_steps_beyond_the_profiled_contexts_grow_by_their_attention_only():
    """The profile times decode graphs up to 2048 keys (1024 at 192+ sequences); above that the
    whole step, weights included, grew in proportion: one 16k-context sequence 7.4x the 2048 one,
    and 3 sequences (padded to 4, a shorter mean context) or 9 (padded to 16) faster than 2 or 8."""
    cm = engine("sim=h200", "engine.kv_cache_tokens=null", "engine.max_model_len=32768").cost_model
    assert cm.decode_graph is not None
    one = {c: cm.step_time([(1, c)]) for c in (2048, 4096, 16384, 32000)}
    assert all(math.isfinite(t) and t > 0 for t in one.values())
    assert one[2048] < one[4096] < one[16384] < one[32000] < 2 * one[2048]
    for c in (4096, 16384):
        times = [cm.device_time([(1, c)] * b) for b in range(1, 17)]
        assert all(b >= a * (1 - 1e-9) for a, b in zip(times, times[1:])), (c, np.round(times, 5))
    # inside the grid nothing moved
    g = cm.profile.table("decode_graph", model="llama3-8b", mode="paged", block_size=cm.block_size)
    row = g[(g["batch"] == 8) & (g["context"] == 1024)]["value"].iloc[0]
    assert cm.decode_graph(8, 1024) == pytest.approx(row)


def test_decode_graph_rows_beyond_the_grid_never_fall_in_batch():
    """Above its last context each row grew along its own last segment: a larger batch's row with a
    shallower last segment (or one measured point, flat) fell below a smaller batch's. llama3-8b
    contiguous (the linear tables): one sequence's step slower than two's from 4,096 keys (1.1% at
    32k, 2.6% at 128k)."""
    from experiments.device_profile import Grid2D

    # a=1: 1.0 at 1024, 2.0 at 2048; a=2 (shallower last segment): 1.5 at 512, 1.8 at 1024; a=4: one point
    g = Grid2D([1, 1, 2, 2, 4], [1024, 2048, 512, 1024, 512], [1.0, 2.0, 1.5, 1.8, 3.0], above="linear")
    for b in (1024, 2048, 4096, 65536):
        z = [g(a, b) for a in (1, 2, 3, 4)]
        assert all(y >= x for x, y in zip(z, z[1:])), (b, z)
    assert g(1, 4096) == pytest.approx(4.0) and g(2, 1024) == pytest.approx(1.8)  # the measured rows as before
    cm = engine("sim=h200", "allocator=contiguous", "engine.kv_cache_tokens=null",
                "engine.max_model_len=32768").cost_model
    for c in (4096, 16384, 32000):
        times = [cm.device_time([(1, c)] * b) for b in range(1, 17)]
        assert all(b >= a * (1 - 1e-9) for a, b in zip(times, times[1:])), (c, np.round(times, 5))


def test_an_activation_reserve_that_leaves_no_pool_is_named():
    with pytest.raises(ValueError, match=r"sim\.activation_reserve_bytes=1e\+30 leave no KV memory.*or lower "
                                         r"sim\.activation_reserve_bytes"):
        engine("sim=h200", "engine.kv_cache_tokens=null", "sim.activation_reserve_bytes=1e30")


def test_validate_sim_takes_overrides_before_and_after_its_flags(tmp_path, capsys):
    """`kvlab validate-sim model=... --rates 4 --out DIR sim.profile=...` was argparse's
    'unrecognized arguments' (overrides were taken before the first flag only)."""
    from experiments.validate_sim import main

    assert main(["model=llama3-8b", "--rates", "4", "--sim-only", "--out", str(tmp_path / "v"),
                 "engine.max_num_seqs=0"]) == 2
    err = capsys.readouterr().err
    assert "engine.max_num_seqs" in err and "unrecognized" not in err


def on_this_cpu(metadata):
    """The committed profile's metadata as this CPU's (a merge takes only the device's own profile)."""
    meta = json.loads(metadata[b"kvlab_profile"])
    return {**metadata, b"kvlab_profile": json.dumps({**meta, "device": "cpu"}).encode()}


def profile_args(path, skip):
    return ["--models", "tiny-llama", "--device", "cpu", "--reps", "1", "--skip", skip, "--merge", str(path),
            "--out", str(path)]


def test_an_interrupted_profile_merge_leaves_the_merged_profile_as_it_was(committed, tmp_path, monkeypatch):
    """`kvlab profile --merge P --out P` (the README's way to add host steps) wrote each part's
    checkpoint over P: cut off after the first part, P had lost the tables it was re-measuring."""
    from experiments import profile_cases, profile_device

    df, meta = committed
    path = write(df, tmp_path / "p.parquet", on_this_cpu(meta))
    before = path.read_bytes()
    monkeypatch.setattr(profile_cases, "GEMM_M", [1])

    def cut(timer, device, tick):  # tick: the progress lines' count
        raise KeyboardInterrupt

    monkeypatch.setattr(profile_device, "_rows_copy", cut)  # main calls it through profile_device's name
    args = profile_args(path, "host,models,graphs,ragged,vmm")  # gemm, then copy
    with pytest.raises(KeyboardInterrupt):
        profile_device.main(args)
    assert path.read_bytes() == before
    partial = tmp_path / "p.partial.parquet"
    kept = pq.read_table(partial)
    assert json.loads(kept.schema.metadata[b"kvlab_profile"])["partial"] is True
    # a finished run replaces P and leaves no checkpoint behind
    monkeypatch.setattr(profile_device, "_rows_copy", lambda timer, device, tick: [])
    assert profile_device.main(args) == 0
    assert not partial.exists()
    assert "partial" not in json.loads(pq.read_table(path).schema.metadata[b"kvlab_profile"])


def test_a_profile_merge_on_a_cpu_keeps_the_vmm_table(committed, tmp_path, monkeypatch):
    """A CPU measures no VMM calls (``_rows_vmm``: none): a merge there dropped the GPU's vmm table
    unless --skip vmm was given (CUDA graphs were already kept so)."""
    from experiments import profile_cases, profile_device

    df, meta = committed
    path = write(df, tmp_path / "p.parquet", on_this_cpu(meta))
    monkeypatch.setattr(profile_cases, "COPY_BYTES", [1 << 16])
    assert profile_device.main(profile_args(path, "host,gemm,models,graphs,ragged")) == 0
    merged = pq.read_table(path).to_pandas()
    assert len(merged[merged["table"] == "vmm"]) == len(df[df["table"] == "vmm"]) > 0


@pytest.mark.parametrize("content, why", [
    ('a,b\n1,"2', "not a readable table"),
    ("a,b\n1,2", "not a validate-sim table .no label"),
    ("", "not a readable table"),
    ("label,mode,metric,real,sim,error,target,ok\nx,offline,m,abc,1,0.1,0.05,True", "real not numbers"),
])
def test_collect_names_a_damaged_table_and_writes_nothing(tmp_path, capsys, content, why):
    """A foreign table was merged unsaid (rc 0), text where a number belongs overwrote the merged
    validation.csv and then failed before its .md (a traceback), a cut-off one was a traceback."""
    import shutil

    from experiments.validate_sim import main

    good = ROOT / "results" / "sim_validation" / "llama3-8b-paged" / "validation.csv"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    shutil.copy(good, tmp_path / "a" / "validation.csv")
    (tmp_path / "b" / "validation.csv").write_text(content)
    assert main(["--collect", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "b/validation.csv" in err and re.search(why, err), err
    assert not (tmp_path / "validation.csv").exists() and not (tmp_path / "validation.md").exists()
