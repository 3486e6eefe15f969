"""``kvlab serve`` (= ``python -m experiments.serve``): the OpenAI-compatible server, configured by
Hydra from conf/serve.yaml (model, allocator and engine groups as in ``kvlab run``)."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from engine.serving.server import main as serve_main

    serve_main(cfg)


if __name__ == "__main__":
    main()
