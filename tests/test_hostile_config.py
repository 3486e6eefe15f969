"""Config values are hostile input: a count must be a whole number in a real range, a switch true
or false, a model size a size, a simulated device's figures finite, a resumed folder's files what
kvlab wrote. Each is refused with the key and the fix, before the run does anything."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.model_config import ModelConfig
from experiments.run import cli
from experiments.simulate import SimSettings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("field, value", [
    ("max_num_seqs", 2.5), ("max_num_seqs", True), ("max_model_len", math.inf), ("max_model_len", math.nan),
    ("kv_cache_tokens", 1000.7), ("max_num_batched_tokens", 10**18), ("kv_cache_memory", "lots"),
    ("seed", -1), ("cpu_threads", 10**6),
])
def test_engine_counts_are_whole_numbers_in_range(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.*give a whole number in \["):
        EngineConfig(**{field: value})


def test_engine_counts_take_integral_floats_and_numpy_ints():
    # 4e9 bytes as Hydra parses it, a count computed with numpy: the same whole numbers
    c = EngineConfig(kv_cache_memory=4e9, max_model_len=2048.0, max_num_seqs=np.int64(64))
    assert (c.kv_cache_memory, c.max_num_seqs, c.max_model_len) == (4_000_000_000, 64, 2048)
    assert all(type(v) is int for v in (c.kv_cache_memory, c.max_num_seqs, c.max_model_len))
    assert EngineConfig(kv_cache_tokens=None).kv_cache_tokens is None


def test_whole_numbers_and_numbers_refuse_bools():
    from allocators.checks import is_int, is_real

    assert [is_int(v) for v in (3, np.int64(3), True, 3.0, "3", None)] == [True, True, False, False, False, False]
    assert [is_real(v) for v in (3, 2.5, np.float32(2.5), math.nan, False, "2.5")] == [True] * 4 + [False] * 2
    # the shared check in its call sites: a bool is not a size, a numpy count is
    with pytest.raises(ValueError, match="cuda_graph_max_tokens"):
        EngineConfig(cuda_graph_max_tokens=True)
    assert EngineConfig(tensor_parallel_size=np.int64(1)).tensor_parallel_size == 1


def test_numpy_counts_reach_the_engine_as_plain_ints():
    """A count computed with numpy passes the checks as the number it is, and what is stored is a
    plain int/float: the kernels' own checks (block_size), the host tier's and JSON take no numpy."""
    from allocators.paged import PagedAllocator
    from allocators.registry import checked_args

    args = checked_args(PagedAllocator, {"block_size": np.int64(16)})
    assert args["block_size"] == 16 and type(args["block_size"]) is int
    c = EngineConfig(tensor_parallel_size=np.int64(1), host_transfer_blocks=np.int32(4), kv_scale=np.float32(0.5),
                     cuda_graph_max_tokens=np.int64(512))
    assert [type(v) for v in (c.tensor_parallel_size, c.host_transfer_blocks, c.kv_scale, c.cuda_graph_max_tokens)] \
        == [int, int, float, int]
    json.dumps(dataclasses.asdict(c))
    with pytest.raises(ValueError, match="kv_scale"):
        EngineConfig(kv_scale=True)
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig(sliding_window=True)
    assert type(ModelConfig(sliding_window=np.int64(8)).sliding_window) is int


def test_a_pool_sized_two_ways_is_refused():
    # kvlab run's default kv_cache_tokens=4096 would silently win over a kv_cache_memory given
    with pytest.raises(ValueError, match="kv_cache_tokens=4096 and kv_cache_memory=1000000 both size the KV pool"
                                         ".*engine.kv_cache_tokens=null"):
        EngineConfig(kv_cache_tokens=4096, kv_cache_memory=1_000_000)


@pytest.mark.parametrize("field", ["enable_chunked_prefill", "enable_prefix_caching", "enforce_eager",
                                   "detokenize", "record_memory", "stream_outputs"])
@pytest.mark.parametrize("value", ["maybe", 0, 1, [1]])
def test_engine_switches_are_true_or_false(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.*give true or false"):
        EngineConfig(**{field: value})


@pytest.mark.parametrize("value", ["lots", -1, math.nan, math.inf, True])
def test_swap_space_is_gib_or_null(value):
    with pytest.raises(ValueError, match="swap_space=.*GiB of host memory"):
        EngineConfig(swap_space=value)


@pytest.mark.parametrize("overrides", [
    dict(num_hidden_layers=-1), dict(num_hidden_layers=2.5), dict(num_key_value_heads=0),
    dict(hidden_size="abc"), dict(head_dim=10**9), dict(vocab_size=True), dict(max_position_embeddings=0),
])
def test_model_sizes_are_sizes(overrides):
    (field, value), = overrides.items()
    with pytest.raises(ValueError, match=rf"{field}={value!r} is not a model size"):
        ModelConfig(**overrides)


def test_head_dim_below_one_is_named():
    with pytest.raises(ValueError, match="hidden_size 2 is smaller than num_attention_heads 4"):
        ModelConfig(hidden_size=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("field, value", [
    ("pcie_bandwidth", 0), ("pcie_bandwidth", -1e9), ("pcie_bandwidth", math.nan), ("step_overhead_s", math.inf),
    ("step_overhead_s", math.nan), ("transfer_latency_s", -1), ("activation_reserve_bytes", -1e12),
    ("nvlink_bandwidth", math.nan), ("nvlink_latency_s", -1.0), ("pcie_bandwidth", "fast"),
])
def test_simulated_device_figures_are_finite_and_in_range(field, value):
    with pytest.raises(ValueError, match=rf"sim.{field}=.*give a finite number"):
        SimSettings(**{field: value})
    SimSettings(nvlink_bandwidth=None, nvlink_latency_s=None)  # null: the datasheet's


@pytest.mark.parametrize("args, expected", [
    (["+repeat=3"], ["+repeat: no such key", "did you mean repeats?"]),
    (["+measure.warmup=5"], ["+measure.warmup: no such key", "did you mean measure.warmup_s?"]),
    (["++bogus=1"], ["+bogus: no such key"]),
    (["mode=simulate", "workload.request_rate=null"], ["workload.request_rate=null", "requests per second"]),
    (["mode=simulate", "measure.warmup_s=inf"], ["measure.warmup_s=inf", "finite seconds >= 0"]),
    (["mode=simulate", "measure.warmup_s=-1"], ["measure.warmup_s=-1", "finite seconds >= 0"]),
])
def test_preflight_refuses_added_typos_and_a_null_rate(capsys, args, expected):
    code = cli([*args, "progress=false", "report=false"])
    err = capsys.readouterr().err
    assert code == 2
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert "Traceback" not in err


def test_an_added_key_that_exists_somewhere_open_still_passes(tmp_path):
    """``+engine.hf_overrides.*`` (an open mapping) and a preset group are not typos."""
    from experiments import preflight

    prep = preflight.prepare(["mode=simulate", "+engine.hf_overrides.num_hidden_layers=3", "+experiment=waste_breakdown"],
                             cwd=tmp_path)
    assert prep.overrides


def test_a_preset_key_that_a_strategy_reads_may_be_added(tmp_path):
    # was: +virtual_page_size (a preset's key, read by +strategy=virtual) refused as a key nothing reads
    from experiments import preflight
    from experiments.run import compose

    prep = preflight.prepare(["+strategy=virtual", "+virtual_page_size=auto"], cwd=tmp_path)
    assert compose(prep.overrides).allocator.args.page_size == "auto"
    with pytest.raises(preflight.UserError, match=r"\+virtual_pagesize: no such key"):
        preflight.prepare(["+strategy=virtual", "+virtual_pagesize=auto"], cwd=tmp_path)


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.cli", "run", "progress=false", "report=false", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_hostile_engine_and_model_values_end_in_one_line_and_no_folder(tmp_path):
    cases = [(["engine.max_num_seqs=2.5"], "engine.max_num_seqs=2.5: give a whole number"),
             (["+engine.hf_overrides.num_hidden_layers=-1"], "num_hidden_layers=-1 is not a model size"),
             (["sim.pcie_bandwidth=0"], "sim.pcie_bandwidth=0: give a finite number > 0"),
             (["allocator.args.block_size=16.5"], "allocator.args.block_size=16.5 (paged): give a whole number"),
             # 1M tokens of llama2-7b's KV (512 KiB each) on a simulated A100-40GB
             (["model=llama2-7b", "engine.kv_cache_tokens=1000000"],
              "a KV pool of 488.3 GiB per GPU and 12.6 GiB of weights do not fit the simulated a100-40gb's 40.0 GiB")]
    for i, (args, text) in enumerate(cases):
        run_dir = tmp_path / f"r{i}"
        proc = _run("mode=simulate", "workload.num_requests=4", f"hydra.run.dir={run_dir}", *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and text in out and "Traceback" not in out, out[-2000:]
        assert not run_dir.exists()


def test_resume_names_a_damaged_file_and_the_fix(tmp_path):
    run_dir = tmp_path / "run"
    assert _run("mode=simulate", "workload.num_requests=4", f"hydra.run.dir={run_dir}").returncode == 0
    summary = run_dir / "summary.json"
    for text in ("{bad", json.dumps([1, 2])):
        summary.write_text(text)
        proc = _run("--resume", str(run_dir))
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and f"{summary} is not a run summary" in out and "delete it" in out, out[-2000:]
        assert summary.read_text() == text  # the folder is the user's: nothing is removed
    for text in (": : :", "a: 1"):
        (run_dir / ".hydra" / "overrides.yaml").write_text(text)
        proc = _run("--resume", str(run_dir))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "is not the list of overrides kvlab wrote" in out, out[-2000:]
        assert "Traceback" not in out


@pytest.mark.parametrize("text, why", [("x: [", "ParserError"), ("x: 1", "Missing key hydra")])
def test_resume_of_a_damaged_sweep_file_is_one_line(capsys, tmp_path, text, why):
    (tmp_path / "multirun.yaml").write_text(text)
    code = cli(["--resume", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "multirun.yaml is not the sweep file kvlab wrote" in err and why in err, err
    assert "Traceback" not in err


def test_resume_with_an_override_that_changes_the_runs_is_refused_before_the_sweep_file_changes(capsys, tmp_path):
    """``--resume DIR KEY=V`` with a KEY that changes what the runs measure: Hydra rewrote DIR's
    multirun.yaml with it (so --resume never again found the sweep's own command), every finished
    run then conflicted, and a run whose folder did not conflict ran the other configuration among
    the old runs. Overrides that change only how it runs still resume."""
    sweep = tmp_path / "sweep"
    common = ["mode=simulate", "workload.num_requests=2", "progress=false", "report=false"]
    assert cli(["-m", "allocator=paged,contiguous", *common, f"hydra.sweep.dir={sweep}"]) == 0
    sweep_file = (sweep / "multirun.yaml").read_text()
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    capsys.readouterr()
    assert cli(["--resume", str(sweep), "workload.num_requests=3"]) == 2
    err = capsys.readouterr().err
    assert f"--resume {sweep} goes on with that folder's own settings" in err and "workload.num_requests=3" in err
    assert (sweep / "multirun.yaml").read_text() == sweep_file
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == runs
    assert cli(["--resume", str(sweep), "allocator=paged"]) == 2  # one value of the sweep: a narrower sweep file
    assert (sweep / "multirun.yaml").read_text() == sweep_file
    assert cli(["--resume", str(sweep), "progress=true", "report=true"]) == 0  # how it runs, not what


def test_max_model_len_beyond_the_models_positions_is_refused():
    from engine.llm_engine import LLMEngine

    with pytest.raises(ValueError, match=r"max_model_len=100000 is more than tiny-llama's max_position_embeddings "
                                         r"\(4096\)"):
        LLMEngine(EngineConfig(model="tiny-llama", max_model_len=100000))


@pytest.mark.parametrize("text, expected", [("{bad", "is not a readable JSON config"), ("", "is not a readable JSON"),
                                            ("[1, 2]", "holds a JSON list, not the object of a model config")])
def test_a_damaged_config_json_is_named(tmp_path, text, expected):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=expected) as e:
        ModelConfig.from_dir(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_engine_keys_of_the_run_itself_point_to_them():
    from experiments.preflight import compose
    from experiments.run import engine_config

    for key, where in (("seed", "seed="), ("device", "device="), ("model", "model=")):
        with pytest.raises(ValueError, match=rf"engine.{key}: set by the run's own {where}"):
            engine_config(compose([f"+engine.{key}=x"]))
    with pytest.raises(ValueError, match="device=null: give auto, cpu, cuda or cuda:N"):
        EngineConfig(device=None)


def test_an_interpolated_number_is_not_refused_as_text():
    from experiments import preflight

    prep = preflight.prepare(["mode=simulate", "workload.num_requests=${engine.max_num_seqs}"])
    cfg = preflight.compose(prep.overrides)
    assert cfg.workload.num_requests == cfg.engine.max_num_seqs


@pytest.mark.parametrize("name, engine_key", [("host_tier_tokens", "engine.host_kv_cache_memory"),
                                              ("enable_prefix_caching", "engine.enable_prefix_caching"),
                                              ("swap_space_tokens", "engine.swap_space"),
                                              ("host_transfer_blocks", "engine.host_transfer_blocks")])
def test_allocator_arguments_the_engine_sets_point_to_its_keys(capsys, name, engine_key):
    code = cli(["mode=simulate", f"allocator.args.{name}=1"])
    err = capsys.readouterr().err
    assert code == 2 and f"allocator.args.{name}: the engine sets it from {engine_key}" in err, err


@pytest.mark.parametrize("args, expected", [
    (["mode=online", "workload.num_requests=4", "workload.request_rate=1e-6"], "(at most 86400 s in mode=online)"),
    (["mode=simulate", "workload.num_requests=8", "workload.request_rate=1e-300"], "(at most 1e+09 s in mode=simulate)"),
])
def test_arrivals_spread_beyond_any_run_are_refused(capsys, args, expected):
    code = cli(args)
    err = capsys.readouterr().err
    assert code == 2 and "requests would arrive over" in err and expected in err, err


@pytest.mark.parametrize("arrival", ["Infinity", "1e308", "NaN", "-1", "true"])
def test_a_trace_arrival_beyond_any_clock_is_refused(tmp_path, arrival):
    from experiments.workloads import make_workload

    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt_len": 4, "output_len": 2, "arrival_s": %s}\n' % arrival)
    with pytest.raises(ValueError, match=r"line 1: 'arrival_s' must be seconds in \[0, 1e\+09\]"):
        make_workload(dict(name="trace", trace_path=str(path)), 1000, 256)


@pytest.mark.parametrize("allocator, args, expected", [
    ("paged", dict(block_size="big"), "block_size='big' (paged): give a whole number"),
    ("virtual", dict(prefetch=-3), "prefetch=-3 (virtual): give true or false"),
    ("virtual", dict(layout=3), "layout=3 (virtual): give one of the names it takes"),
    ("contiguous", dict(policy=["max"]), "policy=['max'] (contiguous): give one of the names"),
])
def test_allocator_arguments_have_their_constructors_types(allocator, args, expected):
    from allocators.registry import allocator_class, checked_args

    with pytest.raises(ValueError, match=re.escape(f"allocator.args.{expected}")):
        checked_args(allocator_class(allocator), args)


def test_allocator_arguments_of_the_right_type_pass_and_whole_floats_become_ints():
    from allocators.registry import allocator_class, checked_args

    out = checked_args(allocator_class("paged"), dict(block_size=32.0, enable_prefix_caching=True))
    assert out == dict(block_size=32, enable_prefix_caching=True) and type(out["block_size"]) is int


def test_an_allocator_argument_it_does_not_take_is_refused_naming_what_it_takes():
    from allocators.registry import allocator_class, checked_args

    with pytest.raises(ValueError, match=r"allocator.args.block_sise: allocator 'paged' takes no such argument "
                                         r"\(did you mean allocator.args.block_size\?\); it takes block_size$"):
        checked_args(allocator_class("paged"), dict(block_sise=8))
    with pytest.raises(ValueError, match=r"allocator.args.bogus: allocator 'virtual' takes no such argument; "
                                         r"it takes page_size, layout, backend, "):
        checked_args(allocator_class("virtual"), dict(bogus=1))


@pytest.mark.parametrize("args, msg", [
    (["mode=simulate", "report=maybe"], "report=maybe: give true or false"),
    (["mode=simulate", "resume=1"], "resume=1: give true or false"),
    (["mode=simulate", "run_name=../../x"], "run_name='../../x': give a folder name without /"),
    (["mode=simulate", "+allocator.args.bogus=1"], "allocator.args.bogus: allocator 'paged' takes no such argument"),
    (["mode=simulate", "allocator=virtual", "allocator.args.page_size=-4096"],
     "allocator.args.page_size=-4096: give a positive number of bytes"),
    (["mode=simulate", "workload.input_len_min=600", "workload.input_len_max=700"],
     "workload.input_len_min=600: no prompt that long fits max_model_len=512"),
    (["mode=simulate", "workload=fixed", "workload.input_len=512"], "workload.input_len=512: no prompt that long"),
    (["mode=simulate", "workload.beam_width=4", "engine.max_num_seqs=2"],
     "workload.beam_width=4: a step holds at most 2 sequences"),
    (["mode=simulate", "seed=nan"], "seed=nan: give a whole number"),
    (["mode=offline", "device=cpu", "engine.max_num_seqs=0"], "engine.max_num_seqs=0: give a whole number"),
    (["mode=simulate", "sim.profile=README.md"], "sim.profile=README.md: not a device profile (ArrowInvalid"),
])
def test_a_single_runs_bad_value_is_one_line_before_it_starts(args, msg, capsys, tmp_path):
    """One run (no -m) is range-checked before Hydra starts, as a sweep is: one line, exit 2, no folder."""
    code = cli([*args, f"hydra.run.dir={tmp_path / 'run'}", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"kvlab run: {msg}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_a_results_folder_that_cannot_be_made_is_one_line(key, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code = cli(["-m" if key == "hydra.sweep.dir" else "mode=simulate", "mode=simulate", "progress=false",
                f"{key}={tmp_path / 'file' / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"kvlab run: {key}={tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is not a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_cuda_vmm_backend_on_a_cpu_cache_is_refused():
    from engine.llm_engine import LLMEngine

    with pytest.raises(ValueError, match="allocator.args.backend=cuda maps GPU memory but the KV cache is on cpu"):
        LLMEngine(EngineConfig(model="tiny-llama", device="cpu", allocator="virtual", max_model_len=64,
                               kv_cache_tokens=1024, allocator_args=dict(backend="cuda")))


@pytest.mark.parametrize("tp", [1, 2])
def test_a_damaged_checkpoint_file_is_named(tmp_path, tp):
    """A truncated safetensors file (and one of garbage) is refused naming the file, on one device
    and in each tensor-parallel rank's sliced read."""
    pytest.importorskip("transformers")
    from conftest import make_hf_checkpoint

    from engine.llm_engine import LLMEngine

    make_hf_checkpoint(tmp_path, "llama")
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file \(.*\); save the model again"):
        LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", tensor_parallel_size=tp,
                               max_model_len=64, kv_cache_tokens=256))


