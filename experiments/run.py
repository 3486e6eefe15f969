"""``kvlab run``: one experiment (or a sweep with -m), results written atomically per run folder.

Modes (``mode=``):
- ``offline``: every request at t=0 (``workload.request_rate`` must be inf; a trace's arrivals
  unused): throughput.
- ``online``: requests arrive at ``workload.request_rate`` (Poisson or gamma), or at a trace's
  ``arrival_s``: latency vs rate.
- ``simulate``: the real scheduler and allocator, no model compute; the roofline cost model
  of ``sim=<device>`` advances a virtual clock (experiments/simulate.py). Arrivals as the
  workload says (all at t=0 when the rate is inf).

A run folder is complete when its ``summary.json`` exists (written last). With
``resume=true`` a run whose summary.json exists is skipped, provided it was made with the
same configuration (``config_hash``); a different one is an error, never a silent skip.

Allocator options that an allocator does not take (``allocator.args.block_size`` for
contiguous in a sweep over allocators) are dropped for it with one log line; a sweep run that
thereby repeats an earlier run of the same sweep folder is not run again (one log line, no
folder). A run that fails leaves no folder behind; in a sweep the other runs go on. Ctrl-C
ends with one line: what finished and the command that resumes (``kvlab run --resume DIR``).
The command line is checked by ``experiments/preflight.py`` before torch is imported.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments import preflight
from experiments.atomic import write_json, write_parquet
from experiments.preflight import MODES, UserError, check_config  # noqa: F401 (check_config: public here too)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides: list[str]) -> DictConfig:
    """The configuration ``kvlab run`` would get from these overrides, for callers outside Hydra's
    app (validate-sim, reproduce, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=overrides)
log = logging.getLogger("kvlab.run")
# config keys that change how a run is shown or driven, not what it measures
VOLATILE_KEYS = ("progress", "resume", "report", "run_name", "experiment_name")


def git_commit() -> str:
    try:
        if os.environ.get("KVLAB_COMMIT"):  # a copy without .git (a device machine) is told its commit
            return os.environ["KVLAB_COMMIT"]
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def engine_config(cfg: DictConfig):
    """EngineConfig of a run; an engine key the engine does not know is a clear error."""
    import dataclasses

    from engine.config import EngineConfig

    eng = OmegaConf.to_container(cfg.engine, resolve=True)
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    # set at the top level of a run's config (one value for the engine and the rest of the run)
    top = {"model": "model=", "allocator": "allocator=", "allocator_args": "allocator.args.*", "seed": "seed=",
           "device": "device="}
    given = sorted(set(eng) & set(top))
    if given:
        raise ValueError(f"engine.{given[0]}: set by the run's own {top[given[0]]} (remove the engine. one)")
    unknown = sorted(set(eng) - known)
    if unknown:
        raise ValueError(f"engine option(s) {unknown} are not supported by this engine (engine/config.py "
                         f"EngineConfig knows {sorted(known - {'model', 'allocator', 'allocator_args'})})")
    # experiments read lengths and times, never text, and count only finished requests
    quiet = {k: False for k in ("detokenize", "stream_outputs") if k in known}
    try:
        return EngineConfig(model=cfg.model.path, allocator=cfg.allocator.name,
                            allocator_args=OmegaConf.to_container(cfg.allocator.args, resolve=True) or {},
                            device=cfg.device, seed=cfg.seed, **{**quiet, **eng})
    except ValueError as e:  # EngineConfig names its fields; a run's config has them under engine.
        first = re.match(r"\w+", str(e))
        if first and first.group() in eng:
            raise ValueError(f"engine.{e}") from None
        raise


