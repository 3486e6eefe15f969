"""Pinned host buffers for a step's inputs, so host-to-device copies never wait for the GPU.

Two sets are used in turn: with asynchronous scheduling one step may still be reading its
set while the next step fills the other; a set comes round again only once the step that
used it has finished on the device (``next_step`` waits for it: normally it was read back
already, but a step that samples nothing is never waited for otherwise). Copies from pageable
memory would instead wait for the device, or race with the next step's writes.
"""
from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self._sets: list[dict[str, torch.Tensor]] = [{}, {}]
        self._users: list = [None, None]  # the step (its handle) that last read each set
        self._turn = 0

    def next_step(self) -> None:
        self._turn ^= 1
        user, self._users[self._turn] = self._users[self._turn], None
        if user is not None:
            user.wait()

    def used_by(self, handle) -> None:
        """This step's set is read by the step of ``handle`` (anything with ``wait()``)."""
        self._users[self._turn] = handle

    def host(self, name: str, array: np.ndarray) -> torch.Tensor:
        """``array`` in this step's pinned buffer ``name`` (on CPU: the array itself)."""
        if not self.pinned:
            return torch.from_numpy(array)
        buffers = self._sets[self._turn]
        n = array.size
        buf = buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != _torch_dtype(array.dtype):
            buf = buffers[name] = torch.empty(max(n, 2 * (buf.numel() if buf is not None else 0), 64),
                                              dtype=_torch_dtype(array.dtype), pin_memory=True)
        view = buf[:n].view(array.shape)
        view.numpy()[...] = array
        return view

    def to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        return self.host(name, array).to(self.device, non_blocking=True)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
