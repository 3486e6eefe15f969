"""Bring a GPU to its working clocks before a timed run.

An idle H200 drops its SM clock to 345 MHz within a second or two and takes a few hundred
milliseconds of load to come back up (and, on some machines, to settle under its power limit).
A real run that starts on an idle device pays that ramp in its first steps: an offline run's
first prefill wave, hence much of its mean TTFT. The device profile's tables are timed at working
clocks, so the real runs simulate is compared with start there too (``measure.clock_warmup_s``).
"""
from __future__ import annotations

import time


def warm_clocks(device, seconds: float) -> float:
    """Keep ``device`` busy with bf16 matmuls for ``seconds`` (CUDA only); the seconds spent."""
    import torch

    device = torch.device(device)
    if seconds <= 0 or device.type != "cuda":
        return 0.0
    t0 = time.perf_counter()
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    while time.perf_counter() - t0 < seconds:
        for _ in range(16):  # ~2-3 ms of work between checks of the clock
            torch.matmul(a, a, out=b)
        torch.cuda.synchronize(device)
    del a, b
    return time.perf_counter() - t0
