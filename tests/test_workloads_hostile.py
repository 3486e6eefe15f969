"""Hostile workload configs and trace files: refused before any request is queued, the error
naming the field (and a trace's line) and the fix."""
from __future__ import annotations

import json

import pytest

from experiments.workloads import check_workload, make_workload

VOCAB, MAX_LEN = 1000, 128


def trace(tmp_path, *lines: str | dict, **cfg):
    path = tmp_path / "t.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return make_workload(dict(name="trace", trace_path=str(path), num_requests=10, **cfg), VOCAB, MAX_LEN), path


@pytest.mark.parametrize("line, why", [
    ('{"prompt_len": 1' + "0" * 5000 + ', "output_len": 3}', "a number with too many digits"),
    ('{"prompt_len": ' + "[" * 100_000 + "]" * 100_000 + ', "output_len": 3}', "nested too deeply"),
])
def test_an_unreadable_trace_line_is_named(tmp_path, line, why):
    # was: Python's int-digits ValueError (no line, "use sys.set_int_max_str_digits()"), or a RecursionError
    with pytest.raises(ValueError, match=rf"line 2: not a trace line \({why}\)"):
        trace(tmp_path, {"prompt_len": 3, "output_len": 3}, line)


def test_an_unnamed_lines_id_taken_by_another_line_is_refused(tmp_path):
    # was: two requests 'trace-1'; the engine refused the second mid-run, naming no line
    with pytest.raises(ValueError, match=r"line 1: request_id 'trace-1' is the id of the unnamed request on line 2"):
        trace(tmp_path, {"prompt_len": 3, "output_len": 3, "request_id": "trace-1"}, {"prompt_len": 3, "output_len": 3})
    with pytest.raises(ValueError, match=r"line 2: request_id 'trace-0' is the id of the unnamed request on line 1"):
        trace(tmp_path, {"prompt": "hi", "output_len": 3, "request_id": ""},
              {"prompt": "ho", "output_len": 3, "request_id": "trace-0"})
    specs, _ = trace(tmp_path, {"prompt": "a", "output_len": 3, "request_id": "x"}, {"prompt": "b", "output_len": 3})
    assert [s.request_id for s in specs] == ["x", "trace-1"]


def test_a_trace_lines_n_above_beam_width_is_refused_with_its_line(tmp_path):
    # was: accepted; SamplingParams refused it mid-run, naming no line
    with pytest.raises(ValueError, match=r"line 2: 'n' \(4\) must be <= workload.beam_width \(2\)"):
        trace(tmp_path, {"prompt_len": 3, "output_len": 3, "n": 2}, {"prompt_len": 3, "output_len": 3, "n": 4},
              beam_width=2)


def test_an_empty_text_prompt_is_refused_with_its_line(tmp_path):
    # was: accepted (a BOS-only request, or "tokenizes to nothing" naming no line)
    with pytest.raises(ValueError, match=r"line 1: 'prompt' is empty"):
        trace(tmp_path, {"prompt": "", "output_len": 3})


@pytest.mark.parametrize("cfg, match", [
    # was: every prompt silently clipped to max_model_len - 1 with one output token (fixed refuses this)
    (dict(name="multi_turn", turns=2, input_len=500), "workload.input_len=500: no prompt that long fits max_model_len=128"),
    (dict(name="shared_prefix", prefix_len=10, input_len=500),
     r"workload.prefix_len \+ workload.input_len = 10 \+ 500: no prompt that long fits max_model_len=128"),
    (dict(name="shared_prefix", prefix_len=100, input_len_min=30, input_len_max=40),
     r"workload.prefix_len \+ workload.input_len_min = 100 \+ 30"),
    # was: a boolean taken as 1.0
    (dict(name="fixed", request_rate=True), "workload.request_rate and workload.burstiness must be numbers"),
    (dict(name="fixed", request_rate=1.0, arrival="gamma", burstiness=True), "must be numbers"),
    (dict(name="multi_turn", turns=2, prefix_hit_rate=True), r"workload.prefix_hit_rate must be in \[0, 1\]"),
])
def test_hostile_config_is_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        check_workload(dict(num_requests=4, **cfg), VOCAB, MAX_LEN)


