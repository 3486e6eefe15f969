"""Piecewise CUDA graphs (engine/piecewise_graphs.py): the decomposition of a step into pieces
between attentions, padding to captured sizes included, against the eager forward. On CPU the
pieces are called as they are (Triton interpreter for the fused kernels); on a GPU they are
replayed from captured graphs (test_gpu_engine.py)."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton: the fused kernels of the GPU path (interpreter on CPU)")

from engine.piecewise_graphs import PiecewiseGraphs, token_sizes  # noqa: E402


def test_token_sizes_cover_the_cap_with_bounded_padding():
    assert token_sizes(0) == []
    assert token_sizes(8) == [16]  # one size that holds every step
    sizes = token_sizes(2048)
    assert sizes[0] == 16 and sizes[-1] == 2048 and sizes == sorted(set(sizes))
    assert token_sizes(100)[-1] == 112  # the first size that holds the cap
    for n in range(1, 2049):
        s = next(s for s in sizes if s >= n)
        assert s - n < max(16, n / 8), n  # padding: under a sixteen-token tile or an eighth of the step


@pytest.fixture
def fused_cpu(monkeypatch):
    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _eager_tokens_and_fused_llm(allocator: str, prompt_attention: str = "cache", gemv_max_tokens: int = 0,
                                budget: int = 24):
    """Tokens of the eager fused model for prompts whose steps (a ``budget``-token budget) mix chunked
    prefills with decodes; a second fused LLM whose runner a test gives graphs; its generate."""
    from engine import LLM, SamplingParams

    prompts = [[5, 6, 7, 8, 9, 10, 11], [9, 10], list(range(20, 43))]
    if budget > 24:  # steps of more than one attention tile's queries (tiny-llama: 32)
        prompts += [list(range(50, 100)), [3] * 37]
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    kw = dict(device="cpu", max_model_len=128 if budget > 24 else 64, kv_cache_tokens=512, allocator=allocator,
              max_num_batched_tokens=budget, max_num_seqs=4)
    eager = LLM("tiny-llama", **kw)
    eager.engine.model.fuse()
    want = [o.token_ids for o in eager.generate(prompts, p)]
    llm = LLM("tiny-llama", prompt_attention=prompt_attention, **kw)
    llm.engine.runner.model.fuse(gemv_max_tokens)
    return want, llm, lambda: [o.token_ids for o in llm.generate(prompts, p)]


@pytest.mark.parametrize("allocator,gemv", [("paged", 0), ("contiguous", 0), ("virtual", 0), ("paged", 16)],
                         ids=["paged", "contiguous", "virtual", "paged-small-linear"])
def test_piecewise_steps_equal_eager_steps(fused_cpu, allocator, gemv):
    """Prefill and mixed steps (chunked prompts beside decodes) through the pieces give the eager
    fused model's tokens, every allocator; the steps do take the piecewise path. With small_linear
    for steps of up to 16 tokens, the stream passes between pieces as the whole hidden state."""
    want, llm, generate = _eager_tokens_and_fused_llm(allocator, gemv_max_tokens=gemv)
    runner = llm.engine.runner
    pw = runner.mixed_graphs = PiecewiseGraphs(runner.model, runner.kv_caches, 24, torch.device("cpu"))
    pw.capture()
    assert pw.sizes == [16, 32] and set(pw.pieces) == {16, 32}
    calls = []
    run = pw.run
    pw.run = lambda n, *a: calls.append(n) or run(n, *a)
    got = generate()
    assert got == want
    assert calls and max(calls) > 16 and min(calls) < 16  # both sizes, padded


def test_pieces_leave_padding_slots_unwritten(fused_cpu):
    """Padding rows of a piecewise step write no cache slot: the cache outside the real tokens'
    slots is unchanged."""
    from engine import LLM
    from kernels.metadata import contiguous_metadata

    llm = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256, allocator="contiguous")
    runner = llm.engine.runner
    model = runner.model.fuse()
    pw = PiecewiseGraphs(model, runner.kv_caches, 16, torch.device("cpu"))
    pw.capture()
    before = [k.clone() for k, _ in runner.kv_caches]
    n = 5
    meta = contiguous_metadata(runner.allocator.mode, [n], [n], torch.device("cpu"), 0, 0)
    ids = torch.arange(3, 3 + n)
    hidden = pw.run(n, ids, torch.arange(n), meta.slot_mapping, meta)
    assert hidden.shape[0] == n and torch.isfinite(hidden).all()
    ref = model(ids, torch.arange(n), meta, [(k.clone(), v.clone()) for k, v in runner.kv_caches])
    torch.testing.assert_close(hidden, ref, atol=1e-5, rtol=1e-5)
    written = set(meta.slot_mapping.tolist())
    for (k, _), old in zip(runner.kv_caches, before):
        untouched = [i for i in range(k.shape[0]) if i not in written]
        assert torch.equal(k[untouched], old[untouched])
        assert not torch.equal(k[sorted(written)], old[sorted(written)])


@pytest.mark.parametrize("allocator", ["paged", "contiguous", "virtual"])
def test_full_graph_steps_equal_eager_steps(fused_cpu, allocator):
    """Full graphs (engine/full_graphs.py: attention captured too, its inputs in static buffers
    padded to max_num_seqs empty sequences and a captured token count) give the eager fused
    model's tokens for prefill and mixed steps, every allocator; the steps do take that path."""
    from engine.full_graphs import FullGraphs

    want, llm, generate = _eager_tokens_and_fused_llm(allocator)
    runner = llm.engine.runner
    full = runner.mixed_graphs = runner._mixed_graphs("full", 24, 4, 64)
    assert isinstance(full, FullGraphs) and full.sizes == [16, 32]
    full.capture()
    calls = []
    run = full.run
    full.run = lambda inputs, *a: calls.append((len(inputs.input_ids), len(inputs.seq_lens))) or run(inputs, *a)
    got = generate()
    assert got == want
    assert calls and max(n for n, _ in calls) > 16 and min(n for n, _ in calls) < 16
    assert any(k > 1 for _, k in calls)  # mixed steps: several sequences in one padded graph


