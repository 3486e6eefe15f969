"""The host part of a device profile: the real engine's steps, wall time minus device time.

``kvlab profile`` runs the engine once per allocator on a mixed workload and records, for every
step, its batch shape, wall time, the CPU time of its launch, and the time the experiments' driver
(experiments/driver.py, which feeds the run) spent between it and the next step (``gap``); with
``--host-events`` also its device time (CUDA events from the end of input preparation to the end of
sampling: diagnostics, left out by default since the real runs have no such events). The profiled
cost model takes host time as what those steps took beyond its own modelled device time, gap
included (experiments/profiled_costmodel.py).

With ``async_scheduling`` (``kvlab profile --host-scheduling async``) the steps overlap the
device's previous one and a step's wall time is the longer of the two; what the cost model needs
is then the CPU's own part, recorded as ``value``: the step's host work (``host_s``: scheduling,
input preparation, output handling) plus the CPU time of its launch (graphs, kernels, copies),
every wait for the device left out.
"""
from __future__ import annotations

import math

import numpy as np

TRICKLE_STEPS = 8
# the trickle's longest prompt (at most half of max_model_len): light-load prefill steps beside a few
# decodes of up to 1,024 prompt tokens, as ShareGPT-like online runs have them (it stopped at 512 until
# the session of 2026-12-04 fourth, and longer such steps were extrapolated: results/sim_validation)
TRICKLE_MAX_PROMPT = 1024
HOST_MAX_NUM_BATCHED_TOKENS = 8192  # the host-time engines' token budget (the sim validation's)
HOST_ALLOCATORS = {"paged": ("paged", {"block_size": 16}), "contiguous": ("contiguous", {"policy": "max"}),
                   "virtual": ("virtual", {})}


