"""What ``kvlab profile`` measures: the grids of its tables and the cases each table times, with the
counts its progress totals use. The table builders read the grids as ``profile_cases.NAME`` (a
test's monkeypatch of one here reaches every table)."""
from __future__ import annotations

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


def _modes(block_sizes: list[int]) -> list[tuple[str, int]]:
    return [("linear", 0)] + [("paged", bs) for bs in block_sizes]


def _attention_cases(pool: int, block_sizes) -> list[tuple]:
    """(mode, block size, batch, context, query, mixed) of the attention table that fit ``pool``."""
    shapes = [(b, c, 1, False) for b in (1, 4, 16, 64, 128, 256) for c in CONTEXTS]
    # decode tokens inside a mixed batch: the kernel then runs its prefill tiles, without split-KV
    shapes += [(b, c, 1, True) for b in (1, 4, 16, 64, 128, 256) for c in CONTEXTS]
    shapes += [(1, q + c0, q, False) for q in PREFILL_QUERIES for c0 in (0, 1024)]
    return [(mode, bs, *s) for mode, bs in _modes(block_sizes) for s in shapes if s[0] * s[1] <= pool // 2]


def _ragged_cases(block_sizes) -> list[tuple]:
    """(mode, block size, batch, mean, distribution) of the ragged table (a drawn batch that does not
    fit the pool is left out when drawn)."""
    return [(mode, bs, b, m, dd) for mode, bs in _modes(block_sizes)
            for b in RAGGED_BATCHES for m in RAGGED_MEANS for dd in RAGGED_DISTS]


def _decode_graph_cases(pool: int, max_model_len: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per mode, the decode graphs timed: (batch, context) of uniform batches that fit, and (batch,
    mean) of ragged ones (a drawn batch that does not fit the pool is left out when drawn)."""
    uniform = [(b, ctx) for b in DECODE_BATCHES for ctx in CONTEXTS if ctx <= max_model_len and b * ctx <= pool]
    return uniform, [(b, m) for b in RAGGED_BATCHES if b in DECODE_BATCHES for m in RAGGED_MEANS]


def _gemv_cases(uniform: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The uniform decode graphs timed again through ``kernels.small_linear``: up to GEMV_TOKENS sequences."""
    return [(b, ctx) for b, ctx in uniform if b <= GEMV_TOKENS]


def _graph_queries() -> list[int]:
    """The prefill sizes timed through the graphs: those the engine's default captures."""
    from engine.config import EngineConfig

    return [q for q in PREFILL_QUERIES if q <= EngineConfig.cuda_graph_max_tokens]


def _model_count(pool: int, max_model_len: int, block_sizes, cuda: bool, pdl: bool = False) -> int:
    """The figures ``_rows_model`` times (its progress total): one per loop case of its tables
    (``pdl``: the device takes programmatic dependent launch, the small_linear graphs timed twice)."""
    n = len(_attention_cases(pool, block_sizes)) + len([q for q in PREFILL_QUERIES if q <= pool]) + len(SAMPLE_ROWS)
    if cuda:
        uniform, ragged = _decode_graph_cases(pool, max_model_len)
        n += len(_modes(block_sizes)) * (len(uniform) + len(ragged) + len(_gemv_cases(uniform)) * (2 if pdl else 1))
    return n


def _graphs_count(pool: int) -> int:
    """The figures ``_rows_graphs`` times: each prefill size through piecewise and full graphs."""
    return 2 * len([q for q in _graph_queries() if q <= pool])
