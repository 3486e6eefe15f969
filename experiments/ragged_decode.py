"""Decode attention of a ragged batch: the critical-path term that uniform tables miss.

The profile's decode tables time batches whose sequences share one context length. A real
batch mixes short and long ones. One decode program (a split of one sequence's keys for one
KV head) streams its keys at only ~20 GB/s, so a ragged batch can end on its longest program
rather than at the mean (experiments/bench_ragged.py measures this; 1.1-2.6x on an H200).

The model, fitted to measured ragged batches against uniform ones of the same mean:

- every program resident at once (programs <= the device's resident slots): the batch takes
  max(uniform, c0 + longest / rate) (beyond a twin whose own longest program sets its time: the
  difference of the two critical paths);
- more programs than slots: uniform + k x (longest - a uniform batch's longest) / rate; the
  longest program may start in the last wave.

Both ``kvlab profile`` (its ``ragged`` table, fitted by the profiled cost model) and
``bench_ragged`` (its critical-path fit) use this module, so the split rule it models is
the kernel's own (``choose_config``, ``decode_wave``, ``fixed_split_chunk``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from kernels.metadata import decode_seq_major

RATES_GBS = np.arange(10.0, 40.0, 1.0)  # one program's streaming rate
C0S_US = np.arange(0.0, 8.0, 0.5)  # start-up of a batch bound by one program
TAIL_KS = np.arange(0.0, 1.01, 0.05)  # share of the longest program left after the other waves


def contexts(dist: str, batch: int, mean: int, max_len: int, rng: np.random.Generator) -> list[int]:
    """``batch`` context lengths in [16, max_len] of mean ~``mean``: ``uniform``, ``lognormal``
    (ShareGPT-like spread) or ``twopoint`` (most short, an eighth near the limit)."""
    if dist == "uniform":
        c = np.full(batch, float(mean))
    elif dist == "lognormal":
        c = rng.lognormal(0.0, 0.8, batch)
    elif dist == "twopoint":
        long = max(1, batch // 8)
        c = np.concatenate([np.full(batch - long, 1.0), np.full(long, 6.0)])
    else:
        raise ValueError(f"unknown context distribution {dist!r}: uniform, lognormal or twopoint")
    for _ in range(20):  # rescale to the mean through the clipping
        c = np.clip(c * mean / c.mean(), 16, max_len)
    return [int(x) for x in np.round(c)]


def program_keys(ctxs, splits: int, even: bool, block_n: int, span: int) -> np.ndarray:
    """Keys each program of one KV head streams: the kernel's split rule (even: each sequence's own
    keys in ``splits`` tile-aligned parts; fixed: parts of ``span``, the last taking the rest)."""
    c = np.asarray(ctxs, dtype=np.int64)[:, None]
    j = np.arange(splits)[None, :]
    if even:
        chunk = -(-c // (splits * block_n)) * block_n
        return np.clip(c - j * chunk, 0, chunk).ravel()
    from kernels.triton_attention import fixed_split_chunk

    chunk = fixed_split_chunk(span, splits, block_n)
    k = np.clip(c - j * chunk, 0, chunk)
    k[:, -1] = np.maximum(c[:, 0] - (splits - 1) * chunk, 0)
    return k.ravel()


def longest_keys(ctx: int, splits: int, even: bool, block_n: int, span: int) -> int:
    """``program_keys([ctx], ...).max()`` without arrays: a cost model asks it for each of a
    profile's ~100k steps. Even splits: the first part is the longest; fixed ones: the first, or
    the last, which takes the rest."""
    ctx = max(0, int(ctx))
    if even:
        return min(ctx, -(-ctx // (splits * block_n)) * block_n)
    if splits == 1:
        return ctx
    from kernels.triton_attention import fixed_split_chunk

    chunk = fixed_split_chunk(span, splits, block_n)
    return max(min(ctx, chunk), ctx - (splits - 1) * chunk)


@dataclass(frozen=True)
class DecodePrograms:
    """A decode batch as the kernel launches it: bytes (K and V, one KV head) of its longest
    program and of a uniform batch's of the same mean, its program count and the resident slots."""
    longest_bytes: float
    uniform_bytes: float
    programs: int
    slots: int
    # launched sequence by sequence, the batch longest first (kernels.metadata.decode_seq_major):
    # its longest programs start first, and it takes about a uniform batch's time
    ordered: bool = False


