"""A read-only stream over a buffer (bench_kernels.read_bandwidth_gbps): what a kernel that only
reads, as a decode GEMM reads its weights, reaches on this device."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # fp32 elements a program loads a step (16 KiB: 32 a thread at 4 warps)


@triton.jit
def _read_kernel(x_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.range(pid * BLOCK, n, tl.num_programs(0) * BLOCK, num_stages=4):
        acc += tl.load(x_ptr + start + offs, mask=start + offs < n, other=0.0)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))  # kept: a sum nobody stores is compiled away


def stream_read(x: torch.Tensor, part: torch.Tensor, programs_per_sm: int = 4) -> torch.Tensor:
    """Partial sums of a contiguous fp32 tensor ``x`` by persistent programs, one fp32 per program
    in ``part`` (returned: its first ``grid`` entries; on the CPU: the Triton interpreter, one SM)."""
    if x.dtype != torch.float32 or not x.is_contiguous() or part.dtype != torch.float32 or part.device != x.device:
        raise ValueError(f"x and part must be contiguous float32 tensors on one device, got {x.dtype} on {x.device}"
                         f" and {part.dtype} on {part.device}")
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    grid = min(programs_per_sm * sms, part.numel(), triton.cdiv(x.numel(), BLOCK))
    _read_kernel[(grid,)](x, part, x.numel(), BLOCK=BLOCK, num_warps=4)
    return part[:grid]
