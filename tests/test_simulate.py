"""Simulate mode: the real scheduler and allocator on a virtual clock, timed by the cost model."""
from __future__ import annotations

import math
import time

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import allocators
from allocators.stats import STAT_FIELDS
from experiments.costmodel import MODEL_SHAPES, DEVICES, RooflineCostModel
from experiments.run import CONF_DIR, build_engine, check_config, run_experiment
from experiments.simulate import SimRunner, VirtualClock, simulated_engine

# columns that are scheduler decisions or memory, not time
DECISIONS = ["running", "waiting", "num_seqs", "prefill_tokens", "decode_tokens", "preempted"]
MEMORY = [*STAT_FIELDS, "capacity"]


def config(*overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["progress=false", "report=false", *overrides])


# --------------------------------------------------------------------------- equivalence

# 48 requests of up to 176 tokens in a 1024-token pool: preemption happens
UNIFORM = ["workload=uniform", "workload.num_requests=48", "workload.input_len_min=32", "workload.input_len_max=96",
           "workload.output_len_min=16", "workload.output_len_max=80"]
CASES = {
    "paged": ["allocator=paged", "allocator.args.block_size=8", *UNIFORM],
    "contiguous-pow2": ["allocator=contiguous", "allocator.args.policy=pow2", *UNIFORM],
    "paged-fork-n2": ["allocator=paged", "workload=parallel", "workload.n=2", "workload.input_len=40",
                      "workload.output_len=40", "workload.num_requests=24"],
    "paged-swap": ["allocator=paged", "++engine.preemption_mode=swap", "++engine.swap_space=0.001", *UNIFORM],
    "virtual": ["allocator=virtual", "allocator.args.page_size=4096", *UNIFORM],
    # conversations whose prefixes leave the device pool for the host tier and come back
    "paged-host-tier": ["allocator=paged", "allocator.args.block_size=8", "workload=multi_turn",
                        "workload.num_requests=48", "workload.turns=3", "workload.input_len=96",
                        "workload.output_len=16", "workload.prefix_hit_rate=0.75", "engine.enable_prefix_caching=true",
                        "engine.host_kv_cache_tokens=2048", "engine.host_transfer_blocks=2"],
    # 4 conversations, 4 at a time: each turn comes once the last has finished and left its slot idle
    "virtual-prefix": ["allocator=virtual", "allocator.args.page_size=4096", "workload=multi_turn",
                       "engine.max_num_seqs=4", "workload.num_requests=12", "workload.turns=3", "workload.input_len=96", "workload.output_len=16",
                       "workload.prefix_hit_rate=0.75", "engine.enable_prefix_caching=true"],
    # asynchronous scheduling: stops seen a step late, the same way in both
    "paged-async": ["allocator=paged", "allocator.args.block_size=8", "engine.async_scheduling=true",
                    "engine.enable_prefix_caching=true", *UNIFORM],
    # concurrent requests with two shared 96-token prefixes (12 pages of 8 tokens): live slots map
    # the pages other slots computed; a small token budget spreads the first prefills over steps
    "virtual-share": ["allocator=virtual", "allocator.args.page_size=4096", "allocator.args.layout=shared",
                      "workload=shared_prefix", "workload.num_requests=24", "workload.num_prefixes=2",
                      "engine.max_num_seqs=6", "engine.max_num_batched_tokens=64", "engine.enable_prefix_caching=true"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_simulate_memory_equals_real_engine(case, tmp_path, monkeypatch):
    """Same workload, seed and allocator through the real engine (tiny model, offline) and
    through simulate mode: every scheduling decision and every memory figure is the same."""
    if case == "virtual" and "virtual" not in allocators.available():
        pytest.skip("virtual allocator not registered")
    shares: list[int] = []  # virtual: pages mapped from other slots at each shared admission
    if case == "virtual-share":
        from allocators.virtual import VirtualAllocator
        share = VirtualAllocator._share
        monkeypatch.setattr(VirtualAllocator, "_share",
                            lambda self, seq, slot, groups, hashes: (shares.append(len(groups)),
                                                                     share(self, seq, slot, groups, hashes))[1])
    base = ["model=tiny-llama", "engine.dtype=float32", "engine.kv_cache_tokens=1024",
            "engine.max_model_len=256", "engine.max_num_batched_tokens=256", "engine.max_num_seqs=16"]
    own = {o.split("=")[0] for o in CASES[case]}  # a case may replace a base setting
    common = [o for o in base if o.split("=")[0] not in own] + CASES[case]
    real = run_experiment(config("mode=offline", "device=cpu", *common), tmp_path / "real")
    real_shares, shares[:] = list(shares), []
    sim = run_experiment(config("mode=simulate", *common), tmp_path / "sim")
    assert real_shares == shares  # virtual-share: the same pages shared at the same admissions
    a = pd.read_parquet(tmp_path / "real" / "steps.parquet")
    b = pd.read_parquet(tmp_path / "sim" / "steps.parquet")
    assert len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a[DECISIONS + MEMORY], b[DECISIONS + MEMORY])
    busy = a["num_seqs"] > 0
    assert (a.loc[busy, "launch_s"] > 0).all() and (b["launch_s"] == 0).all()  # simulate launches nothing
    for key in (*STAT_FIELDS, *(f"{f}_peak" for f in STAT_FIELDS), "preemptions", "max_concurrency",
                "total_output_tokens", "kv_capacity_tokens"):
        assert real[key] == sim[key], key
    if case in ("paged", "paged-swap", "virtual", "paged-async"):  # contiguous reserves at admission: never preempts
        assert real["preemptions"] > 0, "the case should exercise preemption"
    ra = pd.read_parquet(tmp_path / "real" / "requests.parquet").set_index("request_id")
    rb = pd.read_parquet(tmp_path / "sim" / "requests.parquet").set_index("request_id")
    cols = ["prompt_len", "output_len", "num_output_tokens", "n", "preemptions"]
    pd.testing.assert_frame_equal(ra.loc[rb.index, cols], rb[cols])
    assert sim["device"] == "simulated a100-40gb" and sim["mode"] == "simulate"
    if case == "virtual-share":  # the same pages shared at the same steps
        assert len(real_shares) >= 3 and min(real_shares) >= 1  # the rest reuse idle slots in place
        assert real["prefix_cache_hit_rate"] > 0.3 and real["prefix_cache_hit_rate"] == sim["prefix_cache_hit_rate"]
        assert real["recomputed_tokens"] == sim["recomputed_tokens"]
    if case == "virtual-prefix":  # idle slots' KV reused in place, the same way
        assert real["prefix_cache_hit_rate"] > 0.1 and real["recomputed_tokens"] == sim["recomputed_tokens"]
        assert real["prefix_cache_hit_rate"] == sim["prefix_cache_hit_rate"]
    if case == "paged-host-tier":  # the same blocks went to the host and came back
        assert real["host_prefix_hit_rate"] > 0.1
        for key in ("host_prefix_hit_rate", "gpu_prefix_hit_rate", "recomputed_tokens", "host_tier_stored_bytes",
                    "host_tier_loaded_bytes", "host_tier_transfers"):
            assert real[key] == sim[key], key
        cols = ["tier_loaded_blocks", "tier_stored_blocks", "tier_transfers"]
        pd.testing.assert_frame_equal(a[cols], b[cols])


# --------------------------------------------------------------------------- the clock

def test_sim_runner_charges_the_cost_model():
    cm = RooflineCostModel(MODEL_SHAPES["opt-13b"], DEVICES["a100-40gb"])
    clock = VirtualClock()

    class Seq:
        def __init__(self, computed, tokens):
            self.seq_id, self.num_computed_tokens, self.token_ids = 1, computed, list(range(tokens))
            self.status = None

        @property
        def num_tokens(self):
            return len(self.token_ids)

    class Batch:
        def __init__(self, items):
            self.seqs = [s for s, _ in items]
            self.num_new_tokens = [n for _, n in items]
            self.preempted = []
            self.swap_transfers = []

    runner = SimRunner(cm, clock, 50272, [2])
    prefill, decode = Seq(0, 100), Seq(99, 100)
    out = runner.execute(Batch([(prefill, 60), (decode, 1)]))
    assert [s for s, _, _ in out] == [decode]  # only a sequence whose new tokens reach its end samples
    assert 4 <= out[0][1] < 50272 and out[0][1] != 2
    assert clock() == pytest.approx(cm.step_time([(60, 60), (1, 100)]))
    clock.advance(-1.0)  # time never runs backwards
    assert clock() == pytest.approx(cm.step_time([(60, 60), (1, 100)]))


def test_online_simulation_jumps_idle_time(tmp_path):
    """At 0.2 req/s the simulated run spans minutes and takes well under a second of wall time;
    the driver jumps to each arrival, so no request waits for an idle engine."""
    t = time.perf_counter()
    s = run_experiment(config("mode=simulate", "workload.num_requests=8", "workload.request_rate=0.2",
                              "workload.output_len_min=8", "workload.output_len_max=24"),
                       tmp_path)
    assert time.perf_counter() - t < 10
    req = pd.read_parquet(tmp_path / "requests.parquet").sort_values("arrival")
    assert req["arrival"].iloc[-1] > 10  # seconds of simulated time
    assert s["duration"] >= req["arrival"].iloc[-1]
    assert (req["ttft"] > 0).all() and (req["first_scheduled"] >= req["arrival"] - 1e-12).all()
    # requests arrive far apart: each is admitted at its arrival, TTFT is one prefill step
    assert (req["first_scheduled"] - req["arrival"]).max() < 1e-9
    assert (req["tpot"] > 0).all() and s["mean_itl_ms"] > 0
    # normalized latency is e2el / output_len per request, averaged
    assert s["normalized_latency"] == pytest.approx((req["e2el"] / req["output_len"]).mean())


def test_host_tier_copies_are_charged_in_closed_form(tmp_path):
    """Roofline: each memcpy costs transfer_latency_s + bytes / pcie_bandwidth; loads delay their
    step, stores only beyond the step's compute."""
    common = ["mode=simulate", "model=llama3-8b", "sim=h200", "sim.cost_model=roofline", "workload=multi_turn",
              "workload.num_requests=96", "workload.turns=3", "workload.input_len=1024", "workload.output_len=8",
              "workload.prefix_hit_rate=0.9", "workload.request_rate=8", "engine.max_model_len=2048",
              "engine.max_num_batched_tokens=2048", "engine.kv_cache_tokens=8192", "engine.enable_prefix_caching=true"]
    off = run_experiment(config(*common), tmp_path / "off")
    on = run_experiment(config(*common, "engine.host_kv_cache_tokens=200000", "engine.host_transfer_blocks=4"),
                        tmp_path / "on")
    bw, lat = 50e9, 1e-5  # conf/sim/h200.yaml
    moved = on["host_tier_stored_bytes"] + on["host_tier_loaded_bytes"]
    assert on["host_tier_transfers"] > 0 and on["host_prefix_hit_rate"] > 0.3
    assert on["host_tier_transfer_s"] == pytest.approx(on["host_tier_transfers"] * lat + moved / bw)
    load_s = on["host_tier_loaded_bytes"] / bw  # + its share of the latencies: loads are always exposed
    assert load_s <= on["host_tier_exposed_s"] <= on["host_tier_transfer_s"]
    assert on["host_tier_hidden_s"] == pytest.approx(on["host_tier_transfer_s"] - on["host_tier_exposed_s"])
    assert on["recomputed_tokens"] < off["recomputed_tokens"] and on["mean_ttft_ms"] < off["mean_ttft_ms"]
    steps = pd.read_parquet(tmp_path / "on" / "steps.parquet")
    assert steps["tier_exposed_s"].sum() == pytest.approx(on["host_tier_exposed_s"])
    assert steps["tier_transfers"].sum() == on["host_tier_transfers"]


def test_swap_time_is_charged(tmp_path):
    common = ["mode=simulate", "model=opt-13b", "workload=sharegpt", "workload.num_requests=200",
              "engine.max_model_len=2048", "engine.max_num_batched_tokens=2048", "engine.kv_cache_tokens=4096",
              "engine.max_num_seqs=256"]
    rec = run_experiment(config(*common), tmp_path / "recompute")
    swap = run_experiment(config(*common, "++engine.preemption_mode=swap"), tmp_path / "swap")
    assert rec["preemptions"] > 0 and swap["preemptions"] > 0
    # swapping moves KV over PCIe instead of recomputing prefills: different timelines
    assert swap["duration"] != rec["duration"]


# --------------------------------------------------------------------------- OPT-13B study

def test_opt13b_on_a100_40gb_pool():
    eng = build_engine(config("mode=simulate", "model=opt-13b", "engine.kv_cache_tokens=null",
                              "engine.max_model_len=2048", "allocator=contiguous"))
    assert eng.kv_capacity_tokens == RooflineCostModel(MODEL_SHAPES["opt-13b"], DEVICES["a100-40gb"]).kv_capacity_tokens()
    assert 15_500 < eng.kv_capacity_tokens < 16_000  # the paper's ~15.7k slots
    assert eng.accountant.bpt == 800 * 1024  # bf16 KV of OPT-13B: 800 KiB per token


def test_opt13b_1000_sharegpt_requests_under_a_minute(tmp_path):
    cfg = config("+experiment=waste_breakdown", "+strategy=paged")
    t = time.perf_counter()
    s = run_experiment(cfg, tmp_path)
    wall = time.perf_counter() - t
    assert s["num_requests"] == 1000 and s["kv_capacity_tokens"] > 15_000
    assert wall < 60, f"simulating 1000 ShareGPT requests took {wall:.1f} s"
    assert s["token_states_saturated"] > 0.9  # the paper's 96.3%


def test_waste_ordering_matches_the_paper(tmp_path):
    """Orca max < pow2 < oracle < paged in token states (PagedAttention Fig. 2), on a shorter run."""
    ts = {}
    for strategy in ("contiguous-max", "contiguous-pow2", "contiguous-oracle", "paged"):
        cfg = config("+experiment=waste_breakdown", f"+strategy={strategy}", "workload.num_requests=300")
        ts[strategy] = run_experiment(cfg, tmp_path / strategy)["token_states_saturated"]
    assert ts["contiguous-max"] < 0.4
    assert ts["contiguous-max"] < ts["contiguous-pow2"] < ts["contiguous-oracle"] < ts["paged"]
    assert ts["paged"] > 0.9


# --------------------------------------------------------------------------- presets and checks

PRESETS = ["waste_breakdown", "rate_sweep", "block_size", "page_size", "parallel_sampling", "shared_prefix",
           "preemption", "host_tier"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_runs(preset, tmp_path):
    """Each preset with the first value of each swept key, shrunk to a few requests."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        base = compose("config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    params = OmegaConf.to_container(base.hydra.sweeper.params)
    assert params, f"{preset} sweeps nothing"
    assert str(base.hydra.mode) in ("MULTIRUN", "RunMode.MULTIRUN") and base.mode == "simulate"
    first = [f"{k}={str(v).split(',')[0].strip()}" for k, v in params.items()]
    cfg = config(f"+experiment={preset}", *first, "workload.num_requests=6")
    check_config(cfg)
    s = run_experiment(cfg, tmp_path)
    assert s["num_requests"] == 6 and s["mode"] == "simulate"
    assert math.isclose(sum(s[f] for f in STAT_FIELDS), 1.0)


def test_mode_and_rate_must_agree(tmp_path):
    with pytest.raises(ValueError, match="mode=online"):
        check_config(config("mode=offline", "workload.request_rate=2"))
    with pytest.raises(ValueError, match="request_rate"):
        check_config(config("mode=online"))
    with pytest.raises(ValueError, match="simulate-only"):
        check_config(config("mode=offline", "model=opt-13b"))
    with pytest.raises(ValueError, match="unknown sim settings"):
        simulated_engine(config("mode=simulate", "+sim.bogus=1"), None)
