"""``kvlab profile``: measure this engine's own operations on the current device.

Writes a device profile (one parquet file, long format: a ``table`` column names what each
row measures, ``value`` is seconds) that the profiled cost model of simulate mode reads
(experiments/profiled_costmodel.py). Tables:

- ``decode_graph``: one pure-decode step as the engine runs it (the captured CUDA graph of the
  whole model, logits included) by padded batch and context per sequence, per addressing mode
  (LINEAR; PAGED per block size), per model;
- ``eager_forward``: an eager forward of a prefill chunk of ``query`` tokens (launch costs
  included, logits of one row, its token read back), per model; ``prefill_graph``: the same
  forward's device time alone; ``piecewise_forward``: the same chunk through the engine's
  piecewise CUDA graphs (everything but attention replayed), wall time; ``full_forward``: through
  its full graphs (``cuda_graph_mode=full``: one replay, attention captured), wall time;
- ``attention``: one layer's attention kernel by addressing mode, block size, batch, context
  and query length (decode: query 1, alone, split as under the decode graph's ``max_model_len``,
  or ``mixed`` beside a prefill chunk; prefill: one sequence), per model head shape;
- ``decode_graph_ragged``: ``decode_graph`` of lognormal (ShareGPT-like) batches, the check of
  the cost model's ragged term on whole steps (``python -m experiments.bench_ragged --check``);
- ``ragged``: decode attention of ragged batches (lognormal, two-point) and uniform ones of the
  same mean, with the programs the kernel launches for them (experiments/ragged_decode.py): the
  profiled cost model fits its critical-path term to these;
- ``gemm``: a bf16 linear layer by token count ``m`` for every (n, k) of the profiled models
  (another model size interpolates from these);
- ``sample``: greedy sampling of ``batch`` rows of logits;
- ``copy``: host<->device copies (pinned) by size (swap);
- ``vmm``: CUDA VMM map / unmap per page (vAttention);
- ``host``: engine steps of the real engine per allocator: wall time minus device time
  (scheduling, allocation, accounting, input preparation, output handling), by batch; with
  ``--host-scheduling async`` (or ``sync,async``) also steps of the asynchronous engine, whose CPU
  time per step (waits for the device left out) simulate takes as an overlapped step's host part.

Kernel timings run inside a CUDA graph (no launch cost), operands rotated over copies larger
than L2 so no layer reads another's weights from cache. Metadata (device, versions, commit,
settings) is stored in the parquet file's key-value metadata ``kvlab_profile``.

Progress goes to stderr (stdout: the ``wrote ...`` line): each part's start (which of the run's
parts, how many figures, the ``--skip`` that leaves it out), a line every ~10 s inside it (done of
total, elapsed, time left; each host-time engine its phases), its end (elapsed, rows);
``--no-progress`` keeps the end lines alone.

    kvlab profile --models qwen3-0.6b,llama3-8b --out results/profiles
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

DECODE_BATCHES = [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256]
CONTEXTS = [16, 128, 256, 512, 1024, 1536, 2048]
PREFILL_QUERIES = [16, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
GEMM_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
SAMPLE_ROWS = [1, 8, 32, 64, 128, 256]
COPY_BYTES = [1 << s for s in range(16, 29, 2)]  # 64 KiB .. 256 MiB
L2_ROTATE_BYTES = 256 << 20
MIXED_MAX_QUERY = 64
RAGGED_BATCHES = [4, 8, 16, 32, 64, 128, 256]
RAGGED_MEANS = [300, 700]
RAGGED_DISTS = ("uniform", "lognormal", "twopoint")
GEMV_TOKENS = 16  # decode graphs of up to this many sequences also timed through kernels.small_linear
PROGRESS_EVERY_S = 10.0  # a progress line at least this often inside a part (a GPU profile's parts take minutes)


def say_progress(t0: float, text: str) -> None:
    """One progress line on stderr, timed from ``t0`` (``time.time()`` at the profile's start; the
    host-time subprocesses get it too): stdout keeps the result line."""
    print(f"[{time.time() - t0:6.1f} s] {text}", file=sys.stderr, flush=True)


def _no_tick() -> None:
    pass


def _ticked(items, tick: Callable[[], None]):
    """``items``, ``tick()`` after the loop's body is done with each (a ``continue`` included)."""
    for x in items:
        yield x
        tick()


class Progress:
    """The progress lines of a ``kvlab profile`` run: a part's start (which of the run's parts, how
    many figures it times, how to leave it out), a line every ``PROGRESS_EVERY_S`` inside it (done
    of total, elapsed, time left) and its end (elapsed, rows). ``enabled`` False (``--no-progress``):
    the end lines alone, as before there were others."""

    def __init__(self, t0: float, parts: int, enabled: bool = True):
        self.t0, self.parts, self.enabled = t0, parts, enabled
        self.index, self.label, self.unit, self.total, self.done = 0, "", "", 0, 0
        self.started = self.last = t0

    def line(self, text: str) -> None:
        if self.enabled:
            say_progress(self.t0, text)

    def start(self, part: str, label: str, total: int, unit: str = "measurements") -> None:
        self.index += 1
        self.label, self.unit, self.total, self.done = label, unit, total, 0
        self.started = self.last = time.time()
        self.line(f"{label} (part {self.index} of {self.parts}): {total} {unit} (--skip {part} leaves them out)")

    def tick(self, what: str = "", force: bool = False) -> None:
        """One measurement done; a line if ``PROGRESS_EVERY_S`` passed since the last (``force``: now)."""
        self.done += 1
        now = time.time()
        if force or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            took = now - self.started
            left = took / self.done * (self.total - self.done)
            eta = f", about {left:.0f} s left" if self.done < self.total else ""
            self.line(f"{self.label}: {self.done} of {self.total} in {took:.1f} s{eta}{what}")

    def end(self, rows: int, total_rows: int, partial: Path) -> None:
        """The part's end: always said (with --no-progress too: these lines predate the others)."""
        done = f"{self.done}" if self.done == self.total else f"{self.done} of {self.total}"
        say_progress(self.t0, f"{self.label}: done, {done} {self.unit} in {time.time() - self.started:.1f} s, "
                              f"{rows} rows ({total_rows} so far in {partial})")


def slug(device_name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in device_name.lower()).split())