def check_ranges(cfg: DictConfig) -> None:
    """What a run checks as it starts, as far as that needs no weights: its engine config, its
    allocator's arguments, its workload and (simulate) its settings; in simulate mode the run's
    own engine is built (no weights), so the allocator's ranges that hang on the model's KV
    layout and the pool are checked too. ValueError names the key and the fix."""
    from allocators.registry import allocator_class, checked_args
    from engine.config import checked_quietly
    from experiments.workloads import check_workload

    cfg, _ = applicable_config(cfg)
    econf = engine_config(cfg)
    checked_args(allocator_class(econf.allocator), dict(econf.allocator_args))
    if cfg.mode == "simulate":
        from experiments.simulate import SimSettings, _to_dict

        SimSettings.from_mapping(_to_dict(cfg.get("sim")))
        # the run's own simulated engine (no weights): allocator ranges that need the KV layout
        engine = checked_quietly(lambda: build_engine(cfg), f"the dry build of {cfg.get('run_name')}")
        if engine is None:
            return
        mc, max_len = engine.model_config, engine.max_model_len
    else:  # the pool of a real run is known only once its weights are loaded
        from engine.loader import resolve_config

        mc = resolve_config(econf.model, econf.hf_overrides)
        max_len = econf.resolved_max_model_len(mc)
    work = check_workload(OmegaConf.to_container(cfg.workload, resolve=True), mc.vocab_size, max_len)
    most = econf.step_sequences
    if work.beam_width > most:  # every live beam runs in each step (the engine refuses each request)
        raise ValueError(f"workload.beam_width={work.beam_width}: a step holds at most {most} sequences "
                         f"(engine.max_num_seqs={econf.max_num_seqs}, max_num_batched_tokens="
                         f"{econf.max_num_batched_tokens}): lower it or raise them")


def check_sweep_ranges(overrides: list[str]) -> None:
    """Every value of a sweep (``kvlab run -m``) through ``check_ranges`` before its first run starts:
    a bad value in its fifth run is not found after four have run."""
    probes = preflight.value_probes(overrides)
    # the keys whose line differs between probes (each probe holds every override, in one order)
    swept = {preflight._key_of(lines[0]) for lines in zip(*probes) if len(set(lines)) > 1}
    for probe in probes:
        try:
            check_ranges(preflight.compose(probe))
        except ValueError as e:
            # (a "sweep" of one value per key: every line of its one run)
            run = " ".join(line for line in probe if preflight._key_of(line) in swept or not swept)
            raise UserError(f"{e} (a run of this sweep: {run}); nothing has run") from None


OLD_GRAPH_MAX_TOKENS = 2048  # engine.cuda_graph_max_tokens before it became 8192 (2026-12-04)


def effective_graph_tokens(engine: dict) -> int | None:
    """``engine.config.graph_token_bound`` of an engine config as a dict (a resolved config's or a
    summary's ``cfg.engine.*``)."""
    from engine.config import graph_token_bound

    return graph_token_bound(engine.get("cuda_graph_max_tokens"), engine.get("max_num_batched_tokens"))


def summary_graph_tokens(summary: dict, default: int | None = None) -> int | None:
    """``effective_graph_tokens`` of a run's ``summary.json`` (its ``cfg.engine.*`` settings);
    ``default``: the bound where the summary records none."""
    return effective_graph_tokens({"cuda_graph_max_tokens": summary.get("cfg.engine.cuda_graph_max_tokens", default),
                                   "max_num_batched_tokens": summary.get("cfg.engine.max_num_batched_tokens")})


