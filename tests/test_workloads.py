"""Workload generators: length statistics, arrivals, determinism, clipping, validation."""
from __future__ import annotations

import json
from types import MappingProxyType

import numpy as np
import pytest

import experiments.workloads as wl
from experiments.workloads import (
    WORKLOADS, RequestSpec, WorkloadConfig, available_workloads, make_workload,
    register_workload, tokenize_requests,
)

VOCAB, MAX_LEN, N = 50272, 2048, 10_000


def lengths(specs: list[RequestSpec]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s.prompt_len for s in specs]), np.array([s.output_len for s in specs])


def within(value: float, target: float, rel: float = 0.05) -> bool:
    return abs(value - target) <= rel * target


def test_registry_lists_every_workload():
    assert {"fixed", "uniform", "sharegpt", "alpaca", "shared_prefix", "parallel", "trace"} <= set(
        available_workloads())


def test_fixed_lengths_are_exact():
    p, o = lengths(make_workload(dict(name="fixed", num_requests=N, input_len=100, output_len=7), VOCAB, MAX_LEN))
    assert (p == 100).all() and (o == 7).all()


def test_uniform_mean_is_mean_of_bounds():
    cfg = dict(name="uniform", num_requests=N, input_len_min=10, input_len_max=300,
               output_len_min=5, output_len_max=95)
    p, o = lengths(make_workload(cfg, VOCAB, MAX_LEN))
    assert p.min() >= 10 and p.max() <= 300 and o.min() >= 5 and o.max() <= 95
    assert within(p.mean(), 155) and within(o.mean(), 50)


def test_uniform_default_range_is_centred_on_input_len():
    p, o = lengths(make_workload(dict(name="uniform", num_requests=N, input_len=64, output_len=32), VOCAB, MAX_LEN))
    assert (p.min(), p.max(), o.min(), o.max()) == (32, 96, 16, 48)
    assert within(p.mean(), 64) and within(o.mean(), 32)


@pytest.mark.parametrize("name, mean_in, mean_out", [("sharegpt", 161, 338), ("alpaca", 19, 58)])
def test_dataset_means_match_published_statistics(name, mean_in, mean_out):
    p, o = lengths(make_workload(dict(name=name, num_requests=N, seed=3), VOCAB, MAX_LEN))
    assert within(p.mean(), mean_in) and within(o.mean(), mean_out), (p.mean(), o.mean())
    assert (p + o).max() <= MAX_LEN and p.min() >= 1 and o.min() >= 1
    # heavy tailed: the mean sits well above the median and the tail reaches far out
    assert np.median(p) < 0.8 * p.mean() and np.median(o) < 0.9 * o.mean()
    assert np.percentile(p, 99) > 4 * np.median(p) and np.percentile(o, 99) > 3 * np.median(o)


def test_sharegpt_is_longer_than_alpaca():
    sp, so = lengths(make_workload(dict(name="sharegpt", num_requests=2000), VOCAB, MAX_LEN))
    ap, ao = lengths(make_workload(dict(name="alpaca", num_requests=2000), VOCAB, MAX_LEN))
    assert sp.mean() > 6 * ap.mean() and so.mean() > 4 * ao.mean()


def test_token_ids_in_range():
    specs = make_workload(dict(name="uniform", num_requests=200), vocab_size=512, max_model_len=256)
    ids = np.concatenate([s.prompt_token_ids for s in specs])
    assert ids.min() >= 4 and ids.max() < 512
    assert len(np.unique(ids)) > 400  # spread over the vocabulary, not a constant
    low0 = make_workload(dict(name="fixed", num_requests=50, input_len=200), 8, 256, low=0)
    assert {i for s in low0 for i in s.prompt_token_ids} == set(range(8))


def test_offline_arrivals_are_zero():
    specs = make_workload(dict(name="fixed", num_requests=50), VOCAB, MAX_LEN)
    assert all(s.arrival_s == 0.0 for s in specs)


def _gaps(cfg: dict) -> np.ndarray:
    t = np.array([s.arrival_s for s in make_workload(cfg, 512, 64)])
    assert t[0] == 0.0 and (np.diff(t) >= 0).all()
    return np.diff(t)