@pytest.mark.parametrize("mode", ["full", "piecewise"])
def test_graph_steps_of_whole_prompts_with_prompt_attention_qkv(fused_cpu, mode):
    """prompt_attention=qkv (PAGED): full graphs take a step of whole prompts through their own_kv
    variant (attention over the step's own K and V), the others through the cache's; piecewise
    graphs always read the cache. Tokens as the eager fused model's reading the cache."""
    want, llm, generate = _eager_tokens_and_fused_llm("paged", "qkv")
    runner = llm.engine.runner
    assert runner.prompt_qkv
    graphs = runner.mixed_graphs = runner._mixed_graphs(mode, 24, 4, 64)
    assert graphs.own_kv == (mode == "full")
    graphs.capture()
    calls = []
    run = graphs.run
    if mode == "full":
        graphs.run = lambda inputs, own, *a: calls.append(own) or run(inputs, own, *a)
    else:
        graphs.run = lambda n, *a: calls.append(a[-1].own_kv) or run(n, *a)
    assert generate() == want
    assert False in calls
    assert (True in calls) == (mode == "full")


def test_full_graphs_replay_the_own_kv_graph_they_captured(fused_cpu, monkeypatch):
    """The capture side of prompt_attention=qkv's graphs, on CPU: capture_each stood in by "graphs"
    whose replay runs the captured forward again into its output, as a CUDA graph would. Steps of
    whole prompts replay the own_kv graph (its block table is not copied in: replaying the other
    would read stale rows), which writes the shared output; the tokens are the eager model's."""
    import types

    from engine import full_graphs

    class Replay:
        def __init__(self, forward, s, out):
            self.forward, self.s, self.out = forward, s, out

        def replay(self):
            self.out.copy_(self.forward(self.s))

    captured = []

    def capture_each(sizes, forward, pool=None, prepare=None):
        outs = {}
        for s in sizes:
            if prepare is not None:  # the step graphs start from a step of no sequences
                prepare(s)
                assert (full._tokens(s)[2] == -1).all() and not full.seq_lens.any()
            outs[s] = forward(s)
        captured.append(outs)
        return {s: Replay(forward, s, outs[s]) for s in sizes}, outs, pool

    monkeypatch.setattr(full_graphs, "capture_each", capture_each)
    want, llm, generate = _eager_tokens_and_fused_llm("paged", "qkv")
    runner = llm.engine.runner
    full = runner.mixed_graphs = runner._mixed_graphs("full", 24, 4, 64)
    full.device = types.SimpleNamespace(type="cuda")  # capture() captures
    full.capture()
    assert len(captured) == 3 and full.own_graphs and set(full.own_graphs) == set(full.graphs)
    assert set(full.logit_graphs) == {1, 2, 4}  # the logits of 1-4 sampled rows (max_num_seqs 4)
    assert all(full.own_hidden[s] is full.hidden[s] for s in full.sizes)  # one set of outputs
    replayed = []
    for graphs, own in ((full.graphs, False), (full.own_graphs, True)):
        for s, g in graphs.items():
            g.replay = (lambda g, own: lambda: replayed.append(own) or Replay.replay(g))(g, own)
    rows = []
    for b, g in full.logit_graphs.items():
        g.replay = (lambda g, b: lambda: rows.append(b) or Replay.replay(g))(g, b)
    assert generate() == want
    assert True in replayed and False in replayed
    assert len(rows) == len(replayed) and set(rows) == {1, 2, 4}  # a logits replay a step, by its sampled rows