def host_rows(model: str, allocator: str, args: dict, *, max_model_len: int, kv_cache_tokens: int,
              device: str, seed: int = 0,
              phases=((256, 32, 1024, 16, 512), (4, 64, 256, 64, 128)), skip_steps: int = 20,
              async_scheduling: bool = False, events: bool = False, progress_t0: float | None = None) -> list[dict]:
    """Steps of the real engine: wall time minus device time (end of input preparation to end of
    sampling). ``phases``: (requests, prompt min, max, output min, max), run one after the other;
    requests min == max == 0 draws ShareGPT-like lengths; a negative count adds that many
    requests one at a time, arriving every ``TRICKLE_STEPS`` steps' time (light load: prefill steps beside a few
    decoding sequences, as an online run at a low rate has them). The first ``skip_steps`` are
    left out (the caching allocator still grows there). ``events``: CUDA events around each
    launch as well, for its device time (``gpu``, diagnostics only: the cost model takes the
    device part from its own tables), which the real runs these steps stand for do not have.
    ``progress_t0``: progress lines on stderr (the engine built, each phase), timed from this
    ``time.time()`` (kvlab profile's start: a process of its own says its lines on the same clock)."""
    import time

    from engine import LLMEngine
    from engine.config import EngineConfig
    from experiments.driver import drive
    from experiments.step_timing import LaunchTimer
    from experiments.workloads import RequestSpec

    def say(text: str) -> None:
        if progress_t0 is not None:
            from experiments.profile_device import say_progress

            say_progress(progress_t0, f"  {model} {allocator}{' async' if async_scheduling else ''}: {text}")

    cuda = device.startswith("cuda")
    built = time.time()
    eng = LLMEngine(EngineConfig(model=model, allocator=allocator, allocator_args=args, device=device,
                                 max_model_len=max_model_len, max_num_seqs=256, max_num_batched_tokens=HOST_MAX_NUM_BATCHED_TOKENS,
                                 kv_cache_tokens=kv_cache_tokens, detokenize=False, stream_outputs=False,
                                 seed=seed, async_scheduling=async_scheduling))
    timer = LaunchTimer(eng, cuda, events=events)
    say(f"engine built in {time.time() - built:.1f} s")
    rng = np.random.default_rng(seed)
    for phase, (n, plo, phi, olo, ohi) in enumerate(phases):
        trickle, n = n < 0, abs(n)
        # between phases only: a phase's last step has nothing left, so no step's gap holds this line
        say(f"phase {phase + 1} of {len(phases)}: {n} requests"
            + (", one at a time" if trickle else ", ShareGPT-like lengths" if phi == 0 else f", prompts {plo}-{phi}"))
        if phi == 0:
            from experiments.workloads import SHAREGPT

            plens, olens = SHAREGPT.sample(rng, n, max_model_len)
        else:
            plens, olens = rng.integers(plo, phi, n), rng.integers(olo, ohi, n)
        specs = [RequestSpec(f"{phase}-{i}", rng.integers(10, min(1000, eng.model_config.vocab_size),
                                                          int(plen)).tolist(), int(olen))
                 for i, (plen, olen) in enumerate(zip(plens, olens))]
        if trickle:  # one request every TRICKLE_STEPS steps' time, as the first one's steps took alone
            before = len(eng.step_records)
            drive(eng, specs[:1], seed=seed)
            specs = specs[1:]
            alone = [r.duration for r in list(eng.step_records)[before:] if r.num_seqs]
            spacing = TRICKLE_STEPS * float(np.mean(alone))
            for i, spec in enumerate(specs):
                spec.arrival_s = i * spacing
        drive(eng, specs, seed=seed)  # the experiments' driver: its time between steps is measured too
    timed = timer.device_times()
    # the configuration the steps ran with: the cost model calibrates against the same graphs
    pw = getattr(eng.runner, "mixed_graphs", None)
    graph_max_tokens = pw.sizes[-1] if pw is not None and pw.sizes else 0
    max_graph_batch = eng.runner.graphs.sizes[-1] if getattr(eng.runner, "graphs", None) is not None else 0
    records = list(eng.step_records)
    rows = []
    for i, r in enumerate(records):
        if r.num_seqs == 0 or i < skip_steps:
            continue
        # the driver's time between this step and the next (not idle: requests were still there)
        nxt = records[i + 1] if i + 1 < len(records) else None
        gap = nxt.time - (r.time + r.duration) if nxt is not None and r.running + r.waiting > 0 else 0.0
        g, launch_cpu = timed.get(i, (0.0, 0.0))
        maps, unmaps = timer.vmm.get(i, (0, 0))
        row = dict(table="host", model=model, allocator=allocator, step=i, batch=r.num_seqs,
                   prefill_tokens=r.prefill_tokens,
                   decode_tokens=r.decode_tokens, context=r.context_tokens, max_context=timer.longest.get(i, 0),
                   duration=r.duration,
                   gap=max(0.0, gap), graph_max_tokens=graph_max_tokens, max_graph_batch=max_graph_batch,
                   graph_mode=eng.config.cuda_graph_mode, vmm_maps=maps, vmm_unmaps=unmaps,
                   scheduling="async" if async_scheduling else "sync", host_s=r.host_s, launch_cpu=launch_cpu,
                   events=timer.events)
        if async_scheduling:  # events around a launch would also hold the wait for the step before
            row["value"] = r.host_s + launch_cpu
        elif not math.isnan(g):  # no device (all host), or its time measured (events)
            row.update(gpu=g, value=max(0.0, r.duration - g))
        rows.append(row)
    timer.close()
    eng.close()
    say(f"{len(rows)} steps recorded")
    return rows


def host_rows_apart(model: str, allocator: str, args: dict, **kw) -> list[dict]:
    """``host_rows`` in a process of its own, as each of validate-sim's real runs is: an engine
    built after others in one process ran its host work 10-20% slower (H200, llama3-8b paged;
    results/sim_validation/README.md, session of 2026-12-04), and the profile's host steps must
    be the real runs' host steps."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="kvlab-host-") as tmp:
        out = Path(tmp) / "rows.json"
        spec = json.dumps(dict(model=model, allocator=allocator, args=args, **kw))
        subprocess.run([sys.executable, "-m", "experiments.profile_host", spec, str(out)], check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    """``python -m experiments.profile_host SPEC OUT``: ``host_rows(**SPEC)`` (JSON), its rows to OUT."""
    import json
    import sys

    spec, out = argv if argv is not None else sys.argv[1:]
    kw = json.loads(spec)
    if "phases" in kw:
        kw["phases"] = tuple(tuple(p) for p in kw["phases"])
    rows = host_rows(kw.pop("model"), kw.pop("allocator"), kw.pop("args"), **kw)
    with open(out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
