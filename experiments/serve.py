"""``kvlab serve`` (= ``python -m experiments.serve``): the OpenAI-compatible server, configured by
Hydra from conf/serve.yaml (model, allocator and engine groups as in ``kvlab run``).

A user error is one line naming the key and the fix, exit code 2, never a traceback, found as
early as it can be: the overrides here, before Hydra (an unknown key, a group choice, a closed
value, a number); the settings in ``engine.serving.server.main`` before the model loads (limits,
port, host and whether it can be bound, log level, the engine's checks that need no weights).
An engine that then fails to start is one line too, exit code 1.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


SERVE_EXTRA = ("fastapi", "uvicorn")
# sections of conf/serve.yaml whose keys are fixed: a key added there (+key=) is read by nobody
# (engine.* is checked against the engine's own settings when the server starts)
CLOSED_SECTIONS = ("", "limits")


def missing_serve_extra() -> list[str]:
    from importlib.util import find_spec

    return [m for m in SERVE_EXTRA if find_spec(m) is None]


def _compose(overrides: list[str]):
    """conf/serve.yaml with ``overrides`` (no hydra node); Hydra's errors as one-line UserError."""
    from experiments.preflight import compose_named

    return compose_named("serve", overrides)


def _top_level_keys(cfg) -> list[str]:
    return [str(k) for k in cfg.keys() if k != "hydra"]


def _unknown_key(cfg, key: str) -> str | None:
    """The error line for a key ``cfg`` lacks (top level: the keys kvlab serve takes), else None."""
    from experiments.preflight import _choices_text, _missing_key, did_you_mean

    top = key.split(".")[0]
    if top not in cfg.keys() or top == "hydra":
        known = _top_level_keys(cfg)
        return (f"{key}: no such key; kvlab serve takes {_choices_text(known)}{did_you_mean(top, known)}")
    return _missing_key(cfg, key)


def check_overrides(overrides: list[str]) -> list[str]:
    """The overrides of ``kvlab serve`` checked before Hydra sees them (Hydra answers an unknown
    key with a multi-line error and exit code 1): syntax, group choices, keys, closed values and
    numbers; ``allocator.args.K`` for an option of the chosen allocator that its yaml lacks
    becomes ``++allocator.args.K`` (as in ``kvlab run``). Returns the overrides Hydra gets;
    raises UserError."""
    from experiments import preflight
    from experiments.preflight import UserError, _choices_text, did_you_mean

    ovs = preflight._parse(overrides)
    for ov in ovs:
        if ov.is_sweep_override() and not ov.key_or_group.startswith("hydra"):
            raise UserError(f"{ov.input_line}: kvlab serve runs one server: give {ov.key_or_group} one value")
    preflight.check_groups(ovs)
    groups = [o.input_line for o in ovs if preflight.is_group(o.key_or_group)]
    structure = _compose(groups)  # the chosen groups' keys, before any value is set
    allocator = str(structure.allocator.name)
    takes = [a for a in preflight.allocator_options().get(allocator, ()) if a not in preflight.ENGINE_SETS]
    out = []
    for line, ov in zip(overrides, ovs):
        key = ov.key_or_group
        kind = ov.type.name
        if key.startswith("hydra") or preflight.is_group(key):
            out.append(line)
            continue
        if key.startswith("allocator.args.") and kind != "DEL":
            name = key.split(".", 2)[2]
            if name in preflight.ENGINE_SETS:
                raise UserError(f"allocator.args.{name}: the engine sets it from {preflight.ENGINE_SETS[name]}: "
                                "give that")
            if name not in takes:
                raise UserError(f"allocator.args.{name}: allocator={allocator} takes no such option; it takes "
                                f"{_choices_text(takes) or 'none'}{did_you_mean(name, takes, 'allocator.args.')}")
            out.append(line if line.startswith("+") else "++" + line)
            continue
        if kind in ("ADD", "FORCE_ADD"):
            where = key.rpartition(".")[0]
            if where in CLOSED_SECTIONS and preflight._missing_key(structure, key):
                node = structure if not where else structure[where]
                known = [f"{where}.{k}" if where else str(k) for k in node.keys() if k != "hydra"]
                raise UserError(f"+{key}: no such key, and kvlab serve reads none by that name; "
                                f"{where or 'kvlab serve'} takes {_choices_text(known)}{did_you_mean(key, known)}")
        elif kind == "CHANGE":
            problem = _unknown_key(structure, key)
            if problem:
                chosen = [o.input_line for o in ovs if o.key_or_group == key.split(".")[0]
                          and preflight.is_group(o.key_or_group)]
                raise UserError(problem + (f" (with {chosen[0]})" if chosen else ""))
        out.append(line)
    preflight.check_choices(ovs)
    preflight._check_value_types(structure, ovs)
    _compose([o for o in out if not o.startswith("hydra")])  # what Hydra would refuse, as one line
    return out


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base="1.3")
def _serve(cfg: DictConfig) -> None:
    from engine.serving.server import EngineStartError, main as serve_main

    try:
        serve_main(cfg)
    except (ValueError, EngineStartError) as e:  # a bad setting (port, limits, model, engine): one line, no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"kvlab serve: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ValueError) else 1)


def main() -> int:
    missing = missing_serve_extra()
    if missing:  # a one-line answer, not an ImportError from deep inside the server
        print(f"kvlab serve needs the serve extra ({', '.join(missing)} missing): make setup, "
              "or pip install -e '.[serve]'", file=sys.stderr)
        return 2
    from experiments import preflight  # registers the kvlab.* resolvers conf/ uses

    flags, overrides = preflight.split_args(sys.argv[1:])
    try:
        overrides = check_overrides(overrides)
    except preflight.UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not preflight.HYDRA_INFO_FLAGS.intersection(flags):  # --help, --cfg job, ...: Hydra answers
            print(f"kvlab serve: {e}", file=sys.stderr)
            return 2
    sys.argv = [sys.argv[0], *flags, *overrides]
    _serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
