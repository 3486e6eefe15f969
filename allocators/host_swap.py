"""Host (CPU) pool of KV blocks for swap preemption: a free stack and per-layer host tensors.

The device copy goes through the shared block kernels: ``gather_blocks`` packs a
sequence's blocks into one dense staging tensor, which crosses to the host in one
transfer (into pinned memory on CUDA), and ``scatter_blocks`` unpacks it on the way back.
Host blocks are reference counted: the samples of a request swapped out together hold their
shared prompt blocks once.
"""
from __future__ import annotations

import torch

import kernels
from allocators.base import KVCacheSpec


class HostSwapSpace:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks  # holders of each host block
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        if spec.materialized and num_blocks:
            pin = str(spec.device).startswith("cuda")
            shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
            for _ in range(spec.num_layers):
                self._k.append(torch.zeros(shape, dtype=spec.dtype, pin_memory=pin))
                self._v.append(torch.zeros(shape, dtype=spec.dtype, pin_memory=pin))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _slots(self, blocks: list[int]) -> torch.Tensor:
        ids = torch.tensor(blocks, dtype=torch.int64)[:, None] * self.block_size
        return (ids + torch.arange(self.block_size)).reshape(-1)

    def swap_out(self, device_caches: list[tuple[torch.Tensor, torch.Tensor]], device_blocks: list[int]) -> list[int]:
        """Copy ``device_blocks`` of every layer into newly taken host blocks; returns them."""
        if len(device_blocks) > len(self._free):
            raise RuntimeError(f"host swap space has {len(self._free)} free blocks, {len(device_blocks)} needed")
        host = [self._free.pop() for _ in device_blocks]
        for h in host:
            self._ref[h] = 1
        if self._k and device_blocks:
            slots = self._slots(host)
            dev = torch.tensor(device_blocks, dtype=torch.int64, device=device_caches[0][0].device)
            for (dk, dv), hk, hv in zip(device_caches, self._k, self._v):
                for cache, dst in ((dk, hk), (dv, hv)):
                    staging = torch.empty((len(host) * self.block_size, *cache.shape[1:]), dtype=cache.dtype,
                                          device=cache.device)
                    kernels.gather_blocks(cache, dev, self.block_size, staging)
                    dst[slots] = staging.to("cpu", non_blocking=False)
        return host

    def swap_in(self, device_caches: list[tuple[torch.Tensor, torch.Tensor]], host_blocks: list[int],
                device_blocks: list[int]) -> None:
        """Copy ``host_blocks`` back into ``device_blocks`` and free the host blocks."""
        self.copy_in(device_caches, host_blocks, device_blocks)
        self.release(host_blocks)

    def copy_in(self, device_caches: list[tuple[torch.Tensor, torch.Tensor]], host_blocks: list[int],
                device_blocks: list[int]) -> None:
        """Copy ``host_blocks`` back into ``device_blocks``; the host blocks stay held."""
        if self._k and host_blocks:
            slots = self._slots(host_blocks)
            dev = torch.tensor(device_blocks, dtype=torch.int64, device=device_caches[0][0].device)
            for (dk, dv), hk, hv in zip(device_caches, self._k, self._v):
                for cache, src in ((dk, hk), (dv, hv)):
                    kernels.scatter_blocks(cache, dev, self.block_size, src[slots].to(cache.device))

    def share(self, host_blocks: list[int]) -> None:
        """One more holder of each of ``host_blocks``."""
        for h in host_blocks:
            self._ref[h] += 1

    def release(self, host_blocks: list[int]) -> None:
        """One holder less of each; a block is free again when none holds it."""
        freed = []
        for h in host_blocks:
            self._ref[h] -= 1
            if self._ref[h] == 0:
                freed.append(h)
        self._free.extend(reversed(freed))
