"""Run the OpenAI-compatible server with uvicorn: ``main(cfg)`` takes the composed ``kvlab serve`` config."""
from __future__ import annotations

import dataclasses
import difflib
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from typing import Any, Mapping

import uvicorn
from uvicorn.config import LOG_LEVELS

from allocators.checks import is_int
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig, checked_quietly
from engine.llm_engine import LLMEngine
from engine.serving.app import create_app
from engine.serving.descriptors import fit_to_descriptors
from engine.serving.limits import ServerLimits

log = logging.getLogger("kvlab.serving")


class EngineStartError(RuntimeError):
    """The engine process could not start (its reason, one line); the model may have loaded."""


# EngineConfig fields set at the top level of conf/serve.yaml, not under engine: (record_memory
# by the server: always off)
_TOP_LEVEL = {"model": "model=", "allocator": "allocator=", "allocator_args": "allocator.args.*", "seed": "seed=",
              "device": "device="}


def engine_config(cfg: Mapping[str, Any]) -> EngineConfig:
    """EngineConfig from the config groups shared with ``kvlab run`` (model, allocator, engine);
    ValueError names a bad key (``engine.foo``) or value.

    A server runs for days: the per-step memory record of experiments would grow without bound.
    """
    engine = dict(cfg.get("engine") or {})
    known = {f.name for f in dataclasses.fields(EngineConfig)} - set(_TOP_LEVEL) - {"record_memory"}
    for key in sorted(engine):
        if key in _TOP_LEVEL:
            raise ValueError(f"engine.{key}: set by {_TOP_LEVEL[key]} in kvlab serve (remove the engine. one)")
        if key == "record_memory":
            raise ValueError("engine.record_memory: a server never records per-step memory (it would grow "
                             "for as long as it runs): remove it")
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ValueError(f"engine.{key}: no such engine setting; engine has {', '.join(sorted(known))}"
                             + (f" (did you mean engine.{close[0]}?)" if close else ""))
    settings = {**engine, "record_memory": False}
    return EngineConfig(model=cfg["model"]["path"], allocator=cfg["allocator"]["name"],
                        allocator_args=dict(cfg["allocator"].get("args") or {}), device=cfg.get("device", "auto"),
                        seed=cfg.get("seed", 0), **settings)


def check_engine(config: EngineConfig) -> None:
    """The engine's start-up checks that need no weights, in this process and before the engine
    process loads the model: the device (device=cuda with no GPU), tensor parallelism, the
    model's context length, the allocator's arguments and its pool. The engine is built as
    simulate mode builds it (no weights, no KV tensors, a virtual allocator's pages only
    counted, which is laxer than mapping them: what fails here fails there too). ValueError
    names the key; any other failure is left for the engine process to report.

    On a GPU with no pool size given, the pool is what the GPU has left once the weights are
    loaded: only the device, the context length and the allocator's arguments are checked."""
    from allocators.registry import allocator_class, checked_args
    from engine.loader import resolve_config

    device = config.resolved_device()
    config.check_devices(device)

    def check() -> None:
        if device.startswith("cuda") and config.kv_cache_tokens is None and config.kv_cache_memory is None:
            config.resolved_max_model_len(resolve_config(config.model, config.hf_overrides))
            checked_args(allocator_class(config.allocator), dict(config.allocator_args))
            return
        _dry_build(config)

    checked_quietly(check, "the engine check")  # the engine process logs what it builds and reports the rest


class _NoRunner:
    """The model runner of a dry build: it never runs a step."""


def _dry_build(config: EngineConfig) -> None:
    import torch

    args = dict(config.allocator_args)
    if args.get("backend") == "sim":  # the virtual allocator's accounting-only backend: no KV tensors to serve
        from allocators.vmm_backends import make_backend

        make_backend("sim", 1, 1, 1, 1, device=config.resolved_device())  # the engine's refusal, as it words it
    if args.get("backend") in ("host", "cuda"):  # the virtual allocator: pages counted, not mapped
        args["backend"] = "sim"
    threads = torch.get_num_threads()  # the engine sets the CPU threads of its process: not this one's
    try:
        engine = LLMEngine(dataclasses.replace(config, allocator_args=args, record_memory=False),
                           runner_factory=lambda allocator: _NoRunner())
    finally:
        torch.set_num_threads(threads)
    close = getattr(engine.allocator, "close", None)
    if callable(close):
        close()


def check_log_level(level: Any) -> str | int:
    """uvicorn's log level: a name (any case) or a number of Python's logging."""
    if isinstance(level, str) and level.lower() in LOG_LEVELS:
        return level.lower()
    if is_int(level) and not isinstance(level, bool) and 0 <= level <= 50:
        return int(level)
    close = difflib.get_close_matches(str(level).lower(), list(LOG_LEVELS), n=1)
    raise ValueError(f"log_level={level}: not a log level; choose one of {', '.join(LOG_LEVELS)}"
                     + (f" (did you mean log_level={close[0]}?)" if close else ""))


