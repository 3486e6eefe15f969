"""The CPU time of the same synchronous decode steps in two real runs of one configuration (H200, qwen3-0.6b,
online 96 req/s: `real/` on GPU-0dd03ba1, `real-2/` on GPU-1e03b225) and in the H100 profile's synchronous host
steps against the H100 run on the same machine. Medians by batch bin of the engine's own host work (`host_s`:
scheduling, input preparation, output handling) and its launch's CPU time (`launch_s` / the profile's
`launch_cpu`), both measured, not residuals. Run from the repository root:
    .venv/bin/python results/sim_validation/logs/host_cpu/host_cpu.py
"""
import pandas as pd

BINS = [0, 1, 4, 8, 16, 32, 64, 128, 256]
SV = "results/sim_validation"


def decode(steps: pd.DataFrame, batch: str) -> pd.DataFrame:
    return steps[(steps.prefill_tokens == 0) & (steps[batch] > 0)]


def cpu_ms(steps: pd.DataFrame, batch: str, launch: str) -> pd.Series:
    d = decode(steps, batch)
    return ((d.host_s + d[launch]).groupby(pd.cut(d[batch], BINS), observed=True).median() * 1e3).round(3)


def main() -> None:
    pd.set_option("display.width", 200)
    print("H200, two machines: host + launch CPU ms a synchronous decode step (qwen3-0.6b, online-96rps)")
    for a in ("paged", "contiguous", "virtual"):
        runs = {r: cpu_ms(pd.read_parquet(f"{SV}/qwen3-0.6b-{a}/{r}/online-96rps/steps.parquet"), "num_seqs", "launch_s")
                for r in ("real", "real-2")}
        t = pd.DataFrame(runs)
        t["ratio"] = (t["real-2"] / t["real"]).round(2)
        print(f"\n{a}\n{t.to_string()}")
    print("\nH100, one machine: the profile's synchronous host steps against the offline real run (qwen3-0.6b)")
    prof = pd.read_parquet("results/profiles/nvidia-h100.parquet")
    prof = prof[(prof.table == "host") & (prof.model == "qwen3-0.6b") & (prof.scheduling == "sync")]
    for a in ("paged", "contiguous", "virtual"):
        run = pd.read_parquet(f"{SV}/h100/sync/qwen3-0.6b-{a}/real/offline/steps.parquet")
        t = pd.DataFrame({"profile": cpu_ms(prof[prof.allocator == a], "batch", "launch_cpu"),
                          "run": cpu_ms(run, "num_seqs", "launch_s")})
        t["ratio"] = (t["run"] / t["profile"]).round(2)
        print(f"\n{a}\n{t.to_string()}")


if __name__ == "__main__":
    main()
