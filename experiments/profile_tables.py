"""``kvlab profile``'s kernel and transfer tables: ``gemm``, ``attention``, ``ragged`` (decode
attention of ragged batches), ``copy`` and ``vmm``, with the attention metadata they launch
(``_paged_meta``, ``_decode_metas``, also the decode graphs' and bench_ragged's)."""
from __future__ import annotations

import json
import math
import sys
from typing import Callable

import numpy as np

from experiments import profile_cases
from experiments.profile_cases import _attention_cases, _ragged_cases
from experiments.profile_timing import Timer, _no_tick, _ticked


def _rows_gemm(timer: Timer, shapes: set[tuple[int, int]], dtype, device,
               tick: Callable[[], None] = _no_tick) -> list[dict]:
    import torch
    import torch.nn.functional as F

    rows = []
    for n, k in sorted(shapes):
        copies = max(1, min(8, math.ceil(profile_cases.L2_ROTATE_BYTES / (n * k * 2))))
        ws = [torch.randn(n, k, dtype=dtype, device=device) * 0.02 for _ in range(copies)]
        for m in _ticked(profile_cases.GEMM_M, tick):
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
                meta.max_query_len = profile_cases.MIXED_MAX_QUERY  # an upper bound, as a prefill chunk beside makes it
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


def _rows_copy(timer: Timer, device, tick: Callable[[], None] = _no_tick) -> list[dict]:
    import torch

    rows = []
    for n in _ticked(profile_cases.COPY_BYTES, tick):
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
