"""Simulate with tensor parallelism: one GPU's shard plus two all-reduces per layer, in closed form."""
from __future__ import annotations

import pytest

from experiments.costmodel import DEVICES, MODEL_SHAPES, AllReduceCost, DeviceSpec, RooflineCostModel
from tests.test_profiled_costmodel import MODEL, synthetic_profile
from tests.test_simulate import config

L3 = MODEL_SHAPES["llama3-8b"]
H200 = DEVICES["h200"]


def test_shard_is_one_gpus_weights_and_kv() -> None:
    s = L3.shard(2)
    assert (s.num_heads, s.num_kv_heads, s.intermediate_size) == (16, 4, 7168)
    h, q, kv, i = L3.hidden_size, 32 * 128, 8 * 128, L3.intermediate_size
    matmuls = L3.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * i)  # split; norms, embedding, head replicated
    assert L3.num_params - s.num_params == matmuls // 2
    assert s.kv_bytes_per_token * 2 == L3.kv_bytes_per_token
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide llama3-8b's num_heads=32"):
        L3.shard(3)


def test_allreduce_closed_form() -> None:
    ar = AllReduceCost(2, 4096, 32, 2, H200)
    tokens = 256
    one = 1e-5 + 2 * (2 - 1) / 2 * tokens * 4096 * 2 / 450e9  # latency + ring bytes / NVLink one way
    assert ar.one_s(tokens) == pytest.approx(one)
    assert ar.step_s(tokens) == pytest.approx(2 * 32 * one)
    assert AllReduceCost(1, 4096, 32, 2, H200).step_s(tokens) == 0.0
    four = AllReduceCost(4, 4096, 32, 2, H200, bandwidth=100e9, latency_s=0.0)
    assert four.one_s(tokens) == pytest.approx(2 * 3 / 4 * tokens * 4096 * 2 / 100e9)
    no_link = DeviceSpec("pcie-card", 1e12, 1e14, 1 << 34)
    with pytest.raises(ValueError, match="set sim.nvlink_bandwidth"):
        AllReduceCost(2, 4096, 32, 2, no_link)


def test_roofline_tp_step_is_shard_plus_allreduce() -> None:
    batch = [(1, 1000)] * 64 + [(512, 512)]
    tp2 = RooflineCostModel(L3, H200, tensor_parallel_size=2)
    shard = RooflineCostModel(L3.shard(2), H200)  # the same GPU running one shard, no communication
    c2, cs = tp2.step_cost(batch), shard.step_cost(batch)
    assert (c2.flops, c2.bytes, c2.compute_s, c2.memory_s) == (cs.flops, cs.bytes, cs.compute_s, cs.memory_s)
    tokens = 64 + 512
    assert c2.comm_s == pytest.approx(2 * 32 * (1e-5 + tokens * 4096 * 2 / 450e9))
    assert c2.total_s == pytest.approx(max(c2.compute_s, c2.memory_s) + c2.comm_s + 5e-4)
    one = RooflineCostModel(L3, H200).step_cost(batch)
    assert c2.memory_s < one.memory_s and c2.total_s < one.total_s  # decode-heavy: half the bytes per GPU
    # the KV pool per GPU: less weight per GPU and half the bytes per token
    assert tp2.kv_capacity_tokens() > 2 * RooflineCostModel(L3, H200).kv_capacity_tokens()


def test_profiled_tp_composes_the_shard_and_adds_allreduce() -> None:
    from engine.loader import resolve_config
    from experiments.profiled_costmodel import ProfiledCostModel
    from experiments.simulate import shape_of

    shape = shape_of(resolve_config(MODEL))
    ar = AllReduceCost(2, shape.hidden_size, shape.num_layers, shape.dtype_bytes, H200)
    args = dict(paged=True, block_size=16, max_graph_batch=64, allocator="paged", calibrate_host=False)
    tp2 = ProfiledCostModel(synthetic_profile(), shape, model=MODEL, allreduce=ar, **args)
    # what the profile gives for the shard alone, composed from its tables (a model it never measured)
    alone = ProfiledCostModel(synthetic_profile(), shape.shard(2), model="shard", **args)
    for work in ([(1, 300)] * 5, [(64, 64), (1, 100)]):
        tokens = 8 if len(work) == 5 else 65  # the decode graph's padded batch; an eager step's tokens
        assert tp2.device_time(work) == pytest.approx(alone.device_time(work) + ar.step_s(tokens))
    assert tp2.model.num_kv_heads == shape.num_kv_heads // 2


def test_simulated_run_at_tp2_reports_per_gpu_shapes(tmp_path) -> None:
    from experiments.run import run_experiment

    common = ["mode=simulate", "model=llama3-8b", "sim=h200", "sim.cost_model=roofline", "allocator=virtual",
              "engine.kv_cache_tokens=null", "engine.max_model_len=4096", "workload.num_requests=16"]
    one = run_experiment(config(*common), tmp_path / "tp1")
    two = run_experiment(config(*common, "engine.tensor_parallel_size=2"), tmp_path / "tp2")
    assert (one["tensor_parallel_size"], two["tensor_parallel_size"]) == (1, 2)
    assert two["cfg.engine.tensor_parallel_size"] == 2
    assert (one["kv_heads_per_gpu"], two["kv_heads_per_gpu"]) == (8, 4)
    # a 2 MiB page of one layer's K (or V): 8 heads x 128 x 2 bytes = 2 KiB a token at TP=1, half at TP=2
    assert (one["kv_tokens_per_page"], two["kv_tokens_per_page"]) == (1024, 2048)
    assert two["kv_pool_bytes_total"] == 2 * two["kv_pool_bytes_per_gpu"]
    cap = RooflineCostModel(L3, H200, tensor_parallel_size=2).kv_capacity_tokens()
    assert two["kv_capacity_tokens"] == cap // 2048 * 2048  # whole pages of one GPU's pool
    assert two["output_throughput"] > one["output_throughput"]  # half the bytes per GPU per decode step
