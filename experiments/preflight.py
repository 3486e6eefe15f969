"""``kvlab run`` overrides checked before anything heavy is imported (torch takes seconds).

A user error is a :class:`UserError`: one or two lines that name the key, the allowed values
and a close match. The checks compose the configuration with Hydra's compose API (tens of
milliseconds) for every combination of a sweep, so a typo in the fifth run of a sweep is found
before the first one starts.

Three rewrites happen here too, so Hydra sees plain overrides:

- ``model=DIR`` (a local HF directory, relative or absolute) becomes
  ``model=hf_dir model.path=/abs/DIR`` (named after the directory by conf/model/hf_dir.yaml);
- ``allocator.args.KEY=V`` for an option some allocator takes becomes ``++allocator.args.KEY=V``,
  so it may be set for every allocator of a sweep; an allocator that does not take it drops it
  when the run starts (``experiments.run_config.applicable_config``), with one log line;
- ``run_name=null`` is left out (null: unset, the default name), not a folder named ``...-None``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from allocators import ENGINE_SETS
from allocators.checks import is_int, is_real
# what conf/ offers, Hydra's flags and UserError live in preflight_conf.py; the rewrites and the override
# parsing in preflight_rewrites.py
from experiments.preflight_conf import (
    CHOICES, CONF_DIR, ENGINE_PROVIDED, HYDRA_INFO_FLAGS, INFO_VALUES, MODES, ROOT, VALUE_FLAGS, UserError,
    _choices_text, allocator_options, did_you_mean, group_choices, is_group, model_presets, split_args,
)
from experiments.preflight_rewrites import (
    _existing_dir, _given, _looks_like_path, _parse, _quote, _values, rewrite_allocator_args, rewrite_model,
    rewrite_run_name,
)

__all__ = [
    "CHOICES", "CLOSED_SECTIONS", "CONF_DIR", "ENGINE_PROVIDED", "ENGINE_SETS", "HYDRA_INFO_FLAGS", "INFO_VALUES",
    "LAUNCHER_COMMANDS", "LAUNCHER_PLUGINS", "MAX_COMPOSED", "MAX_ONLINE_SPAN_S", "MODES", "READ_WHERE_SET", "ROOT",
    "VALUE_FLAGS", "Prepared", "UserError", "allocator_options", "check_choices", "check_config", "check_folder",
    "check_groups", "check_launcher", "compose", "compose_named", "did_you_mean", "group_choices", "is_group",
    "model_presets", "prepare", "register_resolvers", "rewrite_allocator_args", "rewrite_model", "rewrite_run_name",
    "split_args", "value_probes", "_choices_text", "_existing_dir", "_given", "_looks_like_path", "_parse", "_quote",
    "_values",
]

MAX_COMPOSED = 32  # sweep combinations composed one by one; beyond that, one per group choice


def register_resolvers() -> None:
    """``${kvlab.basename:PATH}`` (conf/model/hf_dir.yaml names a run after its directory).
    Registered on import: every module that composes kvlab's configuration imports this one."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("kvlab.basename"):
        OmegaConf.register_new_resolver("kvlab.basename", lambda path: Path(str(path)).name)


register_resolvers()


@dataclass
class Prepared:
    """The overrides Hydra gets, and how many runs they make (None: a preset's sweep decides)."""
    overrides: list[str]
    num_runs: int | None = 1


# ---------------------------------------------------------------------------- checks

def check_groups(ovs) -> None:
    for ov in ovs:
        key = ov.key_or_group
        if key.startswith("hydra") or not is_group(key) or ov.type.name == "DEL":
            continue
        options = group_choices(key)
        shown = {"ADD": "+", "FORCE_ADD": "++"}.get(ov.type.name, "") + key
        for v in _values(ov):
            if v not in options:
                raise UserError(f"{shown}={v}: no such choice (conf/{key}/{v}.yaml); choose one of "
                                f"{_choices_text(options)}{did_you_mean(v, options, shown + '=')}")


# launchers of conf/hydra/launcher that need a Hydra plugin kvlab does not install: (module, pip name)
LAUNCHER_PLUGINS = {"slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")}
# ... and a scheduler command on PATH (submitit submits with it: without, a traceback from deep inside)
LAUNCHER_COMMANDS = {"slurm": ("sbatch", "SLURM")}


