"""Cost of CUDA virtual-memory operations, and what the virtual allocator's steps wait for.

    python -m experiments.bench_vmm [--out results/vmm] [--pages 256]

1. Driver calls per 2 MiB page (cuMemCreate, cuMemMap, cuMemSetAccess, both together,
   cuMemUnmap), each timed on the host around the call; and one cuMemSetAccess over 64
   contiguous pages, per page.
2. The virtual allocator on a Llama-3-8B KV shape: host time of ``allocate`` in a decode
   step that crosses into a new page group, per layout, with and without ``prefetch``
   (a 2 ms sleep stands for the forward pass, during which the background thread maps).

Writes ``vmm_map_cost.csv``, ``vmm_allocator_steps.csv`` and ``vmm.md`` (device, driver,
versions, command) to ``--out``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.atomic import write_rows, write_text

MiB = 1 << 20


def summarize(name: str, us: list[float], **extra) -> dict:
    us = sorted(us)
    return dict(op=name, n=len(us), median_us=round(statistics.median(us), 2),
                p10_us=round(us[len(us) // 10], 2), p90_us=round(us[(9 * len(us)) // 10], 2),
                mean_us=round(statistics.fmean(us), 2), max_us=round(us[-1], 2), **extra)


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter_ns()
    out = fn(*args)
    return (time.perf_counter_ns() - t0) / 1e3, out


def driver_costs(pages: int, page_size: int) -> list[dict]:
    from allocators.vmm_backends import cuda_check, cuda_driver

    drv = cuda_driver()
    dev = torch.cuda.current_device()
    torch.empty(1, device="cuda")
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = dev
    desc = drv.CUmemAccessDesc()
    desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = dev
    desc.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    base = int(cuda_check(drv.cuMemAddressReserve(pages * page_size, 0, 0, 0)))
    rows, t_create, handles = [], [], []
    for _ in range(pages):
        us, h = timed(drv.cuMemCreate, page_size, prop, 0)
        t_create.append(us)
        handles.append(cuda_check(h))
    t_map, t_access, t_unmap, t_both = [], [], [], []
    for rnd in range(2):
        for i, h in enumerate(handles):
            a = base + i * page_size
            if rnd == 0:  # separately
                us, r = timed(drv.cuMemMap, a, page_size, 0, h, 0)
                cuda_check(r)
                t_map.append(us)
                us, r = timed(drv.cuMemSetAccess, a, page_size, [desc], 1)
                cuda_check(r)
                t_access.append(us)
            else:  # together, as the allocator maps a page
                t0 = time.perf_counter_ns()
                cuda_check(drv.cuMemMap(a, page_size, 0, h, 0))
                cuda_check(drv.cuMemSetAccess(a, page_size, [desc], 1))
                t_both.append((time.perf_counter_ns() - t0) / 1e3)
        if rnd == 0:  # the memory works: a kernel writes every page
            x = torch.as_tensor(type("R", (), {"__cuda_array_interface__": {
                "shape": (pages * page_size,), "typestr": "|u1", "data": (base, False), "version": 3,
                "strides": None}})(),
                device="cuda")
            x.fill_(1)
            assert int(x[::page_size].sum()) == pages
            del x
            torch.cuda.synchronize()
        for i in range(pages):
            us, r = timed(drv.cuMemUnmap, base + i * page_size, page_size)
            cuda_check(r)
            if rnd == 0:
                t_unmap.append(us)
    # one cuMemSetAccess over a run of contiguous pages
    run = min(64, pages)
    for i in range(run):
        cuda_check(drv.cuMemMap(base + i * page_size, page_size, 0, handles[i], 0))
    us, r = timed(drv.cuMemSetAccess, base, run * page_size, [desc], 1)
    cuda_check(r)
    for i in range(run):
        cuda_check(drv.cuMemUnmap(base + i * page_size, page_size))
    for h in handles:
        cuda_check(drv.cuMemRelease(h))
    cuda_check(drv.cuMemAddressFree(base, pages * page_size))
    ps = dict(page_size=page_size)
    rows += [summarize("cuMemCreate", t_create, **ps), summarize("cuMemMap", t_map, **ps),
             summarize("cuMemSetAccess", t_access, **ps),
             summarize("cuMemMap+cuMemSetAccess", t_both, **ps), summarize("cuMemUnmap", t_unmap, **ps),
             summarize(f"cuMemSetAccess over {run} pages, per page", [us / run], **ps)]
    return rows


@dataclass(eq=False)
class _Seq:
    seq_id: int
    max_len: int
    prompt_len: int = 0
    oracle_len: int = 0
    token_ids: list[int] = field(default_factory=list)


def allocator_steps(batch: int, sleep_s: float) -> list[dict]:
    """Host time of one decode step's allocate calls when every sequence crosses into a new group."""
    from allocators import KVCacheSpec
    from allocators.virtual import VirtualAllocator

    spec = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda")
    rows = []
    for layout in ("shared", "per_layer"):
        for prefetch in (False, True):
            tpp = 16 if layout == "shared" else 1024
            pages = 16 if layout == "shared" else 4  # per sequence: 15 or 3 crossings
            a = VirtualAllocator(spec, capacity_tokens=batch * (pages + 1) * tpp, max_num_seqs=batch,
                                 max_model_len=pages * tpp, page_size=2 * MiB, layout=layout, backend="cuda",
                                 prefetch=prefetch)
            seqs = [_Seq(i, pages * tpp) for i in range(batch)]
            for s in seqs:
                a.allocate(s, tpp - 3)  # a prompt 3 tokens short of the first page's end
            a.wait_prefetch() if prefetch else None
            cross, other = [], []
            for step in range((pages - 1) * tpp):
                t0 = time.perf_counter_ns()
                for s in seqs:
                    a.allocate(s, 1)
                us = (time.perf_counter_ns() - t0) / 1e3
                (cross if a.num_tokens(seqs[0]) % tpp == 1 else other).append(us)
                time.sleep(sleep_s)  # the forward pass; the prefetch thread maps meanwhile
            group_pages = 1 if layout == "shared" else 2 * spec.num_layers
            extra = dict(layout=layout, prefetch=prefetch, lead_tokens=a.prefetch_tokens if prefetch else 0,
                         batch=batch, pages_per_group=group_pages,
                         sync_maps=a.num_sync_maps, async_maps=a.num_async_maps)
            rows.append(summarize("decode step allocate, crossing into a new group", cross, **extra))
            rows.append(summarize("decode step allocate, inside a group", other, **extra))
            a.close()
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    write_rows(path, rows, list(dict.fromkeys(k for r in rows for k in r)))  # every row's keys; atomic


def markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/vmm")
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sleep-ms", type=float, default=2.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_vmm needs a CUDA device")
    from allocators.vmm_backends import cuda_check, cuda_driver

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drv = cuda_driver()
    device = torch.cuda.get_device_name()
    driver_version = cuda_check(drv.cuDriverGetVersion())
    try:
        from importlib.metadata import version
        bindings = version("cuda-bindings")
    except Exception:  # noqa: BLE001 - best effort
        bindings = "?"
    drows = driver_costs(args.pages, 2 * MiB)
    arows = allocator_steps(args.batch, args.sleep_ms / 1e3)
    for r in drows + arows:
        r["device"] = device
    write_csv(out / "vmm_map_cost.csv", drows)
    write_csv(out / "vmm_allocator_steps.csv", arows)
    cmd = "python -m experiments.bench_vmm " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# CUDA VMM costs on {device}", "",
          f"- command: `{cmd.strip()}`",
          f"- driver API version {driver_version}, torch {torch.__version__}, cuda-bindings {bindings}, "
          f"Python {platform.python_version()}",
          f"- {args.pages} pages of 2 MiB; host wall time around each driver call (perf_counter_ns)", "",
          "## Driver calls per page", "",
          markdown(drows, ["op", "n", "median_us", "p10_us", "p90_us", "mean_us", "max_us"]), "",
          "## Virtual allocator: host time of one decode step's allocate calls "
          f"({args.batch} sequences, Llama-3-8B KV shape, {args.sleep_ms} ms forward stand-in)", "",
          markdown(arows, ["op", "layout", "prefetch", "lead_tokens", "pages_per_group", "n", "median_us", "p90_us", "max_us",
                           "sync_maps", "async_maps"]), ""]
    write_text(out / "vmm.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
