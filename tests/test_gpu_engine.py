"""The engine on a GPU: bf16 greedy parity with HF for every allocator, CUDA graphs, sampling."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from experiments.parity import compare, hf_greedy, match_rate

pytestmark = pytest.mark.gpu

# virtual: one 2 MiB page per range holds thousands of tiny-model tokens, so pages
# shared by all layers and a pool of a page per sequence slot
ALLOCATORS = [("paged", {}), ("contiguous", {"policy": "max"}), ("virtual", {"layout": "shared"})]
MAX_TOKENS = 24
# bf16 logits carry ~3 significant digits: a gap below this is a tie, not a bug
TIE = 0.06


def _prompts(vocab, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [1, 7, 33, 100, 250, 16, 64, 5][:n]
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lens]


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    from conftest import make_hf_checkpoint

    path = tmp_path_factory.mktemp("tiny_bf16")
    hf = make_hf_checkpoint(path, "llama", seed=5, hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
                            intermediate_size=256, vocab_size=512)
    return str(path), hf.to("cuda", torch.bfloat16)


@pytest.fixture(scope="module")
def qwen3_06b_shape(tmp_path_factory):
    """A random model of Qwen3-0.6B's shape (fewer layers keep the test quick)."""
    import transformers

    path = tmp_path_factory.mktemp("qwen3_06b")
    cfg = transformers.Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                                   num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                   tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=4096,
                                   eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    hf.save_pretrained(str(path), safe_serialization=True)
    return str(path), hf.to("cuda")


# and paged with decode steps of up to 16 sequences through kernels.small_linear (fused_gemv_max_tokens), and
# both with the Triton kernels launched with programmatic dependent launch (enable_pdl: kernels/pdl.py)
PARITY = [(a, args, 0, False) for a, args in ALLOCATORS] + [("paged", {}, 16, False), ("paged", {}, 0, True),
                                                            ("paged", {}, 16, True)]


@pytest.mark.parametrize("allocator,args,gemv,pdl", PARITY,
                         ids=[a + ("-small-linear" if g else "") + ("-pdl" if p else "") for a, _, g, p in PARITY])
@pytest.mark.parametrize("model", ["tiny_bf16", "qwen3_06b_shape"])
def test_bf16_greedy_parity(request, model, allocator, args, gemv, pdl):
    path, hf = request.getfixturevalue(model)
    prompts = _prompts(hf.config.vocab_size)
    expected = hf_greedy(hf, prompts, MAX_TOKENS)
    llm = LLM(path, allocator=allocator, allocator_args=dict(args), device="cuda", dtype="bfloat16",
              max_model_len=512, max_num_seqs=16, kv_cache_tokens=8192 if allocator != "virtual" else 16 * 8192,
              fused_gemv_max_tokens=gemv, enable_pdl=pdl)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    divs = compare(hf, prompts, expected, [o.token_ids for o in outs])
    rate = match_rate(divs)
    print(f"\n{model}/{allocator}: match rate {rate:.3f}; first divergences "
          f"{[(d.prompt, d.matched, round(d.logit_gap, 4)) for d in divs if d.matched < d.total]}")
    for d in divs:
        assert d.matched == d.total or d.logit_gap <= TIE, f"prompt {d.prompt} diverged at a non-tie: {d}"
    assert rate >= 0.5


@pytest.mark.parametrize("mode", ["piecewise", "full"])
@pytest.mark.parametrize("allocator,args", ALLOCATORS, ids=[a for a, _ in ALLOCATORS])
def test_cuda_graphs_equal_eager(tiny_bf16, allocator, args, mode):
    """Decode graphs and piecewise or full graphs of prefill/mixed steps (a 96-token budget splits
    the prompts into chunks beside decodes): the eager engine's tokens, every allocator."""
    path, _ = tiny_bf16
    prompts = _prompts(512)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16, max_num_batched_tokens=96,
                  allocator=allocator, allocator_args=dict(args),
                  kv_cache_tokens=8192 if allocator != "virtual" else 16 * 8192)
    eager = LLM(path, enforce_eager=True, **common).generate(prompts, params)
    graphs = LLM(path, enforce_eager=False, cuda_graph_mode=mode, **common)
    runner = graphs.engine.runner
    assert runner.graphs is not None and runner.mixed_graphs is not None and runner.mixed_graphs.graphs
    calls = []
    run = runner.mixed_graphs.run
    runner.mixed_graphs.run = lambda x, *a: calls.append(x if mode == "piecewise" else len(x.input_ids)) or run(x, *a)
    out = graphs.generate(prompts, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in eager]
    assert len(calls) >= 4 and max(calls) > 16


