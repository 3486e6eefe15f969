"""``kvlab run``: one experiment (or a sweep with -m), results written atomically per run folder.

Modes (``mode=``):
- ``offline``: every request at t=0 (``workload.request_rate`` must be inf): throughput.
- ``online``: requests arrive at ``workload.request_rate`` (Poisson or gamma): latency vs rate.
- ``simulate``: the real scheduler and allocator, no model compute; the roofline cost model
  of ``sim=<device>`` advances a virtual clock (experiments/simulate.py). Arrivals as the
  workload says (all at t=0 when the rate is inf).

A run folder is complete when its ``summary.json`` exists (written last). With
``resume=true`` a run whose summary.json exists is skipped, provided it was made with the
same configuration (``config_hash``); a different one is an error, never a silent skip.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import platform
import subprocess
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.atomic import write_json, write_parquet

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("kvlab.run")
MODES = ("offline", "online", "simulate")
# config keys that change how a run is shown or driven, not what it measures
VOLATILE_KEYS = ("progress", "resume", "report", "run_name", "experiment_name")


def git_commit() -> str:
    try:
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
    unknown = sorted(set(eng) - known)
    if unknown:
        raise ValueError(f"engine option(s) {unknown} are not supported by this engine (engine/config.py "
                         f"EngineConfig knows {sorted(known - {'model', 'allocator', 'allocator_args'})})")
    # experiments read lengths and times, never text, and count only finished requests
    quiet = {k: False for k in ("detokenize", "stream_outputs") if k in known}
    return EngineConfig(model=cfg.model.path, allocator=cfg.allocator.name,
                        allocator_args=OmegaConf.to_container(cfg.allocator.args, resolve=True) or {},
                        device=cfg.device, seed=cfg.seed, **{**quiet, **eng})


def check_config(cfg: DictConfig) -> None:
    """Mode, arrivals and model must agree before anything is built."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode '{cfg.mode}' is unknown: choose one of {MODES}")
    rate = float(cfg.workload.get("request_rate", math.inf))
    if cfg.mode == "offline" and math.isfinite(rate):
        raise ValueError(f"mode=offline sends every request at t=0 but workload.request_rate={rate}: "
                         "use mode=online (or simulate) for arrivals at a rate, or request_rate=inf")
    if cfg.mode == "online" and not math.isfinite(rate):
        raise ValueError("mode=online needs arrivals over time: set workload.request_rate (req/s), "
                         "e.g. workload.request_rate=4")
    if cfg.model.get("shape") and cfg.mode != "simulate":
        from engine.presets import PRESETS

        if cfg.model.path not in PRESETS and not Path(cfg.model.path).is_dir():
            raise ValueError(f"model '{cfg.model.name}' is a simulate-only shape (no weights here): "
                             "use mode=simulate, or set model.path to a local HF directory")


def config_hash(cfg: DictConfig) -> str:
    """What a run measures: the resolved config without the keys that only change its display."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for k in VOLATILE_KEYS:
        d.pop(k, None)
    if cfg.mode != "simulate":
        d.pop("sim", None)
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


class _LogicalTokens:
    """Wraps a runner: at each executed step, the tokens live sequences hold (one count per
    holder), read at the moment the engine records memory (after scheduling, before compute)."""

    def __init__(self, runner, engine):
        self._runner, self._engine = runner, engine
        self.counts: dict[int, int] = {}

    def execute(self, batch):
        e = self._engine
        alloc = e.allocator
        self.counts[e.accountant.num_steps - 1] = sum(alloc.num_tokens(s) for s in e.scheduler.running)
        return self._runner.execute(batch)

    def __getattr__(self, name):
        return getattr(self._runner, name)


def build_engine(cfg: DictConfig):
    """The engine for ``cfg.mode``: real model, or (simulate) the real scheduler and allocator only."""
    from engine.llm_engine import LLMEngine

    if cfg.mode == "simulate":
        from experiments.simulate import simulated_engine

        return simulated_engine(cfg, engine_config(cfg))
    return LLMEngine(engine_config(cfg))


def _resume(summary_path: Path, cfg_hash: str) -> dict | None:
    if not summary_path.exists():
        return None
    done = json.loads(summary_path.read_text())
    if done.get("config_hash", cfg_hash) != cfg_hash:
        raise RuntimeError(
            f"{summary_path} holds a run of a different configuration (config_hash {done.get('config_hash')} "
            f"!= {cfg_hash}): give this run its own folder (hydra.run.dir / hydra.sweep.dir) or set resume=false "
            "to overwrite it")
    return done


def run_experiment(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run one experiment into ``out_dir``; summary.json is written last and marks completion."""
    import torch

    from experiments.driver import drive
    from experiments.metrics import memory_summary, requests_frame, steps_frame, summarize
    from experiments.workloads import make_workload, tokenize_requests

    out = Path(out_dir)
    check_config(cfg)
    summary_path = out / "summary.json"
    cfg_hash = config_hash(cfg)
    if cfg.get("resume", True):
        done = _resume(summary_path, cfg_hash)
        if done is not None:
            log.info("skipping %s: summary.json exists (resume=true)", out)
            return done
    wall0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    engine = build_engine(cfg)
    try:
        probe = engine.runner = _LogicalTokens(engine.runner, engine)
        workload = OmegaConf.to_container(cfg.workload, resolve=True)
        specs = make_workload(workload, engine.model_config.vocab_size, engine.max_model_len)
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
        steps = steps_frame(engine.step_records, engine.accountant.table(), engine.accountant.capacity, t0,
                            probe.counts)
        summary = summarize(requests, steps, t_end - t0)
        summary.update(engine.accountant.summary())
        summary.update(memory_summary(steps, engine.accountant.bpt, engine.config.max_num_batched_tokens,
                                      engine.config.max_num_seqs))
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
            kv_capacity_tokens=engine.kv_capacity_tokens,
            prefix_cache_hit_rate=float(getattr(engine.allocator, "prefix_cache_hit_rate", 0.0)),
            max_model_len=engine.max_model_len,
            wall_time_s=time.perf_counter() - wall0,
            config_hash=cfg_hash,
            **flat_config(cfg),
        )
        if sim:
            summary["simulated_busy_s"] = engine.runner.busy_s
    finally:
        engine.allocator.close()
    write_parquet(out / "requests.parquet", requests)
    write_parquet(out / "steps.parquet", steps)
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
    return summary


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_experiment(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
