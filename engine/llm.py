"""LLM: offline batch generation over an LLMEngine (the vLLM entry point)."""
from __future__ import annotations

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "tiny-llama", allocator: str = "paged", **kwargs):
        allocator_args = kwargs.pop("allocator_args", {})
        # allocator options may be given flat, e.g. LLM(block_size=8) or LLM(policy="pow2")
        for key in ("block_size", "policy", "page_size", "layout", "backend"):
            if key in kwargs:
                allocator_args[key] = kwargs.pop(key)
        kwargs.setdefault("stream_outputs", False)  # generate() reads finished requests only
        self.engine = LLMEngine(EngineConfig(model=model, allocator=allocator, allocator_args=allocator_args, **kwargs))
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        """vLLM's accessor, the same object as ``tokenizer`` (an HF tokenizer for a checkpoint with
        tokenizer files; a preset's ``ByteTokenizer`` otherwise)."""
        return self.engine.tokenizer

    def generate(
        self,
        prompts: list[str | list[int] | dict] | str | list[int] | dict,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        *,
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        A prompt is text, token ids, or as in vLLM a dict ``{"prompt": text}`` (TextPrompt) or
        ``{"prompt_token_ids": ids}`` (TokensPrompt). ``sampling_params`` (vLLM's name; ``params``
        is the same) is one SamplingParams for all prompts or one per prompt.
        Every prompt is checked before any is queued, so a bad one costs no work.
        """
        if params is not None:
            if sampling_params is not None:
                raise ValueError("give sampling_params or params, not both")
            sampling_params = params
        if not isinstance(prompts, (str, list, tuple, dict)) and not hasattr(prompts, "tolist"):
            raise ValueError(f"prompts: give text, token ids, or a list of them, got {type(prompts).__name__}")
        if hasattr(prompts, "tolist"):  # a numpy array: one prompt's ids, or a row per prompt
            prompts = prompts.tolist()
        if isinstance(prompts, (str, dict)) or (prompts and not _is_prompt(prompts[0])):
            prompts = [prompts]
        prompts = [_prompt_of(p, i) for i, p in enumerate(prompts)]
        params = SamplingParams() if sampling_params is None else sampling_params
        # only None means the defaults: a falsy mistake ({}, 0) is refused below, not replaced
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        for i, p in enumerate(params_list):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}]: give a SamplingParams, got {type(p).__name__}")
        ids = []
        for prompt, p in zip(prompts, params_list):
            rid = f"gen-{self._counter}"
            self._counter += 1
            self.engine.validate(rid, self.engine.encode(prompt)[1], p)
            ids.append(rid)
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.engine.add_request(rid, prompt, p)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [done[rid] for rid in ids]


PROMPT_KEYS = ("prompt", "prompt_token_ids")  # vLLM's TextPrompt / TokensPrompt keys that kvlab runs


def _is_prompt(x) -> bool:
    """Whether ``x`` is one prompt (text, ids, a prompt dict, a 1-d numpy array or tensor of ids)
    rather than one token id: a list of arrays is a prompt per array, not one prompt."""
    return isinstance(x, (str, list, tuple, dict)) or getattr(x, "ndim", 0) >= 1


def _prompt_of(prompt, i: int):
    """A prompt as text or token ids: vLLM's TextPrompt / TokensPrompt dicts are unwrapped.

    Each key must hold its own kind (text in ``prompt``, ids in ``prompt_token_ids``): a string of
    "ids" would otherwise be tokenized as text. Keys kvlab cannot honour (``multi_modal_data``, ...)
    are refused rather than silently dropped."""
    if not isinstance(prompt, dict):
        # an array's or a tensor's ids as Python ints (a tensor's items are tensors, not ids)
        return prompt.tolist() if getattr(prompt, "ndim", 0) >= 1 else prompt
    if not set(prompt) & set(PROMPT_KEYS):
        raise ValueError(f"prompts[{i}]: a prompt dict needs 'prompt' (text) or 'prompt_token_ids', "
                         f"got keys {sorted(map(str, prompt))}")
    other = sorted(map(str, set(prompt) - set(PROMPT_KEYS)))
    if other:
        raise ValueError(f"prompts[{i}]: kvlab takes no {other} in a prompt dict, only 'prompt' (text) "
                         "or 'prompt_token_ids': leave them out")
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if isinstance(ids, (str, bytes, dict)):
            raise ValueError(f"prompts[{i}]: 'prompt_token_ids' must be a list of token ids, got "
                             f"{type(ids).__name__} (give text as {{'prompt': text}})")
        return ids.tolist() if getattr(ids, "ndim", 0) >= 1 else ids
    text = prompt["prompt"]
    if not isinstance(text, str):
        raise ValueError(f"prompts[{i}]: 'prompt' must be text, got {type(text).__name__} "
                         "(give token ids as {'prompt_token_ids': ids})")
    return text
