"""Conversation workloads: the chatbot (history carried, cut to history_len) and multi_turn (a set
prefix-hit rate)."""
from __future__ import annotations

import pytest

from experiments.workloads import make_workload


def chat(**kw):
    return make_workload(dict(name="chatbot", num_requests=12, turns=3, **kw), 1000, 2048)


def test_chatbot_turns_carry_the_conversation_and_arrive_in_order():
    specs = {s.request_id: s for s in make_workload(dict(name="chatbot", num_requests=12, turns=3,
                                                         request_rate=2.0), 1000, 2048)}
    for c in range(4):
        t0, t1, t2 = (specs[f"chat{c}-turn{t}"] for t in range(3))
        assert t0.arrival_s < t1.arrival_s < t2.arrival_s
        # turn t+1 = turn t's prompt + its answer + a new question (uncut while under 1024)
        if t1.prompt_len < 1024:
            assert t1.prompt_token_ids[:t0.prompt_len] == t0.prompt_token_ids
            assert t1.prompt_len > t0.prompt_len + t0.output_len


def test_chatbot_history_is_cut_to_its_last_tokens():
    specs = chat(history_len=64)
    assert max(s.prompt_len for s in specs) == 64
    first = [s for s in specs if s.request_id.endswith("turn0")]
    assert all(s.prompt_len <= 64 for s in first)
    assert all(s.prompt_len + s.output_len <= 2048 for s in specs)


@pytest.mark.parametrize("hit", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_multi_turn_follow_ups_repeat_the_set_share_of_the_previous_prompt(hit):
    specs = make_workload(dict(name="multi_turn", num_requests=40, turns=4, prefix_hit_rate=hit,
                               input_len=100, output_len=8), 1000, 2048)
    by_id = {s.request_id: s for s in specs}
    for s in specs:
        c, t = s.request_id.removeprefix("conv").split("-turn")
        if t == "0":
            continue
        prev = by_id[f"conv{c}-turn{int(t) - 1}"].prompt_token_ids
        shared = next((i for i, (a, b) in enumerate(zip(prev, s.prompt_token_ids)) if a != b), len(prev))
        assert shared >= round(hit * s.prompt_len)  # at least the set share (fresh ids may match by chance)
        assert shared <= round(hit * s.prompt_len) + 3


def test_conversation_fields_are_checked():
    with pytest.raises(ValueError, match="prefix_hit_rate must be in"):
        make_workload(dict(name="multi_turn", prefix_hit_rate=1.5), 1000, 2048)
    with pytest.raises(ValueError, match=r"turns must be an integer in \[1, "):
        make_workload(dict(name="chatbot", turns=0), 1000, 2048)
    with pytest.raises(ValueError, match="not used by workload 'uniform'"):
        make_workload(dict(name="uniform", turns=3), 1000, 2048)


def test_prefix_cache_hits_follow_the_set_rate(tmp_path):
    """Paged with prefix caching, simulated: the hit rate grows with prefix_hit_rate and stays
    no higher than the set share (whole blocks only; first turns never hit)."""
    from tests.test_simulate import config
    from experiments.run import run_experiment

    rates = []
    for hit in (0.0, 0.5, 0.9):
        s = run_experiment(config("mode=simulate", "workload=multi_turn", "workload.num_requests=32",
                                  f"workload.prefix_hit_rate={hit}", "engine.enable_prefix_caching=true",
                                  "allocator=paged", "allocator.args.block_size=16"), tmp_path / str(hit))
        rates.append(s["prefix_cache_hit_rate"])
    assert rates[0] < 0.05 < rates[1] < rates[2] <= 0.9