@pytest.mark.parametrize("tp", [1, 2])
def test_a_tensor_in_two_checkpoint_files_is_refused(tmp_path, tp):
    """A stale weights file beside a re-saved model (another save's shards): every *.safetensors file
    is read, so each tensor both hold silently came from whichever sorted last."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from conftest import make_hf_checkpoint
    from engine.llm_engine import LLMEngine

    make_hf_checkpoint(tmp_path, "llama")
    weights = next(tmp_path.glob("*.safetensors"))
    old = {k: v * 2 for k, v in load_file(str(weights)).items() if "layers.0." in k}
    save_file(old, str(tmp_path / "model-00001-of-00002.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.0.* is in both model-00001-of-00002"
                                         r".safetensors and model.safetensors .*remove the file"):
        LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", tensor_parallel_size=tp,
                               max_model_len=64, kv_cache_tokens=256))


@pytest.mark.parametrize("value", [-3, 0])
def test_virtual_prefetch_tokens_below_one_is_refused_not_clamped(value):
    from engine.llm_engine import LLMEngine

    with pytest.raises(ValueError, match=rf"allocator.args.prefetch_tokens={value}: .*give a whole number >= 1"):
        LLMEngine(EngineConfig(model="tiny-llama", device="cpu", allocator="virtual", max_model_len=64,
                               kv_cache_tokens=1024, allocator_args=dict(backend="host", prefetch_tokens=value)))
    ok = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", allocator="virtual", max_model_len=64,
                                kv_cache_tokens=1024, allocator_args=dict(backend="host", prefetch_tokens=5)))
    assert ok.allocator.prefetch_tokens == 5


def test_a_sweeps_bad_value_is_refused_before_any_run(capsys, tmp_path):
    """kvlab run -m: every swept value is range-checked (engine config, allocator arguments, simulate
    settings) before the first run starts, naming the run of the sweep that holds it."""
    common = ["-m", "mode=simulate", "workload.num_requests=6", f"hydra.sweep.dir={tmp_path}", "report=false",
              "progress=false"]
    code = cli([*common, "engine.max_num_seqs=4,-5", "allocator=paged,contiguous"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "engine.max_num_seqs=-5: give a whole number in [1, 1048576]" in err
    assert "(a run of this sweep: engine.max_num_seqs=-5 allocator=paged); nothing has run" in err
    assert not any(tmp_path.iterdir())
    code = cli([*common, "engine.max_num_seqs=-5,-5"])  # a sweep of one value: its run named whole
    assert code == 2 and "progress=false engine.max_num_seqs=-5); nothing has run" in capsys.readouterr().err
    code = cli([*common, "sim.efficiency=0.8,-1"])
    err = capsys.readouterr().err
    assert code == 2 and "sim.efficiency" in err and "nothing has run" in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("allocator, values, expected", [
    ("paged", "allocator.args.block_size=16,0", "block_size=0: choose a block size between 1 and"),
    ("contiguous", "allocator.args.arena=first_fit,bestfit", "unknown arena 'bestfit'"),
    ("virtual", "allocator.args.premap=4,-1", "allocator.args.premap=-1"),
    ("virtual", "allocator.args.page_size=4096,-64", "allocator.args.page_size=-64: give a positive number"),
])
def test_a_real_sweeps_bad_allocator_argument_is_refused_before_any_run(capsys, tmp_path, allocator, values,
                                                                        expected):
    """Offline (the real engine, whose pool is known only once its weights load): the allocator's
    ranges that need neither the model nor the pool (``KVAllocator.check_args``) stop the sweep
    before its first run, as simulate's dry build does; a good value's run is not made first."""
    code = cli(["-m", "mode=offline", "device=cpu", "workload.num_requests=4", f"allocator={allocator}", values,
                f"hydra.sweep.dir={tmp_path}", "report=false", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "nothing has run" in err, err
    assert not any(tmp_path.iterdir())


def test_a_sweeps_value_that_needs_the_kv_layout_or_the_workload_is_refused_before_any_run(capsys, tmp_path):
    """Ranges checked only where the model is known: simulate builds each run's own engine (no
    weights) first, so a virtual page that holds no whole token, or a prefetch of 0, stops the
    sweep before its first run; the workload of every mode is checked against the model's
    vocabulary and length."""
    common = ["-m", "workload.num_requests=6", f"hydra.sweep.dir={tmp_path}", "report=false", "progress=false"]
    code = cli([*common, "mode=simulate", "allocator=virtual", "allocator.args.page_size=4096,100"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "allocator.args.page_size=100 does not hold a whole number of tokens of 64 bytes" in err
    assert "nothing has run" in err
    code = cli([*common, "mode=simulate", "allocator=virtual", "+allocator.args.prefetch_tokens=16,0"])
    err = capsys.readouterr().err
    assert code == 2 and "allocator.args.prefetch_tokens=0" in err and "nothing has run" in err, err
    code = cli([*common, "mode=offline", "device=cpu", "workload.input_len_min=4,9", "workload.input_len_max=8"])
    err = capsys.readouterr().err
    assert code == 2 and "workload.input_len_min (9) > input_len_max (8)" in err and "nothing has run" in err, err
    code = cli([*common, "mode=simulate", "workload=shared_prefix", "workload.prefix_len=8,600"])
    err = capsys.readouterr().err
    assert code == 2 and "workload.prefix_len must be in [1, max_model_len - 2" in err, err
    assert not any(tmp_path.iterdir())
    # a valid sweep of the same keys runs, and the dry builds' logs are not left switched off
    code = cli([*common, "mode=simulate", "allocator=virtual", "allocator.args.page_size=4096,8192"])
    assert code == 0, capsys.readouterr().err
    assert len(list(tmp_path.glob("*/summary.json"))) == 2
    assert logging.root.manager.disable == logging.NOTSET


def test_value_probes_hold_every_swept_value():
    from experiments.preflight import MAX_COMPOSED, value_probes

    small = value_probes(["engine.max_num_seqs=1,2", "seed=3,4"])
    assert sorted(map(tuple, small)) == sorted(itertools.product(["engine.max_num_seqs=1", "engine.max_num_seqs=2"],
                                                                 ["seed=3", "seed=4"]))
    many = [f"seed={','.join(map(str, range(MAX_COMPOSED)))}", "engine.max_num_seqs=7,8", "mode=simulate"]
    probes = value_probes(many)
    assert len(probes) == 1 + (MAX_COMPOSED - 1) + 1  # each value once beside the others' first
    assert {p[0] for p in probes} == {f"seed={i}" for i in range(MAX_COMPOSED)}
    assert {p[1] for p in probes} == {"engine.max_num_seqs=7", "engine.max_num_seqs=8"}
    assert all(p[2] == "mode=simulate" for p in probes)


def test_a_sweeps_null_and_bools_are_checked_as_hydra_runs_them(tmp_path):
    """A null among a sweep's values became the text "None": ``engine.kv_cache_tokens=null,40000``, a
    sweep whose runs both run, was refused ("expects a number") before any of them started."""
    from experiments.preflight import prepare, value_probes

    probes = value_probes(["engine.kv_cache_tokens=null,40000", "engine.enforce_eager=true,false"])
    assert {p[0] for p in probes} == {"engine.kv_cache_tokens=null", "engine.kv_cache_tokens=40000"}
    assert {p[1] for p in probes} == {"engine.enforce_eager=true", "engine.enforce_eager=false"}
    prepare(["mode=simulate", "engine.kv_cache_tokens=null,40000", f"hydra.sweep.dir={tmp_path / 's'}"])


def test_a_run_into_a_folder_of_another_run_is_refused_before_hydra_rewrites_it(capsys, tmp_path):
    """The folder's finished run, its .hydra files and its --resume stay as they were; the same run
    again is skipped (resume), and resume=false overwrites."""
    run = tmp_path / "run"
    common = ["mode=simulate", f"hydra.run.dir={run}", "progress=false", "report=false"]
    assert cli([*common, "workload.num_requests=4"]) == 0
    before = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    summary = (run / "summary.json").read_bytes()
    code = cli([*common, "workload.num_requests=7"])
    err = capsys.readouterr().err
    assert code == 2 and "summary.json holds a run of a different configuration" in err
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == before
    assert (run / "summary.json").read_bytes() == summary
    assert cli(["--resume", str(run)]) == 0 and cli([*common, "workload.num_requests=4"]) == 0
    assert (run / "summary.json").read_bytes() == summary  # skipped: the same run
    assert cli([*common, "workload.num_requests=7", "resume=false"]) == 0
    assert json.loads((run / "summary.json").read_text())["num_requests"] == 7


@pytest.mark.parametrize("tp", [1, 2])
def test_a_model_folder_without_weights_is_a_value_error(tmp_path, tp):
    """One device and each tensor-parallel rank give the same clear error (a setting, exit 2), not a
    FileNotFoundError."""
    pytest.importorskip("transformers")
    from conftest import make_hf_checkpoint

    from engine.llm_engine import LLMEngine

    make_hf_checkpoint(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors in .*: save the model with save_pretrained"):
        LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", tensor_parallel_size=tp,
                               max_model_len=64, kv_cache_tokens=256))


def test_a_negative_max_tokens_is_one_error():
    from engine.sampling_params import SamplingParams

    with pytest.raises(ValueError) as e:
        SamplingParams(max_tokens=-1)
    assert str(e.value) == "invalid SamplingParams: max_tokens must be an integer in [0, 2147483647], got -1"


def test_the_python_api_refuses_what_is_not_a_prompt_or_params():
    """LLM.generate and SamplingParams answer a wrong type with a ValueError naming it (not a
    TypeError from deep inside); numpy token ids are the same ids."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM("tiny-llama", device="cpu")
    for prompts, params, msg in [
        (None, None, "prompts: give text, token ids, or a list of them, got NoneType"),
        (5, None, "prompts: give text, token ids, or a list of them, got int"),
        ([[True, 5]], None, r"token ids must be whole numbers, got True \(bool\)"),
        (["a\ud800b"], None, r"the prompt is not valid text \(surrogates not allowed at character 1\)"),
        (["a"], [{"max_tokens": 3}], r"params\[0\]: give a SamplingParams, got dict"),
    ]:
        with pytest.raises(ValueError, match=msg):
            llm.generate(prompts, params)
    greedy = SamplingParams(max_tokens=3, temperature=0)
    want = llm.generate([[1, 5, 6]], greedy)[0].outputs[0].token_ids
    for ids in ([np.int64(1), np.int64(5), np.int64(6)], np.array([1, 5, 6])):
        out = llm.generate(ids if isinstance(ids, np.ndarray) else [ids], greedy)[0]
        assert out.outputs[0].token_ids == want and out.prompt_token_ids == [1, 5, 6]
        assert all(type(t) is int for t in out.prompt_token_ids)
    for kw in (dict(stop_token_ids=5), dict(stop=5)):
        with pytest.raises(ValueError, match=rf"{next(iter(kw))} must be a list, got 5"):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="device='tpu': give auto, cpu, cuda or cuda:N"):
        EngineConfig(device="tpu")


