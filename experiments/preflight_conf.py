"""What kvlab's configuration offers, read without composing it (``experiments.preflight``):
the groups of conf/ and the model presets, each allocator's options (read from allocators/*.py
with ``ast``), the keys whose values form a closed set, Hydra's flags; and :class:`UserError`,
the one-line mistake every check raises, with its close-match hint."""
from __future__ import annotations

import ast
import difflib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
MODES = ("offline", "online", "simulate")
# values a key may take, where the set is closed (allocators/*.py, engine/config.py keep the truth;
# tests/test_cli_errors.py checks that these agree)
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "device": ("auto", "cpu", "cuda"),
    "allocator.args.policy": ("max", "pow2", "oracle"),
    "allocator.args.layout": ("per_layer", "shared"),
    "allocator.args.backend": ("auto", "sim", "host", "cuda"),
    "engine.preemption_mode": ("recompute", "swap"),
    "workload.arrival": ("poisson", "gamma"),
}
# constructor arguments the engine passes itself: never allocator options of a config
ENGINE_PROVIDED = {"self", "spec", "capacity_tokens", "max_num_seqs", "max_model_len"}
# allocator arguments the engine sets from its own settings, which check them (allocator.args.* would not)
# flags after which Hydra does something other than run (help, print the config, ...): no checks
HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "-p", "--package",
                    "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--version"}
# Hydra flags followed by a value (--cfg job), and --info's optional one
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
               "-cd", "--experimental-rerun"}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


class UserError(ValueError):
    """A mistake in the command line or the configuration: shown as its message, exit code 2."""



# ---------------------------------------------------------------------------- what exists

def group_choices(group: str) -> list[str]:
    """Options of a config group: the yaml files in conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def model_presets() -> list[str]:
    """Models by name (random weights of a real model's shape); hf_dir is the directory entry."""
    return [m for m in group_choices("model") if m != "hf_dir"]


def is_group(key: str) -> bool:
    return (CONF_DIR / key).is_dir()


@lru_cache(maxsize=1)
def allocator_options() -> dict[str, tuple[str, ...]]:
    """Allocator name -> the options its constructor takes, read from allocators/*.py without
    importing them (they import torch)."""
    out: dict[str, tuple[str, ...]] = {}
    for path in sorted((ROOT / "allocators").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            names = [d.args[0].value for d in node.decorator_list if isinstance(d, ast.Call)
                     and getattr(d.func, "id", None) == "register" and d.args and isinstance(d.args[0], ast.Constant)]
            init = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if names and init:
                params = [a.arg for a in init.args.args + init.args.kwonlyargs if a.arg not in ENGINE_PROVIDED]
                out[names[0]] = tuple(params)
    return out


def did_you_mean(word: str, options, prefix: str = "") -> str:
    """" (did you mean PREFIX+closest?)" or nothing."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _choices_text(options) -> str:
    return ", ".join(str(o) for o in options)


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) and the overrides, each in the order given."""
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and "=" not in a:
            flags.append(a)
            takes = a in VALUE_FLAGS or (a in ("--info", "-i") and i + 1 < len(argv) and argv[i + 1] in INFO_VALUES)
            if takes and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return flags, overrides
