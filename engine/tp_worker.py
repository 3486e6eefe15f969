"""Tensor parallelism across processes: rank 0 (the engine) and the worker ranks it spawns.

Rank 0 is the LLMEngine's process: scheduler, allocator decisions, sampler, outputs. Every other
rank is a process spawned here (``spawn``: never fork a process that may hold CUDA state) that
holds its shard of the model and of the KV pool and runs every step rank 0 runs::

    rank 0                                          rank r (worker_main)
    schedule: allocator calls, recorded
    BatchInputs (slots, block-table rows, ...)
    publish ("step", calls, inputs, rows)  -pipe->  replay the calls on its own allocator,
                                                    copy the changed block-table rows
    forward: 2 all-reduces per layer      <-NCCL->  forward: the same all-reduces
    logits (lm_head replicated), sample             (no logits: only rank 0 samples)

Each message is pickled once and written to one pipe per worker; the collectives go over
``torch.distributed`` (NCCL on GPUs, gloo on CPU). Failures never hang: a worker that raises
sends its traceback and exits, which breaks the collective rank 0 waits in (gloo: at once;
NCCL: after ``KVLAB_TP_TIMEOUT_S``); rank 0 then raises ``FatalEngineError`` naming the rank.
A worker whose rank 0 is gone reads EOF from its pipe and exits. ``TPGroup.close`` (also at
garbage collection and interpreter exit) stops the workers, killing any that do not stop.
"""
from __future__ import annotations

import logging
import os
import pickle
import time
import traceback
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.multiprocessing as mp

from allocators import KVCacheSpec, create_allocator
from engine.allocator_mirror import AllocatorReplay, RecordingAllocator
from engine.config import EngineConfig
from engine.fault_isolation import FatalEngineError
from engine.model_config import ModelConfig
from engine.parallel import backend_for, destroy_group, free_port, init_group, load_sharded_model, rank_device
from engine.runner import BatchInputs, ModelRunner, StepInputs

log = logging.getLogger("kvlab.tp")


def timeout_s() -> float:
    """How long a rank waits for another (start-up, a collective) before it gives up."""
    return float(os.environ.get("KVLAB_TP_TIMEOUT_S", "300"))


@dataclass
class WorkerSetup:
    config: EngineConfig
    model_config: ModelConfig  # the full model's
    max_model_len: int
    dtype: torch.dtype
    device: str  # the engine's device ("cpu" or "cuda"): rank r uses cuda:r
    init_method: str
    timeout_s: float