def _step(qs: list[int], ctx: list[int], sample: list[int] | None = None, base: int = 0):
    """A step's host arrays as ``ModelRunner.forward`` hands them to the graphs: sequences of ``qs``
    new tokens reaching ``ctx``, LINEAR, back to back from slot ``base`` (as ``contiguous_metadata``)."""
    import types

    import numpy as np

    qsl = np.concatenate([[0], np.cumsum(qs)]).astype(np.int32)
    pos = np.concatenate([np.arange(c - q, c) for q, c in zip(qs, ctx)]).astype(np.int64)
    addressing = base + np.concatenate([[0], np.cumsum(ctx)[:-1]]).astype(np.int64)
    seq = np.repeat(np.arange(len(qs)), qs)
    return types.SimpleNamespace(
        input_ids=(7 + 3 * np.arange(int(qsl[-1]))).astype(np.int64) % 250, positions=pos,
        slots=addressing[seq] + pos, qsl=qsl, seq_lens=np.array(ctx, dtype=np.int32), addressing=addressing,
        sample_rows=list(qsl[1:] - 1) if sample is None else sample)


@pytest.mark.parametrize("allocator", ["paged", "contiguous"])
def test_full_graph_steps_of_several_query_tiles_equal_eager_steps(fused_cpu, allocator):
    """Graph sizes of more tokens than an attention tile holds (tiny-llama: 32 query tokens from 48-token
    graphs on), whose tiles the kernel finds by searching the max_num_seqs padded query starts: the eager
    fused model's tokens, mixed steps of several sequences among them."""
    want, llm, generate = _eager_tokens_and_fused_llm(allocator, budget=64)
    runner = llm.engine.runner
    full = runner.mixed_graphs = runner._mixed_graphs("full", 64, 4, 128)
    assert full.sizes == [16, 32, 48, 64]
    calls = []
    run = full.run
    full.run = lambda inputs, *a: calls.append((len(inputs.input_ids), len(inputs.seq_lens))) or run(inputs, *a)
    assert generate() == want
    assert any(n > 32 and k > 1 for n, k in calls)


def _full_graphs(allocator: str, max_tokens: int, max_model_len: int):
    """A fused tiny-llama engine's full graphs (four sequences) on a CPU, not captured."""
    from engine import LLM

    llm = LLM("tiny-llama", device="cpu", max_model_len=max_model_len, kv_cache_tokens=4 * max_model_len,
              allocator=allocator, max_num_seqs=4)
    llm.engine.runner.model.fuse()
    return llm.engine.runner._mixed_graphs("full", max_tokens, 4, max_model_len)


