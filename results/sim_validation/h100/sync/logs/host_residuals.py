"""The synchronous decode steps' host part (duration minus the profiled device time of the step's work), by batch
bin: the profile's own steps (prof_*) against the validation's offline real runs (run_*) on the same machine, and
simulate's step time for the real runs' work (run_pred). Run from the repository root:
    .venv/bin/python results/sim_validation/h100/sync/logs/host_residuals.py   # -> host_residuals.txt
"""
import pandas as pd, numpy as np
from types import SimpleNamespace as NS
from experiments.device_profile import load_profile, host_model_of, host_scheduling_of
from experiments.profiled_costmodel import ProfiledCostModel
from experiments.host_calibration import _calibration_work
from experiments.profile_lookup import _shape
p = load_profile('results/profiles/nvidia-h100.parquet')
h = p.table('host')
h = h[(host_model_of(p, h) == 'qwen3-0.6b').to_numpy() & (host_scheduling_of(h) == 'sync').to_numpy()]
bins = [0, 1, 4, 8, 16, 32, 64, 128, 256]
for a, paged, bs in [('paged', True, 16), ('contiguous', False, 0), ('virtual', False, 0)]:
    cm = ProfiledCostModel(p, _shape('qwen3-0.6b'), model='qwen3-0.6b', paged=paged, block_size=bs, max_graph_batch=256,
                           enforce_eager=False, allocator=a, graph_max_tokens=8192, graph_mode='full', overlapped=False,
                           max_model_len=2048)
    hp = h[(h.allocator == a) & (h.prefill_tokens == 0)]
    dev = np.array([cm.device_time(_calibration_work(r)) for r in hp.itertuples()])
    res = hp.duration.to_numpy() - dev
    r = pd.read_parquet(f'results/sim_validation/h100/sync/qwen3-0.6b-{a}/real/offline/steps.parquet')
    r = r[r.prefill_tokens == 0]
    rw = [NS(batch=x.num_seqs, prefill_tokens=0, context=x.context_tokens, max_context=float('nan')) for x in r.itertuples()]
    rdev = np.array([cm.device_time(_calibration_work(x)) for x in rw])
    pred = np.array([cm.step_time(_calibration_work(x)) for x in rw])
    rres = r.duration.to_numpy() - rdev
    df = pd.DataFrame({'b': pd.cut(hp.batch, bins), 'ctx': hp.context / hp.batch, 'res': res * 1e3, 'dur': hp.duration * 1e3})
    dr = pd.DataFrame({'b': pd.cut(r.num_seqs, bins), 'ctx': r.context_tokens / r.num_seqs, 'res': rres * 1e3, 'dur': r.duration * 1e3, 'pred': pred * 1e3})
    print(a)
    print(pd.concat({'prof_ctx': df.groupby('b', observed=True).ctx.median(), 'prof_res': df.groupby('b', observed=True).res.median(),
                     'prof_dur': df.groupby('b', observed=True).dur.median(),
                     'run_ctx': dr.groupby('b', observed=True).ctx.median(), 'run_res': dr.groupby('b', observed=True).res.median(),
                     'run_dur': dr.groupby('b', observed=True).dur.median(), 'run_pred': dr.groupby('b', observed=True).pred.median()}, axis=1).round(3).to_string())