def config_hash(cfg: DictConfig) -> str:
    """What a run measures: the resolved config without the keys that only change its display."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for k in VOLATILE_KEYS:
        d.pop(k, None)
    if cfg.mode != "simulate":
        d.pop("sim", None)
    d.pop("repeats", None)  # each repeat is a run of its own seed: more repeats resume the first ones
    if (d.get("measure") or {}).get("warmup_s") is None:
        d.pop("measure", None)  # the default window: runs made before it existed keep their hash
    if (d.get("engine") or {}).get("async_scheduling") is False:
        d["engine"].pop("async_scheduling")  # likewise: synchronous runs made before the key existed
    eng = d.get("engine") or {}
    if "cuda_graph_max_tokens" in eng and effective_graph_tokens(eng) == effective_graph_tokens(
            {**eng, "cuda_graph_max_tokens": OLD_GRAPH_MAX_TOKENS}):
        # the same engine as under the old default (the engine caps it at the token budget): runs made
        # before the default moved keep their hash
        eng["cuda_graph_max_tokens"] = OLD_GRAPH_MAX_TOKENS
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flat_config(cfg: DictConfig) -> dict:
    """``cfg.<dotted key>`` columns of what a run measures (the report finds sweep axes in them)."""
    d = OmegaConf.to_container(cfg, resolve=True)
    out: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(node, list):
            out[prefix] = json.dumps(node)
        else:
            out[prefix] = node

    for key in ("mode", "seed", "model", "allocator", "workload", "engine"):
        if key in d:
            walk(f"cfg.{key}", d[key])
    if cfg.mode == "simulate" and "sim" in d:
        walk("cfg.sim", d["sim"])
    return out


def build_engine(cfg: DictConfig):
    """The engine for ``cfg.mode``: real model, or (simulate) the real scheduler and allocator only."""
    from engine.llm_engine import LLMEngine

    if cfg.mode == "simulate":
        from experiments.simulate import simulated_engine

        return simulated_engine(cfg, engine_config(cfg))
    return LLMEngine(engine_config(cfg))


class ResumeConflict(RuntimeError):
    """A run folder holds a finished run of another configuration."""


def _resume(summary_path: Path, cfg_hash: str) -> dict | None:
    done = _finished_run(summary_path, cfg_hash)
    if done is None:
        return None
    missing = missing_tables(summary_path.parent)
    if missing:  # a run's tables were removed (e.g. simulate's, not committed): make it again, its
        # old summary gone first, so that an interrupted rerun leaves an unfinished folder, not a mix
        log.info("running %s again: its %s is missing", summary_path.parent, " and ".join(missing))
        summary_path.unlink()
        return None
    return done


def _finished_run(summary_path: Path, cfg_hash: str) -> dict | None:
    """The summary at ``summary_path`` (None: none there); ResumeConflict where it is damaged or
    holds a run of another configuration."""
    if not summary_path.exists():
        return None
    try:
        done = json.loads(summary_path.read_text())
        if not isinstance(done, dict):
            raise ValueError(f"a JSON {type(done).__name__}, not an object")
    except (OSError, ValueError) as e:  # written last and whole by kvlab: edited or damaged since
        raise ResumeConflict(f"{summary_path} is not a run summary ({e}): delete it to make the run again, or "
                             "set resume=false to overwrite the folder") from None
    if done.get("config_hash", cfg_hash) != cfg_hash:
        raise ResumeConflict(
            f"{summary_path} holds a run of a different configuration (config_hash {done.get('config_hash')} "
            f"!= {cfg_hash}): give this run its own folder (hydra.run.dir / hydra.sweep.dir) or set resume=false "
            "to overwrite it")
    return done


def _check_run_folder(cfg: DictConfig, overrides: list[str]) -> None:
    """A run given a folder (``hydra.run.dir``) that holds a finished run of another configuration
    is refused before Hydra starts: Hydra would first rewrite the folder's ``.hydra`` files, and
    the folder would then resume as neither run."""
    dirs = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("hydra.run.dir=")]
    if not dirs or not cfg.get("resume", True):
        return
    folder = Path(dirs[-1]).expanduser()
    first = repeat_configs(cfg)[0]
    want = config_hash(applicable_config(first)[0])
    for path in (folder / "summary.json", folder / "rep0" / "summary.json"):
        _finished_run(path, want)  # ResumeConflict names the folder and the fix


def missing_tables(run_dir: Path) -> list[str]:
    """The tables a finished run writes before its summary.json that ``run_dir`` lacks."""
    return [n for n in ("steps.parquet", "requests.parquet") if not (Path(run_dir) / n).exists()]


HOST_TIER_DEFAULTS = {"host_kv_cache_memory": 0, "host_kv_cache_tokens": None, "host_tier_policy": "lru",
                      "host_transfer_blocks": 1}
# what a dropped engine key goes back to
ENGINE_DEFAULTS = {**HOST_TIER_DEFAULTS, "enable_prefix_caching": False, "preemption_mode": "recompute",
                   "swap_space": None}


def applicable_config(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """``cfg`` without the allocator options its allocator does not take but another one does
    (a sweep sets ``allocator.args.block_size`` for contiguous too), and what was dropped
    (keys as ``allocator.args.K`` / ``engine.K``). An option no allocator takes stays: the
    allocator refuses it, naming it. Likewise the host KV tier's engine settings go back to
    their defaults for an allocator without a host tier, and the tier's policy and granularity
    where the tier is off (a sweep of the tier off / on x granularity runs "off" once), and
    prefix caching for an allocator without a prefix cache (contiguous: it would run off, while
    the summary said on), and swap preemption (with its swap space) for an allocator that cannot
    swap (contiguous, virtual: the engine preempts them by recompute, while the summary said swap)."""
    import copy

    from omegaconf import open_dict

    options = preflight.allocator_options()
    mine = set(options.get(cfg.allocator.name, ()))
    anyone = {a for opts in options.values() for a in opts}
    args = cfg.allocator.get("args") or {}
    drop = {f"allocator.args.{k}": args[k] for k in list(args) if k not in mine and k in anyone}
    eng = cfg.get("engine") or {}
    tierless = cfg.allocator.name in options and "host_tier_tokens" not in mine
    off = not (eng.get("host_kv_cache_memory") or eng.get("host_kv_cache_tokens"))
    for k, default in HOST_TIER_DEFAULTS.items():
        if k in eng and eng[k] != default and (tierless or (off and k in ("host_tier_policy", "host_transfer_blocks"))):
            drop[f"engine.{k}"] = eng[k]
    if eng.get("enable_prefix_caching") and "enable_prefix_caching" not in mine:
        drop["engine.enable_prefix_caching"] = eng["enable_prefix_caching"]
    if cfg.allocator.name in options and "swap_space_tokens" not in mine:  # no swap: the engine recomputes
        if eng.get("preemption_mode") == "swap":
            drop["engine.preemption_mode"] = eng["preemption_mode"]
            if eng.get("swap_space") is not None:  # the host space of a swap that never happens
                drop["engine.swap_space"] = eng["swap_space"]
    if not drop or cfg.allocator.name not in options:
        return cfg, {}
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in drop:
            group, k = key.rsplit(".", 1)
            if group == "engine":
                cfg.engine[k] = ENGINE_DEFAULTS[k]
            else:
                del cfg.allocator.args[k]
    return cfg, drop


def _same_run_in(folder: Path, cfg_hash: str, me: Path) -> Path | None:
    """A finished run of the same configuration in ``folder`` (the sweep), other than ``me``
    (a repeated run is compared by its first repeat)."""
    for path in sorted([*folder.glob("*/summary.json"), *folder.glob("*/rep0/summary.json")]):
        if path.parent.resolve() == me.resolve():
            continue
        try:
            if json.loads(path.read_text()).get("config_hash") == cfg_hash:
                return path.parent
        except (OSError, ValueError):
            continue
    return None


def repeat_configs(cfg: DictConfig) -> list[DictConfig]:
    """One configuration per repeat (``repeats=N``): seeds ``seed``, ``seed+1``, ... (the
    workload's seed follows ``seed``)."""
    import copy

    from omegaconf import open_dict

    out = []
    for i in range(int(cfg.get("repeats", 1) or 1)):
        rep = copy.deepcopy(cfg)
        with open_dict(rep):
            rep.seed = int(cfg.seed) + i
        out.append(rep)
    return out


def run_experiment(cfg: DictConfig, out_dir: str | Path, sweep_dir: str | Path | None = None) -> dict:
    """Run one experiment into ``out_dir``; summary.json is written last and marks completion.

    With ``repeats=N`` (N > 1) the experiment runs N times, seeds ``seed`` .. ``seed+N-1``,
    into ``out_dir/rep0`` .. ``rep{N-1}``, each a complete run folder (resumed one by one); the
    result is ``{"repeats": [summary, ...]}``. A repeat that fails or is interrupted leaves no
    folder; the ones before it stay.

    With ``sweep_dir``, a run whose configuration a finished run there already has is not run
    again: the result is ``{"duplicate_of": that folder}``.
    """
    out = Path(out_dir)
    check_config(cfg)
    reps = repeat_configs(cfg)
    if len(reps) == 1:
        return _run_one(cfg, out, sweep_dir)
    summaries = []
    for i, rep in enumerate(reps):
        rep_dir = out / f"rep{i}"
        try:
            summary = _run_one(rep, rep_dir, sweep_dir if i == 0 else None, repeat=(i, len(reps)))
        except BaseException:
            _remove_unfinished(rep_dir)
            raise
        if "duplicate_of" in summary:  # the first repeat repeats another run: so do the others
            shutil.rmtree(rep_dir, ignore_errors=True)
            return summary
        summaries.append(summary)
    return {"repeats": summaries}


def _run_one(cfg: DictConfig, out: Path, sweep_dir: str | Path | None = None,
             repeat: tuple[int, int] | None = None) -> dict:
    """One run of one seed into ``out`` (``repeat``: its index and the number of repeats)."""
    cfg, dropped = applicable_config(cfg)
    if dropped:
        log.info("%s ignores %s", cfg.allocator.name, ", ".join(f"{k}={v}" for k, v in dropped.items()))
    summary_path = out / "summary.json"
    cfg_hash = config_hash(cfg)
    if cfg.get("resume", True):
        done = _resume(summary_path, cfg_hash)
        if done is not None:
            log.info("skipping %s: summary.json exists (resume=true)", out)
            return done
    same = _same_run_in(Path(sweep_dir), cfg_hash, out) if sweep_dir else None
    if same is not None:
        log.info("skipping %s: the same run as %s (not run twice)", out.name, same.name)
        return {"duplicate_of": str(same), "config_hash": cfg_hash}

    import torch

    from experiments.driver import cyclic_gc_paused, drive
    from experiments.metrics import WindowRule, host_tier_summary, requests_frame, summarize, write_steps
    from experiments.workloads import at_time_zero, make_workload, tokenize_requests

    wall0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    # simulate: the cyclic collector rests until the run is written (cyclic_gc_paused says why)
    with cyclic_gc_paused(cfg.mode == "simulate"):
        engine = build_engine(cfg)
        try:
            workload = OmegaConf.to_container(cfg.workload, resolve=True)
            specs = make_workload(workload, engine.model_config.vocab_size, engine.max_model_len)
            if cfg.mode == "offline":  # a throughput run: a trace's arrival_s are for online and simulate
                specs = at_time_zero(specs)
            last = max((s.arrival_s for s in specs), default=0.0)  # (tokenizing keeps the arrivals)
            if workload.get("name") == "trace" and cfg.mode == "online" and last > preflight.MAX_ONLINE_SPAN_S:
                raise ValueError(f"workload.trace_path: arrival_s up to {last:g} s, but mode=online waits for "
                                 f"arrivals in real time (at most {preflight.MAX_ONLINE_SPAN_S:g} s): replay the trace "
                                 "with mode=simulate, or shorten its arrivals")
            specs = tokenize_requests(specs, engine.tokenizer.encode, engine.max_model_len)
            bar = None
            if cfg.get("progress", True):
                from tqdm import tqdm

                bar = tqdm(total=len(specs), desc=str(cfg.run_name), unit="req", leave=False, mininterval=0.5)
            try:
                t0, t_end = drive(engine, specs, seed=cfg.seed, advance_idle=getattr(engine, "advance_idle", None),
                                  on_finish=bar.update if bar else None)
            finally:
                if bar:
                    bar.close()
            requests = requests_frame(engine.finished_requests, t0)
            summary = summarize(requests, None, t_end - t0)  # the step figures come from write_steps
            summary.update(engine.accountant.summary())
            # steps.parquet streamed chunk by chunk (written before summary.json, which marks completion)
            window = WindowRule(last_arrival_s=last,
                                warmup_s=(cfg.get("measure") or {}).get("warmup_s"))
            summary.update(write_steps(out / "steps.parquet", engine.step_records, engine.accountant, t0,
                                       engine.logical_tokens, engine.config.max_num_batched_tokens,
                                       engine.config.max_num_seqs, window))
            sim = cfg.mode == "simulate"
            summary.update(
                run_id=out.name,
                allocator=cfg.allocator.name,
                allocator_label=cfg.allocator.label,
                allocator_args=OmegaConf.to_container(cfg.allocator.args, resolve=True),
                model=cfg.model.name,
                workload=cfg.workload.name,
                mode=cfg.mode,
                request_rate=float(cfg.workload.get("request_rate", math.inf)),
                device=f"simulated {engine.sim_device}" if sim else device_name(engine.device),
                git_commit=git_commit(),
                time=dt.datetime.now().isoformat(timespec="seconds"),
                seed=cfg.seed,
                **({"repeat": repeat[0], "repeats": repeat[1]} if repeat else {}),
                kv_capacity_tokens=engine.kv_capacity_tokens,
                **engine.kv_memory_summary(),  # tensor_parallel_size, KV bytes per GPU and over all GPUs
                prefix_cache_hit_rate=engine.scheduler.prefix_cache_hit_rate,  # as the server's /metrics
                **host_tier_summary(engine.scheduler, engine.allocator.host_tier),
                max_model_len=engine.max_model_len,
                wall_time_s=time.perf_counter() - wall0,
                config_hash=cfg_hash,
                **flat_config(cfg),
            )
            if sim:
                summary["simulated_busy_s"] = engine.runner.busy_s
                summary.update(getattr(engine, "sim_summary", {}))  # the cost model and profile it used
        finally:
            engine.close()
        write_parquet(out / "requests.parquet", requests)
        write_json(summary_path, summary)
    if cfg.get("report", True):
        from experiments.report import write_run_plots

        write_run_plots(out)
    saturated = summary.get("token_states_saturated")
    waiting = ("" if saturated is None or not math.isfinite(saturated)
               else f" ({100 * saturated:.1f}% while requests wait)")
    log.info("%s: %.1f output tok/s, token_states %.1f%%%s, %d preemptions, %.1f s -> %s", cfg.run_name,
             summary.get("output_throughput", 0), 100 * summary.get("token_states", 0), waiting,
             summary.get("preemptions", 0), summary["wall_time_s"], out)
    failed = summary.get("num_failed_requests", 0)
    if failed:  # the run finished, but its figures count requests that ended in an error
        log.warning("%s: %d of %d requests failed (finish_reason=error; run.log says why): the figures count them",
                    cfg.run_name, failed, summary.get("num_requests", 0))
    return summary


# ---------------------------------------------------------------------------- the command

@dataclass
class Session:
    """What this ``kvlab run`` process did, for its closing line (or the Ctrl-C line)."""
    argv: list[str] = field(default_factory=list)  # as the user typed it, for the resume command
    verbose: bool = False
    num_runs: int | None = None  # known for sweeps given on the command line
    sweep_dir: str | None = None
    run_dir: str | None = None
    finished: list[str] = field(default_factory=list)  # run now or earlier (skipped: resumed)
    duplicates: list[str] = field(default_factory=list)
    failed: list[tuple[str, BaseException]] = field(default_factory=list)


SESSION = Session()
# files a run writes (and Hydra's); a folder holding only these and no summary.json is removed
_RUN_FILES = {".hydra", "run.log", "requests.parquet", "steps.parquet", "kv_usage_over_time.png"}


def _remove_unfinished(out: Path) -> bool:
    """Remove a run folder that holds no result (and nothing that is not a run's): True if gone."""
    if not out.is_dir() or (out / "summary.json").exists():
        return False
    if any(p.name not in _RUN_FILES and not p.name.endswith(".tmp") for p in out.iterdir()):
        return False  # someone else's files: leave them
    shutil.rmtree(out, ignore_errors=True)
    if out.exists():
        return False
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", out.parent.name):  # the dated folder Hydra made for it,
        try:                                                     # if nothing else is there
            out.parent.rmdir()
        except OSError:
            pass
    return True


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    if sweep:
        SESSION.sweep_dir = str(hc.sweep.dir)
    else:
        SESSION.run_dir = str(out)
    try:
        summary = run_experiment(cfg, out, sweep_dir=hc.sweep.dir if sweep else None)
    except KeyboardInterrupt:
        log.warning("%s: interrupted, no results written", cfg.get("run_name", out.name))
        raise
    except Exception as e:  # noqa: BLE001 - one run fails, the sweep goes on; reported at the end
        SESSION.failed.append((out.name, e))
        log.error("%s failed: %s", cfg.get("run_name", out.name), _one_line(e))
        if SESSION.verbose or os.environ.get("HYDRA_FULL_ERROR") == "1":
            log.error("%s", "".join(traceback.format_exception(e)))
        _remove_unfinished(out)
        _tell_parent("failed", out, e)
        return
    if "duplicate_of" in summary:
        SESSION.duplicates.append(out.name)
        _remove_unfinished(out)
        _tell_parent("duplicate", out)
    else:
        SESSION.finished.append(out.name)
        _tell_parent("finished", out)


# A launcher that runs a sweep's jobs in other processes (hydra/launcher=parallel: loky workers) returns
# nothing of them to `cli`: each worker writes what became of its job into this folder (made by `cli`,
# outside the results), and `cli` reads it for its closing lines and exit code.
JOBS_ENV, JOBS_PID_ENV = "KVLAB_SWEEP_JOBS", "KVLAB_SWEEP_PID"


class WorkerFailure(Exception):
    """A run that failed in a launcher's worker process, as `cli` learns of it."""

    def __init__(self, line: str, user: bool):
        super().__init__(line)
        self.line, self.user = line, user


def _tell_parent(status: str, out: Path, error: BaseException | None = None) -> None:
    """In a launcher's worker process, what became of the job in ``out``, for ``cli`` (``_hear_workers``)."""
    folder = os.environ.get(JOBS_ENV)
    if not folder or os.environ.get(JOBS_PID_ENV) == str(os.getpid()):  # cli's own process: SESSION has it
        return
    record = {"status": status, "name": out.name, "sweep_dir": SESSION.sweep_dir, "run_dir": SESSION.run_dir}
    if error is not None:
        record.update(line=_one_line(error), user=_users_fault(error))
    try:
        write_json(Path(folder) / f"{os.getpid()}-{time.time_ns()}.json", record)
    except OSError as e:  # the run's own outcome stands; only the closing lines miss it
        log.warning("could not tell kvlab run about %s (%s)", out.name, e)


def _users_fault(e: BaseException) -> bool:
    """A run's failure from its settings (exit 2), not from kvlab (exit 1); a worker's, as it said."""
    return isinstance(e, (ValueError, ResumeConflict)) or (isinstance(e, WorkerFailure) and e.user)


def _hear_workers(session: Session, folder: Path) -> None:
    """What the launcher's worker processes did (``_tell_parent``), into ``session``."""
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        session.sweep_dir = session.sweep_dir or rec.get("sweep_dir")
        session.run_dir = session.run_dir or rec.get("run_dir")
        if rec.get("status") == "failed":
            session.failed.append((rec["name"], WorkerFailure(rec.get("line", ""), bool(rec.get("user")))))
        else:
            (session.duplicates if rec.get("status") == "duplicate" else session.finished).append(rec["name"])


def _one_line(e: BaseException) -> str:
    """The first line of an error; its type too unless it is a ValueError (a bad setting)."""
    if isinstance(e, WorkerFailure):  # already one line, in the worker
        return e.line
    lines = str(e).strip().splitlines()
    if not lines:
        return repr(e)
    return lines[0] if isinstance(e, ValueError) else f"{type(e).__name__}: {lines[0]}"


def _resume_argv(resume_dir: Path) -> list[str]:
    """The command line of the sweep (or run) in ``resume_dir``, pointed at that folder."""
    sweep_file = resume_dir / "multirun.yaml"
    if sweep_file.is_file():
        try:
            hydra_cfg = OmegaConf.load(sweep_file).hydra
            keep = [o for o in hydra_cfg.overrides.hydra if not str(o).startswith(("hydra.sweep.dir", "hydra.mode"))]
            return ["-m", *map(str, hydra_cfg.overrides.task), *map(str, keep), f"hydra.sweep.dir={resume_dir}"]
        except Exception as e:  # a file kvlab wrote, since edited or cut short
            raise UserError(f"--resume {resume_dir}: {sweep_file} is not the sweep file kvlab wrote ({_why(e)}); "
                            "run the sweep again with its command line and hydra.sweep.dir= that folder") from None
    run_file = resume_dir / ".hydra" / "overrides.yaml"
    if run_file.is_file():
        try:
            lines = OmegaConf.load(run_file)
            if not OmegaConf.is_list(lines):
                raise ValueError("not a list of overrides")
            return [*map(str, lines), f"hydra.run.dir={resume_dir}"]
        except Exception as e:
            raise UserError(f"--resume {resume_dir}: {run_file} is not the list of overrides kvlab wrote ({_why(e)}); "
                            "run it again with its command line and hydra.run.dir= that folder") from None
    raise UserError(f"--resume {resume_dir}: no sweep (multirun.yaml) or run (.hydra/overrides.yaml) there")


def _check_resume_extras(resume_dir: Path, resumed: list[str], extra: list[str]) -> None:
    """``--resume DIR`` goes on with DIR's own command line; overrides given beside it may change how
    it runs (progress=false, hydra/launcher=parallel), not what its runs measure: Hydra would first
    write them into DIR's multirun.yaml (the command --resume reads), then every finished run would
    conflict with its folder and new runs of the other configuration would join the old ones."""
    _, more = preflight.split_args(extra)
    if not more:
        return
    _, base = preflight.split_args(resumed)

    def runs(overrides: list[str]) -> list[str]:  # what each run (of a large sweep: each value) measures
        return [config_hash(applicable_config(repeat_configs(preflight.compose(probe))[0])[0])
                for probe in preflight.value_probes(preflight.prepare(overrides).overrides)]

    if runs(base) != runs([*base, *more]):
        raise UserError(f"--resume {resume_dir} goes on with that folder's own settings, and {' '.join(more)} "
                        "changes what its runs measure (or which runs it makes): run it with that change into a "
                        "new folder (hydra.sweep.dir / hydra.run.dir), or resume without it")


def _why(e: Exception) -> str:
    """An exception in one line: its type and its message's first line."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _resume_command(session: Session) -> str:
    """The command that continues what this process did: the folder's own command line (finished
    runs are skipped), or the command as typed if Hydra had not made a folder yet."""
    folder = session.sweep_dir or session.run_dir
    if folder:
        return f"kvlab run --resume {shlex.quote(folder)}"
    return shlex.join(["kvlab", "run", *session.argv])


def _interrupted_line(session: Session) -> str:
    if session.sweep_dir:
        done, total = len(session.finished), session.num_runs
        runs = "run" if (total or done) == 1 else "runs"
        what = f"{done}{f' of {total}' if total else ''} {runs} finished in {session.sweep_dir}"
    else:
        what = "the run did not finish"
    return f"kvlab run: interrupted; {what}; to resume: {_resume_command(session)}"


def cli(argv: list[str]) -> int:
    """``kvlab run [--verbose] [--resume DIR] [-m] [overrides]``: checks, then Hydra; exit 2 for a
    user error, 1 if a run failed, 130 after Ctrl-C."""
    global SESSION
    verbose = "--verbose" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    argv = [a for a in argv if a != "--verbose"]
    SESSION = Session(argv=list(argv), verbose=verbose)
    try:
        if "--resume" in argv:
            i = argv.index("--resume")
            if i + 1 >= len(argv):
                raise UserError("--resume needs the folder of a sweep or run: kvlab run --resume runs/multirun/...")
            resumed, extra = _resume_argv(Path(argv[i + 1])), [*argv[:i], *argv[i + 2:]]
            _check_resume_extras(Path(argv[i + 1]), resumed, extra)
            argv = [*argv[:i], *resumed, *argv[i + 2:]]
        flags, overrides = preflight.split_args(argv)
        if not preflight.HYDRA_INFO_FLAGS.intersection(flags):
            prepared = preflight.prepare(overrides)
            SESSION.num_runs = prepared.num_runs
            overrides = prepared.overrides
            for o in overrides:  # a folder given for the results must take them (Hydra would crash)
                key, _, value = o.lstrip("+").partition("=")
                if key in ("hydra.run.dir", "hydra.sweep.dir") and value:
                    preflight.check_folder(key, Path(value), sep="=")
            if {"-m", "--multirun"} & set(flags) and prepared.num_runs != 1:
                check_sweep_ranges(overrides)
            elif prepared.num_runs == 1:  # one run: its bad value in one line too, before Hydra starts
                try:
                    cfg = preflight.compose(overrides)
                    check_ranges(cfg)
                    _check_run_folder(cfg, overrides)
                except (ValueError, ResumeConflict) as e:
                    raise UserError(str(e)) from None
    except UserError as e:
        if verbose:
            traceback.print_exc()
        print(f"kvlab run: {e}", file=sys.stderr)
        return 2
    if verbose:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = ["kvlab run", *flags, *overrides]
    import tempfile

    # what a launcher's worker processes did; one folder per process, since loky keeps its workers
    # (and the environment they started with) for the next sweep of the same process
    jobs = Path(tempfile.gettempdir()) / f"kvlab-jobs-{os.getpid()}"
    shutil.rmtree(jobs, ignore_errors=True)
    jobs.mkdir(mode=0o700)
    os.environ[JOBS_ENV], os.environ[JOBS_PID_ENV] = str(jobs), str(os.getpid())
    try:
        main()
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        _hear_workers(SESSION, jobs)
        print(f"\n{_interrupted_line(SESSION)}", file=sys.stderr)
        return 130
    else:
        _hear_workers(SESSION, jobs)
    finally:
        os.environ.pop(JOBS_ENV, None)
        os.environ.pop(JOBS_PID_ENV, None)
        shutil.rmtree(jobs, ignore_errors=True)
    if SESSION.duplicates:
        log.info("%d run(s) of this sweep have the configuration of an earlier one (the same values, or the same "
                 "once options their allocator does not take are dropped): not run twice (%s)",
                 len(SESSION.duplicates), ", ".join(SESSION.duplicates))
    if SESSION.failed:
        lines = [f"  {name}: {_one_line(e)}" for name, e in SESSION.failed]
        ran = len(SESSION.failed) + len(SESSION.finished)
        print(f"kvlab run: {len(SESSION.failed)} of {ran} run(s) failed, no results written:\n"
              + "\n".join(lines) + ("" if verbose else "\n(--verbose shows the tracebacks)"), file=sys.stderr)
        user = all(_users_fault(e) for _, e in SESSION.failed)
        return 2 if user else 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
