"""``kvlab`` command: run | report | serve | bench."""
from __future__ import annotations

import sys

USAGE = """usage: kvlab COMMAND [args]

  run [hydra overrides]      one experiment; -m for a sweep (kvlab run -m allocator=paged,contiguous)
  report DIR [--out OUT]     tables and plots of every run under DIR
  serve [hydra overrides]    OpenAI-compatible server (host=127.0.0.1 port=8000)
  bench throughput [...]     throughput benchmark vs HF transformers
  bench serve [...]          load generator for any OpenAI-compatible server (like vllm bench serve)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from experiments import run

        sys.argv = ["kvlab run", *rest]
        run.main()
        return 0
    if cmd == "report":
        from experiments import report

        return report.main(rest)
    if cmd == "serve":
        from experiments import serve

        sys.argv = ["kvlab serve", *rest]
        serve.main()
        return 0
    if cmd == "bench":
        if rest[:1] == ["serve"]:
            from experiments import bench_serve

            return bench_serve.main(rest[1:])
        from experiments import bench

        return bench.main(rest)
    print(f"kvlab: unknown command '{cmd}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