def test_poisson_arrival_rate():
    gaps = _gaps(dict(name="fixed", num_requests=N, input_len=4, output_len=4, request_rate=8.0))
    assert within(1 / gaps.mean(), 8.0)
    assert within(gaps.std() / gaps.mean(), 1.0)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_coefficient_of_variation(burstiness):
    gaps = _gaps(dict(name="fixed", num_requests=N, input_len=4, output_len=4, request_rate=5.0,
                      arrival="gamma", burstiness=burstiness, seed=1))
    assert within(1 / gaps.mean(), 5.0)
    assert within(gaps.std() / gaps.mean(), 1 / np.sqrt(burstiness), rel=0.08)


def test_same_seed_same_workload_different_seed_differs():
    cfg = dict(name="sharegpt", num_requests=100, request_rate=2.0, seed=7)
    assert make_workload(cfg, VOCAB, MAX_LEN) == make_workload(cfg, VOCAB, MAX_LEN)
    other = make_workload({**cfg, "seed": 8}, VOCAB, MAX_LEN)
    assert lengths(other)[0].tolist() != lengths(make_workload(cfg, VOCAB, MAX_LEN))[0].tolist()


def test_rate_sweep_replays_the_same_requests():
    slow = make_workload(dict(name="alpaca", num_requests=50, request_rate=1.0), VOCAB, MAX_LEN)
    fast = make_workload(dict(name="alpaca", num_requests=50, request_rate=10.0), VOCAB, MAX_LEN)
    assert [s.prompt_token_ids for s in slow] == [s.prompt_token_ids for s in fast]
    assert [s.output_len for s in slow] == [s.output_len for s in fast]
    assert slow[-1].arrival_s > fast[-1].arrival_s


def test_config_object_and_mapping_agree_and_config_is_not_mutated():
    cfg = WorkloadConfig(name="uniform", num_requests=20, seed=5)
    a = make_workload(cfg, VOCAB, MAX_LEN)
    b = make_workload(MappingProxyType(dict(name="uniform", num_requests=20, seed=5)), VOCAB, MAX_LEN)
    assert a == b and cfg.input_len_min is None
    assert [s.request_id for s in a] == [f"uniform-{i}" for i in range(20)]


@pytest.mark.parametrize("cfg", [
    dict(name="uniform", input_len_min=100, input_len_max=5000, output_len_min=500, output_len_max=3000),
    dict(name="fixed", input_len=200, output_len=4000),
    dict(name="sharegpt"),
    dict(name="shared_prefix", prefix_len=200, input_len=40, output_len=300),  # 240-token prompts
])
def test_lengths_clipped_to_max_model_len(cfg):
    specs = make_workload({**cfg, "num_requests": 500}, VOCAB, max_model_len=256)
    p, o = lengths(specs)
    assert p.min() >= 1 and o.min() >= 1 and (p + o).max() <= 256
    assert (p + o).max() == 256  # the cap binds for all of these


@pytest.mark.parametrize("cfg, key", [
    (dict(name="uniform", input_len_min=256, input_len_max=5000), "input_len_min=256"),
    (dict(name="uniform", input_len=600), "input_len=600"),  # [300, 900]
    (dict(name="fixed", input_len=256), "input_len=256"),
    (dict(name="parallel", input_len=4000, n=2), "input_len=4000"),
])
def test_a_workload_whose_every_prompt_is_too_long_is_refused(cfg, key):
    """Every prompt would be clipped to max_model_len - 1 with one output token: not the workload
    asked for, so it is refused naming the key (some prompts clipped is still the documented cap)."""
    with pytest.raises(ValueError, match=rf"workload.{key}: no prompt that long fits max_model_len=256"):
        make_workload({**cfg, "num_requests": 5}, VOCAB, max_model_len=256)
    make_workload({**cfg, "num_requests": 5}, VOCAB, max_model_len=2 * 4096)


def test_shared_prefix_groups_share_exactly_their_prefix():
    cfg = dict(name="shared_prefix", num_requests=60, prefix_len=40, num_prefixes=3, input_len=10)
    specs = make_workload(cfg, VOCAB, MAX_LEN)
    assert all(s.prompt_len == 50 for s in specs)
    groups = [specs[g::3] for g in range(3)]
    for group in groups:
        assert len(group) == 20
        prefix = group[0].prompt_token_ids[:40]
        assert all(s.prompt_token_ids[:40] == prefix for s in group)
        assert len({tuple(s.prompt_token_ids[40:]) for s in group}) == 20  # suffixes are distinct
    assert len({tuple(g[0].prompt_token_ids[:40]) for g in groups}) == 3  # prefixes are distinct


