"""``kvlab serve`` (= ``python -m experiments.serve``): the OpenAI-compatible server, configured by
Hydra from conf/serve.yaml (model, allocator and engine groups as in ``kvlab run``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


SERVE_EXTRA = ("fastapi", "uvicorn")


def missing_serve_extra() -> list[str]:
    from importlib.util import find_spec

    return [m for m in SERVE_EXTRA if find_spec(m) is None]


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base="1.3")
def _serve(cfg: DictConfig) -> None:
    from engine.serving.server import main as serve_main

    try:
        serve_main(cfg)
    except ValueError as e:  # a bad setting (port, limits, model, engine): one line, no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"kvlab serve: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> int:
    missing = missing_serve_extra()
    if missing:  # a one-line answer, not an ImportError from deep inside the server
        print(f"kvlab serve needs the serve extra ({', '.join(missing)} missing): make setup, "
              "or pip install -e '.[serve]'", file=sys.stderr)
        return 2
    _serve()
    return 0


if __name__ == "__main__":
    main()
