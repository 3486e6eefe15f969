"""``kvlab profile``'s per-model tables, each of the model as the engine builds it: ``attention``,
``eager_forward``, ``prefill_graph`` and ``sample`` (``_rows_model``), its decode CUDA graphs
(``decode_graph``, ``decode_graph_ragged``) and the prefill chunk through its piecewise and full
graphs (``piecewise_forward``, ``full_forward``: the ``graphs`` part)."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Callable

import numpy as np

from experiments import profile_cases
from experiments.profile_cases import _decode_graph_cases, _gemv_cases, _graph_queries, _modes
from experiments.profile_tables import _paged_meta, _rows_attention
from experiments.profile_timing import Timer, _no_tick, _ticked


def _rows_model(timer: Timer, name: str, pool: int, max_model_len: int, block_sizes, device,
                tick: Callable[[], None] = _no_tick) -> list[dict]:
    """decode_graph and eager_forward of the model as the engine builds it; attention and sample."""
    import torch

    from engine.loader import load_model, resolve_config
    from kernels.metadata import Addressing, contiguous_metadata

    mc = resolve_config(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # rotary tables long enough for the longest single-sequence prefill measured
    model = load_model(mc, name, max(max_model_len, max(profile_cases.PREFILL_QUERIES)), dtype, str(device), 0)
    if device.type == "cuda":
        model.fuse()
    rows = _rows_attention(timer, mc, name, pool, block_sizes, dtype, device, max_model_len, tick)
    caches = _scratch_caches(mc, pool, dtype, device)
    with torch.inference_mode():
        for t_q in _ticked([q for q in profile_cases.PREFILL_QUERIES if q <= pool], tick):
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
        for s in _ticked(profile_cases.SAMPLE_ROWS, tick):
            logits = torch.randn(s, mc.vocab_size, device=device)
            rows.append(dict(table="sample", model=name, batch=s, value=timer.graph([lambda: logits.argmax(-1)])))
        if device.type == "cuda":
            rows += _rows_decode_graphs(timer, model, caches, mc, name, pool, max_model_len, block_sizes, device, tick)
    del caches, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _scratch_caches(mc, pool: int, dtype, device) -> list[tuple]:
    """A LINEAR K and V cache of ``pool`` slots per layer, zeroed: what the model tables write into."""
    import torch

    return [tuple(torch.zeros(pool, mc.num_key_value_heads, mc.head_dim, dtype=dtype, device=device) for _ in "kv")
            for _ in range(mc.num_hidden_layers)]


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
        graphs, table = captured(mode, bs, list(profile_cases.DECODE_BATCHES))
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
    model.set_gemv_max_tokens(profile_cases.GEMV_TOKENS)
    # and with programmatic dependent launch (engine.enable_pdl): the cost model's `pdl` rows
    for launch in ([False, True] if (pdl_module.supported(device) if pdl is None else pdl) else [False]):
        model.pdl = launch
        for mode, bs in _modes(block_sizes):
            graphs, table = captured(mode, bs, [b for b in profile_cases.DECODE_BATCHES
                                                if b <= profile_cases.GEMV_TOKENS])
            uniform_rows(graphs, table, mode, bs, _gemv_cases(uniform), gemv=profile_cases.GEMV_TOKENS,
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