@pytest.mark.parametrize("mode", ["piecewise", "full"])
def test_graphs_with_pdl_equal_eager_without(tiny_bf16, mode):
    """enable_pdl (kernels/pdl.py) with small_linear decodes, captured in decode graphs and piecewise or
    full graphs of prefill/mixed steps (piecewise: the attentions launched eagerly between graph replays,
    with PDL too): the tokens of the eager engine without PDL, bit for bit in fp32."""
    path, _ = tiny_bf16
    prompts = _prompts(512)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16, max_num_batched_tokens=96,
                  allocator="paged", kv_cache_tokens=8192, fused_gemv_max_tokens=16)
    eager = LLM(path, enforce_eager=True, **common).generate(prompts, params)
    llm = LLM(path, enforce_eager=False, cuda_graph_mode=mode, enable_pdl=True, **common)
    assert llm.engine.model.pdl and llm.engine.runner.mixed_graphs.graphs
    out = llm.generate(prompts, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in eager]


@pytest.mark.parametrize("mode", ["eager", "piecewise", "full"])
def test_prompt_attention_qkv_equals_cache_on_gpu(tiny_bf16, mode):
    """prompt_attention=qkv (PAGED): steps of whole prompts attend over their own K/V projection
    (eager and full graphs; piecewise graphs read the cache), the tokens of reading the cache; the
    long prompts' later chunks and the decodes read the cache."""
    path, _ = tiny_bf16
    prompts = _prompts(512)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16, max_num_batched_tokens=96,
                  allocator="paged", kv_cache_tokens=8192, enforce_eager=mode == "eager",
                  cuda_graph_mode="full" if mode == "eager" else mode)
    want = LLM(path, **common).generate(prompts, params)
    llm = LLM(path, prompt_attention="qkv", **common)
    runner = llm.engine.runner
    assert runner.prompt_qkv
    own = []
    if mode == "full":  # full graphs take the step's host arrays: no device metadata built
        run = runner.mixed_graphs.run
        runner.mixed_graphs.run = lambda inputs, own_kv=False, *a: own.append(own_kv) or run(inputs, own_kv, *a)
    else:
        meta_of = runner._metadata
        runner._metadata = lambda inputs, group=0, own_kv=False: own.append(own_kv) or meta_of(inputs, group, own_kv)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert False in own and (True in own) == (mode != "piecewise")


def test_seeded_sampling_is_reproducible_on_gpu(tiny_bf16):
    path, _ = tiny_bf16
    llm = LLM(path, device="cuda", max_model_len=256, kv_cache_tokens=4096)
    p = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = llm.generate([[5, 6, 7]], p)[0].token_ids
    b = llm.generate([[5, 6, 7], [9, 10]], [p, SamplingParams(max_tokens=4, temperature=1.0)])[0].token_ids
    assert a == b


def test_async_scheduling_equals_sync_on_gpu(tiny_bf16):
    """Tokens fed to the next step on the device, pinned double-buffered inputs, CUDA graphs:
    the same tokens as the synchronous engine."""
    path, _ = tiny_bf16
    prompts = _prompts(512)
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
              SamplingParams(n=2, max_tokens=12, temperature=0.9, seed=3, ignore_eos=True)]
    common = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16, kv_cache_tokens=8192)
    for p in params:
        want = LLM(path, async_scheduling=False, **common).generate(prompts, p)
        got = LLM(path, async_scheduling=True, **common).generate(prompts, p)
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]


def test_async_virtual_reclaiming_pages_equals_sync_on_gpu(tmp_path):
    """A pool too small for every slot's pages: growing sequences unmap idle slots' pages while a
    step is in flight (the allocator waits for it first: unmapping under a running kernel faults)."""
    from conftest import make_hf_checkpoint

    # 4 layers x 8 KV heads x 64 x fp32, K and V: 16 KiB a token, 128 tokens a 2 MiB page
    make_hf_checkpoint(tmp_path, "llama", seed=5, hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
                       intermediate_size=512, vocab_size=512, num_hidden_layers=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 512, (k,), generator=g).tolist() for k in [100, 250, 180, 33, 300, 150, 220, 64] * 3]
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16, kv_cache_tokens=2048,
                  allocator="virtual", allocator_args={"layout": "shared"})
    want = LLM(str(tmp_path), async_scheduling=False, **common).generate(prompts, p)
    llm = LLM(str(tmp_path), async_scheduling=True, **common)
    backend, unmaps = llm.engine.allocator.backend, []
    inner = backend.unmap

    def unmap(r, page):
        unmaps.append(page)
        inner(r, page)

    backend.unmap = unmap
    got = llm.generate(prompts, p)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert len(unmaps) > 0


def test_async_scheduling_with_prefix_caching_equals_sync_on_gpu(tiny_bf16):
    """A second turn (prompt + first answer) hits blocks that filled while their last token was
    still on the device: same tokens and hits as the synchronous engine."""
    path, _ = tiny_bf16
    first = [p[:40] for p in _prompts(512)][:6]
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16, kv_cache_tokens=8192,
                  enable_prefix_caching=True)
    runs = []
    for async_ in (False, True):
        llm = LLM(path, async_scheduling=async_, **common)
        a = llm.generate(first, p)
        b = llm.generate([q + o.token_ids for q, o in zip(first, a)], p)
        runs.append(([o.token_ids for o in a + b], [o.metrics.num_cached_tokens for o in b]))
    assert runs[0] == runs[1] and sum(runs[1][1]) > 0