def test_full_graphs_pack_a_step_into_one_buffer(fused_cpu):
    """``FullGraphs.pack``: one int64 array holds the whole step, padded to the captured size as the
    graph needs it: the query starts of empty sequences at the token count, their lengths 0, padding
    tokens' slots -1 (written nowhere), the sampled rows after the addressing."""
    import numpy as np

    full = _full_graphs("contiguous", 24, 64)
    step = _step([5, 1, 3], [5, 20, 9])
    words = full.pack(step, 16)
    S, h = 4, full.head
    assert words.shape == (h + 3 * 16,) and h == 3 * S + 1
    w32 = words[:S + 1].view(np.int32)
    assert w32[:S + 1].tolist() == [0, 5, 6, 9, 9]  # the fourth sequence: empty, starting at n
    assert w32[S + 1:2 * S + 1].tolist() == [5, 20, 9, 0]
    assert words[S + 1:2 * S + 1].tolist() == step.addressing.tolist() + [0]
    assert words[2 * S + 1:3 * S + 1].tolist() == [4, 5, 8, 0]
    assert words[h:h + 9].tolist() == step.input_ids.tolist() and not words[h + 9:h + 16].any()
    assert words[h + 16:h + 25].tolist() == step.positions.tolist()
    assert words[h + 32:h + 41].tolist() == step.slots.tolist() and (words[h + 41:h + 48] == -1).all()


def test_full_graphs_return_the_sampled_rows_logits(fused_cpu):
    """A full-graph step computes the logits of its sampled rows inside the graph (into one static
    buffer): those of the eager model's hidden states at those rows; a step that samples none
    returns no logits. The cache writes are the eager model's too."""
    from engine import LLM
    from kernels.metadata import contiguous_metadata

    llm = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256, allocator="contiguous", max_num_seqs=4)
    runner = llm.engine.runner
    model = runner.model.fuse()
    full = runner._mixed_graphs("full", 24, 4, 64)
    caches = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    step = _step([6, 4, 7], [6, 4, 7], sample=[5, 16])
    hidden, logits = full.run(step)
    meta = contiguous_metadata(runner.allocator.mode, [6, 4, 7], [6, 4, 7], torch.device("cpu"))
    ref = model(torch.from_numpy(step.input_ids), torch.from_numpy(step.positions), meta, caches)
    torch.testing.assert_close(hidden, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, model.compute_logits(ref[[5, 16]]), atol=1e-5, rtol=1e-5)
    for (k, _), (k_ref, _) in zip(runner.kv_caches, caches):
        assert torch.equal(k, k_ref) and k[:17].any()
    step.sample_rows = []
    assert full.run(step)[1] is None


def test_full_graph_steps_copy_their_inputs_once(fused_cpu):
    """A prefill/mixed step through the full graphs builds no device metadata: no per-array copy
    (``HostStaging.to_device``) and no eager logits (``compute_logits``); its words go through one
    pinned buffer (``HostStaging.host``) into the graph's. The tokens stay the eager model's."""
    want, llm, generate = _eager_tokens_and_fused_llm("paged")
    runner = llm.engine.runner
    full = runner.mixed_graphs = runner._mixed_graphs("full", 24, 4, 64)
    full.capture()
    seen: list[str] = []
    for obj, name in ((runner.staging, "to_device"), (runner.staging, "host"), (runner.model, "compute_logits")):
        fn = getattr(obj, name)
        setattr(obj, name, (lambda fn, name: lambda *a, **k: seen.append(name if name != "host" else a[0])
                            or fn(*a, **k))(fn, name))
    steps = []
    run = full.run

    def traced(*a):
        seen.clear()
        out = run(*a)
        steps.append(list(seen))
        return out

    full.run = traced
    assert generate() == want
    assert steps and all(s == ["full_graph"] for s in steps)


def test_full_graphs_refuse_what_they_did_not_capture(fused_cpu):
    from engine import LLM

    llm = LLM("tiny-llama", device="cpu", max_model_len=64, kv_cache_tokens=256, allocator="paged", max_num_seqs=2)
    runner = llm.engine.runner
    runner.model.fuse()
    full = runner._mixed_graphs("full", 16, 2, 64)
    with pytest.raises(ValueError, match="3 sequences"):
        full.run(_step([2, 2, 2], [2, 2, 2]))
    with pytest.raises(ValueError, match="no own_kv graphs"):  # a cache-only engine's graphs
        full.run(_step([2, 2], [2, 2]), True)
    with pytest.raises(ValueError, match="40 tokens"):
        full.run(_step([20, 20], [20, 20]))


