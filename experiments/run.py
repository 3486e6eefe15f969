"""``kvlab run``: one experiment (or a sweep with -m), results written atomically per run folder."""
from __future__ import annotations

import datetime as dt
import logging
import platform
import subprocess
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.atomic import write_json, write_parquet

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("kvlab.run")
MODES = ("offline", "online", "simulate")


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
    from engine.config import EngineConfig

    eng = OmegaConf.to_container(cfg.engine, resolve=True)
    return EngineConfig(model=cfg.model.path, allocator=cfg.allocator.name,
                        allocator_args=OmegaConf.to_container(cfg.allocator.args, resolve=True) or {},
                        device=cfg.device, seed=cfg.seed, **eng)


def build_engine(cfg: DictConfig):
    """The engine for ``cfg.mode``: real model, or (simulate) the real scheduler and allocator only."""
    from engine.llm_engine import LLMEngine

    if cfg.mode == "simulate":
        from experiments.simulate import simulated_engine

        return simulated_engine(cfg, engine_config(cfg))
    return LLMEngine(engine_config(cfg))


def run_experiment(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run one experiment into ``out_dir``; summary.json is written last and marks completion."""
    import torch
    from experiments.driver import drive
    from experiments.metrics import requests_frame, steps_frame, summarize
    from experiments.workloads import make_workload, tokenize_requests

    out = Path(out_dir)
    if cfg.mode not in MODES:
        raise ValueError(f"mode '{cfg.mode}' is unknown: choose one of {MODES}")
    summary_path = out / "summary.json"
    if cfg.get("resume", True) and summary_path.exists():
        log.info("skipping %s: summary.json exists (resume=true)", out)
        import json

        return json.loads(summary_path.read_text())
    torch.manual_seed(cfg.seed)
    engine = build_engine(cfg)
    workload = OmegaConf.to_container(cfg.workload, resolve=True)
    specs = make_workload(workload, engine.model_config.vocab_size, engine.max_model_len)
    specs = tokenize_requests(specs, engine.tokenizer.encode, engine.max_model_len)
    bar = None
    if cfg.get("progress", True):
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc=f"{cfg.run_name}", unit="req", leave=False)
    t0, t_end = drive(engine, specs, seed=cfg.seed, advance_idle=getattr(engine, "advance_idle", None),
                      on_finish=bar.update if bar else None)
    if bar:
        bar.close()
    requests = requests_frame(engine.finished_requests, t0)
    steps = steps_frame(engine.step_records, engine.accountant.table(), engine.accountant.capacity, t0)
    summary = summarize(requests, steps, t_end - t0)
    summary.update(engine.accountant.summary())
    summary.update(
        run_id=out.name,
        allocator=cfg.allocator.name,
        allocator_label=cfg.allocator.label,
        allocator_args=OmegaConf.to_container(cfg.allocator.args, resolve=True),
        model=cfg.model.name,
        workload=cfg.workload.name,
        mode=cfg.mode,
        device=device_name(engine.device) if cfg.mode != "simulate" else f"simulated {engine.sim_device}",
        git_commit=git_commit(),
        time=dt.datetime.now().isoformat(timespec="seconds"),
        seed=cfg.seed,
        kv_capacity_tokens=engine.kv_capacity_tokens,
        prefix_cache_hit_rate=float(getattr(engine.allocator, "prefix_cache_hit_rate", 0.0)),
        max_model_len=engine.max_model_len,
    )
    write_parquet(out / "requests.parquet", requests)
    write_parquet(out / "steps.parquet", steps)
    write_json(summary_path, summary)
    if cfg.get("report", True):
        from experiments.report import write_run_plots

        write_run_plots(out)
    log.info("%s: %.1f output tok/s, token_states %.1f%%, %d preemptions -> %s", cfg.run_name,
             summary.get("output_throughput", 0), 100 * summary.get("token_states", 0),
             summary.get("preemptions", 0), out)
    return summary


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_experiment(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