def decode_programs(ctxs, *, num_kv_heads: int, group: int, head_dim: int, elem_size: int, num_sms: int,
                    span: int, fp8: bool = False, num_splits: int | None = None,
                    even_split: bool = True) -> DecodePrograms:
    """``ctxs``: each sequence's keys (a CUDA graph's padding rows as 0); ``span``: the graph's
    bound on them (``max_model_len``). ``num_splits`` overrides the config's count. A sequence's
    longest program grows with its keys, so the batch's is its longest sequence's."""
    return programs_of_sums(len(ctxs), sum(ctxs), max(ctxs) if len(ctxs) else 0, num_kv_heads=num_kv_heads,
                            group=group, head_dim=head_dim, elem_size=elem_size, num_sms=num_sms, span=span, fp8=fp8,
                            num_splits=num_splits, even_split=even_split)


def programs_of_sums(batch: int, total: int, longest_ctx: int, *, num_kv_heads: int, group: int, head_dim: int,
                     elem_size: int, num_sms: int, span: int, fp8: bool = False, num_splits: int | None = None,
                     even_split: bool = True) -> DecodePrograms:
    """``decode_programs`` of a batch given by its size, its keys' sum and its longest sequence's
    keys: all it reads of the list (simulate's bulk path times runs of decode steps from sums)."""
    block_n, splits, slots = _launch(batch, num_kv_heads, group, head_dim, elem_size, num_sms, span, fp8, even_split)
    splits = num_splits or splits
    row = 2 * head_dim * elem_size  # a key and its value
    longest = longest_keys(longest_ctx, splits, even_split, block_n, span) if batch else 0
    mean = int(round(total / batch)) if batch else 0
    uniform = longest_keys(mean, splits, even_split, block_n, span)
    return DecodePrograms(longest * row, uniform * row, batch * splits * num_kv_heads, slots,
                          decode_seq_major(batch, splits))


