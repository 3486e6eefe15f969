"""Server vs offline engine on one model and one workload, in one run: what the server delivers of
the engine's speed.

1. offline: an LLMEngine with the server's settings runs the workload's exact prompts (all at
   once), in a process of its own so that its GPU memory is gone before the server starts;
2. online: ``kvlab serve`` with the same settings, driven by ``kvlab bench serve`` at the
   given concurrency (streamed completions, ``ignore_eos``), the server's own token counter
   read from /metrics before and after.

Writes ``<out>/<model>_<device>.json`` (both figures, their ratio, the commands) beside the
bench JSON and the server log.

    python -m experiments.serve_vs_offline --model qwen3-0.6b --out results/serving
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from experiments.atomic import write_json
from experiments.bench import add_async_arg, async_value


def _workload_args(a: argparse.Namespace) -> list[str]:
    return ["--num-prompts", str(a.num_prompts), "--random-input-len", str(a.input_len),
            "--random-range-ratio", str(a.range_ratio), "--random-output-len", str(a.output_len),
            "--seed", str(a.seed), "--vocab-high", str(a.vocab_high)]


def _engine_overrides(a: argparse.Namespace) -> dict:
    return dict(max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens, gpu_memory_utilization=a.gpu_memory_utilization,
                kv_cache_tokens=None, async_scheduling=async_value(a.async_scheduling))


def offline(a: argparse.Namespace) -> dict:
    """The engine alone on the bench's exact prompts (run in a child process)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    from engine import LLMEngine, SamplingParams
    from engine.config import EngineConfig
    from experiments.bench_serve import make_requests, parse_args

    reqs = make_requests(parse_args(_workload_args(a)))
    engine = LLMEngine(EngineConfig(model=a.model, allocator=a.allocator, record_memory=False, **_engine_overrides(a)))
    for i, r in enumerate(reqs[:8]):  # warm-up: the prefill kernels of each shape class
        engine.add_request(f"warm-{i}", r.prompt, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        engine.add_request(f"r{i}", r.prompt, SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0,
                                                             output_kind="final_only"))
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(c.token_ids) for o in engine.step() if o.finished for c in o.outputs)
    sync()
    wall = time.perf_counter() - t0
    return dict(output_tokens=tokens, wall_s=wall, output_throughput=tokens / wall,
                kv_capacity_tokens=engine.kv_capacity_tokens,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def online(a: argparse.Namespace, out: Path) -> tuple[dict, list[str], list[str]]:
    port = _free_port()
    over = _engine_overrides(a)
    serve_cmd = ["kvlab", "serve", f"model={a.model}", f"allocator={a.allocator}", f"port={port}",
                 "access_log=false", "log_level=warning", "engine.kv_cache_tokens=null",
                 *(f"++engine.{k}={v}" for k, v in over.items() if k != "kv_cache_tokens")]
    log_path = out / f"serve_{a.model}.log"
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", *serve_cmd[1:]], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kvlab serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        print(f"server up after {time.time() - t0:.0f} s", flush=True)
        # warm-up through the server, as the offline run warms up
        subprocess.run([sys.executable, "-m", "experiments.cli", "bench", "serve", "--base-url", url,
                        "--num-prompts", "16", "--random-input-len", str(a.input_len), "--random-output-len", "8",
                        "--vocab-high", str(a.vocab_high), "--disable-tqdm", "--seed", "1"], check=True,
                       stdout=subprocess.DEVNULL)
        bench_cmd = ["kvlab", "bench", "serve", "--base-url", url, *_workload_args(a), "--max-concurrency",
                     str(a.concurrency), "--num-clients", str(a.num_clients), "--server-metrics", "--save-result",
                     "--result-dir", str(out), "--result-filename", f"bench_serve_{a.model}.json", "--disable-tqdm"]
        print(f"warm-up done after {time.time() - t0:.0f} s", flush=True)
        subprocess.run([sys.executable, "-m", "experiments.cli", *bench_cmd[1:]], check=True, timeout=a.bench_timeout)
    finally:
        proc.terminate()  # the server stops its engine process first, then exits
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
    return json.loads((out / f"bench_serve_{a.model}.json").read_text()), serve_cmd, bench_cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.serve_vs_offline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--allocator", default="paged")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=562, help="with --range-ratio 0.82: uniform in [101, 1023]")
    ap.add_argument("--range-ratio", type=float, default=0.82)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--num-clients", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=1536)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    add_async_arg(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-high", type=int, default=1000, help="prompt token ids uniform in [10, this)")
    ap.add_argument("--out", default="results/serving")
    ap.add_argument("--bench-timeout", type=float, default=600, help="seconds the load may take at most")
    ap.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args(argv)
    if a.offline_only:
        print(json.dumps(offline(a)))
        return 0
    import torch

    if not torch.cuda.is_available():  # its engine settings size the KV pool from GPU memory
        raise SystemExit("serve_vs_offline needs a CUDA device")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    t_start = time.time()
    child = subprocess.run([sys.executable, "-m", "experiments.serve_vs_offline", *argv, "--offline-only"],
                           capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"the offline run failed ({child.returncode}):\n{child.stderr[-4000:]}")
    off = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"[{time.time() - t_start:.0f} s] offline: {off['output_throughput']:.0f} output tok/s", flush=True)
    bench, serve_cmd, bench_cmd = online(a, out)
    server_rate = bench.get("server_output_throughput") or bench["output_throughput"]
    res = dict(model=a.model, allocator=a.allocator, device=off["device"], workload=_workload_args(a),
               concurrency=a.concurrency, async_scheduling=a.async_scheduling,
               offline_output_throughput=off["output_throughput"], offline_wall_s=off["wall_s"],
               served_output_throughput=bench["output_throughput"], server_counter_output_throughput=server_rate,
               completed=bench["completed"], failed=bench["failed"],
               ratio_client=bench["output_throughput"] / off["output_throughput"],
               ratio_server_counter=server_rate / off["output_throughput"],
               mean_ttft_ms=bench["mean_ttft_ms"], mean_tpot_ms=bench["mean_tpot_ms"],
               commands=dict(this=f"python -m experiments.serve_vs_offline {' '.join(argv)}",
                             serve=" ".join(serve_cmd), bench=" ".join(bench_cmd)))
    write_json(out / f"{a.model}_{off['device'].replace(' ', '_')}.json", res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
