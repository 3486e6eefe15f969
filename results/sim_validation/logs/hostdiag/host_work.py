import sys,gc,time,numpy as np,torch,pandas as pd
sys.path.insert(0,'.')
from engine import LLMEngine
from engine.config import EngineConfig
from experiments.driver import drive
from experiments.step_timing import LaunchTimer
from experiments.workloads import RequestSpec,SHAREGPT,make_workload
M,W,H,OUT=sys.argv[1],sys.argv[2],int(sys.argv[3]),sys.argv[4]
AL={'paged':{'block_size':16},'contiguous':{'policy':'max'},'virtual':{}}
def mk(m,a='paged'):return LLMEngine(EngineConfig(model=m,allocator=a,allocator_args=AL[a],device='cuda',max_model_len=2048,max_num_seqs=256,max_num_batched_tokens=8192,kv_cache_tokens=40000,detokenize=False,stream_outputs=False,seed=0,async_scheduling=False))
def ps(rng,ph):
 o=[]
 for k,(n,a,b,c,d) in enumerate(ph):
  P,O=SHAREGPT.sample(rng,n,2048) if b==0 else (rng.integers(a,b,n),rng.integers(c,d,n))
  o.append([RequestSpec(f"{k}-{i}",rng.integers(10,1000,int(p)).tolist(),int(q)) for i,(p,q) in enumerate(zip(P,O))])
 return o
t0=time.time()
for a in ['paged','contiguous','virtual'][:H]:
 e=mk('qwen3-0.6b',a);t=LaunchTimer(e,True)
 for s in ps(np.random.default_rng(0),((256,0,0,0,0),)):drive(e,s)
 t.device_times();t.close();e.close();del e,t
e=mk(M);t=LaunchTimer(e,True) if W=='prof' else None
if W=='prof':[drive(e,s) for s in ps(np.random.default_rng(0),((256,0,0,0,0),(128,32,1024,16,512)))]
else:drive(e,make_workload(dict(name='sharegpt',num_requests=300,seed=0),e.model_config.vocab_size,2048))
R=[(r.num_seqs,r.waiting,r.preempted,r.prefill_tokens,r.host_s,r.duration) for r in e.step_records]
d=pd.DataFrame(R,columns=['b','w','p','pf','h','dur']);d.to_csv(OUT)
d=d[(d.pf==0)&(d.b>0)]
print(M,W,H,round(time.time()-t0),(d.groupby(pd.cut(d.b,[0,32,64,96,128,160,192,256]),observed=True).h.median()*1e3).round(3).to_dict(),flush=True)
