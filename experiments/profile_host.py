"""The host part of a device profile: the real engine's steps, wall time minus device time.

``kvlab profile`` runs the engine once per allocator on a mixed workload and records, for every
step, its batch shape, wall time and device time (CUDA events from the end of input preparation
to the end of sampling). The profiled cost model takes host time as what those steps took beyond
its own modelled device time (experiments/profiled_costmodel.py).
"""
from __future__ import annotations

import numpy as np

TRICKLE_STEPS = 8
HOST_ALLOCATORS = {"paged": ("paged", {"block_size": 16}), "contiguous": ("contiguous", {"policy": "max"}),
                   "virtual": ("virtual", {})}


def host_rows(model: str, allocator: str, args: dict, *, max_model_len: int, kv_cache_tokens: int,
              device: str, seed: int = 0,
              phases=((256, 32, 1024, 16, 512), (4, 64, 256, 64, 128)), skip_steps: int = 20) -> list[dict]:
    """Steps of the real engine: wall time minus device time (end of input preparation to end of
    sampling). ``phases``: (requests, prompt min, max, output min, max), run one after the other;
    requests min == max == 0 draws ShareGPT-like lengths; a negative count adds that many
    requests one at a time, every ``TRICKLE_STEPS`` steps (light load: prefill steps beside a few
    decoding sequences, as an online run at a low rate has them). The first ``skip_steps`` are
    left out (the caching allocator still grows there)."""
    from engine import LLMEngine, SamplingParams
    from engine.config import EngineConfig
    from experiments.step_timing import LaunchTimer

    cuda = device.startswith("cuda")
    eng = LLMEngine(EngineConfig(model=model, allocator=allocator, allocator_args=args, device=device,
                                 max_model_len=max_model_len, max_num_seqs=256, max_num_batched_tokens=8192,
                                 kv_cache_tokens=kv_cache_tokens, detokenize=False, stream_outputs=False,
                                 seed=seed))
    timer = LaunchTimer(eng, cuda)
    rng = np.random.default_rng(seed)
    for phase, (n, plo, phi, olo, ohi) in enumerate(phases):
        trickle, n = n < 0, abs(n)
        if phi == 0:
            from experiments.workloads import SHAREGPT

            plens, olens = SHAREGPT.sample(rng, n, max_model_len)
        else:
            plens, olens = rng.integers(plo, phi, n), rng.integers(olo, ohi, n)
        for i, (plen, olen) in enumerate(zip(plens, olens)):
            prompt = rng.integers(10, min(1000, eng.model_config.vocab_size), int(plen)).tolist()
            eng.add_request(f"{phase}-{i}", prompt, SamplingParams(
                max_tokens=int(olen), ignore_eos=True, temperature=0, output_kind="final_only"))
            for _ in range(TRICKLE_STEPS if trickle else 0):
                if eng.has_unfinished_requests():
                    eng.step()
        while eng.has_unfinished_requests():
            eng.step()
    gpu = {i: d for i, (d, _) in timer.device_times().items()}
    # the configuration the steps ran with: the cost model calibrates against the same graphs
    pw = getattr(eng.runner, "piecewise", None)
    graph_max_tokens = pw.sizes[-1] if pw is not None and pw.sizes else 0
    max_graph_batch = eng.runner.graphs.sizes[-1] if getattr(eng.runner, "graphs", None) is not None else 0
    rows = []
    for i, r in enumerate(eng.step_records):
        if r.num_seqs == 0 or i < skip_steps:
            continue
        g = gpu.get(i, 0.0)
        maps, unmaps = timer.vmm.get(i, (0, 0))
        rows.append(dict(table="host", model=model, allocator=allocator, batch=r.num_seqs, prefill_tokens=r.prefill_tokens,
                         decode_tokens=r.decode_tokens, context=r.context_tokens, duration=r.duration, gpu=g,
                         value=max(0.0, r.duration - g), graph_max_tokens=graph_max_tokens,
                         max_graph_batch=max_graph_batch, graph_mode=eng.config.cuda_graph_mode,
                         vmm_maps=maps, vmm_unmaps=unmaps))
    timer.close()
    eng.close()
    return rows