def check_launcher(ovs) -> None:
    """``hydra/launcher=slurm`` without its plugin (Hydra says only that a config could not be loaded) or
    off a cluster (submitit's FileNotFoundError for sbatch, after the sweep folder is made)."""
    import shutil

    for ov in ovs:
        if ov.key_or_group != "hydra/launcher":
            continue
        for v in _values(ov):
            module, package = LAUNCHER_PLUGINS.get(v, (None, None))
            if module and not _importable(module):
                raise UserError(f"hydra/launcher={v} needs the Hydra plugin {package}, not installed here: "
                                f"pip install {package}")
            command, scheduler = LAUNCHER_COMMANDS.get(v, (None, None))
            if command and shutil.which(command) is None:
                raise UserError(f"hydra/launcher={v} submits each run with {scheduler}'s {command}, not on PATH here: "
                                f"run kvlab on a {scheduler} login node, or drop hydra/launcher={v} (hydra/launcher="
                                "parallel: this machine's cores)")


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


def check_choices(ovs) -> None:
    """Keys with a closed set of values, before composing (every value of a sweep)."""
    for ov in ovs:
        key = ov.key_or_group
        options = CHOICES.get(key)
        if options is None:
            continue
        for v in _values(ov):
            if v not in options and not (key == "device" and v.startswith("cuda:")):
                raise UserError(f"{key}={v}: not a valid value; choose one of {_choices_text(options)}"
                                f"{did_you_mean(v, options, key + '=')}")


