"""The rewrites of ``kvlab run`` overrides (``experiments.preflight``), so Hydra sees plain
overrides: ``model=DIR`` -> ``model=hf_dir model.path=/abs/DIR``, ``allocator.args.KEY=V`` ->
``++allocator.args.KEY=V`` for an option some allocator takes, and ``run_name=null`` left out; and
the parsing of override lines (``_parse``, ``_values``) the checks share."""
from __future__ import annotations

import os
from pathlib import Path

from allocators import ENGINE_SETS
from experiments.preflight_conf import UserError, _choices_text, allocator_options, did_you_mean, group_choices, model_presets


# ---------------------------------------------------------------------------- rewrites

def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for line in overrides:
        try:
            out.append(parser.parse_override(line))
        except HydraException as e:  # OverrideParseException, or the grammar's own
            first = str(e).strip().splitlines()[0]
            raise UserError(f"cannot read the override '{line}': {first} (write KEY=VALUE, e.g. "
                            "workload.num_requests=64; a sweep: allocator=paged,contiguous with -m)") from None
    return out


def _values(ov) -> list[str]:
    """An override's value(s) as strings: a sweep's list, or the one value."""
    v = ov.value()
    if ov.is_sweep_override():
        choices = getattr(v, "list", None)  # a,b,c: the values as written, unescaped
        if choices is not None:
            return [_text(getattr(c, "text", c)) for c in choices]  # QuotedString -> its text
        return [str(c) for c in ov.sweep_string_iterator()]
    return [] if v is None else [str(v) if not isinstance(v, str) else v]


def _text(v) -> str:
    """A parsed sweep value as Hydra's grammar writes it: str() made a null the text "None" (a run of
    the sweep then composed, and was checked, with that string instead of null)."""
    if v is None:
        return "null"
    return str(v).lower() if isinstance(v, bool) else str(v)


def _looks_like_path(v: str) -> bool:
    return os.sep in v or v.startswith((".", "~")) or Path(v).is_dir()


def _given(ovs, key: str) -> bool:
    return any(o.key_or_group == key for o in ovs)


def rewrite_model(overrides: list[str], cwd: Path | None = None) -> list[str]:
    """``model=DIR`` -> ``model=hf_dir model.path=/abs/DIR`` (hf_dir.yaml names it after the
    directory); ``model.path=DIR`` with a preset group gets ``model.name=basename``."""
    cwd = cwd or Path.cwd()
    ovs = _parse(overrides)
    out: list[str] = []
    presets = group_choices("model")
    for line, ov in zip(overrides, ovs):
        key = ov.key_or_group
        if key == "model" and ov.type.name == "CHANGE":
            vals = _values(ov)
            if all(v in presets for v in vals):
                out.append(line)
                continue
            dirs = [v for v in vals if v not in presets]
            if len(dirs) != len(vals):
                raise UserError(f"model={','.join(vals)}: a sweep takes presets or directories, not both; "
                                "sweep directories with model=hf_dir model.path=DIR1,DIR2")
            for v in dirs:
                if not _looks_like_path(v):
                    raise UserError(f"model={v}: no such preset or directory; presets: {_choices_text(model_presets())} "
                                    f"or a directory: model=/path/to/hf_dir{did_you_mean(v, presets, 'model=')}")
            paths = [_existing_dir(v, "model", cwd) for v in dirs]
            out += ["model=hf_dir", f"model.path={','.join(_quote(p) for p in paths)}"]  # named by hf_dir.yaml
            continue
        if key == "model.path" and ov.type.name == "CHANGE":
            vals = _values(ov)
            from engine.presets import PRESETS  # a plain dict: no torch

            for v in vals:
                if v not in PRESETS:
                    if not _looks_like_path(v):
                        raise UserError(f"model.path={v}: no such directory or preset; presets: "
                                        f"{_choices_text(sorted(PRESETS))}{did_you_mean(v, PRESETS, 'model.path=')}")
                    _existing_dir(v, "model.path", cwd)
            if len(vals) == 1 and vals[0] not in PRESETS and not _given(ovs, "model.name"):
                out += [line, f"model.name={_quote(Path(vals[0]).expanduser().resolve().name)}"]
                continue
        out.append(line)
    return out


def _existing_dir(v: str, key: str, cwd: Path) -> str:
    p = Path(v).expanduser()
    p = (p if p.is_absolute() else cwd / p).resolve()
    if not p.is_dir():
        raise UserError(f"{key}={v}: no such directory ({p}); a model is a preset "
                        f"({_choices_text(model_presets())}) or a local HF directory "
                        "with config.json and *.safetensors")
    if not (p / "config.json").is_file():
        raise UserError(f"{key}={v}: {p} has no config.json: a model directory is a Hugging Face "
                        "checkpoint (config.json and *.safetensors)")
    return str(p)


def _quote(s: str) -> str:
    """A value Hydra reads back as the same string."""
    return s if all(c.isalnum() or c in "-_./" for c in s) else "'" + s.replace("'", "\\'") + "'"


def rewrite_allocator_args(overrides: list[str]) -> list[str]:
    """``allocator.args.K=V`` -> ``++allocator.args.K=V`` where some allocator takes K (the config
    group of the others lacks the key); an option no allocator takes is an error."""
    known = allocator_options()
    every = sorted({a for opts in known.values() for a in opts})
    out = []
    for line, ov in zip(overrides, _parse(overrides)):
        key = ov.key_or_group
        if key.startswith("allocator.args.") and ov.type.name == "CHANGE":
            name = key.split(".", 2)[2]
            if name in ENGINE_SETS:  # given here it would skip the engine's checks (and its accounting)
                raise UserError(f"allocator.args.{name}: the engine sets it from {ENGINE_SETS[name]}: give that")
            if name not in every:
                takes = "; ".join(f"{a}: {_choices_text(o)}" for a, o in sorted(known.items()))
                raise UserError(f"allocator.args.{name}: no allocator takes this option ({takes})"
                                f"{did_you_mean(name, every, 'allocator.args.')}")
            line = "++" + line
        out.append(line)
    return out


def rewrite_run_name(overrides: list[str]) -> list[str]:
    """``run_name=null`` is left out: to a Hydra user null means unset, so the run keeps its default
    name (allocator-model-workload); given to Hydra, it named the run folder ``...-None``. A null
    among a sweep's names cannot be left out: refused."""
    out = []
    for line, ov in zip(overrides, _parse(overrides)):
        if ov.key_or_group == "run_name" and ov.type.name in ("CHANGE", "FORCE_ADD"):
            if not ov.is_sweep_override() and ov.value() is None:
                continue
            if None in (getattr(ov.value(), "list", None) or ()):  # Hydra would name that run's folder N-None
                raise UserError(f"{line}: run_name=null in a sweep names that run's folder N-None: give each run "
                                "a folder name, or leave run_name out for the default (allocator-model-workload)")
        out.append(line)
    return out