def model_programs(mc, ctxs, **kw) -> DecodePrograms:
    """``decode_programs`` of a model config's heads (``elem_size``, ``num_sms``, ``span``... in ``kw``)."""
    return decode_programs(ctxs, num_kv_heads=mc.num_key_value_heads,
                           group=mc.num_attention_heads // mc.num_key_value_heads, head_dim=mc.head_dim, **kw)


def as_launched(ctxs: list[int], p: DecodePrograms) -> list[int]:
    """A decode batch's keys in the order the engine hands the kernel its sequences (``p``: the
    batch's launch): longest first where it goes sequence by sequence (engine/runner.py), else
    as admitted."""
    return sorted(ctxs, reverse=True) if p.ordered else list(ctxs)


@lru_cache(maxsize=4096)
def _launch(batch: int, num_kv_heads: int, group: int, head_dim: int, elem_size: int, num_sms: int, span: int,
            fp8: bool, even_split: bool) -> tuple[int, int, int]:
    """(BLOCK_N, splits, resident slots) of the decode kernel's launch for ``batch`` sequences."""
    from kernels.triton_attention import _pow2, choose_config, decode_wave

    cfg = choose_config(num_seqs=batch, max_query_len=1, max_seq_len=span, num_kv_heads=num_kv_heads, group=group,
                        head_dim=head_dim, elem_size=elem_size, num_sms=num_sms, fp8=fp8, even_split=even_split)
    return cfg.block_n, cfg.num_splits, decode_wave(cfg.block_n, cfg.num_stages,
                                                    max(16, _pow2(head_dim)) * elem_size, num_sms)


@dataclass(frozen=True)
class RaggedFit:
    """The critical-path term's constants and how well they fit (mean and p90 |relative error| of
    the ragged batches' time; ``base_error``: of the uniform time alone)."""
    rate_gbs: float
    c0_us: float
    k: float
    mean_error: float = 0.0
    p90_error: float = 0.0
    base_error: float = 0.0
    n: int = 0

    def time(self, uniform_s: float, p: DecodePrograms) -> float:
        """Seconds of the ragged batch whose uniform twin takes ``uniform_s``: never more than that
        where its longest program is no longer than the twin's (at 1-2 sequences one program can
        set even the twin's time, which the measured ``uniform_s`` holds already)."""
        if p.ordered:  # bench_ragged: within -0.24..+0.31 ms a step (all layers) of the uniform twin
            return uniform_s
        rate = self.rate_gbs * 1e9
        if p.programs <= p.slots:
            twin = max(uniform_s, self.c0_us * 1e-6 + p.uniform_bytes / rate)
            return uniform_s + max(0.0, self.c0_us * 1e-6 + p.longest_bytes / rate - twin)
        return uniform_s + self.k * max(0.0, p.longest_bytes - p.uniform_bytes) / rate

    def excess(self, uniform_s: float, p: DecodePrograms) -> float:
        return self.time(uniform_s, p) - uniform_s

    def describe(self) -> str:
        return (f"ragged batches ({self.n}): the uniform batch's time alone is off by {self.base_error:.1%} on "
                f"average; with the critical-path term (a program at {self.rate_gbs:.0f} GB/s, c0 {self.c0_us:.1f} "
                f"us, tail k {self.k:.2f}) by {self.mean_error:.1%} (p90 {self.p90_error:.1%})")


def paired(df, key: list[str], value: str):
    """A table's ragged rows (``dist`` not uniform) that have a uniform twin of the same ``key``
    (at least two columns), and each one's twin's ``value``: what ``fit`` compares them with."""
    uni = df[df["dist"] == "uniform"].set_index(key)[value]
    has = np.array([k in uni.index for k in zip(*(df[c] for c in key))], dtype=bool)
    rag = df[(df["dist"] != "uniform").to_numpy() & has]
    return rag, uni.loc[list(zip(*(rag[c] for c in key)))].to_numpy(float)


def fit(uniform_s, measured_s, longest_bytes, uniform_bytes, programs, slots) -> RaggedFit:
    """Least mean |relative error| over the grid of (rate, c0, k): per rate, c0 only moves the
    batches whose programs are all resident and k only the others, so each is chosen apart."""
    u, m = np.asarray(uniform_s, float), np.asarray(measured_s, float)
    lb, ub = np.asarray(longest_bytes, float), np.asarray(uniform_bytes, float)
    resident = np.asarray(programs) <= np.asarray(slots)
    if len(m) == 0:
        raise ValueError("no ragged batches to fit")
    best = None
    for rate in RATES_GBS:
        t = lb / (rate * 1e9)
        a = np.abs(np.maximum(u[resident, None], C0S_US[None, :] * 1e-6 + t[resident, None])
                   / m[resident, None] - 1).sum(axis=0)
        tail = np.maximum(0.0, lb - ub)[~resident, None] / (rate * 1e9)
        b = np.abs((u[~resident, None] + TAIL_KS[None, :] * tail) / m[~resident, None] - 1).sum(axis=0)
        i, j = int(np.argmin(a)), int(np.argmin(b))
        total = a[i] + b[j]
        if best is None or total < best[0] - 1e-12:
            best = (total, rate, C0S_US[i], TAIL_KS[j])
    _, rate, c0, k = best
    f = RaggedFit(float(rate), float(c0), float(k))
    pred = np.array([f.time(ui, DecodePrograms(li, bi, int(pi), int(si)))
                     for ui, li, bi, pi, si in zip(u, lb, ub, programs, slots)])
    err = np.abs(pred / m - 1)
    return RaggedFit(f.rate_gbs, f.c0_us, f.k, float(err.mean()), float(np.percentile(err, 90)),
                     float(np.abs(u / m - 1).mean()), len(m))