class TPGroup:
    """Rank 0's handle on the worker ranks: start, messages, failures, stop."""

    def __init__(self, config: EngineConfig, mc: ModelConfig, max_model_len: int, dtype: torch.dtype,
                 device: str):
        self.world = config.tensor_parallel_size
        self.config, self.model_config, self.device, self.dtype = config, mc, device, dtype
        self.max_model_len = max_model_len
        self.timeout_s = timeout_s()
        self.recorder: RecordingAllocator | None = None
        setup = WorkerSetup(config, mc, max_model_len, dtype, device, f"tcp://127.0.0.1:{free_port()}",
                            self.timeout_s)
        ctx = mp.get_context("spawn")
        self.procs: list = []
        self.conns: list = []
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.conns)
        for rank in range(1, self.world):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, setup, theirs), name=f"kvlab-tp-rank{rank}",
                               daemon=True)
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)
        self.gather("hello")  # every worker started (imports done) before rank 0 blocks in the rendezvous
        if device.startswith("cuda"):
            torch.cuda.set_device(rank_device(device, 0))
        init_group(backend_for(device), setup.init_method, 0, self.world, self.timeout_s)
        log.info("tensor parallelism: %d ranks (%s), %s", self.world, backend_for(device), mc.name)

    # -- model and runner ---------------------------------------------------------------------------
    def load_model(self, seed: int) -> torch.nn.Module:
        model = load_sharded_model(self.model_config, self.config.model, self.max_model_len, self.dtype,
                                   rank_device(self.device, 0), seed, 0, self.world)
        if self.device.startswith("cuda"):
            model.fuse()
        return model

    def profile_kv_budget(self, engine, spec: KVCacheSpec) -> int:
        """KV bytes per GPU: every rank measures its own (the activation forward runs on all of
        them at once) and the smallest budget holds for all."""
        from engine.profiling import profile_kv_budget

        self.send(("profile",))
        mine = profile_kv_budget(_profile_view(engine.config, engine.model, engine.max_model_len, engine.device,
                                               engine.dtype), spec)
        return min([mine] + [m[1] for m in self.gather("budget")])

    def mirror(self, allocator, name: str, args: dict) -> RecordingAllocator:
        """Rank 0's allocator, recording its calls; every worker builds the same allocator (class,
        arguments, capacity) over its own shard of KV heads, and its runner."""
        self.send(("runner", name, args, allocator.capacity_tokens))
        self.recorder = RecordingAllocator(allocator)
        return self.recorder

    def runner(self, model, recorder: RecordingAllocator, eos_ids: list[int]) -> "TPModelRunner":
        c = self.config
        return TPModelRunner(self, recorder, model, recorder, self.device, eos_ids, c.seed, c.max_num_seqs,
                             self.max_model_len, c.enforce_eager, max_num_batched_tokens=c.max_num_batched_tokens,
                             prompt_qkv=c.prompt_attention == "qkv")

    def probe(self) -> list[dict]:
        """Each worker's allocator as rank 0 would describe it (``allocator_view``), after the calls
        rank 0 has made so far: the tensor-parallel tests compare them with rank 0's."""
        self.send(("probe", self._recorder_take()))
        return [m[1] for m in self.gather("probe")]

    def _recorder_take(self) -> list:
        return self.recorder.take() if self.recorder is not None else []

    # -- messages -------------------------------------------------------------------------------------
    def send(self, msg: tuple) -> None:
        self.check()
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as e:
                raise self.failure(e, rank) from e

    def check(self) -> None:
        """Raise if a worker has reported an error (without waiting)."""
        for rank, conn in enumerate(self.conns, start=1):
            if conn.poll():
                msg = _recv(conn)
                if msg is None or msg[0] == "error":
                    raise self._fatal(rank, msg)
                raise RuntimeError(f"tensor-parallel rank {rank} sent {msg[0]!r} unasked")

    def gather(self, kind: str) -> list[tuple]:
        """One ``kind`` message from every worker, in rank order; a worker that fails or dies
        instead is an error naming it."""
        out = []
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            deadline = time.monotonic() + self.timeout_s
            while not conn.poll(0.05):
                if not proc.is_alive() and not conn.poll(0.5):
                    raise self._fatal(rank, None)
                if time.monotonic() > deadline:
                    raise FatalEngineError(f"tensor-parallel rank {rank} sent no {kind!r} within {self.timeout_s:.0f} s "
                                           "(KVLAB_TP_TIMEOUT_S)")
            msg = _recv(conn)
            if msg is None or msg[0] != kind:
                raise self._fatal(rank, msg)
            out.append(msg)
        return out

    def failure(self, exc: BaseException, rank: int | None = None) -> FatalEngineError:
        """The error to raise when a step failed on rank 0 (a collective broke, a pipe closed): a
        worker's own report where one arrives, else rank 0's error. Always fatal: the ranks are
        no longer in step."""
        # a collective breaks as soon as a peer's sockets close, which may be a moment before its
        # report is readable or its exit is seen: wait a little for either
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for r, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
                if conn.poll():
                    msg = _recv(conn)
                    if msg is None or msg[0] == "error":
                        return self._fatal(r, msg)
                elif not proc.is_alive() and (rank is None or r == rank):
                    return self._fatal(r, None)
            time.sleep(0.05)
        return FatalEngineError(f"tensor-parallel rank 0 failed: {exc!r}")

    def _fatal(self, rank: int, msg: tuple | None) -> FatalEngineError:
        if msg is not None and msg[0] == "error":
            return FatalEngineError(f"tensor-parallel rank {rank} failed:\n{msg[2]}")
        proc = self.procs[rank - 1]
        proc.join(1.0)
        return FatalEngineError(f"tensor-parallel rank {rank} exited (code {proc.exitcode}) without a report"
                                + (f"; it sent {msg!r}" if msg is not None else ""))

    def close(self) -> None:
        self._finalizer()


def _recv(conn) -> tuple | None:
    try:
        return pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return None


def _stop_workers(procs: list, conns: list) -> None:
    """Ask each worker to stop, wait a little, kill what is left; leave the process group."""
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("stop",)))
        except OSError:
            pass
    deadline = time.monotonic() + 10.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
    for conn in conns:
        conn.close()
    try:
        destroy_group()
    except Exception:  # at interpreter exit the group may be half torn down already
        pass


def _profile_view(config, model, max_model_len: int, device: str, dtype: torch.dtype) -> SimpleNamespace:
    """What ``profile_kv_budget`` reads of an engine, with this rank's shapes (its KV heads)."""
    return SimpleNamespace(config=config, model_config=model.config, max_model_len=max_model_len, device=device,
                           dtype=dtype, model=model)


