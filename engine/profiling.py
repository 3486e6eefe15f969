"""KV budget on a GPU from ``gpu_memory_utilization``: what is left after weights and activations."""
from __future__ import annotations

import torch


def profile_kv_budget(engine, spec) -> int:
    """Bytes for the KV pool: utilization x device memory, minus weights and peak activations.

    The activation peak is measured by a forward pass over ``max_num_batched_tokens`` tokens
    with a throwaway one-block cache.
    """
    from engine.profiling_run import peak_activation_bytes

    total = torch.cuda.get_device_properties(engine.device).total_memory
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    peak = peak_activation_bytes(engine)
    budget = int(total * engine.config.gpu_memory_utilization) - weights - peak
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache: {total / 2**30:.1f} GiB x gpu_memory_utilization="
            f"{engine.config.gpu_memory_utilization} minus weights {weights / 2**30:.1f} GiB and "
            f"activations {peak / 2**30:.1f} GiB: raise gpu_memory_utilization or lower max_num_batched_tokens")
    return budget
