"""KV budget on a GPU from ``gpu_memory_utilization``: what is left after weights and activations."""
from __future__ import annotations

import torch


def profile_kv_budget(engine, spec) -> int:
    """Bytes for the KV pool: this process may use ``gpu_memory_utilization`` of the device;
    everything already in use (the weights just loaded, other engines, other processes) and
    the activation peak of the largest batch come off that.

    The activation peak is measured by a forward pass over ``max_num_batched_tokens`` tokens
    with a throwaway cache.
    """
    from engine.profiling_run import peak_activation_bytes

    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # memory torch caches but does not use is not "in use"
    free, total = torch.cuda.mem_get_info(engine.device)
    in_use = total - free
    peak = peak_activation_bytes(engine)
    util = engine.config.gpu_memory_utilization
    budget = int(total * util) - in_use - peak
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache: {total / 2**30:.1f} GiB x gpu_memory_utilization={util} "
            f"minus {in_use / 2**30:.1f} GiB in use (weights {torch.cuda.memory_allocated() / 2**30:.1f} GiB "
            f"of it) and activations {peak / 2**30:.1f} GiB: raise gpu_memory_utilization, lower "
            "max_num_batched_tokens, or free the GPU")
    return budget