def test_stop_strings_without_detokenizing_are_refused():
    """With detokenize=False there is no text to find a stop string in: refused, not ignored."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM("tiny-llama", device="cpu", detokenize=False)
    with pytest.raises(ValueError, match="stop strings need the output text, but the engine runs with detokenize=False"):
        llm.generate("Hello", SamplingParams(max_tokens=5, stop=["8>4"]))
    assert llm.generate("Hello", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0].outputs[0].token_ids


def test_a_launcher_without_its_plugin_names_the_package(monkeypatch, tmp_path):
    # was: Hydra's "Could not load 'hydra/launcher/submitit_slurm'" and a config search path
    from experiments import preflight

    monkeypatch.setitem(preflight.LAUNCHER_PLUGINS, "slurm", ("kvlab_no_such_pkg.launcher", "some-plugin"))
    with pytest.raises(preflight.UserError, match="hydra/launcher=slurm needs the Hydra plugin some-plugin.*"
                                                  "pip install some-plugin"):
        preflight.prepare(["hydra/launcher=slurm"], cwd=tmp_path)
    assert preflight._importable("experiments.preflight") and not preflight._importable("kvlab_no_such_pkg.x")


def test_a_cluster_launcher_off_the_cluster_says_so(monkeypatch, tmp_path):
    # was (plugin installed, no SLURM): submitit's FileNotFoundError for sbatch, a traceback, after the sweep
    # folder was made
    import shutil

    from experiments import preflight

    monkeypatch.setitem(preflight.LAUNCHER_PLUGINS, "slurm", ("experiments.preflight", "some-plugin"))  # "installed"
    monkeypatch.setattr(shutil, "which", lambda cmd: None)
    with pytest.raises(preflight.UserError, match="hydra/launcher=slurm submits each run with SLURM's sbatch, not on "
                                                  "PATH here: run kvlab on a SLURM login node"):
        preflight.prepare(["hydra/launcher=slurm"], cwd=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing made
    monkeypatch.setattr(shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    preflight.check_launcher(preflight._parse(["hydra/launcher=slurm"]))  # on a cluster: no complaint


@pytest.mark.parametrize("value", [-1, 17, True, 2.5, "8"])
def test_fused_gemv_max_tokens_is_a_count_the_kernel_takes(value):
    with pytest.raises(ValueError, match=r"fused_gemv_max_tokens must be an integer in \[0, 16\]"):
        EngineConfig(fused_gemv_max_tokens=value)
    assert EngineConfig(fused_gemv_max_tokens=np.int64(16)).fused_gemv_max_tokens == 16


def test_a_null_run_name_means_unset_and_keeps_the_default_name(tmp_path, monkeypatch, capsys):
    """To a Hydra user ``run_name=null`` means unset: the run folder was named ``<time>-None``."""
    from experiments.preflight import compose

    monkeypatch.chdir(tmp_path)  # the default run folder: runs/<date>/<time>-<run_name>
    common = ["mode=simulate", "workload.num_requests=4", "report=false", "progress=false"]
    assert cli([*common, "run_name=null"]) == 0
    (run,) = (tmp_path / "runs").glob("*/*")
    default = compose(common).run_name  # allocator-model-workload
    assert run.name.endswith(f"-{default}") and (run / "summary.json").is_file()
    # a null among a sweep's names is refused before any run (Hydra would name the folder 0-None)
    capsys.readouterr()
    assert cli(["-m", *common, "run_name=null,x", f"hydra.sweep.dir={tmp_path / 'sweep'}"]) == 2
    assert "run_name=null,x: run_name=null in a sweep names that run's folder N-None" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
    # a null that reaches the configuration (a preset's, run_experiment's) is refused, not named None
    from experiments.preflight import UserError, check_config

    with pytest.raises(UserError, match=r"run_name=null: give a folder name, or leave run_name out"):
        check_config(compose([*common, "run_name=null"]))
