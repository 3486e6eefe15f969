"""Finding 1 of the README's fifth session of 2026-12-03: simulate llama3-8b paged (synchronous)
against this folder's real runs (GPU-cfce3a85), once with the committed profile and once with this
machine's own synchronous host steps (sync_llama.parquet) in place of the profile's llama3-8b ones.

    python results/sim_validation/logs/syncdiag/same_machine.py      # ~1 min on a CPU, writes under /tmp
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

here = Path(__file__).parent
committed = Path("results/profiles/nvidia-h200.parquet")
work = Path(tempfile.mkdtemp(prefix="kvlab-syncdiag-"))
table = pq.read_table(committed)
df = table.to_pandas()
own = pd.read_parquet(here / "sync_llama.parquet")
own = own[own.table == "host"].reindex(columns=df.columns)
keep = ~((df.table == "host") & (df.model == "llama3-8b") & (df.scheduling == "sync"))
merged = pa.Table.from_pandas(pd.concat([df[keep], own], ignore_index=True), preserve_index=False)
pq.write_table(merged.replace_schema_metadata(table.schema.metadata), work / "same-machine.parquet")

base = ("workload=sharegpt workload.num_requests=300 engine.kv_cache_tokens=40000 engine.max_model_len=2048 "
        "engine.max_num_seqs=256 engine.max_num_batched_tokens=8192 device=cuda report=false").split()
for name, profile in (("committed profile", committed), ("this machine's host steps", work / "same-machine.parquet")):
    out = work / name.split()[0] / "llama3-8b-paged"
    shutil.copytree(here / "llama3-8b-paged" / "real", out / "real")
    subprocess.run([sys.executable, "-m", "experiments.cli", "validate-sim", "model=llama3-8b", *base,
                    "allocator=paged", f"sim.profile={profile}", "--rates", "4", "--online-requests", "50",
                    "--sim-only", "--label", "llama3-8b-paged", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    v = pd.read_csv(out / "validation.csv")
    v = v[v.target.isin([0.05, 0.15])]
    print(f"{name}: {int(v.ok.sum())} of {len(v)} within target")
    print(v[["mode", "metric", "real", "sim", "error"]].round(4).to_string(index=False))
