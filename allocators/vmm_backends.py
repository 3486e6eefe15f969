"""Virtual-memory backends of the virtual allocator: reserve ranges, map physical pages into them.

A backend reserves ``num_ranges`` virtual ranges of ``range_bytes`` each, holds a pool of
``num_handles`` physical pages of ``page_size`` bytes, and maps page handle ``h`` at page
``p`` of range ``r`` on request. Kernels see each range as an ordinary torch tensor.

- ``cuda``: driver VMM (cuMemAddressReserve / cuMemCreate / cuMemMap / cuMemSetAccess /
  cuMemUnmap); physical pages are created up front; imported lazily.
- ``host``: one mmap reserved PROT_NONE with MAP_NORESERVE; mapping is mprotect(READ|WRITE),
  release is madvise(MADV_DONTNEED) + mprotect(PROT_NONE), so the OS really pages memory in
  and out. A "handle" is only a count here: a host page's memory belongs to its address.
  With ``alias=True`` (the virtual allocator's prefix sharing) a handle is a page of one
  memfd file instead, mapped MAP_SHARED|MAP_FIXED at every address that maps it, so one
  physical page shows at several slots as on the GPU; the last unmap of a handle punches its
  page out of the file (fallocate PUNCH_HOLE), which frees the memory and zeroes it. Each
  mapped page is then its own kernel VMA (mind vm.max_map_count for pools of >60k pages).
- ``sim``: accounting only, no memory.

Every backend can map one handle at several (range, page) places at once (``alias``): the
virtual allocator maps a shared prefix page group into several slots.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
from abc import ABC, abstractmethod

import torch


class VMMBackend(ABC):
    name: str
    granularity: int = 1  # page_size must be a multiple of this
    # bytes before page 0 of each range that are always backed: a tensor's base address
    # must be mapped for Triton (and torch) to accept it as a device pointer
    anchor_bytes: int = 0

    def __init__(self, page_size: int, range_bytes: int, num_ranges: int, num_handles: int):
        if page_size % self.granularity:
            raise ValueError(
                f"page_size={page_size} (allocator.args.page_size) is not a multiple of the {self.name} "
                f"backend's granularity {self.granularity} bytes: choose a multiple of it, or "
                "allocator.args.page_size=auto for one chosen to fit")
        self.page_size = page_size
        self.range_bytes = range_bytes
        self.num_ranges = num_ranges
        self.num_handles = num_handles
        self.mapped: set[tuple[int, int]] = set()  # (range, page) currently backed
        self._lock = threading.Lock()  # guards `mapped` against the prefetch thread

    @abstractmethod
    def tensor(self, r: int) -> torch.Tensor | None:
        """A uint8 tensor over range ``r`` (None for ``sim``); read only mapped pages of it."""

    @abstractmethod
    def _map(self, handle: int, r: int, page: int) -> None: ...

    @abstractmethod
    def _unmap(self, r: int, page: int) -> None: ...

    def map(self, handle: int, r: int, page: int) -> None:
        self._map(handle, r, page)
        with self._lock:
            self.mapped.add((r, page))

    def unmap(self, r: int, page: int) -> None:
        self._unmap(r, page)
        with self._lock:
            self.mapped.discard((r, page))

    def bind_thread(self) -> None:
        """Called once in a background thread before it maps (CUDA: make the context current)."""

    def close(self) -> None:
        """Unmap everything and give the memory back; tensors over the ranges are invalid after."""


class SimBackend(VMMBackend):
    name = "sim"

    def tensor(self, r: int) -> None:
        return None

    def _map(self, handle: int, r: int, page: int) -> None:
        pass

    def _unmap(self, r: int, page: int) -> None:
        pass


# -- host: real OS paging over an mmap reservation ------------------------------------------
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python < 3.13 lacks it
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_PROT_NONE = getattr(mmap, "PROT_NONE", 0)
_MAP_FIXED = 0x10  # Linux; the mmap module does not export it
_FALLOC_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_libc = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        vp, sz, ci = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        libc.mmap.restype, libc.mmap.argtypes = vp, [vp, sz, ci, ci, ci, ctypes.c_long]
        libc.munmap.argtypes = [vp, sz]
        libc.mprotect.argtypes = [vp, sz, ci]
        libc.madvise.argtypes = [vp, sz, ci]
        libc.mincore.argtypes = [vp, sz, ctypes.POINTER(ctypes.c_ubyte)]
        libc.fallocate.argtypes = [ci, ci, ctypes.c_long, ctypes.c_long]
        _libc = libc
    return _libc


def _os_check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} failed: {__import__('os').strerror(err)}")


class HostBackend(VMMBackend):
    name = "host"
    granularity = mmap.PAGESIZE

    def __init__(self, page_size: int, range_bytes: int, num_ranges: int, num_handles: int, alias: bool = False):
        super().__init__(page_size, range_bytes, num_ranges, num_handles)
        libc = _get_libc()
        self._total = range_bytes * num_ranges
        addr = libc.mmap(None, self._total, _PROT_NONE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap reserve of {self._total} bytes failed: "
                          "lower max_num_seqs x max_model_len or use backend=sim")
        self.base = addr
        self._fd: int | None = None
        if alias:  # handles are pages of one file: a page can show at several addresses
            self._fd = os.memfd_create("kvlab-kv-pages", os.MFD_CLOEXEC)
            os.ftruncate(self._fd, num_handles * page_size)  # sparse: no memory until written
            self._handle_at: dict[tuple[int, int], int] = {}  # (range, page) -> handle mapped there
            self._maps_of = [0] * num_handles  # addresses mapping each handle
        self._buffers = [(ctypes.c_uint8 * range_bytes).from_address(addr + r * range_bytes)
                         for r in range(num_ranges)]

    def addr(self, r: int, page: int) -> int:
        return self.base + r * self.range_bytes + page * self.page_size

    def tensor(self, r: int) -> torch.Tensor:
        return torch.frombuffer(self._buffers[r], dtype=torch.uint8)  # no copy, touches nothing

    def _map(self, handle: int, r: int, page: int) -> None:
        if self._fd is None:
            _os_check(_get_libc().mprotect(self.addr(r, page), self.page_size, mmap.PROT_READ | mmap.PROT_WRITE),
                      "mprotect(READ|WRITE)")
            return
        self._mmap_fixed(self.addr(r, page), mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                         self._fd, handle * self.page_size)
        with self._lock:  # the prefetch thread maps while the engine thread unmaps
            self._handle_at[(r, page)] = handle
            self._maps_of[handle] += 1

    def _unmap(self, r: int, page: int) -> None:
        a, libc = self.addr(r, page), _get_libc()
        if self._fd is None:
            _os_check(libc.madvise(a, self.page_size, _MADV_DONTNEED), "madvise(DONTNEED)")  # frees the memory
            _os_check(libc.mprotect(a, self.page_size, _PROT_NONE), "mprotect(NONE)")
            return
        # back to the reservation (PROT_NONE, no memory); the file page lives on for other addresses
        self._mmap_fixed(a, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        with self._lock:
            handle = self._handle_at.pop((r, page))
            self._maps_of[handle] -= 1
            last = self._maps_of[handle] == 0
        if last:  # no address shows it: give the memory back (the page reads zeros when mapped again)
            _os_check(libc.fallocate(self._fd, _FALLOC_PUNCH_HOLE, handle * self.page_size, self.page_size),
                      "fallocate(PUNCH_HOLE)")

    def _mmap_fixed(self, a: int, prot: int, flags: int, fd: int, offset: int) -> None:
        got = _get_libc().mmap(a, self.page_size, prot, flags | _MAP_FIXED, fd, offset)
        if got != a:
            raise OSError(ctypes.get_errno(), f"mmap(MAP_FIXED) at {a:#x} failed: {os.strerror(ctypes.get_errno())}")

    def resident_pages(self, r: int, page: int) -> int:
        """OS pages of (r, page) resident in RAM now (mincore): 0 once released."""
        n = self.page_size // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        _os_check(_get_libc().mincore(self.addr(r, page), self.page_size, vec), "mincore")
        return sum(v & 1 for v in vec)

    def close(self) -> None:
        if self.base:
            _get_libc().munmap(self.base, self._total)
            self.base = 0
            self.mapped.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- cuda: driver VMM --------------------------------------------------------------------------
def cuda_driver():
    """``cuda.bindings.driver``, imported only when the cuda backend is used."""
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("backend 'cuda' needs NVIDIA's cuda-python bindings (pip install cuda-bindings); "
                           "on a machine without them use backend=host or backend=sim") from e
    return driver


def cuda_check(result):
    """Unpack a cuda.bindings result tuple, raising on an error code."""
    drv = cuda_driver()
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != drv.CUresult.CUDA_SUCCESS:
        _, msg = drv.cuGetErrorString(err)
        raise RuntimeError(f"CUDA driver error {err}: {msg.decode() if isinstance(msg, bytes) else msg}")
    return rest[0] if len(rest) == 1 else rest


class CudaBackend(VMMBackend):
    name = "cuda"

    def __init__(self, page_size: int, range_bytes: int, num_ranges: int, num_handles: int,
                 device: str | torch.device = "cuda"):
        drv = cuda_driver()
        dev = torch.device(device)
        self.device_index = dev.index if dev.index is not None else torch.cuda.current_device()
        with torch.cuda.device(self.device_index):
            torch.empty(1, device=f"cuda:{self.device_index}")  # torch creates the primary context
            cuda_check(drv.cuInit(0))
            cu_dev = cuda_check(drv.cuDeviceGet(self.device_index))
            self._ctx = cuda_check(drv.cuDevicePrimaryCtxRetain(cu_dev))
            self._cu_dev = cu_dev
            cuda_check(drv.cuCtxSetCurrent(self._ctx))
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device_index
        self._prop = prop
        self.granularity = int(cuda_check(drv.cuMemGetAllocationGranularity(
            prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))
        super().__init__(page_size, range_bytes, num_ranges, num_handles)
        if range_bytes % page_size or num_handles < 1:
            raise ValueError(f"range of {range_bytes} bytes is not a whole number of {page_size}-byte pages, "
                             f"or a pool of {num_handles} pages")
        # each range is [anchor page | range_bytes]; one physical page, outside the pool, backs
        # every anchor, so each range's tensor starts at a mapped address
        self.anchor_bytes = page_size
        self._stride = range_bytes + page_size
        self._total = self._stride * num_ranges
        self.base = int(cuda_check(drv.cuMemAddressReserve(self._total, 0, 0, 0)))  # granularity-aligned
        self._handles = [cuda_check(drv.cuMemCreate(page_size, prop, 0)) for _ in range(num_handles)]
        self._anchor = cuda_check(drv.cuMemCreate(page_size, prop, 0))
        desc = drv.CUmemAccessDesc()
        desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.device_index
        desc.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [desc]
        for r in range(num_ranges):
            a = self.base + r * self._stride
            cuda_check(drv.cuMemMap(a, page_size, 0, self._anchor, 0))
            cuda_check(drv.cuMemSetAccess(a, page_size, self._access, 1))
        self._tensors = [self._wrap(r) for r in range(num_ranges)]

    def addr(self, r: int, page: int) -> int:
        return self.base + r * self._stride + self.anchor_bytes + page * self.page_size

    def _wrap(self, r: int) -> torch.Tensor:
        """A torch tensor over range r, anchor included, through __cuda_array_interface__ (no copy)."""
        iface = {"shape": (self._stride,), "typestr": "|u1", "data": (self.base + r * self._stride, False),
                 "version": 3, "strides": None}
        holder = type("_VMMRange", (), {"__cuda_array_interface__": iface})()
        return torch.as_tensor(holder, device=f"cuda:{self.device_index}")

    def tensor(self, r: int) -> torch.Tensor:
        return self._tensors[r]

    def bind_thread(self) -> None:
        cuda_check(cuda_driver().cuCtxSetCurrent(self._ctx))

    def _map(self, handle: int, r: int, page: int) -> None:
        # a handle may already be mapped at other addresses (a prefix page shared by several
        # slots): cuMemMap maps one physical allocation at any number of virtual addresses, and
        # cuMemUnmap of one leaves the others; the handle is released only in close()
        drv, a = cuda_driver(), self.addr(r, page)
        cuda_check(drv.cuMemMap(a, self.page_size, 0, self._handles[handle], 0))
        cuda_check(drv.cuMemSetAccess(a, self.page_size, self._access, 1))

    def _unmap(self, r: int, page: int) -> None:
        cuda_check(cuda_driver().cuMemUnmap(self.addr(r, page), self.page_size))

    def close(self) -> None:
        if not self.base:
            return
        drv = cuda_driver()
        torch.cuda.synchronize(self.device_index)
        for r, page in list(self.mapped):
            self.unmap(r, page)
        for r in range(self.num_ranges):
            cuda_check(drv.cuMemUnmap(self.base + r * self._stride, self.page_size))
        for h in [*self._handles, self._anchor]:
            cuda_check(drv.cuMemRelease(h))
        cuda_check(drv.cuMemAddressFree(self.base, self._total))
        cuda_check(drv.cuDevicePrimaryCtxRelease(self._cu_dev))
        self.base = 0
        self._tensors = []


CUDA_GRANULARITY = 2 << 20  # cuMemGetAllocationGranularity(MINIMUM) on NVIDIA GPUs to date: 2 MiB


def granularity(kind: str) -> int:
    """The page-size granularity of backend ``kind`` (the cuda backend checks the driver's own)."""
    return {"sim": SimBackend.granularity, "host": HostBackend.granularity, "cuda": CUDA_GRANULARITY}[kind]


def make_backend(kind: str, page_size: int, range_bytes: int, num_ranges: int, num_handles: int,
                 device: str | None, alias: bool = False) -> VMMBackend:
    """``alias``: handles will be mapped at several places at once (host: memfd-backed pages)."""
    if kind == "sim":
        if device is not None:
            raise ValueError("backend 'sim' keeps no KV tensors: use it in simulate mode, or backend=host/cuda")
        return SimBackend(page_size, range_bytes, num_ranges, num_handles)
    if device is None:
        raise ValueError(f"backend '{kind}' needs a device; accounting-only runs use backend=sim")
    is_cuda = str(device).startswith("cuda")
    if kind == "host":
        if is_cuda:
            raise ValueError("backend 'host' maps CPU memory: on a CUDA device use backend=cuda")
        return HostBackend(page_size, range_bytes, num_ranges, num_handles, alias=alias)
    if kind == "cuda":
        if not is_cuda:
            raise ValueError(f"backend 'cuda' needs a CUDA device, got device={device}: use backend=host")
        return CudaBackend(page_size, range_bytes, num_ranges, num_handles, device)
    raise ValueError(f"unknown VMM backend '{kind}': choose auto, cuda, host or sim")
