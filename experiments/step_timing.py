"""Where a real engine's step time goes: host work, the CPU time of launching the forward, and
the device's own time, per step of any experiment config (GPU).

    python -m experiments.step_timing model=qwen3-0.6b allocator=paged device=cuda \\
        workload=sharegpt workload.request_rate=8 workload.num_requests=60 --out /tmp/st

Runs the config as ``kvlab run`` would (same engine, workload and driver) with the runner's
``launch`` wrapped (``LaunchTimer``, also what ``kvlab profile`` records host time with), and
writes ``step_timing.csv`` (one row per step) and prints medians by step kind. A step's wall
time is host (scheduling, input preparation, output handling) + launch (the CPU issuing the
graphs and kernels) + the wait for the device; ``device_s`` is CUDA-event time from the end of
input preparation to the end of sampling.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path


class LaunchTimer:
    """Wraps ``eng.runner.launch``: per step, CUDA events around the launch (device time; only
    with ``events``) and the CPU time the launch call took, the batch's longest context; with a
    VMM allocator, the maps its scheduling made (``MapCounter``). ``close()`` unwraps it (no
    cycle through the wrapper). Without ``events`` the steps run as in a run with no timer on
    the device's side (``kvlab profile``'s host steps: the real runs they stand for have none)."""

    def __init__(self, eng, cuda: bool, events: bool = True):
        import torch

        from experiments.simulate import MapCounter

        self.eng, self.cuda, self.events, self.torch = eng, cuda, cuda and events, torch
        self.marks: list = []  # (step index, start event, end event, prep s, launch cpu s)
        self.vmm: dict[int, tuple[int, int]] = {}  # step -> VMM (maps, unmaps) on its path
        self.longest: dict[int, int] = {}  # step -> its longest sequence's context (keys attention reads)
        self.counter = MapCounter(eng.allocator) if getattr(eng.allocator, "backend", None) is not None else None
        self._launch = eng.runner.launch
        eng.runner.launch = self

    def __call__(self, batch, inflight=None):
        step = len(self.eng.step_records)
        self.longest[step] = max((s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens)),
                                 default=0)
        if self.counter is not None:  # what this step's scheduling mapped (the allocator runs before launch)
            self.vmm[step] = self.counter.take()
        if not self.cuda:
            return self._launch(batch, inflight)
        a = b = None
        if self.events:
            a, b = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        if a is not None:
            a.record()
        h = self._launch(batch, inflight)
        if b is not None:
            b.record()
        cpu = time.perf_counter() - t0
        prep = self.eng.runner.last_prep_s
        # the device idles while the runner prepares inputs: that part is host time
        self.marks.append((step, a, b, prep, max(0.0, cpu - prep)))
        return h

    def device_times(self) -> dict[int, tuple[float, float]]:
        """step -> (device s, launch cpu s), device s NaN without ``events``; synchronizes."""
        if self.events:
            self.torch.cuda.synchronize()
        return {i: (max(0.0, a.elapsed_time(b) / 1e3 - prep) if a is not None else math.nan, cpu)
                for i, a, b, prep, cpu in self.marks}

    def close(self) -> None:
        del self.eng.runner.launch


def step_kind(r) -> str:
    if r.prefill_tokens and r.decode_tokens:
        return "mixed"
    return "prefill" if r.prefill_tokens else "decode"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for kvlab run")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import pandas as pd
    import torch
    from omegaconf import OmegaConf

    from experiments.atomic import write_csv
    from experiments.driver import drive
    from experiments.run import build_engine, compose
    from experiments.workloads import make_workload, tokenize_requests

    cfg = compose(list(a.overrides))
    if cfg.mode == "simulate":
        raise SystemExit("step_timing times the real engine: not mode=simulate")
    torch.manual_seed(cfg.seed)
    try:
        eng = build_engine(cfg)
    except ValueError as e:  # a setting this machine cannot run (device=cuda without one, ...): one line
        raise SystemExit(f"step_timing: {e}") from None
    timer = LaunchTimer(eng, str(eng.device).startswith("cuda"))
    specs = make_workload(OmegaConf.to_container(cfg.workload, resolve=True), eng.model_config.vocab_size,
                          eng.max_model_len)
    specs = tokenize_requests(specs, eng.tokenizer.encode, eng.max_model_len)
    t0, t1 = drive(eng, specs, seed=cfg.seed)
    dev = timer.device_times()
    timer.close()
    rows = []
    prev_end = None
    for i, r in enumerate(eng.step_records):
        d, cpu = dev.get(i, (0.0, 0.0))
        rows.append(dict(step=i, kind=step_kind(r), batch=r.num_seqs, prefill_tokens=r.prefill_tokens,
                         decode_tokens=r.decode_tokens, wall_s=r.duration, host_s=r.host_s, launch_cpu_s=cpu,
                         device_s=d, gap_before_s=(r.time - prev_end) if prev_end is not None else 0.0))
        prev_end = r.time + r.duration
    eng.close()
    df = pd.DataFrame(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "step_timing.csv", df)  # atomic: a cut-off write leaves no partial file
    ms = df.assign(**{c: df[c] * 1e3 for c in ("wall_s", "host_s", "launch_cpu_s", "device_s", "gap_before_s")})
    summary = ms[ms.batch > 0].groupby("kind").agg(
        steps=("step", "size"), tokens=("prefill_tokens", "median"), wall_ms=("wall_s", "median"),
        host_ms=("host_s", "median"), launch_cpu_ms=("launch_cpu_s", "median"), device_ms=("device_s", "median"),
        gap_ms=("gap_before_s", "median"), wall_sum_s=("wall_s", lambda x: x.sum() / 1e3))
    print(f"{cfg.model.name} {cfg.allocator.name} {cfg.mode} rate={cfg.workload.get('request_rate')}: "
          f"{len(specs)} requests in {t1 - t0:.2f} s")
    print(summary.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