def test_parallel_and_n_propagate():
    assert all(s.n == 4 for s in make_workload(dict(name="parallel", n=4, num_requests=10), VOCAB, MAX_LEN))
    assert all(s.n == 2 for s in make_workload(dict(name="alpaca", n=2, num_requests=10), VOCAB, MAX_LEN))


def test_trace_replay_with_lengths(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [dict(prompt_len=10, output_len=5, arrival_s=0.0), dict(prompt_len=3000, output_len=9, arrival_s=0.5),
            dict(prompt_len=7, output_len=2, arrival_s=1.25, n=3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    specs = make_workload(dict(name="trace", trace_path=str(path), num_requests=100), VOCAB, MAX_LEN)
    assert [(s.prompt_len, s.output_len, s.arrival_s, s.n) for s in specs] == [
        (10, 5, 0.0, 1), (2047, 1, 0.5, 1), (7, 2, 1.25, 3)]  # the long one clipped
    assert all(s.prompt_text is None for s in specs)
    first_two = make_workload(dict(name="trace", trace_path=str(path), num_requests=2), VOCAB, MAX_LEN)
    assert len(first_two) == 2
    rated = make_workload(dict(name="trace", trace_path=str(path), request_rate=100.0), VOCAB, MAX_LEN)
    assert [s.arrival_s for s in rated] != [0.0, 0.5, 1.25] and rated[0].arrival_s == 0.0


def test_trace_replay_with_text_prompts(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [dict(prompt="hello world", output_len=5000), dict(prompt="a b c d e f", output_len=3, request_id="x")]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    specs = make_workload(dict(name="trace", trace_path=str(path)), VOCAB, max_model_len=8)
    assert [s.prompt_text for s in specs] == ["hello world", "a b c d e f"]
    assert all(s.prompt_token_ids == [] and s.arrival_s == 0.0 for s in specs)
    assert specs[0].output_len == 7 and specs[1].request_id == "x"
    encode = lambda text: [ord(c) for c in text]  # noqa: E731 (stand-in tokenizer)
    done = tokenize_requests(specs, encode, max_model_len=8)
    assert done[0].prompt_token_ids == [ord(c) for c in "hello w"] and done[0].output_len == 1
    assert done[1].prompt_len == 7 and done[1].output_len == 1
    unclipped = tokenize_requests(specs, encode)
    assert unclipped[0].prompt_len == 11 and unclipped[0].output_len == 7
    assert tokenize_requests(done, lambda text: [], 8) == done  # ids present: left alone
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        tokenize_requests(specs, lambda text: [], 8)


@pytest.mark.parametrize("cfg, match", [
    (dict(name="zipf"), "unknown workload 'zipf'.*workload.name"),
    (dict(name="uniform", input_length=5), "unknown workload field 'input_length'.*workload.input_len"),
    (dict(name="fixed", num_requests=0), r"workload.num_requests must be an integer in \[1, 10000000\]"),
    (dict(name="fixed", num_requests=10**9), r"workload.num_requests must be an integer in \[1, 10000000\]"),
    (dict(name="uniform", input_len_min=1, input_len_max=10**19), r"input_len_max must be an integer in \[1, "),
    (dict(name="shared_prefix", prefix_len=4, num_prefixes=10**9), "num_prefixes must be an integer in.*num_requests"),
    (dict(name="multi_turn", turns=10**9), "turns must be an integer in.*num_requests"),
    (dict(name="parallel", n=10**6), r"workload.n must be an integer in \[1, 1024\]"),
    (dict(name="fixed", output_len=2.5), "workload.output_len must be an integer"),
    (dict(name="uniform", input_len_min=10), "input_len_min and input_len_max go together"),
    (dict(name="uniform", output_len_min=10, output_len_max=5), "output_len_min.*> output_len_max"),
    (dict(name="fixed", input_len_min=1, input_len_max=5), "input_len_min is not used by workload 'fixed'"),
    (dict(name="sharegpt", prefix_len=16), "prefix_len is not used by workload 'sharegpt'"),
    (dict(name="shared_prefix"), "workload.prefix_len must be in"),
    (dict(name="parallel", n=1), "workload.n >= 2"),
    (dict(name="trace"), "workload.trace_path must name a local JSONL file"),
    (dict(name="fixed", request_rate=0), "workload.request_rate must be > 0"),
    (dict(name="fixed", arrival="uniform"), "workload.arrival must be 'poisson' or 'gamma'"),
    (dict(name="fixed", burstiness=0.5), "set workload.arrival=gamma"),
    (dict(name="fixed", arrival="gamma", burstiness=-1.0), "workload.burstiness must be"),
])
def test_bad_config_raises_clear_error(cfg, match):
    with pytest.raises(ValueError, match=match):
        make_workload(cfg, VOCAB, MAX_LEN)


@pytest.mark.parametrize("line, match", [
    ('{"prompt_len": 5}', "missing 'output_len'"),
    ('{"prompt_len": 5, "prompt": "x", "output_len": 1}', "exactly one of 'prompt'"),
    ('{"prompt_len": 0, "output_len": 1}', "'prompt_len' must be an integer >= 1"),
    ('{"prompt_len": 5, "output_len": 1, "tokens": 3}', "unknown keys \\['tokens'\\]"),
    ('{"prompt_len": 5, "output_len": 1', "line 1: not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_trace_raises_clear_error(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        make_workload(dict(name="trace", trace_path=str(path)), VOCAB, MAX_LEN)


def test_trace_arrivals_all_or_none(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt_len": 5, "output_len": 1, "arrival_s": 1}\n{"prompt_len": 5, "output_len": 1}\n')
    with pytest.raises(ValueError, match="arrival_s on every line or on none"):
        make_workload(dict(name="trace", trace_path=str(path)), VOCAB, MAX_LEN)


def test_registered_workload_plugs_in():
    @register_workload("_test_const", uses=("prefix_len",))
    def const(cfg, ctx):
        return ctx.specs([ctx.tokens(cfg.prefix_len)] * cfg.num_requests, [3] * cfg.num_requests, cfg.n)

    try:
        specs = make_workload(dict(name="_test_const", num_requests=3, prefix_len=6, request_rate=1.0), VOCAB, MAX_LEN)
        assert [(s.prompt_len, s.output_len) for s in specs] == [(6, 3)] * 3
        assert specs[2].arrival_s > 0 and specs[0].request_id == "_test_const-0"
    finally:
        del WORKLOADS["_test_const"]
        del wl._USES["_test_const"]


@pytest.mark.parametrize("content, msg", [
    (b'{"prompt": "\\ud800x", "output_len": 3}\n', r"line 1: 'prompt' is not valid text \(surrogates not allowed"),
    (b'{"prompt_len": 2, "output_len": 3}\n{"prompt": "caf\xe9", "output_len": 3}\n',
     r"line 2: not UTF-8 text \(invalid continuation byte\): save the trace as UTF-8"),
    (b'{"prompt_len": 3, "output_len": 3, "request_id": "a"}\n\n{"prompt_len": 3, "output_len": 3, "request_id": "a"}\n',
     r"line 3: request_id 'a' is also on line 1"),
    (b'{"prompt_len": 3, "output_len": 3, "n": 100000}\n', r"line 1: 'n' must be at most 1024 samples"),
    (b'{"prompt_len": 3, "output_len": 3, "request_id": [1]}\n', r"line 1: 'request_id' must be a string"),
])
def test_a_hostile_trace_line_is_named(content, msg, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"trace {path} {msg}"):
        make_workload(dict(name="trace", trace_path=str(path), num_requests=10), VOCAB, MAX_LEN)


def test_a_trace_with_a_byte_order_mark_reads_as_without(tmp_path):
    plain, bom = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    line = b'{"prompt_len": 3, "output_len": 4, "request_id": 7}\n'
    plain.write_bytes(line)
    bom.write_bytes(b"\xef\xbb\xbf" + line)
    a, b = (make_workload(dict(name="trace", trace_path=str(p), num_requests=10), VOCAB, MAX_LEN) for p in (plain, bom))
    assert [(s.request_id, s.output_len, s.prompt_len) for s in a] == [(s.request_id, s.output_len, s.prompt_len)
                                                                       for s in b] == [("7", 4, 3)]
