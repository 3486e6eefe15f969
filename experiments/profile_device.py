"""``kvlab profile``: measure this engine's own operations on the current device.

Writes a device profile (one parquet file, long format: a ``table`` column names what each
row measures, ``value`` is seconds) that the profiled cost model of simulate mode reads
(experiments/profiled_costmodel.py). Tables:

- ``decode_graph``: one pure-decode step as the engine runs it (the captured CUDA graph of the
  whole model, logits included) by padded batch and context per sequence, per addressing mode
  (LINEAR; PAGED per block size), per model;
- ``eager_forward``: an eager forward of a prefill chunk of ``query`` tokens (launch costs
  included, logits of one row, its token read back), per model; ``prefill_graph``: the same
  forward's device time alone; ``piecewise_forward``: the same chunk through the engine's
  piecewise CUDA graphs (everything but attention replayed), wall time; ``full_forward``: through
  its full graphs (``cuda_graph_mode=full``: one replay, attention captured), wall time;
- ``attention``: one layer's attention kernel by addressing mode, block size, batch, context
  and query length (decode: query 1, alone, split as under the decode graph's ``max_model_len``,
  or ``mixed`` beside a prefill chunk; prefill: one sequence), per model head shape;
- ``decode_graph_ragged``: ``decode_graph`` of lognormal (ShareGPT-like) batches, the check of
  the cost model's ragged term on whole steps (``python -m experiments.bench_ragged --check``);
- ``ragged``: decode attention of ragged batches (lognormal, two-point) and uniform ones of the
  same mean, with the programs the kernel launches for them (experiments/ragged_decode.py): the
  profiled cost model fits its critical-path term to these;
- ``gemm``: a bf16 linear layer by token count ``m`` for every (n, k) of the profiled models
  (another model size interpolates from these);
- ``sample``: greedy sampling of ``batch`` rows of logits;
- ``copy``: host<->device copies (pinned) by size (swap);
- ``vmm``: CUDA VMM map / unmap per page (vAttention);
- ``host``: engine steps of the real engine per allocator: wall time minus device time
  (scheduling, allocation, accounting, input preparation, output handling), by batch; with
  ``--host-scheduling async`` (or ``sync,async``) also steps of the asynchronous engine, whose CPU
  time per step (waits for the device left out) simulate takes as an overlapped step's host part.

Kernel timings run inside a CUDA graph (no launch cost), operands rotated over copies larger
than L2 so no layer reads another's weights from cache. Metadata (device, versions, commit,
settings) is stored in the parquet file's key-value metadata ``kvlab_profile``.

Progress goes to stderr (stdout: the ``wrote ...`` line): each part's start (which of the run's
parts, how many figures, the ``--skip`` that leaves it out), a line every ~10 s inside it (done of
total, elapsed, time left; each host-time engine its phases), its end (elapsed, rows);
``--no-progress`` keeps the end lines alone.

    kvlab profile --models qwen3-0.6b,llama3-8b --out results/profiles
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Callable

from experiments import profile_cases
# main and its parts call these through this module's names, so a test's monkeypatch of one here (Timer, _rows_copy)
# reaches main; say_progress and _decode_metas are also imported from here (profile_host, bench_ragged)
from experiments.profile_cases import _gemm_shapes, _graphs_count, _model_count, _ragged_cases
# the merge's checks moved to profile_merge stay importable from here
from experiments.profile_merge import _check_same_host_engine, _same_device_kind, merge_base
from experiments.profile_models import _rows_graphs, _rows_model
from experiments.profile_tables import _decode_metas, _rows_copy, _rows_gemm, _rows_ragged, _rows_vmm
from experiments.profile_timing import Progress, Timer, say_progress, slug

__all__ = ["main", "check_args", "metadata", "metadata_switch", "write_profile", "PART_TABLES",
           "Timer", "say_progress", "_decode_metas", "_same_device_kind", "_check_same_host_engine"]


def metadata_switch() -> int:
    """The decode launches this process times: sequence by sequence from this many sequences
    (``kernels.metadata.SEQ_MAJOR_MIN_SEQS``, KVLAB_SEQ_MAJOR_MIN_SEQS)."""
    from kernels import metadata as km

    return int(km.SEQ_MAJOR_MIN_SEQS)


def metadata(device, args) -> dict:
    import torch

    from experiments.run_config import git_commit
    from kernels.triton_attention import device_sms

    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
                torch=torch.__version__, python=platform.python_version(),
                commit=git_commit(),  # KVLAB_COMMIT where the copy has no .git
                created=dt.datetime.now().isoformat(timespec="seconds"), models=args.models,
                max_model_len=args.max_model_len, pool_tokens=args.pool_tokens, block_sizes=args.block_sizes,
                host_model=args.host_model or args.models.split(",")[0],
                num_sms=device_sms(device),  # the ragged decode term's split rule
                # the decode launches its tables timed: sequence by sequence from this many (kernels.metadata)
                seq_major_min_seqs=metadata_switch(),
                command="kvlab profile " + " ".join(args.argv))
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


def write_profile(path: Path, rows: list[dict], meta: dict) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from experiments.atomic import atomic_path

    df = pd.DataFrame(rows)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"kvlab_profile": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# the parts of a profile (--skip names them) and the tables each writes
PART_TABLES = {"host": {"host"}, "gemm": {"gemm"}, "copy": {"copy"}, "vmm": {"vmm"}, "ragged": {"ragged"},
               "models": {"attention", "eager_forward", "prefill_graph", "sample", "decode_graph",
                          "decode_graph_ragged"},
               "graphs": {"piecewise_forward", "piecewise_capture", "full_forward", "full_capture"}}


def check_args(a) -> None:
    """The flags, one line naming the flag and the fix if one is wrong: before anything is timed
    (a bad one was a traceback seconds or minutes in, or in the host-time subprocess)."""
    import re

    from allocators.paged import MAX_BLOCK_SIZE
    from engine.loader import resolve_config
    from experiments.device_profile import load_profile, resolve_profile_path
    from experiments.preflight import UserError, check_folder

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)
    for flag, v, what in (("--reps", a.reps, "the timed calls per figure"),
                          ("--max-model-len", a.max_model_len, "the decode graphs' max_model_len in tokens"),
                          ("--pool-tokens", a.pool_tokens, "the scratch cache's KV slots"),
                          ("--host-kv-tokens", a.host_kv_tokens, "the host-time engines' KV slots"),
                          ("--host-requests", a.host_requests, "the host-time run's full batch"),
                          ("--virtual-page-size", a.virtual_page_size, "the page size in bytes (or leave it out)")):
        need(v is None or v >= 1, f"{flag} {v}: give {what}, 1 or more")
    sizes = [b for b in a.block_sizes.split(",") if b]
    need(all(b.isdigit() and 1 <= int(b) <= MAX_BLOCK_SIZE for b in sizes), f"--block-sizes {a.block_sizes}: give "
         f"block sizes in tokens, whole numbers in [1, {MAX_BLOCK_SIZE}], comma-separated (e.g. 8,16,32)")
    models = [m for m in a.models.split(",") if m]
    need(bool(models), "--models: give presets or HF directories, comma-separated (e.g. --models tiny-llama)")
    for flag, names in (("--models", models), ("--host-model", [m for m in (a.host_model or "").split(",") if m])):
        for m in names:
            try:
                resolve_config(m)
            except (ValueError, OSError) as e:  # not a preset, or no readable HF directory
                raise UserError(f"{flag} {m}: {e}") from None
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device) is not None, f"--device {a.device}: give auto, cpu, cuda "
         "or cuda:N")
    if a.device.startswith("cuda"):
        import torch

        need(torch.cuda.is_available(), f"--device {a.device}: no CUDA device is visible: give --device cpu or auto")
    if a.merge:
        need(resolve_profile_path(a.merge) is not None, f"--merge {a.merge}: no such file: give an earlier "
             "profile's .parquet file (kvlab profile --out wrote it)")
        try:  # cached: the merge reads it again for nothing
            load_profile(a.merge)
        except Exception as e:  # noqa: BLE001 (pyarrow's errors: not a parquet file, a cut-off one, ...)
            why = " ".join(str(e).split())  # one line
            raise UserError(f"--merge {a.merge}: not a readable device profile ({type(e).__name__}: {why})") from None
    out = Path(a.out)
    if out.suffix == ".parquet":  # a file: its folder must take it
        check_folder(f"--out {a.out}: its folder", out.parent)
    else:
        check_folder("--out", out)


def _parser():
    """The flags of ``kvlab profile``."""
    from experiments.cli import Parser

    ap = Parser(prog="kvlab profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-0.6b,llama3-8b", help="presets or HF directories, comma-separated")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-model-len", type=int, default=2048, help="the decode graphs' max_model_len")
    ap.add_argument("--pool-tokens", type=int, default=262144, help="KV slots of the scratch cache")
    ap.add_argument("--block-sizes", default="8,16,32")
    ap.add_argument("--host-model", default=None,
                    help="models of the host-time steps, comma-separated (default: the first of --models)")
    ap.add_argument("--host-kv-tokens", type=int, default=40000)
    ap.add_argument("--host-in-process", action="store_true",
                    help="run the host-time engines in this process (default: each in a process of its own, "
                         "as validate-sim's real runs are)")
    ap.add_argument("--host-requests", type=int, default=256, help="requests of the host-time run's full batch")
    ap.add_argument("--host-repeats", type=int, default=1,
                    help="runs of the host-time steps per model and allocator, each its own engine and seed: "
                         "one run's host work can be 10-40%% off another's on a VM, the tables pool them")
    ap.add_argument("--host-scheduling", default="sync",
                    help="how the host-time runs schedule, comma-separated: sync (steps one after another), "
                         "async (each step launched before the previous one is read back: what simulate "
                         "uses for engine.async_scheduling=true)")
    ap.add_argument("--host-events", action="store_true",
                    help="CUDA events around each host-time step's launch too, for its device time (the gpu "
                         "column; diagnostics: the real runs the steps stand for have no such events)")
    ap.add_argument("--virtual-page-size", type=int, default=None, help="page size of the host-time run (bytes)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip", default="", help="parts to leave out, comma-separated: host, gemm, models, graphs "
                    "(prefill/mixed CUDA graphs), ragged, copy, vmm")
    ap.add_argument("--merge", default=None, help="an earlier profile: its tables not measured now are kept")
    ap.add_argument("--host-add", action="store_true",
                    help="with --merge: keep the earlier profile's host steps of the models and schedulings "
                         "measured now and add this run's as further repeats (the tables pool them: host work "
                         "differs from one machine to another); its workloads are the first run's (seeds from 0), "
                         "so machines are compared on the same steps")
    ap.add_argument("--out", default="results/profiles", help="folder (file name from the device) or .parquet")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress lines (each part's start, and one every ~10 s inside it) on stderr: its end "
                         "lines only (as kvlab run's progress=false leaves out its bar)")
    return ap


def _parts_and_schedulings(ap, a) -> tuple[list[str], set[str]]:
    """The host-time schedulings and the parts to skip the flags name; a wrong one is ``ap.error``
    (``check_args`` checks the rest)."""
    if a.host_repeats < 1:
        ap.error(f"--host-repeats must be >= 1, got {a.host_repeats}")
    schedulings = [s for s in a.host_scheduling.split(",") if s]
    if not schedulings or set(schedulings) - {"sync", "async"}:
        ap.error(f"--host-scheduling: sync, async or both comma-separated, got {a.host_scheduling!r}")
    skip = {k for k in a.skip.split(",") if k}
    if skip - set(PART_TABLES):
        ap.error(f"--skip: unknown part(s) {sorted(skip - set(PART_TABLES))}; the parts are "
                 f"{', '.join(sorted(PART_TABLES))}")
    if a.host_add and not a.merge:
        ap.error("--host-add adds to the host steps of a --merge profile: name one")
    return schedulings, skip


def main(argv: list[str] | None = None) -> int:
    import sys

    from experiments.preflight import UserError

    ap = _parser()
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    schedulings, skip = _parts_and_schedulings(ap, a)
    try:
        check_args(a)
    except UserError as e:
        print(f"kvlab profile: {e}", file=sys.stderr)
        return 2
    import torch

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    models = [m for m in a.models.split(",") if m]
    block_sizes = [int(b) for b in a.block_sizes.split(",") if b]
    if device.type != "cuda":
        skip.add("graphs")  # CUDA graphs only: a merge on a CPU keeps the profile's graph tables
        skip.add("vmm")  # CUDA's driver calls only (_rows_vmm: none here): nor did it keep the vmm table
    host_models = [m for m in (a.host_model or models[0]).split(",") if m]
    timer = Timer(device, a.reps)
    meta = metadata(device, a)
    out = Path(a.out)
    path = out if out.suffix == ".parquet" else out / f"{slug(meta['device'])}.parquet"
    # what a cut-off run measured goes beside the profile, not over it: --merge P --out P (the README's
    # way to add host steps) replaced P at its first part with P less the tables not yet re-measured
    partial = path.with_name(f"{path.stem}.partial.parquet")
    rows: list[dict] = []
    t0 = time.time()
    first_repeat = 0
    if a.merge:  # keep what this run does not re-measure
        rows, meta, first_repeat = merge_base(ap, a, meta, skip, models, host_models, schedulings,
                                              device.type == "cuda")

    per_model = sum(k not in skip for k in ("models", "graphs", "ragged"))  # graphs, vmm: in skip off CUDA
    parts = sum(k not in skip for k in ("host", "gemm", "copy", "vmm")) + len(models) * per_model
    progress = Progress(t0, parts, not a.no_progress)

    def checkpoint() -> None:
        meta["updated" if a.merge else "seconds"] = (
            {**meta["updated"], "seconds": round(time.time() - t0, 1)} if a.merge else round(time.time() - t0, 1))
        write_profile(partial, rows, {**meta, "partial": True})  # a cut-off run keeps what it measured

    def part(name: str, label: str, total: int, measure: Callable[[Callable[[], None]], list[dict]],
             unit: str = "measurements") -> None:
        """One part (or one model's share of it): its start line, ``measure(tick)``, the checkpoint, its end line."""
        progress.start(name, label, total, unit)
        new = measure(progress.tick)
        rows.extend(new)
        checkpoint()
        progress.end(len(new), len(rows), partial)

    if "host" not in skip:
        _host_part(a, device, host_models, schedulings, first_repeat, rows, progress, checkpoint, partial, t0)
    import gc

    gc.collect()  # the host-time engines, weights and graphs included
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _kernel_parts(part, timer, a, models, block_sizes, skip, device)
    write_profile(path, rows, meta)
    partial.unlink(missing_ok=True)
    print(f"wrote {path}: {len(rows)} rows, {meta['device']}", flush=True)
    return 0


def _host_part(a, device, host_models: list[str], schedulings: list[str], first_repeat: int, rows: list[dict],
               progress: Progress, checkpoint: Callable[[], None], partial: Path, t0: float) -> None:
    """The ``host`` part: the real engine's steps of every host model, allocator and scheduling, each
    repeat (``--host-repeats``) numbered from ``first_repeat``, added to ``rows`` with a checkpoint
    after each engine run."""
    from experiments.profile_host import HOST_ALLOCATORS, TRICKLE_MAX_PROMPT, host_rows, host_rows_apart

    run_host = host_rows if a.host_in_process else host_rows_apart

    # ShareGPT-like lengths (seeded apart from any workload), uniform ones, then a trickle
    half = a.max_model_len // 2
    phases = ((a.host_requests, 0, 0, 0, 0), (a.host_requests // 2, 32, min(1024, half), 16, min(512, half)),
              (-max(8, a.host_requests // 4), 16, min(TRICKLE_MAX_PROMPT, half), 16, 64))  # then one at a time
    # repeats go round every model and allocator, so a slow spell of the machine falls on all
    runs = [(rep, hm, alloc, sched) for rep in range(a.host_repeats) for hm in host_models
            for alloc in HOST_ALLOCATORS for sched in schedulings]
    progress.start("host", "host steps", len(runs), "engine runs (model, allocator, scheduling, repeat)")
    before = len(rows)
    for rep, hm, alloc, sched in runs:
        name, args = HOST_ALLOCATORS[alloc]
        if name == "virtual" and a.virtual_page_size:
            args = {**args, "page_size": a.virtual_page_size}
        what = f"{hm} {alloc} {sched}" + (f" (repeat {rep + 1} of {a.host_repeats})" if a.host_repeats > 1 else "")
        progress.line(f"host steps: {what}: the real engine's steps"
                      + ("" if a.host_in_process else " (in a process of its own)"))
        rows += [dict(r, repeat=first_repeat + rep) for r in run_host(
            hm, name, args, max_model_len=a.max_model_len, kv_cache_tokens=a.host_kv_tokens,
            device=str(device), phases=phases, seed=rep, async_scheduling=sched == "async",
            events=a.host_events, progress_t0=t0 if progress.enabled else None)]
        checkpoint()
        progress.tick(f" ({what})", force=True)  # a run takes ~30 s on a GPU: a line each
    progress.end(len(rows) - before, len(rows), partial)


def _kernel_parts(part, timer, a, models: list[str], block_sizes: list[int], skip: set[str], device) -> None:
    """The kernel and forward parts not in ``skip`` (gemm; per model: models, graphs, ragged; copy, vmm),
    each through ``part`` (main's: its progress lines and checkpoint)."""
    import torch

    from kernels import compile_watch
    from kernels.pdl import supported as pdl_supported

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    with compile_watch.expected():  # the kernel tables compile every shape they time
        if "gemm" not in skip:
            shapes = _gemm_shapes(models)
            part("gemm", "gemm", len(shapes) * len(profile_cases.GEMM_M),
                 lambda tick: _rows_gemm(timer, shapes, dtype, device, tick))
        for m in models if "models" not in skip else ():
            part("models", f"model {m}", _model_count(a.pool_tokens, a.max_model_len, block_sizes, cuda,
                                                      pdl_supported(device)),
                 lambda tick: _rows_model(timer, m, a.pool_tokens, a.max_model_len, block_sizes, device, tick))
        for m in models if "graphs" not in skip and cuda else ():
            part("graphs", f"graphs {m}", _graphs_count(a.pool_tokens),
                 lambda tick: _rows_graphs(timer, m, a.pool_tokens, device, tick))
        for m in models if "ragged" not in skip else ():
            from engine.loader import resolve_config

            part("ragged", f"ragged decode {m}", len(_ragged_cases(block_sizes)),
                 lambda tick: _rows_ragged(timer, resolve_config(m), m, a.pool_tokens, a.max_model_len, block_sizes,
                                           dtype, device, tick))
        if "copy" not in skip:
            part("copy", "copy", len(profile_cases.COPY_BYTES), lambda tick: _rows_copy(timer, device, tick),
                 "sizes (h2d and d2h each)")
        if "vmm" not in skip:
            part("vmm", "vmm", 1, lambda tick: _rows_vmm(device, tick), "measurement (map and unmap per page)")


if __name__ == "__main__":
    raise SystemExit(main())