class TPModelRunner(ModelRunner):
    """Rank 0's runner: every step's inputs go to the workers before the model runs."""

    def __init__(self, group: TPGroup, recorder: RecordingAllocator, *args, **kwargs):
        self.group, self.recorder = group, recorder
        super().__init__(*args, **kwargs)
        self._sent_rows = self.table.host.copy() if self.table is not None else None

    def publish(self, inputs: BatchInputs) -> None:
        rows = data = None
        if self.table is not None:  # the block-table rows that changed since the last step
            changed = np.flatnonzero((self.table.host != self._sent_rows).any(axis=1))
            if len(changed):
                rows, data = changed, self.table.host[changed]
                self._sent_rows[changed] = data
        self.group.send(("step", self.recorder.take(), StepInputs.of(inputs), rows, data))

    def forward(self, inputs, feed=None):
        try:
            return super().forward(inputs, feed)
        except Exception as e:  # the ranks are out of step: nothing can be retried
            raise self.group.failure(e) from e

    def forget(self, seq) -> None:
        super().forget(seq)
        self.recorder.forget(seq.seq_id)


def allocator_view(allocator, seqs) -> dict:
    """What must agree on every rank: the pool's breakdown (in tokens: bytes differ by the heads a
    rank holds) and each live sequence's tokens and addressing (block ids or base slot)."""
    from kernels.metadata import Addressing

    stats = allocator.stats()
    bpt = allocator.bytes_per_token
    paged = allocator.mode == Addressing.PAGED
    live = {}
    for s in seqs:
        n = allocator.num_tokens(s)
        if n:
            live[s.seq_id] = (n, tuple(allocator.block_ids(s)) if paged else allocator.seq_base(s))
    return dict(stats={k: v // bpt for k, v in stats.as_dict().items()}, seqs=live)


def worker_main(rank: int, setup: WorkerSetup, conn) -> None:
    """A worker rank: its shard of the model and of the KV pool, steps as rank 0 sends them."""
    allocator = None
    try:
        device = rank_device(setup.device, rank)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        conn.send_bytes(pickle.dumps(("hello", rank)))
        init_group(backend_for(device), setup.init_method, rank, setup.config.tensor_parallel_size,
                   setup.timeout_s)
        c, mc = setup.config, setup.model_config
        if device == "cpu":  # as the engine decides for rank 0
            threads = c.cpu_threads or (1 if mc.num_params < 50_000_000 else 0)
            if threads:
                torch.set_num_threads(threads)
        torch.manual_seed(c.seed)
        model = load_sharded_model(mc, c.model, setup.max_model_len, setup.dtype, device, c.seed, rank,
                                   c.tensor_parallel_size)
        if device.startswith("cuda"):
            model.fuse()
        local = model.config
        spec = KVCacheSpec(local.num_hidden_layers, local.num_key_value_heads, local.head_dim, setup.dtype, device)
        runner: ModelRunner | None = None
        replay: AllocatorReplay | None = None
        while True:
            msg = _recv(conn)
            if msg is None or msg[0] == "stop":  # rank 0 is gone, or done
                break
            kind = msg[0]
            if kind == "step":
                _, calls, inputs, rows, data = msg
                replay.apply(calls)
                runner.staging.next_step()
                if runner.table is not None:
                    if rows is not None:
                        runner.table.write_rows(rows, data)
                    runner.table.sync(runner.staging)
                with torch.inference_mode():
                    runner.forward(inputs)
            elif kind == "runner":
                _, name, args, capacity = msg
                allocator = create_allocator(name, spec=spec, capacity_tokens=capacity, max_num_seqs=c.max_num_seqs,
                                             max_model_len=setup.max_model_len, **args)
                replay = AllocatorReplay(allocator)
                runner = ModelRunner(model, allocator, device, [], c.seed, c.max_num_seqs, setup.max_model_len,
                                     c.enforce_eager, max_num_batched_tokens=c.max_num_batched_tokens,
                                     prompt_qkv=c.prompt_attention == "qkv")
            elif kind == "probe":
                replay.apply(msg[1])
                conn.send_bytes(pickle.dumps(("probe", allocator_view(allocator, replay.seqs.values()))))
            elif kind == "profile":
                from engine.profiling import profile_kv_budget

                budget = profile_kv_budget(_profile_view(c, model, setup.max_model_len, device, setup.dtype), spec)
                conn.send_bytes(pickle.dumps(("budget", budget)))
            else:
                raise RuntimeError(f"unknown message {kind!r} from rank 0")
    except BaseException:
        try:
            conn.send_bytes(pickle.dumps(("error", rank, traceback.format_exc())))
        except OSError:
            pass
        os._exit(1)  # at once: the collective rank 0 waits in breaks now, not at a timeout
    if allocator is not None:
        allocator.close()
    destroy_group()
