"""Host time per engine step at 256 streaming sequences, by output length (CPU, no model).

Streaming (``output_kind='delta'``, text on, a stop string to watch) must cost the same per
step whatever the outputs' length; ``cumulative`` outputs (everything so far, each step) are
the before, measured side by side in the same run.

    python -m experiments.bench_stream_host --out results/serving
"""
from __future__ import annotations

import argparse
import pickle
import sys
import platform
import statistics
import time
from pathlib import Path

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from experiments.atomic import write_text
from experiments.host_runner import HostOnlyRunner

NUM_SEQS = 256
PROMPT = 128


def streaming_engine(kind: str, max_len: int = 4096, stop: list[str] | None = None, core: bool = False) -> LLMEngine:
    """256 requests of ``kind`` outputs on a host-only engine; ``core``: set up as ``kvlab serve``'s
    engine process sets up its engine (before any request: token ids only, packed outputs)."""
    cfg = EngineConfig(model="tiny-llama", allocator="paged", max_model_len=max_len, max_num_seqs=NUM_SEQS,
                       max_num_batched_tokens=NUM_SEQS * PROMPT, kv_cache_tokens=NUM_SEQS * max_len,
                       record_memory=False, stream_outputs=True, async_scheduling=False)  # the host-only
    # runner computes its tokens at once: the synchronous host path (the serving engine overlaps it on a GPU)
    engine = LLMEngine(cfg, runner_factory=lambda a: HostOnlyRunner(a, NUM_SEQS, max_len, token=3 + ord("a")))
    if core:
        EngineCore(engine, lambda msg: None)
    params = SamplingParams(max_tokens=max_len - PROMPT, ignore_eos=True, temperature=0,
                            stop=["never seen"] if stop is None else stop, output_kind=kind)
    for i in range(NUM_SEQS):
        engine.add_request(str(i), [5 + (i + j) % 500 for j in range(PROMPT)], params)
    return engine


def core_ms(serving: bool, steps: int, outputs: int = 100) -> float:
    """Median CPU ms per step of the engine as ``kvlab serve``'s core runs it (delta outputs, no
    text, packed and pickled for the pipe) or as an offline run does (final-only outputs)."""
    engine = streaming_engine("delta" if serving else "final_only", max_len=1024, stop=[], core=serving)
    while not engine.scheduler.running or engine.scheduler.running[0].num_output_tokens < outputs:
        engine.step()
    cpu = []
    for _ in range(steps):
        c = time.thread_time()
        outs = engine.step()
        if serving:
            pickle.dumps(("outputs", outs, None, engine.output_processor.take_fast()))
        cpu.append(time.thread_time() - c)
    return 1000 * statistics.median(cpu)


def host_ms_at(engine: LLMEngine, outputs: int, steps: int) -> tuple[float, float]:
    """Median (CPU, wall) ms of ``steps`` steps once every sequence has ``outputs`` output tokens.
    CPU time is this thread's own: what other processes on a shared machine do does not count."""
    while not engine.scheduler.running or engine.scheduler.running[0].num_output_tokens < outputs:
        engine.step()
    cpu, wall = [], []
    for _ in range(steps):
        c, t = time.thread_time(), time.perf_counter()
        engine.step()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    engine.step_records.clear()
    return 1000 * statistics.median(cpu), 1000 * statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_stream_host", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="100,500,1500")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", help="folder for stream_host_<machine>.md")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for kind in ("delta", "cumulative"):
        engine = streaming_engine(kind)
        ms = [host_ms_at(engine, n, args.steps) for n in lengths]
        rows.append((kind, ms))
        print(f"{kind:>10}: " + ", ".join(f"{n} tokens {c:.2f} ms CPU ({w:.2f} wall)" for n, (c, w) in zip(lengths, ms)),
              flush=True)
    head = "| output_kind | " + " | ".join(f"{n} output tokens" for n in lengths) + " | last / first (CPU) |"
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    for kind, ms in rows:
        lines.append(f"| {kind} | " + " | ".join(f"{c:.2f} ms ({w:.2f})" for c, w in ms)
                     + f" | {ms[-1][0] / ms[0][0]:.2f} |")
    table = "\n".join(lines) + "\n\nms of CPU time of the engine thread per step (wall-clock ms in brackets), median."
    offline, serving = core_ms(False, args.steps), core_ms(True, args.steps)
    table += ("\n\nThe engine as `kvlab serve`'s core runs it (delta outputs, token ids only, packed and pickled "
              f"for the pipe): {serving:.2f} ms CPU per step, against {offline:.2f} ms for an offline run "
              "(final-only outputs), 256 sequences.")
    print(table)
    if args.out:
        machine = f"{platform.machine()}-{platform.processor() or 'cpu'}"
        text = (f"# Host time per step, {NUM_SEQS} streaming sequences (median of {args.steps} steps)\n\n"
                f"machine: {platform.platform()}, {machine}\n\ncommand: `python -m experiments.bench_stream_host "
                f"{' '.join(argv or [])}`\n\n{table}\n")
        write_text(Path(args.out) / "stream_host_cpu.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
