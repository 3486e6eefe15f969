"""The benchmarks' floors (experiments/floors.py) against closed forms on a tiny model."""
import pytest
import torch

from engine.loader import load_model
from engine.model_config import ModelConfig
from experiments.floors import linear_weights, memory_floor_s, phase_floor_s, streamed_weight_bytes
from experiments.profile_step import device_busy


def _model(tied: bool):
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    return load_model(cfg, "random", 64, torch.bfloat16, "cpu", seed=0)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_weights_skip_only_an_untied_embedding(tied, fused):
    m = _model(tied)
    if fused:
        m.fuse()
    total = sum(p.numel() * 2 for p in m.parameters())
    emb = 128 * 32 * 2
    assert streamed_weight_bytes(m) == (total if tied else total - emb)
    # per layer q,k,v,o (fused or not), gate/up/down, and the LM head: its weight once when tied
    lin = sum(w.numel() for w in linear_weights(m))
    per_layer = 32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 64
    assert lin == 2 * per_layer + 128 * 32


def test_phase_floor_is_the_memory_floor_when_every_gemm_is_memory_bound_and_adds_compute_beyond():
    m = _model(False)
    bw, kv = 1e12, 1e6
    # a matmul rate so high that no GEMM is compute-bound: the two floors agree
    assert phase_floor_s(m, 4, kv, bw, 1e30) == pytest.approx(memory_floor_s(m, kv, bw))
    # so low that all are: the GEMMs take their FLOPs at that rate, the rest stays at bandwidth
    lin = sum(w.numel() for w in linear_weights(m))
    rest = streamed_weight_bytes(m) - 2 * lin
    assert phase_floor_s(m, 256, kv, bw, 1e6) == pytest.approx(2 * 256 * lin / 1e6 + (rest + kv) / bw)
    # in between: monotone in the batch
    mid = 2 * lin * 64 / (2 * lin / bw)  # the rate at which 64 sequences are the balance point
    assert phase_floor_s(m, 32, kv, bw, mid) < phase_floor_s(m, 128, kv, bw, mid) < phase_floor_s(m, 256, kv, bw, mid)


class _Ev:
    def __init__(self, s, e, cuda=True):
        from types import SimpleNamespace

        self.time_range = SimpleNamespace(start=s, end=e)
        self.device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU


def test_device_busy_is_the_union_of_device_intervals():
    evs = [_Ev(0, 10), _Ev(5, 12), _Ev(20, 30), _Ev(21, 25), _Ev(0, 100, cuda=False), _Ev(40, 40)]
    busy, span = device_busy(evs)
    assert busy == pytest.approx(22e-6)  # [0,12] + [20,30], microseconds -> seconds
    assert span == pytest.approx(30e-6)
    assert device_busy([]) == (0.0, 0.0)