class Timer:
    """Seconds per call: inside a CUDA graph on a GPU (device time only), wall time on a CPU."""

    def __init__(self, device, reps: int = 10):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.reps = reps

    def graph(self, fns: list) -> float:
        """Mean device time of one call of ``fns`` (called round-robin: operand copies)."""
        torch = self.torch
        if not self.cuda:
            for f in fns:
                f()
            t = time.perf_counter()
            for i in range(self.reps):
                fns[i % len(fns)]()
            return (time.perf_counter() - t) / self.reps
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside capture: Triton compiles, cuBLAS picks
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        return self.replay(g.replay, len(fns))

    def replay(self, run, calls_per_run: int = 1) -> float:
        torch = self.torch
        run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.reps):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / (self.reps * calls_per_run)

    def wall(self, fn) -> float:
        """Median wall time of ``fn`` from an idle device to its end (launch costs included)."""
        sync = self.torch.cuda.synchronize if self.cuda else (lambda: None)
        fn()
        sync()
        times = []
        for _ in range(max(3, self.reps // 2)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))


def _gemm_shapes(models: list[str]) -> set[tuple[int, int]]:
    """The (n, k) of every linear layer of ``models``: fused QKV, output, fused gate-up, down, LM head."""
    from engine.loader import resolve_config

    shapes = set()
    for m in models:
        mc = resolve_config(m)
        q, kv, h, i = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim, \
            mc.hidden_size, mc.intermediate_size
        shapes |= {(q + 2 * kv, h), (h, q), (2 * i, h), (h, i), (mc.vocab_size, h)}
    return shapes


def _rows_gemm(timer: Timer, shapes: set[tuple[int, int]], dtype, device,
               tick: Callable[[], None] = _no_tick) -> list[dict]:
    import torch
    import torch.nn.functional as F

    rows = []
    for n, k in sorted(shapes):
        copies = max(1, min(8, math.ceil(L2_ROTATE_BYTES / (n * k * 2))))
        ws = [torch.randn(n, k, dtype=dtype, device=device) * 0.02 for _ in range(copies)]
        for m in _ticked(GEMM_M, tick):
            x = torch.randn(m, k, dtype=dtype, device=device)
            t = timer.graph([(lambda w=w: F.linear(x, w)) for w in ws])
            rows.append(dict(table="gemm", m=m, n=n, k=k, value=t))
        del ws
    return rows


def _paged_meta(ctxs: list[int], q: int, bs: int, num_blocks: int, device, gen, width: int = 0):
    """PAGED metadata of sequences of ``ctxs`` keys each, the last ``q`` of them queried, their
    blocks drawn at random from the pool; a block table ``width`` wide (default: the longest)."""
    import torch

    from kernels.metadata import Addressing, AttentionMetadata

    i32 = dict(dtype=torch.int32, device=device)
    nbs = [-(-c // bs) for c in ctxs]
    width = max(width, max(nbs))
    perm = torch.randperm(num_blocks, generator=gen)[: sum(nbs)].tolist()
    rows, at = [], 0
    for nb in nbs:
        rows.append(perm[at:at + nb] + [0] * (width - nb))
        at += nb
    blocks = torch.tensor(rows, **i32)
    seq = torch.arange(len(ctxs), device=device).repeat_interleave(q)
    pos = (torch.tensor(ctxs, device=device).repeat_interleave(q)
           - q + torch.arange(q, device=device).repeat(len(ctxs)))
    slots = blocks[seq, pos // bs].long() * bs + pos % bs
    return AttentionMetadata(Addressing.PAGED, torch.arange(0, (len(ctxs) + 1) * q, q, **i32),
                             torch.tensor(ctxs, **i32), q, max(ctxs), slots, block_table=blocks, block_size=bs)


def _modes(block_sizes: list[int]) -> list[tuple[str, int]]:
    return [("linear", 0)] + [("paged", bs) for bs in block_sizes]


def _attention_cases(pool: int, block_sizes) -> list[tuple]:
    """(mode, block size, batch, context, query, mixed) of the attention table that fit ``pool``."""
    shapes = [(b, c, 1, False) for b in (1, 4, 16, 64, 128, 256) for c in CONTEXTS]
    # decode tokens inside a mixed batch: the kernel then runs its prefill tiles, without split-KV
    shapes += [(b, c, 1, True) for b in (1, 4, 16, 64, 128, 256) for c in CONTEXTS]
    shapes += [(1, q + c0, q, False) for q in PREFILL_QUERIES for c0 in (0, 1024)]
    return [(mode, bs, *s) for mode, bs in _modes(block_sizes) for s in shapes if s[0] * s[1] <= pool // 2]


def _rows_attention(timer: Timer, mc, name: str, pool: int, block_sizes, dtype, device, span: int,
                    tick: Callable[[], None] = _no_tick) -> list[dict]:
    import torch

    from kernels import ops
    from kernels.metadata import Addressing, contiguous_metadata

    gen = torch.Generator().manual_seed(0)
    kvh, d, h = mc.num_key_value_heads, mc.head_dim, mc.num_attention_heads
    k_cache = torch.zeros(pool, kvh, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    rows = []
    for mode, bs, b, ctx, q, mixed in _ticked(_attention_cases(pool, block_sizes), tick):
        copies = max(1, min(4, pool // max(1, b * ctx * 2)))
        metas = []
        for c in range(copies):
            if mode == "linear":
                meta = contiguous_metadata(Addressing.LINEAR, [q] * b, [ctx] * b, device)
                meta.seq_base += c * b * ctx  # each copy reads its own keys
            else:
                meta = _paged_meta([ctx] * b, q, bs, pool // bs, device, gen)
            if mixed:
                meta.max_query_len = MIXED_MAX_QUERY  # an upper bound, as a prefill chunk beside makes it
            elif q == 1:  # a decode batch runs in the decode graph, split under its bound
                meta.max_seq_len = max(span, ctx)
            metas.append(meta)
        qt = torch.randn(b * q, h, d, dtype=dtype, device=device)
        t = timer.graph([(lambda m=m: ops.attention(qt, k_cache, v_cache, m, d**-0.5)) for m in metas])
        rows.append(dict(table="attention", model=name, mode=mode, block_size=bs, batch=b, context=ctx,
                         query=q, mixed=mixed, value=t))
    return rows


def _decode_metas(ctxs: list[int], bs: int, span: int, pool: int, device, gen) -> list:
    """Decode metadata of sequences of ``ctxs`` keys as the decode graph launches them (split
    under its bound ``span``): PAGED (``bs`` > 0) or LINEAR, in up to 4 copies that each read
    their own keys of a ``pool``-slot cache (no copy finds another's in L2)."""
    from kernels.metadata import Addressing, contiguous_metadata

    metas = []
    for c in range(max(1, min(4, pool // (2 * sum(ctxs))))):
        if bs:
            m = _paged_meta(ctxs, 1, bs, pool // bs, device, gen, -(-span // bs))
        else:
            m = contiguous_metadata(Addressing.LINEAR, [1] * len(ctxs), ctxs, device)
            m.seq_base += c * sum(ctxs)
        m.max_seq_len = span  # what the decode graph's metadata says: its split config
        metas.append(m)
    return metas


def _ragged_cases(block_sizes) -> list[tuple]:
    """(mode, block size, batch, mean, distribution) of the ragged table (a drawn batch that does not
    fit the pool is left out when drawn)."""
    return [(mode, bs, b, m, dd) for mode, bs in _modes(block_sizes)
            for b in RAGGED_BATCHES for m in RAGGED_MEANS for dd in RAGGED_DISTS]


def _rows_ragged(timer: Timer, mc, name: str, pool: int, span: int, block_sizes, dtype, device,
                 tick: Callable[[], None] = _no_tick) -> list[dict]:
    """Decode attention (one layer, the decode graph's config: split under ``span``) of ragged
    batches and uniform ones of the same mean (experiments/ragged_decode.py), per mode; each row
    with the batch's programs as the kernel launches them, for the profiled cost model's fit."""
    import torch

    from experiments.ragged_decode import as_launched, contexts, model_programs
    from kernels import ops
    from kernels.triton_attention import device_sms

    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    kvh, d, h = mc.num_key_value_heads, mc.head_dim, mc.num_attention_heads
    k_cache = torch.zeros(pool, kvh, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    rows = []
    for mode, bs, b, mean, dist in _ticked(_ragged_cases(block_sizes), tick):
        ctxs = contexts(dist, b, mean, span, rng)
        if 2 * sum(ctxs) > pool:
            continue
        p = model_programs(mc, ctxs, elem_size=k_cache.element_size(), num_sms=device_sms(device), span=span)
        ctxs = as_launched(ctxs, p)
        metas = _decode_metas(ctxs, bs, span, pool, device, gen)
        qt = torch.randn(b, h, d, dtype=dtype, device=device)
        out = torch.empty_like(qt)
        t = timer.graph([(lambda m=m: ops.attention(qt, k_cache, v_cache, m, d**-0.5, out=out)) for m in metas])
        rows.append(dict(table="ragged", model=name, mode=mode, block_size=bs, batch=b, dist=dist, mean=mean,
                         context=float(np.mean(ctxs)), max_context=max(ctxs), span=span,
                         longest_bytes=p.longest_bytes, uniform_bytes=p.uniform_bytes, programs=p.programs,
                         slots=p.slots, ordered=p.ordered, contexts=json.dumps(ctxs), value=t))
    return rows


def _decode_graph_cases(pool: int, max_model_len: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per mode, the decode graphs timed: (batch, context) of uniform batches that fit, and (batch,
    mean) of ragged ones (a drawn batch that does not fit the pool is left out when drawn)."""
    uniform = [(b, ctx) for b in DECODE_BATCHES for ctx in CONTEXTS if ctx <= max_model_len and b * ctx <= pool]
    return uniform, [(b, m) for b in RAGGED_BATCHES if b in DECODE_BATCHES for m in RAGGED_MEANS]


def _gemv_cases(uniform: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The uniform decode graphs timed again through ``kernels.small_linear``: up to GEMV_TOKENS sequences."""
    return [(b, ctx) for b, ctx in uniform if b <= GEMV_TOKENS]


def _model_count(pool: int, max_model_len: int, block_sizes, cuda: bool, pdl: bool = False) -> int:
    """The figures ``_rows_model`` times (its progress total): one per loop case of its tables
    (``pdl``: the device takes programmatic dependent launch, the small_linear graphs timed twice)."""
    n = len(_attention_cases(pool, block_sizes)) + len([q for q in PREFILL_QUERIES if q <= pool]) + len(SAMPLE_ROWS)
    if cuda:
        uniform, ragged = _decode_graph_cases(pool, max_model_len)
        n += len(_modes(block_sizes)) * (len(uniform) + len(ragged) + len(_gemv_cases(uniform)) * (2 if pdl else 1))
    return n


def _rows_model(timer: Timer, name: str, pool: int, max_model_len: int, block_sizes, device,
                tick: Callable[[], None] = _no_tick) -> list[dict]:
    """decode_graph and eager_forward of the model as the engine builds it; attention and sample."""
    import torch

    from engine.loader import load_model, resolve_config
    from kernels.metadata import Addressing, contiguous_metadata

    mc = resolve_config(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # rotary tables long enough for the longest single-sequence prefill measured
    model = load_model(mc, name, max(max_model_len, max(PREFILL_QUERIES)), dtype, str(device), 0)
    if device.type == "cuda":
        model.fuse()
    rows = _rows_attention(timer, mc, name, pool, block_sizes, dtype, device, max_model_len, tick)
    caches = _scratch_caches(mc, pool, dtype, device)
    with torch.inference_mode():
        for t_q in _ticked([q for q in PREFILL_QUERIES if q <= pool], tick):
            meta = contiguous_metadata(Addressing.LINEAR, [t_q], [t_q], device)
            ids = torch.randint(10, mc.vocab_size, (t_q,), device=device)
            pos = torch.arange(t_q, device=device)

            def fwd():
                hidden = model(ids, pos, meta, caches)
                return model.compute_logits(hidden[-1:]).argmax(-1)

            rows.append(dict(table="eager_forward", model=name, mode="linear", query=t_q, context=t_q,
                             value=timer.wall(lambda: fwd().cpu())))
            # the same forward's device time alone (captured: no launch gaps)
            rows.append(dict(table="prefill_graph", model=name, mode="linear", query=t_q, context=t_q,
                             value=timer.graph([fwd])))
        for s in _ticked(SAMPLE_ROWS, tick):
            logits = torch.randn(s, mc.vocab_size, device=device)
            rows.append(dict(table="sample", model=name, batch=s, value=timer.graph([lambda: logits.argmax(-1)])))
        if device.type == "cuda":
            rows += _rows_decode_graphs(timer, model, caches, mc, name, pool, max_model_len, block_sizes, device, tick)
    del caches, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _rows_decode_graphs(timer: Timer, model, caches, mc, name: str, pool: int, max_model_len: int, block_sizes,
                        device, tick: Callable[[], None] = _no_tick, pdl: bool | None = None) -> list[dict]:
    """(CUDA) the model's decode graphs: uniform batches (``decode_graph``), ragged ones
    (``decode_graph_ragged``), and the uniform ones of up to GEMV_TOKENS sequences again through
    ``kernels.small_linear`` (``decode_graph`` rows with ``gemv``), and once more with programmatic
    dependent launch where the device takes it (``pdl``, default: ``kernels.pdl.supported``; rows with
    ``pdl`` 1); the model is left with both on."""
    import torch

    from kernels import pdl as pdl_module

    from engine.block_table import PersistentBlockTable
    from engine.cuda_graphs import DecodeGraphs
    from experiments.ragged_decode import as_launched, contexts, model_programs
    from kernels.metadata import Addressing
    from kernels.triton_attention import device_sms

    rows: list[dict] = []
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    uniform, ragged = _decode_graph_cases(pool, max_model_len)

    def captured(mode: str, bs: int, sizes: list[int]):
        paged = mode == "paged"
        stub = SimpleNamespace(mode=Addressing.PAGED if paged else Addressing.LINEAR, block_size=bs)
        table = PersistentBlockTable(max(sizes) + 1, -(-max_model_len // bs), device) if paged else None
        graphs = DecodeGraphs(model, stub, caches, table, max(sizes), max_model_len, device)
        graphs.sizes = sizes
        graphs.capture()
        return graphs, table

    def uniform_rows(graphs, table, mode: str, bs: int, cases, **extra) -> None:
        for b, ctx in _ticked(cases, tick):
            _fill_decode_graph(graphs, table, [ctx] * b, bs, pool, gen, device)
            rows.append(dict(table="decode_graph", model=name, mode=mode, block_size=bs, batch=b, context=ctx, **extra,
                             value=timer.replay(graphs.graphs[b].replay)))

    for mode, bs in _modes(block_sizes):
        graphs, table = captured(mode, bs, list(DECODE_BATCHES))
        uniform_rows(graphs, table, mode, bs, uniform)
        # whole steps of ragged batches: what the cost model's ragged term is checked against
        for b, mean in _ticked(ragged, tick):
            ctxs = contexts("lognormal", b, mean, max_model_len, rng)
            ctxs = as_launched(ctxs, model_programs(mc, ctxs, elem_size=caches[0][0].element_size(),
                                                    num_sms=device_sms(device), span=max_model_len))
            if sum(ctxs) <= pool:
                _fill_decode_graph(graphs, table, ctxs, bs, pool, gen, device)
                rows.append(dict(table="decode_graph_ragged", model=name, mode=mode, block_size=bs, batch=b,
                                 mean=mean, context=float(np.mean(ctxs)), max_context=max(ctxs),
                                 contexts=json.dumps(ctxs), value=timer.replay(graphs.graphs[b].replay)))
        del graphs
        torch.cuda.empty_cache()
    # the uniform decode graphs of up to GEMV_TOKENS sequences again through kernels.small_linear
    # (engine.fused_gemv_max_tokens): the cost model's `gemv` rows
    model.set_gemv_max_tokens(GEMV_TOKENS)
    # and with programmatic dependent launch (engine.enable_pdl): the cost model's `pdl` rows
    for launch in ([False, True] if (pdl_module.supported(device) if pdl is None else pdl) else [False]):
        model.pdl = launch
        for mode, bs in _modes(block_sizes):
            graphs, table = captured(mode, bs, [b for b in DECODE_BATCHES if b <= GEMV_TOKENS])
            uniform_rows(graphs, table, mode, bs, _gemv_cases(uniform), gemv=GEMV_TOKENS,
                         **({"pdl": 1} if launch else {}))
            del graphs
            torch.cuda.empty_cache()
    return rows


def _fill_decode_graph(graphs, table, ctxs: list[int], bs: int, pool: int, gen, device) -> None:
    """The decode graph's inputs for sequences of ``ctxs`` tokens (each decoding its last): PAGED
    (``bs`` > 0) with blocks drawn at random from the pool, else LINEAR regions one after another."""
    import torch

    b = len(ctxs)
    c = torch.tensor(ctxs, device=device)
    addressing, ids, positions, slots = graphs.static_inputs(b)  # the graph of b sequences replays
    graphs.seq_lens[:b] = c
    positions[:] = c - 1
    ids[:] = 11
    if bs:
        meta = _paged_meta(ctxs, 1, bs, pool // bs, device, gen)
        table.device_t[:b, :meta.block_table.shape[1]] = meta.block_table
        addressing[:] = torch.arange(b, device=device)
        slots[:] = meta.slot_mapping
    else:
        base = torch.cumsum(c, 0) - c
        addressing[:] = base
        slots[:] = base + c - 1


def _graphs_count(pool: int) -> int:
    """The figures ``_rows_graphs`` times: each prefill size through piecewise and full graphs."""
    return 2 * len([q for q in _graph_queries() if q <= pool])


def _rows_graphs(timer: Timer, name: str, pool: int, device, tick: Callable[[], None] = _no_tick) -> list[dict]:
    """``piecewise_forward`` and ``full_forward`` of the model as the engine builds it (CUDA only):
    a part of its own (``graphs``), so that raising ``cuda_graph_max_tokens`` re-measures these alone."""
    import torch

    from engine.loader import load_model, resolve_config

    mc = resolve_config(name)
    queries = [q for q in _graph_queries() if q <= pool]  # a prefill writes its keys into the scratch cache
    model = load_model(mc, name, max(queries), torch.bfloat16, str(device), 0)
    model.fuse()
    caches = _scratch_caches(mc, pool, torch.bfloat16, device)
    with torch.inference_mode():
        rows = (_rows_mixed_graphs(timer, model, caches, name, device, "piecewise", queries, tick)
                + _rows_mixed_graphs(timer, model, caches, name, device, "full", queries, tick))
    del caches, model
    torch.cuda.empty_cache()
    return rows


def _scratch_caches(mc, pool: int, dtype, device) -> list[tuple]:
    """A LINEAR K and V cache of ``pool`` slots per layer, zeroed: what the model tables write into."""
    import torch

    return [tuple(torch.zeros(pool, mc.num_key_value_heads, mc.head_dim, dtype=dtype, device=device) for _ in "kv")
            for _ in range(mc.num_hidden_layers)]


def _graph_queries() -> list[int]:
    """The prefill sizes timed through the graphs: those the engine's default captures."""
    from engine.config import EngineConfig

    return [q for q in PREFILL_QUERIES if q <= EngineConfig.cuda_graph_max_tokens]


def _rows_mixed_graphs(timer: Timer, model, caches, name: str, device, mode: str, queries: list[int],
                       tick: Callable[[], None] = _no_tick) -> list[dict]:
    """``piecewise_forward`` / ``full_forward``: a prefill chunk of ``query`` tokens through the
    engine's piecewise CUDA graphs (replays, eager attentions) or its full graphs (one replay,
    attention captured), one row of logits, its token read back: wall time."""
    import torch

    from engine.config import EngineConfig
    from engine.full_graphs import FullGraphs
    from engine.piecewise_graphs import PiecewiseGraphs
    from engine.staging import HostStaging
    from kernels.metadata import Addressing, contiguous_metadata

    if mode == "full":
        # sequences padded to the engine's default max_num_seqs, as its graphs pad them
        graphs = FullGraphs(model, caches, max(queries), device, mode=Addressing.LINEAR,
                            max_num_seqs=EngineConfig.max_num_seqs, max_model_len=max(queries))
    else:
        graphs = PiecewiseGraphs(model, caches, max(queries), device)
    graphs.capture()
    stage = HostStaging(device)  # the step's words from pinned memory, as the engine copies them (each call syncs)
    rows = []
    for t_q in _ticked(queries, tick):
        meta = contiguous_metadata(Addressing.LINEAR, [t_q], [t_q], device)
        ids = torch.randint(10, model.config.vocab_size, (t_q,), device=device)
        pos = torch.arange(t_q, device=device)
        # full graphs take the step's host arrays, as the engine hands them over, and compute its logits
        step = SimpleNamespace(input_ids=ids.cpu().numpy(), positions=pos.cpu().numpy(),
                               slots=meta.slot_mapping.cpu().numpy(), qsl=meta.query_start_loc.cpu().numpy(),
                               seq_lens=meta.seq_lens.cpu().numpy(), addressing=meta.seq_base.cpu().numpy(),
                               sample_rows=[t_q - 1])

        def fwd():
            if mode == "full":
                return graphs.run(step, host=stage.host)[1].argmax(-1)
            hidden = graphs.run(t_q, ids, pos, meta.slot_mapping, meta)
            return model.compute_logits(hidden[-1:]).argmax(-1)

        rows.append(dict(table=f"{mode}_forward", model=name, mode="linear", query=t_q, context=t_q,
                         value=timer.wall(lambda: fwd().cpu())))
    rows.append(dict(table=f"{mode}_capture", model=name, query=max(queries), value=graphs.capture_s))
    del graphs
    torch.cuda.empty_cache()
    return rows


def _rows_copy(timer: Timer, device, tick: Callable[[], None] = _no_tick) -> list[dict]:
    import torch

    rows = []
    for n in _ticked(COPY_BYTES, tick):
        host = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda")
        dev = torch.empty(n, dtype=torch.uint8, device=device)
        for op, fn in (("h2d", lambda: dev.copy_(host, non_blocking=True)),
                       ("d2h", lambda: host.copy_(dev, non_blocking=True))):
            t = timer.replay(fn) if timer.cuda else timer.wall(fn)
            rows.append(dict(table="copy", op=op, bytes=n, value=t))
    return rows


def _rows_vmm(device, tick: Callable[[], None] = _no_tick) -> list[dict]:
    if device.type != "cuda":
        return []
    try:
        from experiments.bench_vmm import driver_costs

        costs = driver_costs(64, 2 << 20)
    except Exception as e:  # cuda-bindings missing or no VMM support: the model does without
        print(f"vmm: not measured ({e!r})", file=sys.stderr, flush=True)  # a remark: stdout is the result
        return []
    finally:
        tick()
    return [dict(table="vmm", op=r["op"], bytes=2 << 20, value=r["median_us"] / 1e6) for r in costs]


def metadata_switch() -> int:
    """The decode launches this process times: sequence by sequence from this many sequences
    (``kernels.metadata.SEQ_MAJOR_MIN_SEQS``, KVLAB_SEQ_MAJOR_MIN_SEQS)."""
    from kernels import metadata as km

    return int(km.SEQ_MAJOR_MIN_SEQS)


def tile_map_switch() -> bool:
    """Whether this process's full graphs give their attention a tile map (``kernels.metadata.TILE_MAP``,
    KVLAB_TILE_MAP): their forwards and the engine steps run through them depend on it."""
    from kernels import metadata as km

    return bool(km.TILE_MAP)


def metadata(device, args) -> dict:
    import torch

    from experiments.run import git_commit
    from kernels.triton_attention import device_sms

    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
                torch=torch.__version__, python=platform.python_version(),
                commit=os.environ.get("KVLAB_COMMIT") or git_commit(),  # a copy without .git names it
                created=dt.datetime.now().isoformat(timespec="seconds"), models=args.models,
                max_model_len=args.max_model_len, pool_tokens=args.pool_tokens, block_sizes=args.block_sizes,
                host_model=args.host_model or args.models.split(",")[0],
                num_sms=device_sms(device),  # the ragged decode term's split rule
                # the decode launches its tables timed: sequence by sequence from this many (kernels.metadata)
                seq_major_min_seqs=metadata_switch(),
                tile_map=tile_map_switch(),  # full graphs' attention: a tile map (KVLAB_TILE_MAP) or a search
                command="kvlab profile " + " ".join(args.argv))
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


def write_profile(path: Path, rows: list[dict], meta: dict) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from experiments.atomic import atomic_path

    df = pd.DataFrame(rows)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"kvlab_profile": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# the parts of a profile (--skip names them) and the tables each writes
PART_TABLES = {"host": {"host"}, "gemm": {"gemm"}, "copy": {"copy"}, "vmm": {"vmm"}, "ragged": {"ragged"},
               "models": {"attention", "eager_forward", "prefill_graph", "sample", "decode_graph",
                          "decode_graph_ragged"},
               "graphs": {"piecewise_forward", "piecewise_capture", "full_forward", "full_capture"}}


def _same_device_kind(profiled: str | None, now: str) -> bool:
    """Whether a run on ``now`` may merge into a profile of ``profiled`` (the device names kvlab
    profile writes; every CPU is "cpu (machine)", some older profiles say "cpu"; no name: unknown)."""
    def kind(name: str) -> str:
        return "cpu" if name.startswith("cpu") else name

    return not profiled or kind(str(profiled)) == kind(now)


def _check_same_host_engine(ap, prior, cuda: bool, events: bool = False) -> None:
    """``--host-add`` pools host steps only of engines with this one's graphs: the cost model models
    a pool's steps with one graph setting (the profile's host engine: ``HOST_MAX_NUM_BATCHED_TOKENS``, defaults);
    and only of one timer: steps with CUDA events around each launch (``--host-events``; every step on a
    GPU before the ``events`` column) took longer before the device's wait than steps without."""
    from engine.config import EngineConfig, graph_token_bound
    from engine.piecewise_graphs import token_sizes
    from experiments.profile_host import HOST_MAX_NUM_BATCHED_TOKENS

    cap = (token_sizes(graph_token_bound(EngineConfig.cuda_graph_max_tokens, HOST_MAX_NUM_BATCHED_TOKENS))[-1]
           if cuda else 0)  # none on a CPU
    for key, now in (("graph_max_tokens", cap), ("graph_mode", EngineConfig.cuda_graph_mode)):
        if key in prior and prior[key].notna().any():
            old = sorted(set(prior[key].dropna()) - {now})
            if old:
                ap.error(f"--host-add: the profile's host steps were recorded with {key} {old}, this engine's is "
                         f"{now!r}; pooled, the cost model would model them as one: record them again without "
                         "--host-add")
    if len(prior):
        was = prior["events"].tolist() if "events" in prior else [None] * len(prior)
        was = {bool(v) if v == v and v is not None else cuda for v in was}
        if was != {cuda and events}:
            ap.error(f"--host-add: the profile's host steps were recorded {'with' if True in was else 'without'} the "
                     f"launch timer's CUDA events, these {'with' if cuda and events else 'without'}; pooled, two "
                     "timings would be averaged: give the same --host-events, or record them again without "
                     "--host-add")


def check_args(a) -> None:
    """The flags, one line naming the flag and the fix if one is wrong: before anything is timed
    (a bad one was a traceback seconds or minutes in, or in the host-time subprocess)."""
    import re

    from allocators.paged import MAX_BLOCK_SIZE
    from engine.loader import resolve_config
    from experiments.device_profile import load_profile, resolve_profile_path
    from experiments.preflight import UserError, check_folder

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)
    for flag, v, what in (("--reps", a.reps, "the timed calls per figure"),
                          ("--max-model-len", a.max_model_len, "the decode graphs' max_model_len in tokens"),
                          ("--pool-tokens", a.pool_tokens, "the scratch cache's KV slots"),
                          ("--host-kv-tokens", a.host_kv_tokens, "the host-time engines' KV slots"),
                          ("--host-requests", a.host_requests, "the host-time run's full batch"),
                          ("--virtual-page-size", a.virtual_page_size, "the page size in bytes (or leave it out)")):
        need(v is None or v >= 1, f"{flag} {v}: give {what}, 1 or more")
    sizes = [b for b in a.block_sizes.split(",") if b]
    need(all(b.isdigit() and 1 <= int(b) <= MAX_BLOCK_SIZE for b in sizes), f"--block-sizes {a.block_sizes}: give "
         f"block sizes in tokens, whole numbers in [1, {MAX_BLOCK_SIZE}], comma-separated (e.g. 8,16,32)")
    models = [m for m in a.models.split(",") if m]
    need(bool(models), "--models: give presets or HF directories, comma-separated (e.g. --models tiny-llama)")
    for flag, names in (("--models", models), ("--host-model", [m for m in (a.host_model or "").split(",") if m])):
        for m in names:
            try:
                resolve_config(m)
            except (ValueError, OSError) as e:  # not a preset, or no readable HF directory
                raise UserError(f"{flag} {m}: {e}") from None
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device) is not None, f"--device {a.device}: give auto, cpu, cuda "
         "or cuda:N")
    if a.device.startswith("cuda"):
        import torch

        need(torch.cuda.is_available(), f"--device {a.device}: no CUDA device is visible: give --device cpu or auto")
    if a.merge:
        need(resolve_profile_path(a.merge) is not None, f"--merge {a.merge}: no such file: give an earlier "
             "profile's .parquet file (kvlab profile --out wrote it)")
        try:  # cached: the merge reads it again for nothing
            load_profile(a.merge)
        except Exception as e:  # noqa: BLE001 (pyarrow's errors: not a parquet file, a cut-off one, ...)
            why = " ".join(str(e).split())  # one line
            raise UserError(f"--merge {a.merge}: not a readable device profile ({type(e).__name__}: {why})") from None
    out = Path(a.out)
    if out.suffix == ".parquet":  # a file: its folder must take it
        check_folder(f"--out {a.out}: its folder", out.parent)
    else:
        check_folder("--out", out)


def main(argv: list[str] | None = None) -> int:
    import sys

    from experiments.cli import Parser
    from experiments.preflight import UserError

    ap = Parser(prog="kvlab profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-0.6b,llama3-8b", help="presets or HF directories, comma-separated")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-model-len", type=int, default=2048, help="the decode graphs' max_model_len")
    ap.add_argument("--pool-tokens", type=int, default=262144, help="KV slots of the scratch cache")
    ap.add_argument("--block-sizes", default="8,16,32")
    ap.add_argument("--host-model", default=None,
                    help="models of the host-time steps, comma-separated (default: the first of --models)")
    ap.add_argument("--host-kv-tokens", type=int, default=40000)
    ap.add_argument("--host-in-process", action="store_true",
                    help="run the host-time engines in this process (default: each in a process of its own, "
                         "as validate-sim's real runs are)")
    ap.add_argument("--host-requests", type=int, default=256, help="requests of the host-time run's full batch")
    ap.add_argument("--host-repeats", type=int, default=1,
                    help="runs of the host-time steps per model and allocator, each its own engine and seed: "
                         "one run's host work can be 10-40%% off another's on a VM, the tables pool them")
    ap.add_argument("--host-scheduling", default="sync",
                    help="how the host-time runs schedule, comma-separated: sync (steps one after another), "
                         "async (each step launched before the previous one is read back: what simulate "
                         "uses for engine.async_scheduling=true)")
    ap.add_argument("--host-events", action="store_true",
                    help="CUDA events around each host-time step's launch too, for its device time (the gpu "
                         "column; diagnostics: the real runs the steps stand for have no such events)")
    ap.add_argument("--virtual-page-size", type=int, default=None, help="page size of the host-time run (bytes)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip", default="", help="parts to leave out, comma-separated: host, gemm, models, graphs "
                    "(prefill/mixed CUDA graphs), ragged, copy, vmm")
    ap.add_argument("--merge", default=None, help="an earlier profile: its tables not measured now are kept")
    ap.add_argument("--host-add", action="store_true",
                    help="with --merge: keep the earlier profile's host steps of the models and schedulings "
                         "measured now and add this run's as further repeats (the tables pool them: host work "
                         "differs from one machine to another); its workloads are the first run's (seeds from 0), "
                         "so machines are compared on the same steps")
    ap.add_argument("--out", default="results/profiles", help="folder (file name from the device) or .parquet")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress lines (each part's start, and one every ~10 s inside it) on stderr: its end "
                         "lines only (as kvlab run's progress=false leaves out its bar)")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.host_repeats < 1:
        ap.error(f"--host-repeats must be >= 1, got {a.host_repeats}")
    schedulings = [s for s in a.host_scheduling.split(",") if s]
    if not schedulings or set(schedulings) - {"sync", "async"}:
        ap.error(f"--host-scheduling: sync, async or both comma-separated, got {a.host_scheduling!r}")
    skip = {k for k in a.skip.split(",") if k}
    if skip - set(PART_TABLES):
        ap.error(f"--skip: unknown part(s) {sorted(skip - set(PART_TABLES))}; the parts are "
                 f"{', '.join(sorted(PART_TABLES))}")
    if a.host_add and not a.merge:
        ap.error("--host-add adds to the host steps of a --merge profile: name one")
    try:
        check_args(a)
    except UserError as e:
        print(f"kvlab profile: {e}", file=sys.stderr)
        return 2
    import torch

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    models = [m for m in a.models.split(",") if m]
    block_sizes = [int(b) for b in a.block_sizes.split(",") if b]
    if device.type != "cuda":
        skip.add("graphs")  # CUDA graphs only: a merge on a CPU keeps the profile's graph tables
        skip.add("vmm")  # CUDA's driver calls only (_rows_vmm: none here): nor did it keep the vmm table
    host_models = [m for m in (a.host_model or models[0]).split(",") if m]
    timer = Timer(device, a.reps)
    meta = metadata(device, a)
    out = Path(a.out)
    path = out if out.suffix == ".parquet" else out / f"{slug(meta['device'])}.parquet"
    # what a cut-off run measured goes beside the profile, not over it: --merge P --out P (the README's
    # way to add host steps) replaced P at its first part with P less the tables not yet re-measured
    partial = path.with_name(f"{path.stem}.partial.parquet")
    rows: list[dict] = []
    t0 = time.time()
    first_repeat = 0
    if a.merge:  # keep what this run does not re-measure
        from experiments.device_profile import host_model_of, host_scheduling_of, load_profile

        old = load_profile(a.merge)
        if not _same_device_kind(old.meta.get("device"), meta["device"]):  # its times would be named the other's
            ap.error(f"--merge {a.merge}: measured on {old.meta['device']}, this run is on {meta['device']}: a "
                     "profile holds one device's tables (simulate names them by it): profile this device into a "
                     "new file (--out without --merge)")
        redo = set().union(*(t for k, t in PART_TABLES.items() if k not in skip))
        per_model = redo & (PART_TABLES["models"] | PART_TABLES["ragged"] | PART_TABLES["graphs"])
        keep = ~old.df["table"].isin(redo)
        if "model" in old.df:  # a model's tables measured now replace that model's: the others' stay
            keep |= old.df["table"].isin(per_model) & old.df["model"].notna() & ~old.df["model"].isin(models)
        if "gemm" in redo:  # GEMM shapes of models not measured now stay
            shapes = _gemm_shapes(models)
            if {"n", "k"} <= set(old.df.columns):
                timed_now = [(n, k) in shapes for n, k in zip(old.df["n"], old.df["k"])]
                keep |= (old.df["table"] == "gemm") & ~np.array(timed_now, dtype=bool)
        if "host" in redo:  # host steps are per model and scheduling: those not re-measured now stay
            remeasured = (host_model_of(old).reindex(old.df.index).isin(host_models)
                          & host_scheduling_of(old.df).isin(schedulings))
            keep |= (old.df["table"] == "host") & (~remeasured | a.host_add)
            if a.host_add:  # this run's repeats follow the kept ones (a run is a repeat's steps in order)
                prior = old.df[(old.df["table"] == "host") & remeasured]
                _check_same_host_engine(ap, prior, device.type == "cuda", a.host_events)
                if len(prior):  # rows from before the column: one run, repeat 0
                    first_repeat = (int(prior["repeat"].fillna(0).max()) if "repeat" in prior else 0) + 1
        rows = [{k: v for k, v in r.items() if v == v and v is not None}
                for r in old.df[keep].to_dict("records")]
        stamp = {k: meta[k] for k in ("commit", "created", "command")}
        kept = {k: v for k, v in old.meta.items() if k != "partial"}  # this run's own end says whether it is
        # the SM count sets the ragged decode term's split rule: the device's that measured the tables
        sms = meta["num_sms"] if redo & {"ragged", "decode_graph"} else old.meta.get("num_sms", meta["num_sms"])
        names = [m for m in str(kept.get("models", "")).split(",") if m]
        names += [m for m in models if m not in names and per_model]
        if redo & (PART_TABLES["models"] | PART_TABLES["ragged"]):  # decode launches timed under this process's switch
            kept["seq_major_min_seqs"] = metadata_switch()
        if redo & (PART_TABLES["graphs"] | PART_TABLES["host"]):  # full graphs run under this process's switch
            kept["tile_map"] = tile_map_switch()
        meta = {**kept, "num_sms": sms, "models": ",".join(names),
                "updated": {**old.meta.get("updated", {}), **{t: stamp for t in sorted(redo)}}}
        if a.host_add and "host" in redo:  # the pooled runs' stamps, each (the last one is "host")
            before = old.meta.get("updated", {})
            # the first run: the merged profile's own, or its own merge's
            runs = before.get("host_runs") or [before.get("host") or {k: old.meta.get(k) for k in stamp}]
            meta["updated"]["host_runs"] = [*runs, {**stamp, "first_repeat": first_repeat}]

    cuda = device.type == "cuda"
    per_model = sum(k not in skip for k in ("models", "graphs", "ragged"))  # graphs, vmm: in skip off CUDA
    parts = sum(k not in skip for k in ("host", "gemm", "copy", "vmm")) + len(models) * per_model
    progress = Progress(t0, parts, not a.no_progress)

    def checkpoint() -> None:
        meta["updated" if a.merge else "seconds"] = (
            {**meta["updated"], "seconds": round(time.time() - t0, 1)} if a.merge else round(time.time() - t0, 1))
        write_profile(partial, rows, {**meta, "partial": True})  # a cut-off run keeps what it measured

    def part(name: str, label: str, total: int, measure: Callable[[Callable[[], None]], list[dict]],
             unit: str = "measurements") -> None:
        """One part (or one model's share of it): its start line, ``measure(tick)``, the checkpoint, its end line."""
        progress.start(name, label, total, unit)
        new = measure(progress.tick)
        rows.extend(new)
        checkpoint()
        progress.end(len(new), len(rows), partial)

    if "host" not in skip:
        from experiments.profile_host import HOST_ALLOCATORS, TRICKLE_MAX_PROMPT, host_rows, host_rows_apart

        run_host = host_rows if a.host_in_process else host_rows_apart

        # ShareGPT-like lengths (seeded apart from any workload), uniform ones, then a trickle
        half = a.max_model_len // 2
        phases = ((a.host_requests, 0, 0, 0, 0), (a.host_requests // 2, 32, min(1024, half), 16, min(512, half)),
                  (-max(8, a.host_requests // 4), 16, min(TRICKLE_MAX_PROMPT, half), 16, 64))  # then one at a time
        # repeats go round every model and allocator, so a slow spell of the machine falls on all
        runs = [(rep, hm, alloc, sched) for rep in range(a.host_repeats) for hm in host_models
                for alloc in HOST_ALLOCATORS for sched in schedulings]
        progress.start("host", "host steps", len(runs), "engine runs (model, allocator, scheduling, repeat)")
        before = len(rows)
        for rep, hm, alloc, sched in runs:
            name, args = HOST_ALLOCATORS[alloc]
            if name == "virtual" and a.virtual_page_size:
                args = {**args, "page_size": a.virtual_page_size}
            what = f"{hm} {alloc} {sched}" + (f" (repeat {rep + 1} of {a.host_repeats})" if a.host_repeats > 1 else "")
            progress.line(f"host steps: {what}: the real engine's steps"
                          + ("" if a.host_in_process else " (in a process of its own)"))
            rows += [dict(r, repeat=first_repeat + rep) for r in run_host(
                hm, name, args, max_model_len=a.max_model_len, kv_cache_tokens=a.host_kv_tokens,
                device=str(device), phases=phases, seed=rep, async_scheduling=sched == "async",
                events=a.host_events, progress_t0=t0 if progress.enabled else None)]
            checkpoint()
            progress.tick(f" ({what})", force=True)  # a run takes ~30 s on a GPU: a line each
        progress.end(len(rows) - before, len(rows), partial)
    import gc

    gc.collect()  # the host-time engines, weights and graphs included
    if device.type == "cuda":
        torch.cuda.empty_cache()
    from kernels import compile_watch
    from kernels.pdl import supported as pdl_supported

    dtype = torch.bfloat16 if cuda else torch.float32
    with compile_watch.expected():  # the kernel tables compile every shape they time
        if "gemm" not in skip:
            shapes = _gemm_shapes(models)
            part("gemm", "gemm", len(shapes) * len(GEMM_M),
                 lambda tick: _rows_gemm(timer, shapes, dtype, device, tick))
        for m in models if "models" not in skip else ():
            part("models", f"model {m}", _model_count(a.pool_tokens, a.max_model_len, block_sizes, cuda,
                                                      pdl_supported(device)),
                 lambda tick: _rows_model(timer, m, a.pool_tokens, a.max_model_len, block_sizes, device, tick))
        for m in models if "graphs" not in skip and cuda else ():
            part("graphs", f"graphs {m}", _graphs_count(a.pool_tokens),
                 lambda tick: _rows_graphs(timer, m, a.pool_tokens, device, tick))
        for m in models if "ragged" not in skip else ():
            from engine.loader import resolve_config

            part("ragged", f"ragged decode {m}", len(_ragged_cases(block_sizes)),
                 lambda tick: _rows_ragged(timer, resolve_config(m), m, a.pool_tokens, a.max_model_len, block_sizes,
                                           dtype, device, tick))
        if "copy" not in skip:
            part("copy", "copy", len(COPY_BYTES), lambda tick: _rows_copy(timer, device, tick),
                 "sizes (h2d and d2h each)")
        if "vmm" not in skip:
            part("vmm", "vmm", 1, lambda tick: _rows_vmm(device, tick), "measurement (map and unmap per page)")
    write_profile(path, rows, meta)
    partial.unlink(missing_ok=True)
    print(f"wrote {path}: {len(rows)} rows, {meta['device']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