def check_listen(host: Any, port: int) -> None:
    """Bind ``host``:``port`` as uvicorn will (asyncio's create_server: every address ``host``
    resolves to, SO_REUSEADDR, IPv6 sockets v6-only) and release it at once, so that a host
    that is no address of this machine, or a port in use, is a config error before the model
    loads. (Another process may still take the port before uvicorn binds it: uvicorn then says so.)"""
    fix_host = ("give an address of this machine, e.g. host=127.0.0.1 (this machine only) or host=0.0.0.0 "
                "(every interface)")
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"host={'null' if host is None else repr(host)}: {fix_host}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"host={host}: not an IP address nor a name this machine resolves ({why}): "
                         f"{fix_host}") from None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks (asyncio skips it too)
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                where = f"[{address[0]}]:{address[1]}" if family == socket.AF_INET6 else f"{address[0]}:{address[1]}"
                if e.errno == errno.EADDRINUSE:
                    raise ValueError(f"port={port}: {where} is already in use (another server?): choose another "
                                     "port, e.g. port=0 for any free one, or stop the other server") from None
                if e.errno == errno.EACCES:
                    raise ValueError(f"port={port}: not allowed to listen on {where} (ports below 1024 need "
                                     "root): choose a port of 1024 or more, e.g. port=8000") from None
                if e.errno == errno.EADDRNOTAVAIL:
                    raise ValueError(f"host={host}: {address[0]} is not an address of this machine: "
                                     f"{fix_host}") from None
                raise ValueError(f"host={host} port={port}: cannot listen on {where} ({e.strerror or e}): give "
                                 "an address of this machine (e.g. host=127.0.0.1) and a free port (port=0: any)"
                                 ) from None


def build_server(engine: LLMEngine | AsyncLLMEngine, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, log_level: str = "info", access_log: bool = True,
                 limits: ServerLimits | None = None) -> tuple[uvicorn.Server, AsyncLLMEngine]:
    """uvicorn serving the app over ``engine``; ``limits`` (default ``ServerLimits()``) go to the app
    (body, prompts, n, stop strings) and to uvicorn (headers, head timeout, keep-alive, connections),
    once fitted to the open-file limit (``fit_to_descriptors``: may raise it, or lower the default
    ``max_concurrency`` with a warning; LimitsConfigError for another value that cannot fit)."""
    limits = fit_to_descriptors(limits or ServerLimits())
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
    try:
        engine = AsyncLLMEngine.start_process(dataclasses.replace(engine_cfg, record_memory=False))
    except RuntimeError as e:  # its reason, as text: whether a setting or a fault, the process cannot tell us
        raise EngineStartError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
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
    port, api_key, served_model_name, log_level, access_log and limits (``ServerLimits``). A bad
    setting is a ValueError naming its key, raised before the model loads: the limits (against
    the open-file limit too, ``fit_to_descriptors``), port, log
    level, the engine's settings and what the engine checks without weights (``check_engine``),
    then the host and port, bound and released (``check_listen``). An engine process that fails
    to start after that raises EngineStartError (its reason, one line)."""
    if not isinstance(cfg, dict):  # an OmegaConf DictConfig: resolve interpolations once
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    # first: a limit that cannot fit the open-file limit fails now, and the engine process inherits the raised one
    limits = fit_to_descriptors(ServerLimits.from_config(cfg.get("limits")))
    port = cfg.get("port", 8000)
    if not is_int(port) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r}: a TCP port is an integer in [0, 65535] (0: any free port), e.g. port=8000")
    host = cfg.get("host", "127.0.0.1")
    log_level = check_log_level(cfg.get("log_level", "info"))
    access_log = cfg.get("access_log", True)
    if not isinstance(access_log, bool):
        raise ValueError(f"access_log={access_log}: give true (a line per request) or false")
    api_key = cfg.get("api_key")
    if isinstance(api_key, (dict, list)):
        raise ValueError("api_key: give the key clients must send as text (api_key=SECRET or KVLAB_API_KEY=SECRET), "
                         "or null for none")
    name = cfg.get("served_model_name") or cfg["model"]["name"]
    engine_cfg = engine_config(cfg)
    check_engine(engine_cfg)  # what needs no weights, before the engine process loads them
    check_listen(host, port)  # last: the port is free as the model starts loading
    serve(engine_cfg, served_model_name=str(name), host=host, port=port,
          api_key=str(api_key) if api_key else None, log_level=log_level, access_log=access_log,
          limits=limits)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
