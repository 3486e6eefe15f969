"""What a run folder already holds and how a run or sweep goes on: finished runs resumed or
refused (``ResumeConflict``), unfinished folders removed, ``kvlab run --resume DIR``'s command
line, and the Ctrl-C line that names it."""
from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from experiments import preflight
from experiments.preflight import UserError
from experiments.run_config import applicable_config, config_hash, repeat_configs

if TYPE_CHECKING:
    from experiments.run import Session

log = logging.getLogger("kvlab.run")


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