def test_prompts_that_fit_still_pass():
    assert len(make_workload(dict(name="multi_turn", num_requests=4, turns=2, input_len=127), VOCAB, MAX_LEN)) == 4
    specs = make_workload(dict(name="shared_prefix", num_requests=4, prefix_len=100, input_len=27), VOCAB, MAX_LEN)
    assert {s.prompt_len for s in specs} == {127}


def _far_trace(tmp_path):
    path = tmp_path / "far.jsonl"
    path.write_text('{"prompt_len": 8, "output_len": 2, "arrival_s": 0}\n'
                    '{"prompt_len": 8, "output_len": 2, "arrival_s": 3}\n')
    return path


def test_a_trace_whose_arrivals_span_past_a_day_is_refused_online(tmp_path, capsys, monkeypatch):
    # was: the real engine waited for arrival_s in real time (a trace allows 1e9 s, ~31 years); online's one-day
    # bound (preflight.MAX_ONLINE_SPAN_S) skips traces. The day is 1 s here, so the unfixed run takes 3 s and fails.
    from experiments import preflight
    from experiments.run import cli

    monkeypatch.setattr(preflight, "MAX_ONLINE_SPAN_S", 1.0)
    code = cli(["mode=online", "device=cpu", "model=tiny-llama", "workload=trace",
                f"workload.trace_path={_far_trace(tmp_path)}",
                f"hydra.run.dir={tmp_path / 'run'}", "progress=false", "report=false"])
    err = capsys.readouterr().err
    assert code == 2 and "arrival_s up to 3 s, but mode=online waits for arrivals in real time (at most 1 s)" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_offline_sends_a_trace_at_t0_and_online_replays_its_arrivals(tmp_path, mode):
    # was: offline kept a trace's arrival_s (README: "every request at t=0") and online refused a trace
    # (request_rate=inf: "needs arrivals over time"), so no mode named what it did with one
    import pandas as pd

    from experiments.run import cli

    run = tmp_path / "run"
    assert cli([f"mode={mode}", "device=cpu", "model=tiny-llama", "workload=trace",
                f"workload.trace_path={_far_trace(tmp_path)}", f"hydra.run.dir={run}",
                "progress=false", "report=false"]) == 0
    arrivals = sorted(pd.read_parquet(run / "requests.parquet")["arrival"])
    if mode == "offline":
        assert arrivals == [0.0, 0.0]
    else:
        assert arrivals[0] == 0.0 and arrivals[1] == pytest.approx(3.0, abs=0.05)


def test_online_without_a_rate_is_still_refused_for_generated_arrivals(capsys):
    from experiments.run import cli

    assert cli(["mode=online", "device=cpu", "model=tiny-llama", "workload=uniform", "progress=false"]) == 2
    assert "mode=online needs arrivals over time" in capsys.readouterr().err


def test_a_trace_cut_to_max_model_len_says_so_once(tmp_path, caplog):
    # was: silent (a replayed trace's longest requests shortened, its figures not the trace's)
    path = tmp_path / "long.jsonl"
    path.write_text('{"prompt_len": 8, "output_len": 4}\n{"prompt_len": 500, "output_len": 4}\n'
                    '{"prompt_len": 8, "output_len": 900}\n{"prompt_len": 900, "output_len": 900}\n')
    with caplog.at_level("WARNING", logger="kvlab.workloads"):
        specs = make_workload(dict(name="trace", trace_path=str(path)), VOCAB, 256)
    assert [s.prompt_len + s.output_len <= 256 for s in specs] == [True] * 4
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "3 of 4 requests cut to fit max_model_len=256" in said[0] and "line 2" in said[0], said
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvlab.workloads"):
        make_workload(dict(name="trace", trace_path=str(path), num_requests=1), VOCAB, 256)
    assert not caplog.records


def test_text_prompts_cut_to_max_model_len_say_so_once(caplog):
    from experiments.workloads import RequestSpec, tokenize_requests

    specs = [RequestSpec(f"r{i}", [], 4, prompt_text="x" * n) for i, n in enumerate((5, 50, 60))]
    with caplog.at_level("WARNING", logger="kvlab.workloads"):
        out = tokenize_requests(specs, lambda t: list(range(1, len(t) + 1)), max_model_len=32)
    assert [s.prompt_len for s in out] == [5, 31, 31]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "text prompts: 2 of 3 requests cut" in said[0] and "request r1" in said[0], said
