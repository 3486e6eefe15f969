"""Step latency of the engine against its physical floors (GPU).

    python -m experiments.bench_latency --models qwen3-0.6b,llama3-8b --out results/engine

Per model, one engine (paged, random bf16 weights), three measurements side by side:

- ``decode``: time per output token of B sequences decoding (512-token prompts), synchronous
  and asynchronous scheduling, against the memory floor: (weights streamed + KV read) / copy
  bandwidth measured in the same run (the embedding table is gathered, not streamed, unless
  tied to the LM head); ``read_floor_pct``: the same floor at the bandwidth of reads alone (a
  kernel that only reads, as decode GEMMs read weights, can go above copy bandwidth);
- ``prefill``: one step holding a single prompt of N tokens, and ``mixed``: the same beside 8
  decodes; each with the engine's CUDA graphs of prefill/mixed steps (``cuda_graph_mode``) and
  eagerly (as with ``cuda_graph_max_tokens`` = 0), medians of repeats: what the graphs take off a step.

``--fused-gemv-max-tokens 0,16`` builds one engine per value (``engine.fused_gemv_max_tokens``:
steps of up to that many tokens run each linear layer as a ``kernels.small_linear`` kernel) and
measures each in turn: the same run, the same device, before and after. ``--enable-pdl 0,1`` (one
value for all, or one per engine beside ``--fused-gemv-max-tokens``) sets ``engine.enable_pdl``
(programmatic dependent launch of the step's Triton kernels, kernels/pdl.py).

Rows go to ``latency_<device>.csv`` and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from experiments.atomic import write_csv
from experiments.bench import copy_bandwidth
from experiments.bench_kernels import read_bandwidth_gbps
from experiments.floors import memory_floor_s
from experiments.tables import markdown_table

PROMPT = 512


def _drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()


def _prompt(i: int, n: int, vocab: int) -> list[int]:
    rng = np.random.default_rng(i)
    return rng.integers(4, vocab, size=n).tolist()


def decode_rows(engine: LLMEngine, batch: int, steps: int, copy_bw: float, read_bw: float) -> list[dict]:
    """Decode time a token at ``batch``, both schedulings, against the memory floor at ``copy_bw``
    and at the read-only rate ``read_bw`` (how far above the floor a step could still go)."""
    rows = []
    vocab = engine.model_config.vocab_size
    for mode in ("sync", "async"):
        engine.config.async_scheduling = mode == "async"
        for i in range(batch):
            engine.add_request(f"d{mode}{batch}-{i}", _prompt(i, PROMPT, vocab),
                               SamplingParams(max_tokens=steps + 40, ignore_eos=True, temperature=0))
        while not engine.step_records or engine.step_records[-1].prefill_tokens or len(engine.step_records) < 3:
            engine.step()
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        per_token = (time.perf_counter() - t0) / steps
        _drain(engine)
        ctx = PROMPT + 5 + steps // 2
        floor = memory_floor_s(engine.model, batch * ctx * engine.kv_spec.bytes_per_token, copy_bw)
        rows.append(dict(kind="decode", scheduling=mode, batch=batch, tokens=batch, ms=per_token * 1e3,
                         floor_ms=floor * 1e3, floor_pct=100 * floor / per_token,
                         read_floor_pct=100 * floor * copy_bw / read_bw / per_token))
    engine.config.async_scheduling = False
    return rows


def prefill_rows(engine: LLMEngine, tokens: int, decodes: int, reps: int) -> list[dict]:
    """Median step time of one ``tokens``-token prompt (beside ``decodes`` decoding sequences),
    the engine's prefill/mixed graphs and eager."""
    runner, vocab = engine.runner, engine.model_config.vocab_size
    mixed = runner.mixed_graphs
    rows = []
    for graphs in (True, False):
        runner.mixed_graphs = mixed if graphs else None
        times = []
        for r in range(reps + 1):
            for i in range(decodes):
                engine.add_request(f"m{tokens}-{graphs}-{r}-{i}", _prompt(1000 + i, 64, vocab),
                                   SamplingParams(max_tokens=64, ignore_eos=True, temperature=0))
            if decodes:  # the decodes' prompts first, until a step has none left
                engine.step()
                while engine.has_unfinished_requests() and engine.step_records[-1].prefill_tokens:
                    engine.step()
            engine.add_request(f"p{tokens}-{graphs}-{r}", _prompt(2000 + r, tokens, vocab),
                               SamplingParams(max_tokens=1, ignore_eos=True, temperature=0))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            if r:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
            _drain(engine)
        rows.append(dict(kind="mixed" if decodes else "prefill", scheduling="sync", batch=decodes + 1,
                         tokens=tokens + decodes, graphs=engine.config.cuda_graph_mode if graphs else "eager",
                         ms=float(np.median(times)) * 1e3))
    runner.mixed_graphs = mixed
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-0.6b,llama3-8b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prefill-tokens", default="16,128,512,1536")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--fused-gemv-max-tokens", default="0",
                    help="comma-separated engine.fused_gemv_max_tokens values, one engine each (0: cuBLAS)")
    ap.add_argument("--enable-pdl", default="0",
                    help="comma-separated engine.enable_pdl values (0/1): one for every engine or one each")
    ap.add_argument("--out", default="results/engine")
    a = ap.parse_args(argv)
    gemvs = [int(x) for x in a.fused_gemv_max_tokens.split(",")]
    values = [x.strip().lower() for x in a.enable_pdl.split(",")]
    if not set(values) <= {"0", "1", "true", "false"}:
        ap.error(f"--enable-pdl {a.enable_pdl}: give 0/1 (or false/true) values, comma-separated")
    pdls = [x in ("1", "true") for x in values]
    if len(pdls) not in (1, len(gemvs)):
        ap.error(f"--enable-pdl: one value or one per --fused-gemv-max-tokens value ({len(gemvs)}), got {len(pdls)}")
    variants = list(zip(gemvs, pdls * len(gemvs) if len(pdls) == 1 else pdls))
    prefills = [int(x) for x in a.prefill_tokens.split(",") if x]
    if not torch.cuda.is_available():
        raise SystemExit("bench_latency needs a CUDA device")
    device = torch.cuda.get_device_name()
    bw = copy_bandwidth("cuda")
    read_bw = max(read_bandwidth_gbps().values()) * 1e9
    print(f"device: {device}; copy bandwidth {bw / 1e9:.0f} GB/s, read alone {read_bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for run, (model, (gemv, pdl)) in enumerate((m, v) for m in a.models.split(",") for v in variants):
        t0 = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=model, allocator="paged", max_model_len=4096, max_num_seqs=64,
                                        kv_cache_tokens=65536, detokenize=False, record_memory=False,
                                        stream_outputs=False, fused_gemv_max_tokens=gemv, enable_pdl=pdl))
        pw = engine.runner.mixed_graphs
        start = dict(model=model, fused_gemv_max_tokens=gemv, enable_pdl=pdl,
                     startup_s=round(time.perf_counter() - t0, 1),
                     graph_mode=engine.config.cuda_graph_mode,
                     mixed_graphs_capture_s=round(pw.capture_s, 1) if pw else None)
        print(start, flush=True)
        tag = dict(model=model, fused_gemv=gemv, pdl=int(pdl), engine_run=run)  # a value given twice: repeats, told apart
        for b in (int(x) for x in a.batches.split(",")):
            rows += [dict(**tag, **r) for r in decode_rows(engine, b, a.steps, bw, read_bw)]
        for n in prefills:
            for decodes in (0, 8):
                rows += [dict(**tag, **r) for r in prefill_rows(engine, n, decodes, a.reps)]
        print(markdown_table(pd.DataFrame([r for r in rows if r["engine_run"] == run])), flush=True)
        engine.close()  # its weights and graphs go before the next engine's
        del engine
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    df["device"], df["copy_bw_GBps"], df["read_bw_GBps"] = device, bw / 1e9, read_bw / 1e9
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"latency_{device.replace(' ', '_')}.csv"
    write_csv(path, df)  # atomic: a cut-off write leaves no partial file
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
