"""A prefill step of whole prompts through the engine: PAGED reading its cache, PAGED reading the
step's own K/V projection (``engine.prompt_attention=qkv``), and LINEAR (contiguous), side by side.

    python -m experiments.bench_prompt_attention --models llama3-8b --out results/engine/prompt_attention

Per model: one PAGED engine built with ``prompt_attention=qkv`` (its full graphs hold both
variants) whose runner is switched between the two per repeat, and one contiguous engine; random
bf16 weights, the engine's defaults otherwise (full CUDA graphs up to 8,192 tokens). Each shape
``BxN`` is one step of B prompts of N tokens that each sample one token; the time is from
``step()`` until the device is idle, median of ``--reps`` (the three alternate, after a warm-up
each). Every timed step is checked to have read its keys the way its row says. Rows go to
``prompt_attention_<device>.csv`` and a markdown table with each row against LINEAR.
On a CPU it runs tiny-llama on short prompts by default (a smoke run: the reference kernels, eager).
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
from experiments.tables import markdown_table

SHAPES = "1x8192,4x2048,8x1024,16x512"
CPU_SHAPES = "2x64,1x128"


def _sync(engine: LLMEngine) -> None:
    if str(engine.device).startswith("cuda"):
        torch.cuda.synchronize()


class _OwnKvSpy:
    """Whether the engine's last step read its keys from its own K/V projection."""

    def __init__(self, runner):
        self.last = None
        meta_of = runner._metadata

        def spy(inputs, group=0, own_kv=False):
            self.last = own_kv
            return meta_of(inputs, group, own_kv)

        runner._metadata = spy


def step_time(engine: LLMEngine, batch: int, length: int, tag: str, seed: int) -> float:
    """Seconds of one step holding ``batch`` fresh ``length``-token prompts (each samples a token
    and finishes)."""
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", rng.integers(4, vocab, size=length).tolist(),
                           SamplingParams(max_tokens=1, ignore_eos=True, temperature=0))
    _sync(engine)
    t0 = time.perf_counter()
    engine.step()
    _sync(engine)
    dt = time.perf_counter() - t0
    if engine.has_unfinished_requests() or engine.step_records[-1].prefill_tokens != batch * length:
        raise RuntimeError(f"{batch}x{length} did not run as one step: raise max_num_batched_tokens")
    return dt


def run(model: str, shapes: list[tuple[int, int]], reps: int, **engine_kw) -> pd.DataFrame:
    cfg = dict(model=model, detokenize=False, record_memory=False, stream_outputs=False,
               max_num_batched_tokens=max(b * n for b, n in shapes), max_num_seqs=max(b for b, _ in shapes),
               max_model_len=max(n for _, n in shapes) + 16, async_scheduling=False)
    cfg.update(engine_kw)
    paged = LLMEngine(EngineConfig(allocator="paged", prompt_attention="qkv", **cfg))
    if not paged.runner.prompt_qkv:
        raise SystemExit("the paged engine cannot read prompts' own K/V here (fp8 cache or layer groups)")
    linear = LLMEngine(EngineConfig(allocator="contiguous", **cfg))
    spies = {id(e): _OwnKvSpy(e.runner) for e in (paged, linear)}
    variants = [("paged", "cache", paged, False), ("paged", "qkv", paged, True), ("contiguous", "cache", linear, False)]
    rows = []
    for b, n in shapes:
        times: dict[tuple[str, str], list[float]] = {(a, s): [] for a, s, _, _ in variants}
        for r in range(reps + 1):
            for alloc, source, eng, own in variants:
                eng.runner.prompt_qkv = own
                dt = step_time(eng, b, n, f"{alloc}-{source}-{b}x{n}-{r}", seed=r)
                if spies[id(eng)].last != own:
                    raise RuntimeError(f"{alloc} {source} {b}x{n}: the step read its keys the other way")
                if r:  # the first round warms up
                    times[(alloc, source)].append(dt)
        lin = float(np.median(times[("contiguous", "cache")]))
        for (alloc, source), ts in times.items():
            med = float(np.median(ts))
            rows.append(dict(model=model, shape=f"{b}x{n}", allocator=alloc, prompt_attention=source,
                             ms=med * 1e3, ms_min=min(ts) * 1e3, vs_linear_pct=100 * (med / lin - 1), reps=len(ts)))
    for eng in (paged, linear):
        eng.close()
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_prompt_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="default: llama3-8b on a GPU, tiny-llama on a CPU")
    ap.add_argument("--shapes", default=None,
                    help=f"BxN,...: B whole prompts of N tokens in one step (default {SHAPES}; CPU {CPU_SHAPES})")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default="results/engine/prompt_attention")
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error(f"--reps must be >= 1, got {a.reps}")
    cuda = torch.cuda.is_available()
    a.models = a.models or ("llama3-8b" if cuda else "tiny-llama")
    a.shapes = a.shapes or (SHAPES if cuda else CPU_SHAPES)
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes takes BxN,... with positive B and N, got {a.shapes!r}")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    # both engines on one device: pools of a fixed size, not a share of its memory each; contiguous
    # reserves max_model_len a sequence
    kw = dict(kv_cache_tokens=max(b for b, _ in shapes) * (max(n for _, n in shapes) + 16))
    if not cuda:
        kw["device"] = "cpu"
    df = pd.concat([run(m, shapes, a.reps, **kw) for m in a.models.split(",")], ignore_index=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"prompt_attention_{device.replace(' ', '_')}.csv"
    write_csv(path, df)  # atomic: a cut-off write leaves no partial file
    print(f"device: {device}\n" + markdown_table(df) + f"\n-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