def _missing_key(cfg, key: str) -> str | None:
    """None where ``key`` exists in ``cfg`` (or under an open node); else the error line."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return f"{'.'.join(parts[:i])} is a value, not a group of keys: {key} does not exist"
        if part not in node.keys():  # (`in node` is False for a mandatory value, ???)
            if OmegaConf.is_struct(node) is False:
                return None
            where = ".".join(parts[:i])
            siblings = [f"{where}.{k}" if where else str(k) for k in node.keys()]
            hint = did_you_mean(key if not where else f"{where}.{part}", siblings)
            return f"{key}: no such key" + (f"; {where} has {_choices_text(node.keys())}" if where else "") + hint
        if i + 1 < len(parts):
            node = node[part]
    return None


# sections whose keys are fixed: a key added there (``+key=``) is a typo, not an option (the engine,
# workload, allocator and sim sections refuse theirs where they are read)
CLOSED_SECTIONS = ("", "measure")
# top-level keys no section has but a config group reads where set (conf/strategy/virtual.yaml: a preset's
# page size, `oc.select`): a user may add them as a preset does
READ_WHERE_SET = ("virtual_page_size",)


def _check_added(cfg, key: str) -> None:
    """``+key=...`` at the top level or in a closed section: only where that key exists already
    (Hydra would add a key nobody reads, e.g. ``+repeat=3`` for ``repeats=3``)."""
    where, _, name = key.rpartition(".")
    if where not in CLOSED_SECTIONS:
        return
    node = cfg if not where else cfg.get(where)
    if node is None or name in node or (not where and name in READ_WHERE_SET):
        return
    known = [f"{where}.{k}" if where else str(k) for k in node.keys() if k != "hydra"]
    raise UserError(f"+{key}: no such key, and kvlab reads none by that name; "
                    f"{where or 'the top level'} has {_choices_text(sorted(known))}{did_you_mean(key, known)}")


def _check_value_types(base, ovs) -> None:
    """A number where the configuration has a number (before it fails deep inside a run)."""
    from omegaconf import OmegaConf

    for ov in ovs:
        if ov.type.name != "CHANGE" or is_group(ov.key_or_group) or ov.key_or_group.startswith("hydra"):
            continue
        default = OmegaConf.select(base, ov.key_or_group, default=None, throw_on_missing=False)
        if not is_real(default):
            continue
        for v in _values(ov):
            try:
                float(v)
            except ValueError:
                # (an interpolation, ${...}, resolves later)
                if v not in ("null", "inf", ".inf", "-inf") and not v.startswith("${"):
                    raise UserError(f"{ov.key_or_group}={v}: expects a number (default {default})") from None


def _axes(ovs) -> list[list[str]]:
    """Per override, the override line of each of its values (one line where it sweeps nothing)."""
    axes = []
    for ov in ovs:
        if ov.key_or_group.startswith("hydra"):
            continue
        prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(ov.type.name, "")
        key = ov.key_or_group if ov.package is None else f"{ov.key_or_group}@{ov.package}"
        if ov.is_sweep_override():
            axes.append([f"{prefix}{key}={_escape(v)}" for v in _values(ov)])
        else:
            axes.append([ov.input_line])
    return axes


def value_probes(overrides: list[str]) -> list[list[str]]:
    """Override lines of runs that between them hold every value of a sweep: its runs where there
    are at most ``MAX_COMPOSED``, else each swept value with every other key at its first value (a
    value's valid range seldom hangs on another swept key's)."""
    axes = _axes(_parse(overrides))
    if math.prod(len(a) for a in axes) <= MAX_COMPOSED:
        return [list(c) for c in itertools.product(*axes)]
    first = [a[0] for a in axes]
    return [first] + [first[:i] + [v] + first[i + 1:] for i, a in enumerate(axes) for v in a[1:]]


def _combinations(ovs) -> list[list[str]]:
    """Override lines of each run of a sweep (Hydra's basic sweeper: the cartesian product)."""
    axes = _axes(ovs)
    combos = list(itertools.islice(itertools.product(*axes), MAX_COMPOSED + 1))
    if len(combos) > MAX_COMPOSED:  # large sweep: every group choice once, first value of the rest
        group_axes = [a if is_group(_key_of(a[0])) else a[:1] for a in axes]
        combos = list(itertools.product(*group_axes))[:MAX_COMPOSED]
    return [list(c) for c in combos]


def _key_of(line: str) -> str:
    return line.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def _escape(v: str) -> str:
    return v if all(c not in v for c in " ,()[]{}'\"\\=") else "'" + v.replace("'", "\\'") + "'"


def _count_runs(ovs) -> int | None:
    if any(o.key_or_group == "experiment" for o in ovs):
        return None  # the preset's hydra.sweeper.params sweep too
    return math.prod(len(list(o.sweep_string_iterator())) for o in ovs
                     if o.is_sweep_override() and not o.key_or_group.startswith("hydra"))


def compose(overrides: list[str]):
    """The configuration ``kvlab run`` would get (no hydra node); Hydra's errors as UserError."""
    return _compose(tuple(overrides))


@lru_cache(maxsize=64)  # the checks compose the same lists more than once (no overrides: 3 times)
def _compose(overrides: tuple[str, ...]):
    return compose_named("config", list(overrides))


def compose_named(name: str, overrides: list[str]):
    """conf/NAME.yaml with ``overrides`` (no hydra node); Hydra's errors as one-line UserError."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return hydra_compose(name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        msg = lines[0] if lines else type(e).__name__
        if "To append" in " ".join(lines[1:]):  # Hydra's "use +key=value" hint: the key is misspelt
            msg = msg.replace("Could not override", "no such key")
        raise UserError(msg) from None


def _check_resolves(cfg) -> None:
    """Every value set and every ${...} resolvable."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if OmegaConf.is_missing(cfg.model, "path"):
        raise UserError("model=hf_dir needs model.path (a local HF directory): "
                        "kvlab run model=/path/to/hf_dir")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or str(e).split(":", 1)[-1].strip().splitlines()[0]
        raise UserError(f"{key} is not set: give it a value ({key}=VALUE)") from None
    except OmegaConfBaseException as e:
        raise UserError(str(e).strip().splitlines()[0]) from None


def _check_protocol(cfg) -> None:
    """``repeats`` a whole number >= 1, the switches true or false, ``run_name`` one folder name,
    ``measure.warmup_s`` null or >= 0."""
    repeats = cfg.get("repeats", 1)
    if not is_int(repeats) or repeats < 1:
        raise UserError(f"repeats={repeats}: give the number of runs, 1 or more (seeds seed, seed+1, ...)")
    for key in ("resume", "progress", "report"):
        if not isinstance(cfg.get(key, True), bool):
            raise UserError(f"{key}={cfg.get(key)}: give true or false")
    if cfg.get("run_name", "") is None:  # what the rewrite leaves: a sweep's null (Hydra: a folder ...-None)
        raise UserError("run_name=null: give a folder name, or leave run_name out for its default name "
                        "(allocator-model-workload)")
    name = str(cfg.get("run_name", ""))
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise UserError(f"run_name={name!r}: give a folder name without / (it names the run's folder)")
    warmup = (cfg.get("measure") or {}).get("warmup_s")
    if warmup is not None and (not is_real(warmup) or not 0 <= warmup < math.inf):  # inf: an empty window
        raise UserError(f"measure.warmup_s={warmup}: give finite seconds >= 0, or null to start the steady-state "
                        "window where the pool or the batch first saturates")


MAX_ONLINE_SPAN_S = 24 * 3600.0  # online runs wait for their arrivals in real time


def _check_arrival_span(cfg, rate: float) -> None:
    """Arrivals no run can span: online over a day of real time; simulated over the clock's
    resolution (``workloads.MAX_ARRIVAL_S``, a trace's bound too)."""
    from experiments.workloads import MAX_ARRIVAL_S

    n = cfg.workload.get("num_requests")
    most = {"online": MAX_ONLINE_SPAN_S, "simulate": MAX_ARRIVAL_S}.get(cfg.mode)
    if most is None or cfg.workload.get("name") == "trace" or not is_real(n):
        return
    if 0 < rate < math.inf and n / rate > most:
        raise UserError(f"workload.request_rate={rate:g}: {n:g} requests would arrive over ~{n / rate:.3g} s "
                        f"(at most {most:g} s in mode={cfg.mode}): raise the rate or lower workload.num_requests")


def check_folder(flag: str, path: Path, sep: str = " ") -> None:
    """UserError unless ``path`` is a folder that can be written into, or can be made: checked
    before any run. Creates nothing (a probe folder in the nearest existing one goes at once)."""
    import os
    import tempfile

    p = Path(path).expanduser().absolute()
    while not p.exists() and not p.is_symlink():  # (a dangling link is in the way too)
        p = p.parent
    if not p.is_dir():
        what = "not a folder" if p == Path(path).expanduser().absolute() else f"{p} is not a folder"
        raise UserError(f"{flag}{sep}{path}: {what}: give a folder to write into")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kvlab-probe-", dir=p))
    except OSError as e:  # a probe, not os.access: root passes that and still cannot write in /proc
        raise UserError(f"{flag}{sep}{path}: cannot make folders in {p} ({e.strerror}): "
                        "give a folder you can write to") from None


def check_config(cfg) -> None:
    """Mode, arrivals and model must agree before anything is built (no torch here)."""
    _check_resolves(cfg)
    if cfg.mode not in MODES:
        raise UserError(f"mode={cfg.mode}: not a valid value; choose one of {_choices_text(MODES)}"
                        f"{did_you_mean(cfg.mode, MODES, 'mode=')}")
    _check_protocol(cfg)
    rate = cfg.workload.get("request_rate", math.inf)
    if not is_real(rate):
        raise UserError(f"workload.request_rate={'null' if rate is None else rate}: give requests per second "
                        "(a number > 0), or inf to send every request at t=0")
    rate = float(rate)
    if cfg.mode == "offline" and math.isfinite(rate):
        raise UserError(f"mode=offline sends every request at t=0 but workload.request_rate={rate:g}: "
                        "use mode=online (or simulate) for arrivals at a rate, or request_rate=inf")
    if cfg.mode == "online" and not math.isfinite(rate) and cfg.workload.get("name") != "trace":
        raise UserError("mode=online needs arrivals over time: set workload.request_rate (req/s), "
                        "e.g. workload.request_rate=4, or replay a trace's arrival_s (workload=trace)")
    _check_arrival_span(cfg, rate)
    from engine.presets import PRESETS  # a plain dict: engine/__init__ imports torch lazily

    path = str(cfg.model.path)
    if path not in PRESETS and not Path(path).expanduser().is_dir():
        if cfg.model.get("shape"):
            if cfg.mode != "simulate":
                raise UserError(f"model={cfg.model.name} is a simulate-only shape (no weights here): "
                                "use mode=simulate, or set model.path to a local HF directory")
        elif _looks_like_path(path):
            raise UserError(f"model.path={path}: no such directory")
        else:
            raise UserError(f"model.path={path}: not a preset or a directory; presets: "
                            f"{_choices_text(sorted(PRESETS))}{did_you_mean(path, PRESETS, 'model.path=')}")


def prepare(overrides: list[str], cwd: Path | None = None) -> Prepared:
    """Rewrite and check ``kvlab run`` overrides (without -m / --multirun and other flags)."""
    overrides = rewrite_run_name(rewrite_allocator_args(rewrite_model(overrides, cwd)))
    ovs = _parse(overrides)
    check_groups(ovs)
    check_launcher(ovs)
    check_choices(ovs)
    base = compose([o.input_line for o in ovs if not o.key_or_group.startswith("hydra")
                    and (is_group(o.key_or_group) and not o.is_sweep_override())])
    _check_value_types(base, ovs)
    for combo in _combinations(ovs):
        groups_only = [c for c in combo if is_group(_key_of(c)) or c.startswith("+") and not c.startswith("++")]
        structure = compose(groups_only)
        added = [_key_of(c) for c in combo if c.startswith("+") and not is_group(_key_of(c))]
        if added:  # against the configuration without them
            chosen = compose([c for c in combo if is_group(_key_of(c))])
            for key in added:
                _check_added(chosen, key)
        for line in combo:
            if line.startswith(("+", "~")) or is_group(_key_of(line)):
                continue
            problem = _missing_key(structure, _key_of(line))
            if problem:
                group = _key_of(line).split(".")[0]
                chosen = [c for c in combo if _key_of(c) == group and is_group(group)]
                raise UserError(problem + (f" (with {chosen[0].lstrip('+')})" if chosen else ""))
        check_config(compose(combo))
    return Prepared(overrides, num_runs=_count_runs(ovs))
