"""Run the OpenAI-compatible server with uvicorn: ``main(cfg)`` takes the composed ``kvlab serve`` config."""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import sys
from typing import Any, Mapping

import uvicorn

from allocators.checks import is_int
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.serving.app import create_app
from engine.serving.limits import ServerLimits

log = logging.getLogger("kvlab.serving")


def engine_config(cfg: Mapping[str, Any]) -> EngineConfig:
    """EngineConfig from the config groups shared with ``kvlab run`` (model, allocator, engine).

    A server runs for days: the per-step memory record of experiments would grow without bound.
    """
    settings = {**(cfg.get("engine") or {}), "record_memory": False}
    return EngineConfig(model=cfg["model"]["path"], allocator=cfg["allocator"]["name"],
                        allocator_args=dict(cfg["allocator"].get("args") or {}), device=cfg.get("device", "auto"),
                        seed=cfg.get("seed", 0), **settings)


def build_server(engine: LLMEngine | AsyncLLMEngine, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, log_level: str = "info", access_log: bool = True,
                 limits: ServerLimits | None = None) -> tuple[uvicorn.Server, AsyncLLMEngine]:
    """uvicorn serving the app over ``engine``; ``limits`` (default ``ServerLimits()``) go to the app
    (body, prompts, n, stop strings) and to uvicorn (headers, head timeout, keep-alive, connections)."""
    limits = limits or ServerLimits()
    async_engine = engine if isinstance(engine, AsyncLLMEngine) else AsyncLLMEngine(engine)
    app = create_app(async_engine, served_model_name, api_key, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=5,  # open streams are cut after 5 s on shutdown
                            **limits.uvicorn_settings())
    return uvicorn.Server(config), async_engine


def serve(engine_cfg: EngineConfig, served_model_name: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, log_level: str = "info", access_log: bool = True,
          limits: ServerLimits | None = None) -> None:
    limits = limits or ServerLimits()  # checked before the engine loads: a bad limit fails at once
    if not api_key and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    # the engine in a process of its own: HTTP work never waits on the engine's GIL, nor it on ours
    engine = AsyncLLMEngine.start_process(dataclasses.replace(engine_cfg, record_memory=False))
    name = served_model_name or engine_cfg.model
    server, async_engine = build_server(engine, name, host, port, api_key, log_level, access_log, limits)
    died: list[str] = []

    def on_dead(reason: str) -> None:  # a fatal engine error: stop serving, exit non-zero for a supervisor
        died.append(reason)
        server.should_exit = True

    async_engine.add_dead_listener(on_dead)
    # uvicorn re-raises the SIGTERM it handled once it has shut down; without a handler of ours
    # that would kill this process before the engine process is stopped (it would keep the GPU)
    signal.signal(signal.SIGTERM, _raise_terminated)
    log.info("serving %s (%s allocator, %d KV tokens, max_model_len %d) on http://%s:%d/v1", name,
             engine_cfg.allocator, engine.info.kv_capacity_tokens, engine.max_model_len, host, port)
    terminated = False
    try:
        server.run()
    except _Terminated:
        terminated = True
    finally:
        async_engine.shutdown()
    if terminated:  # end as SIGTERM would have ended us, now that the engine is gone
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    if died:
        log.error("exiting: %s", died[0])
        sys.exit(1)


class _Terminated(BaseException):
    """SIGTERM arrived (after uvicorn's own shutdown)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(cfg: Mapping[str, Any]) -> None:
    """Serve from a composed config (``conf/serve.yaml``): the groups of ``kvlab run`` plus host,
    port, api_key, served_model_name, log_level, access_log and limits (``ServerLimits``; a bad
    limit is a config error naming its key, raised before the model loads)."""
    if not isinstance(cfg, dict):  # an OmegaConf DictConfig: resolve interpolations once
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    limits = ServerLimits.from_config(cfg.get("limits"))
    port = cfg.get("port", 8000)
    if not is_int(port) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r}: a TCP port is an integer in [0, 65535] (0: any free port), e.g. port=8000")
    serve(engine_config(cfg), served_model_name=cfg.get("served_model_name") or cfg["model"]["name"],
          host=cfg.get("host", "127.0.0.1"), port=port, api_key=cfg.get("api_key"),
          log_level=cfg.get("log_level", "info"), access_log=bool(cfg.get("access_log", True)), limits=limits)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
