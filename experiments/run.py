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
import json
import logging
import math
import os
import shutil
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
# the configuration and the run folder, in modules of their own; _run_one calls build_engine through
# this module (tests and benchmarks replace run.build_engine)
from experiments.run_config import (CONF_DIR, applicable_config, build_engine, check_ranges, check_sweep_ranges,
                                    compose, config_hash, device_name, engine_config, flat_config, git_commit,
                                    repeat_configs, summary_graph_tokens)
from experiments.run_resume import (ResumeConflict, _check_resume_extras, _check_run_folder, _interrupted_line,
                                    _remove_unfinished, _resume, _resume_argv, _same_run_in, missing_tables)

# what other code imports from here
__all__ = ["CONF_DIR", "MODES", "ResumeConflict", "_resume", "applicable_config", "build_engine", "check_config",
           "check_ranges", "cli", "compose", "config_hash", "engine_config", "flat_config", "git_commit", "main",
           "missing_tables", "run_experiment", "summary_graph_tokens"]

log = logging.getLogger("kvlab.run")


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