@pytest.mark.parametrize("allocator,args", ALLOCATORS[:2], ids=[a for a, _ in ALLOCATORS[:2]])
def test_decode_batches_launched_longest_first_equal_as_scheduled_on_gpu(qwen3_06b_shape, allocator, args,
                                                                        monkeypatch):
    """Switched on, from SEQ_MAJOR_FROM sequences a decode graph launches sequence by sequence, its batch
    longest first (engine/runner.py): 160 ragged sequences of Qwen3-0.6B's heads (one split),
    asynchronous steps, the same tokens as head by head in the order scheduled."""
    import kernels.metadata as metadata
    from kernels.triton_attention import choose_config

    path, hf = qwen3_06b_shape
    c = hf.config
    heads = dict(max_query_len=1, max_seq_len=512, num_kv_heads=c.num_key_value_heads,
                 group=c.num_attention_heads // c.num_key_value_heads, head_dim=c.head_dim, elem_size=2,
                 num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, c.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 300, (160,), generator=g)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    common = dict(device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=192, async_scheduling=True,
                  allocator=allocator, allocator_args=dict(args), kv_cache_tokens=160 * 512)
    outs, seen = [], []
    for threshold in (metadata.SEQ_MAJOR_FROM, 10**9):  # on (KVLAB_SEQ_MAJOR_MIN_SEQS=128), off
        monkeypatch.setattr(metadata, "SEQ_MAJOR_MIN_SEQS", threshold)  # the kernel config's and the runner's
        assert choose_config(num_seqs=160, **heads).seq_major == (threshold < 10**9)
        llm = LLM(path, **common)
        forward = llm.engine.runner.forward
        lens = []
        llm.engine.runner.forward = lambda inputs, feed=None: (
            lens.append(inputs.seq_lens.tolist()) if inputs.num_prefill_tokens == 0 else None) or forward(inputs, feed)
        outs.append([o.token_ids for o in llm.generate(prompts, params)])
        seen.append([x for x in lens if len(x) >= 128])
    # rows of a GEMM may round differently at another position in the batch (a bf16 near-tie then
    # flips a greedy token); a wrong order would give sequences each other's tokens: none would match
    same = sum(a == b for a, b in zip(*outs))
    assert same >= 0.95 * len(prompts), same
    assert seen[0] and all(x == sorted(x, reverse=True) for x in seen[0])
    assert any(x != sorted(x, reverse=True) for x in seen[1])


_WAVE = """
import json, sys
import torch
from engine import LLM, SamplingParams
from engine.runner import ModelRunner
from experiments.profile_wave import lazy_gemm_loads

path, warm, graphs = sys.argv[1], sys.argv[2] == "warm", int(sys.argv[3])
if not warm:
    ModelRunner.warm_gemms = lambda self: []
# the sim validation's offline config, where the loads were found (a smaller one loaded its GEMM
# kernels in the warm-up's own shapes already); graphs to 2048 tokens leave its 8k steps eager
llm = LLM(path, device="cuda", dtype="bfloat16", max_model_len=2048, max_num_seqs=256, kv_cache_tokens=40000,
          max_num_batched_tokens=8192, cuda_graph_max_tokens=graphs, async_scheduling=True)
eng = llm.engine
g = torch.Generator().manual_seed(4)
lens = torch.empty(300).log_normal_(4.6, 0.9, generator=g).clamp(8, 1000).int()  # ShareGPT-like, mean ~160
for i, n in enumerate(lens.tolist()):
    eng.add_request(str(i), torch.randint(4, 1000, (n,), generator=g).tolist(),
                    SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
    while eng.has_unfinished_requests():
        eng.step()
loads, inside = lazy_gemm_loads(prof.events())
print(json.dumps(dict(loads=loads, inside=inside, max_prefill=max(r.prefill_tokens for r in eng.step_records))))
"""


def _first_wave(path: str, warm: bool, graphs: int) -> dict:
    """A first wave of 300 ragged prompts (eager steps above the graphs, a new number of sampled rows
    each step) in a fresh process (kernels load once a process), with or without ``warm_gemms``."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", _WAVE, path, "warm" if warm else "cold", str(graphs)],
                          capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_first_prefill_wave_loads_no_gemm_kernel_lazily(qwen3_06b_shape):
    """The default engine (graphs up to the token budget, ``ModelRunner.warm_gemms`` in the warm-up)
    loads no GEMM kernel at its first launch in the first wave (such a load waits for the device to go
    idle). With graphs to 2048 tokens its 8k steps run eager: without the warm-up's GEMMs they load
    kernels (the control), with them fewer (its grid of token counts misses some)."""
    path, _ = qwen3_06b_shape
    default = _first_wave(path, True, EngineConfig.cuda_graph_max_tokens)
    cold, warm = _first_wave(path, False, 2048), _first_wave(path, True, 2048)
    assert warm["max_prefill"] > 2048 and default["max_prefill"] > 2048  # the budget's steps were among them
    assert cold["inside"] > 0, cold
    assert warm["inside"] < cold["inside"], (warm, cold)
    assert default["inside"] == 0, default
