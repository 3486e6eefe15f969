"""``kvlab`` command: one line per command in COMMANDS, each imported only when it runs
(``kvlab --help`` imports nothing heavy)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"; the function takes the argument list and returns an exit code
    usage: str
    help: str
    hydra: bool = False  # a @hydra.main function: its arguments go through sys.argv
    keep: int = 0  # words of the name the function still gets (bench.main wants "throughput")


COMMANDS: dict[str, Command] = {
    "run": Command("experiments.run:cli", "run [--verbose] [--resume DIR] [-m] [overrides]",
                   "one experiment; -m for a sweep (kvlab run -m allocator=paged,contiguous)"),
    "report": Command("experiments.report:main", "report DIR [--out OUT]", "tables and plots of every run under DIR"),
    "serve": Command("experiments.serve:main", "serve [overrides]",
                     "OpenAI-compatible server (host=127.0.0.1 port=8000)", hydra=True),
    "bench throughput": Command("experiments.bench:main", "bench throughput [...]",
                                "throughput benchmark vs HF transformers", keep=1),
    "bench serve": Command("experiments.bench_serve:main", "bench serve [...]",
                           "load generator for any OpenAI-compatible server (like vllm bench serve)"),
    "profile": Command("experiments.profile_device:main", "profile [...]",
                       "time this engine's operations into a device profile: on the GPU, else "
                       "(minutes, wall times) on the CPU"),
    "validate-sim": Command("experiments.validate_sim:main", "validate-sim [...]",
                            "simulate vs the real engine on one workload: error table and plot"),
    "reproduce": Command("experiments.reproduce:main", "reproduce PAPER [--quick] [--repeats N] [--out DIR]",
                         "every figure of pagedattention / vattention beside the paper's values"),
}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: ...``, exit 2): the usage
    block argparse prints first buries the message; ``--help`` still shows it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def usage() -> str:
    width = max(len(c.usage) for c in COMMANDS.values()) + 2
    lines = [f"  {c.usage:<{width}} {c.help}" for c in COMMANDS.values()]
    return ("usage: kvlab COMMAND [args]\n\n" + "\n".join(lines)
            + "\n\n`kvlab COMMAND --help` for a command's options; `kvlab run --verbose ...` shows tracebacks.\n")


def find(argv: list[str]) -> tuple[str, Command, list[str]] | None:
    """The command named by the first one or two words, and its arguments."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            cmd = COMMANDS[name]
            return name, cmd, argv[words - cmd.keep:]
    return None


def bench_error(argv: list[str]) -> tuple[int, str]:
    """``kvlab bench`` without a known benchmark: the exit code and the line to print (usage
    of the benchmarks for --help)."""
    names = [n.split()[1] for n in COMMANDS if n.startswith("bench ")]
    if len(argv) < 2:
        return 2, f"kvlab bench: name a benchmark: {' or '.join(names)} (e.g. kvlab bench {names[0]} --help)"
    if argv[1] in ("-h", "--help", "help"):
        lines = [f"  kvlab {COMMANDS['bench ' + n].usage:<24} {COMMANDS['bench ' + n].help}" for n in names]
        return 0, "usage: kvlab bench BENCHMARK [args]\n\n" + "\n".join(lines)
    import difflib

    close = difflib.get_close_matches(argv[1], names, n=1)
    hint = f" (did you mean kvlab bench {close[0]}?)" if close else ""
    return 2, f"kvlab bench: unknown benchmark '{argv[1]}': choose {' or '.join(names)}{hint}"


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    found = find(argv)
    if found is None and argv[0] == "bench":
        code, text = bench_error(argv)
        print(text, file=sys.stderr if code else sys.stdout)
        return code
    if found is None:
        print(f"kvlab: unknown command '{argv[0]}'\n\n{usage()}", file=sys.stderr)
        return 2
    name, cmd, rest = found
    module, func = cmd.target.split(":")
    fn = getattr(import_module(module), func)
    if cmd.hydra:
        from experiments import preflight  # registers the kvlab.* resolvers conf/ uses

        flags, overrides = preflight.split_args(rest)
        try:  # model=DIR as in kvlab run
            rest = [*flags, *preflight.rewrite_model(overrides)]
        except preflight.UserError as e:
            print(f"kvlab {name}: {e}", file=sys.stderr)
            return 2
        sys.argv = [f"kvlab {name}", *rest]
        return fn() or 0
    return fn(rest) or 0


def _exit_now(code: int) -> None:
    """End without the interpreter's teardown: with torch loaded, freeing every module takes
    about a second on a small CPU and does nothing for us. Files are closed and flushed first."""
    import atexit
    import logging
    import threading

    try:
        # what the interpreter runs before the atexit functions: the hooks thread pools register with
        # threading (loky's, behind hydra/launcher=joblib, stops its idle workers there); without it
        # multiprocessing's atexit function waits for those workers forever
        threading._shutdown()
        atexit._run_exitfuncs()  # tempfile clean-up, joblib/loky workers, ...
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point; called with ``argv`` (tests, other code) it returns the exit code."""
    as_command = argv is None
    code = dispatch(list(sys.argv[1:] if argv is None else argv))
    if as_command and "torch" in sys.modules:
        _exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
