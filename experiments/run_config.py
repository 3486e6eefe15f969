"""A run's configuration and identity: the Hydra config composed (``compose``), checked
(``check_ranges``, ``check_sweep_ranges``), turned into an engine config and engine
(``engine_config``, ``build_engine``), cut to what its allocator takes (``applicable_config``),
split into repeats, and hashed (``config_hash``) and flattened (``flat_config``) for its summary."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments import preflight
from experiments.preflight import UserError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides: list[str]) -> DictConfig:
    """The configuration ``kvlab run`` would get from these overrides, for callers outside Hydra's
    app (validate-sim, reproduce, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


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
