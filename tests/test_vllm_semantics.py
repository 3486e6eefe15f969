"""Output semantics a vLLM user relies on, checked against vLLM's documented behaviour:
the text of a sample that a stop token or EOS ends, stop strings and min_tokens, raw logprobs,
and the input forms of ``LLM.generate``."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.frontend_output import FrontendOutput
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.tokenizer import ByteTokenizer

PROMPT = [5, 6, 7, 8]
GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-llama", device="cpu", max_model_len=128, kv_cache_tokens=1024)


@pytest.fixture(scope="module")
def greedy(llm):
    return llm.generate([PROMPT], SamplingParams(**GREEDY))[0]


def _bytes(text: str) -> list[int]:
    return ByteTokenizer(320, bos_token_id=None).encode(text)


def test_a_stop_token_s_text_is_not_in_the_output(llm, greedy):
    """vLLM (v1 detokenizer): a sample ended by a stop token or EOS keeps the token id but not
    its text (unless include_stop_str_in_output)."""
    tok = llm.tokenizer
    stop_at = greedy.token_ids[2]
    out = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == greedy.token_ids[:3] and out.outputs[0].stop_reason == stop_at
    assert tok.decode([stop_at]) and out.text == tok.decode(greedy.token_ids[:2])
    # streamed: the deltas add up to the same text
    eng = llm.engine
    eng.config.stream_outputs = True
    try:
        eng.add_request("s", PROMPT, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at],
                                                    output_kind="delta"))
        text = ""
        while eng.has_unfinished_requests():
            text += "".join(o.outputs[0].text for o in eng.step() if o.outputs)
    finally:
        eng.config.stream_outputs = False
    assert text == out.text


def test_the_front_end_leaves_out_the_stop_token_s_text_too():
    tok = ByteTokenizer(320, bos_token_id=None, eos_token_ids=[2])
    ids = _bytes("abc")
    fe = FrontendOutput(tok, [5], SamplingParams(stop_token_ids=[ids[-1]]))
    core = RequestOutput("r", [5], [CompletionOutput(0, ids, "", "stop", ids[-1])], True,
                         RequestMetrics(0.0, 0.0, 0.0, 0.0))
    assert fe.process(core).outputs[0].text == "ab"
    # a sample that ends by length keeps every token's text
    fe = FrontendOutput(tok, [5], SamplingParams())
    core.outputs = [CompletionOutput(0, ids, "", "length", None)]
    assert fe.process(core).outputs[0].text == "abc"


@pytest.mark.parametrize("chunks", [[8], [1] * 8, [3, 2, 3], [4, 4]])
def test_stop_strings_ignore_the_text_of_the_first_min_tokens(chunks):
    """vLLM: the text of the first min_tokens tokens is not searched for stop strings; a stop
    string that ends in a later token counts, even where it starts earlier."""
    tok = ByteTokenizer(320, bos_token_id=None)
    ids = _bytes("abcXdefX")
    for stop, min_tokens, want in [("X", 4, "abcXdef"), ("X", 3, "abc"), ("cX", 4, None), ("Xd", 4, "abc"),
                                   ("b", 4, None)]:
        det = IncrementalDetokenizer(tok, [5], [stop], min_tokens)
        at = 0
        for n in chunks:
            det.add(ids[at:at + n])
            at += n
        det.flush()
        det.delta(True)
        assert det.stop_found == (stop if want is not None else None), (stop, min_tokens)
        assert det.text() == (want if want is not None else "abcXdefX"), (stop, min_tokens)


def test_min_tokens_with_a_stop_string_in_the_last_guarded_token(llm, greedy):
    """The engine end to end: a stop string that only the min_tokens-th token's text holds
    does not stop the sample there."""
    texts = [llm.tokenizer.decode([t]) for t in greedy.token_ids]
    k = next(i for i in range(1, len(texts)) if texts[i] and texts[i][-1] not in "".join(texts[:i]))
    stop = texts[k][-1]
    out = llm.generate([PROMPT], SamplingParams(**GREEDY, stop=[stop], min_tokens=k + 1))[0]
    assert len(out.token_ids) > k + 1
    assert out.text.startswith("".join(texts[:k + 1]))


def test_logprobs_are_the_model_s_before_min_tokens_bans_eos(llm, monkeypatch):
    """vLLM returns raw logprobs by default: the EOS that min_tokens forbids keeps its logprob."""
    model, eos = llm.engine.model, llm.engine.eos_token_ids[0]
    plain = model.compute_logits

    def eos_first(hidden):  # EOS the likeliest token everywhere
        logits = plain(hidden)
        logits[:, eos] = logits.max(dim=-1).values + 3.0
        return logits

    monkeypatch.setattr(model, "compute_logits", eos_first)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=3, min_tokens=3, temperature=0, logprobs=1))[0]
    c = out.outputs[0]
    assert eos not in c.token_ids and len(c.token_ids) == 3
    for lp, top in zip(c.logprobs, c.top_logprobs):
        assert top[0][0] == eos and lp < top[0][1]


def test_generate_takes_vllm_s_keyword_and_prompt_dicts(llm, greedy):
    sp = SamplingParams(**GREEDY)
    assert llm.get_tokenizer() is llm.tokenizer  # vLLM's accessor
    assert llm.generate([PROMPT], sampling_params=sp)[0].token_ids == greedy.token_ids
    assert llm.generate({"prompt_token_ids": PROMPT}, sp)[0].token_ids == greedy.token_ids
    outs = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt": "hi"}], [sp, sp])
    assert outs[0].token_ids == greedy.token_ids
    assert outs[1].prompt == "hi" and outs[1].prompt_token_ids == llm.tokenizer.encode("hi")
    assert llm.generate([PROMPT], (sp,))[0].token_ids == greedy.token_ids
    with pytest.raises(ValueError, match="'prompt'.*'prompt_token_ids'"):
        llm.generate([{"text": "hi"}], sp)
    with pytest.raises(ValueError, match="not both"):
        llm.generate([PROMPT], sp, params=sp)


# -- include_stop_str_in_output (vLLM: the stop string, or a stop token's text, stays) ----------
def _stream_text(det: IncrementalDetokenizer, ids: list[int], chunks: list[int], stop_terminated: bool = False):
    """Feed ``ids`` in ``chunks``, handing text out after each (streaming), as the output stage does."""
    text, at = "", 0
    for j, n in enumerate(chunks):
        det.add(ids[at:at + n], stop_terminated=stop_terminated and at + n == len(ids))
        at += n
        last = at == len(ids) or det.stop_found is not None
        if last:
            det.flush()
        text += det.delta(last)
        if det.stop_found is not None:
            break
    return text


@pytest.mark.parametrize("chunks", [[8], [1] * 8, [3, 2, 3], [4, 4], [2, 6]])
def test_include_stop_str_in_output_keeps_the_stop_string(chunks):
    """The text ends where the stop string ends, even when it starts in text already handed out
    (nothing is held back with include_stop_str_in_output); without it, where it starts."""
    tok = ByteTokenizer(320, bos_token_id=None)
    ids = _bytes("abcXdefXgh")
    chunks = chunks + [len(ids) - sum(chunks)]
    for stop, min_tokens, found, keep, cut in [
            (["X"], 0, "X", "abcX", "abc"), (["cX"], 0, "cX", "abcX", "ab"),
            (["Xd", "fX"], 0, "Xd", "abcXd", "abc"), (["X"], 4, "X", "abcXdefX", "abcXdef"),
            (["cX"], 3, "cX", "abcX", "ab"),  # starts in the text of min_tokens, ends after it
            (["cX"], 4, None, None, None), (["b"], 4, None, None, None),
            (["Xg"], 0, "Xg", "abcXdefXg", "abcXdef")]:
        for include, want in ((True, keep), (False, cut)):
            det = IncrementalDetokenizer(tok, [5], stop, min_tokens, include_stop_str_in_output=include)
            got = _stream_text(det, ids, chunks)
            assert got == (want if want is not None else "abcXdefXgh"), (stop, min_tokens, include)
            assert det.text() == got and det.stop_found == found, (stop, min_tokens, include)


def test_include_stop_str_in_output_hands_text_out_at_once():
    """Nothing is held back for a stop string's sake: each token's text streams as it comes."""
    tok = ByteTokenizer(320, bos_token_id=None)
    det = IncrementalDetokenizer(tok, [5], ["XYZ"], include_stop_str_in_output=True)
    held = IncrementalDetokenizer(tok, [5], ["XYZ"])
    for c in "abXY":
        for d in (det, held):
            d.add(_bytes(c))
    assert det.delta(False) == "abXY" and held.delta(False) == "ab"


def test_include_stop_str_in_output_keeps_the_stop_token_s_text():
    tok = ByteTokenizer(320, bos_token_id=None, eos_token_ids=[2])
    ids = _bytes("abc")
    fe = FrontendOutput(tok, [5], SamplingParams(stop_token_ids=[ids[-1]], include_stop_str_in_output=True))
    core = RequestOutput("r", [5], [CompletionOutput(0, ids, "", "stop", ids[-1])], True,
                         RequestMetrics(0.0, 0.0, 0.0, 0.0))
    assert fe.process(core).outputs[0].text == "abc"
    det = IncrementalDetokenizer(tok, [5], [], include_stop_str_in_output=True)
    assert _stream_text(det, ids, [1, 2], stop_terminated=True) == "abc"


def test_include_stop_str_in_output_through_llm_generate(llm, greedy):
    """End to end (the engine's output stage), whole and streamed: a stop string and a stop
    token stay in the text with include_stop_str_in_output, and are cut without it."""
    tok = llm.tokenizer
    full = greedy.text
    texts = [tok.decode([t]) for t in greedy.token_ids]
    # a stop string that ends inside a later token's text and starts in an earlier one's
    k = next(i for i in range(2, len(texts)) if texts[i] and texts[i - 1])
    start = len("".join(texts[:k])) - 1
    stop = full[start:start + 2]
    assert stop and full.find(stop) == start, "pick a stop string that occurs first here"
    stop_tok = greedy.token_ids[2]
    for kw, with_, without in [(dict(stop=[stop]), full[:start + 2], full[:start]),
                               (dict(stop_token_ids=[stop_tok]), tok.decode(greedy.token_ids[:3]),
                                tok.decode(greedy.token_ids[:2]))]:
        for include, want in ((True, with_), (False, without)):
            p = SamplingParams(max_tokens=12, temperature=0, include_stop_str_in_output=include, **kw)
            out = llm.generate([PROMPT], p)[0]
            assert out.text == want and out.outputs[0].finish_reason == "stop", (kw, include)
            eng = llm.engine
            eng.config.stream_outputs = True
            try:
                eng.add_request(f"s{include}{len(kw)}{stop_tok}", PROMPT,
                                SamplingParams(max_tokens=12, temperature=0, include_stop_str_in_output=include,
                                               output_kind="delta", **kw))
                text = ""
                while eng.has_unfinished_requests():
                    text += "".join(o.outputs[0].text for o in eng.step() if o.outputs)
            finally:
                eng.config.stream_outputs = False
            assert text == want, (kw, include)


# -- LLM.generate's inputs: what vLLM would refuse is refused, not run another way -----------------
@pytest.mark.parametrize("bad", [{}, 0, False, ""])
def test_only_none_means_default_sampling_params(llm, bad):
    """A falsy mistake for sampling_params ({} meant as keyword arguments, 0) is refused, naming
    the type, instead of running with the default SamplingParams (random, 16 tokens)."""
    with pytest.raises(ValueError, match=r"params\[0\]: give a SamplingParams"):
        llm.generate([PROMPT], bad)


@pytest.mark.parametrize("prompt,match", [
    ({"prompt_token_ids": "abc"}, "'prompt_token_ids' must be a list of token ids, got str"),
    ({"prompt": [5, 6, 7]}, "'prompt' must be text, got list"),
    ({"prompt_token_ids": PROMPT, "multi_modal_data": {"image": None}}, r"kvlab takes no \['multi_modal_data'\]"),
    ({}, "a prompt dict needs 'prompt'"),
])
def test_prompt_dicts_hold_their_own_kind(llm, prompt, match):
    """vLLM's TextPrompt holds text and TokensPrompt ids: a string under 'prompt_token_ids' is not
    tokenized as text, and keys kvlab cannot honour are not dropped silently."""
    with pytest.raises(ValueError, match=r"prompts\[0\]: " + match):
        llm.generate([prompt], SamplingParams(**GREEDY))


def test_cumulative_logprob_is_the_sum_of_the_sampled_logprobs(llm):
    """vLLM's CompletionOutput.cumulative_logprob: the sum of the sampled tokens' logprobs with
    logprobs requested (0 included), None without."""
    outs = llm.generate([PROMPT, PROMPT], [SamplingParams(**GREEDY, logprobs=0), SamplingParams(**GREEDY)])
    c = outs[0].outputs[0]
    assert len(c.logprobs) == len(c.token_ids) and c.cumulative_logprob == pytest.approx(sum(c.logprobs))
    assert c.cumulative_logprob < 0
    assert outs[1].outputs[0].cumulative_logprob is None


def test_a_list_of_arrays_is_a_prompt_per_array(llm, greedy):
    """Prompts built with numpy or torch: a list of 1-d arrays (tensors) is one prompt each, as a
    2-d array's rows already were, not one prompt whose "ids" are arrays."""
    import numpy as np

    sp = SamplingParams(**GREEDY)
    for rows in ([np.array(PROMPT), np.array(PROMPT[:3])], [torch.tensor(PROMPT), torch.tensor(PROMPT[:3])]):
        outs = llm.generate(rows, sp)
        assert [o.prompt_token_ids for o in outs] == [PROMPT, PROMPT[:3]]
        assert outs[0].token_ids == greedy.token_ids
        assert llm.generate({"prompt_token_ids": rows[0]}, sp)[0].token_ids == greedy.token_ids