@pytest.mark.parametrize("allocator", ["paged", "contiguous"])
def test_decode_graph_steps_equal_eager_steps(fused_cpu, allocator):
    """Decode graphs (engine/cuda_graphs.py), their inputs packed into one buffer and copied once a
    step, called as they are on a CPU: the eager fused model's tokens, batches padded to 1, 2 and 4
    rows (padding rows read nothing and write nowhere)."""
    from engine.cuda_graphs import DecodeGraphs

    want, llm, generate = _eager_tokens_and_fused_llm(allocator)
    runner = llm.engine.runner
    graphs = runner.graphs = DecodeGraphs(runner.model, runner.allocator, runner.kv_caches, runner.table, 4, 64,
                                          torch.device("cpu"))
    assert graphs.sizes == [1, 2, 4]
    calls = []
    run = graphs.run
    graphs.run = lambda inputs, *a: calls.append(len(inputs.seq_lens)) or run(inputs, *a)
    assert generate() == want
    assert {1, 3} <= set(calls)  # three padded to four


def test_decode_graphs_pack_a_step_into_one_buffer():
    """``DecodeGraphs.pack``: sequence lengths as int32 pairs, then addressing, token ids, positions and
    slots of the padded size; padding rows of length 0 and slot -1."""
    import types

    import numpy as np

    from engine.cuda_graphs import DecodeGraphs
    from kernels.metadata import Addressing

    alloc = types.SimpleNamespace(mode=Addressing.LINEAR)
    graphs = DecodeGraphs(None, alloc, [], None, 16, 64, torch.device("cpu"))
    step = types.SimpleNamespace(seq_lens=np.array([9, 4, 30], np.int32), addressing=np.array([0, 64, 128]),
                                 input_ids=np.array([5, 6, 7]), positions=np.array([8, 3, 29]),
                                 slots=np.array([8, 67, 157]))
    words = graphs.pack(step, 4)
    h = graphs.head
    assert h == 8 and words.shape == (h + 16,)
    assert words[:h].view(np.int32).tolist() == [9, 4, 30] + [0] * 13
    assert words[h:].tolist() == [0, 64, 128, 0, 5, 6, 7, 0, 8, 3, 29, 0, 8, 67, 157, -1]
    graphs.packed[:words.size].copy_(torch.from_numpy(words))
    addressing, ids, pos, slots = graphs.static_inputs(4)
    assert graphs.seq_lens[:4].tolist() == [9, 4, 30, 0] and slots.tolist() == [8, 67, 157, -1]
    assert ids.tolist() == [5, 6, 7, 0] and pos.tolist() == [8, 3, 29, 0] and addressing.tolist() == [0, 64, 128, 0]


def test_profile_times_the_prefill_graphs_as_the_engine_runs_them(fused_cpu):
    """``kvlab profile``'s graphs part (``_rows_mixed_graphs``) runs a lone prompt through the engine's
    graphs (full: its host arrays, the logits from the graph; piecewise: device metadata, logits after)
    and reads its token back: one ``<mode>_forward`` row a size and the capture time, here on a CPU through
    the uncaptured forwards. Both modes give the same tokens for the same prompts."""
    from types import SimpleNamespace

    from engine.loader import resolve_config
    from engine.model import CausalLM
    from experiments import profile_models

    mc = resolve_config("tiny-llama")
    model = CausalLM(mc, 256).fuse()
    tokens = {}
    for mode in ("full", "piecewise"):
        caches = profile_models._scratch_caches(mc, 64, torch.float32, torch.device("cpu"))
        got = tokens[mode] = []

        def wall(fn):
            got.append(fn().tolist())
            return 1e-3

        torch.manual_seed(0)  # the same prompts
        with torch.inference_mode():
            rows = profile_models._rows_mixed_graphs(SimpleNamespace(wall=wall), model, caches, "tiny-llama",
                                                     torch.device("cpu"), mode, [16, 20])
        assert [(r["table"], r.get("query")) for r in rows] == [
            (f"{mode}_forward", 16), (f"{mode}_forward", 20), (f"{mode}_capture", 20)]
    assert len(tokens["full"]) == 2 and all(len(t) == 1 for t in tokens["full"])
    assert tokens["full"] == tokens["piecewise"]
