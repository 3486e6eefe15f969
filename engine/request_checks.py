"""The checks a request passes before anything is queued: its prompt read as text or token ids,
then every field against what this engine can ever run (vocabulary, max_model_len, the pool,
beam search's needs), each refusal naming the field and the fix. A mixin of LLMEngine."""
from __future__ import annotations

from allocators.checks import is_int
from engine.sampling_params import SamplingParams
from engine.scheduler import group_kv_tokens
from engine.tokenizer import has_text
from kernels.metadata import Addressing


class RequestChecksMixin:
    def encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text or as token ids (Python or numpy ints,
        stored as Python ints); ValueError for anything else."""
        if isinstance(prompt, str):
            try:
                return prompt, self.tokenizer.encode(prompt)
            except UnicodeError as e:  # e.g. a lone surrogate: no tokenizer can take it
                raise ValueError(f"the prompt is not valid text ({e.reason} at character {e.start}): "
                                 "give UTF-8 text or token ids") from None
        try:
            ids = list(prompt)
        except TypeError:
            raise ValueError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}") from None
        # numpy ints (an array's items) are the same ids; a bool is not an id (checked at C speed first)
        if set(map(type, ids)) - {int}:
            bad = next((t for t in ids if not is_int(t)), None)
            if bad is not None:
                raise ValueError(f"token ids must be whole numbers, got {bad!r} ({type(bad).__name__})")
            ids = [int(t) for t in ids]
        return None, ids

    def validate(self, request_id: str, token_ids: list[int], params: SamplingParams) -> None:
        """Reject what can never run, before anything is queued."""
        if request_id in self.requests:
            raise ValueError(f"request id '{request_id}' is already in use: give each request its own id")
        if not token_ids:
            raise ValueError(f"request '{request_id}': the prompt is empty")
        n = len(token_ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"request '{request_id}': prompt of {n} tokens does not fit max_model_len={self.max_model_len} "
                "(it needs room for at least one output token): shorten the prompt or raise max_model_len")
        vocab = self.model_config.vocab_size
        # plain ints within the vocabulary (checked at C speed), else the ones that are not
        plain = set(map(type, token_ids)) == {int} and min(token_ids) >= 0 and max(token_ids) < vocab
        bad = [] if plain else [t for t in token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"request '{request_id}': token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request '{request_id}': stop_token_ids {bad[:5]} outside the vocabulary [0, {vocab})")
        if params.stop and not has_text(self.tokenizer):  # stop strings would never match
            raise self.tokenizer.error("stop strings")
        if params.stop and not self.config.detokenize:  # no text to find them in
            raise ValueError(f"request '{request_id}': stop strings need the output text, but the engine runs with "
                             "detokenize=False: set detokenize=True, or stop on token ids (stop_token_ids)")
        if params.beam_width > 1:
            if self.config.async_scheduling and not self.async_auto:
                raise ValueError(f"request '{request_id}': beam search needs async_scheduling=false or auto "
                                 "(beams are chosen from the step's tokens before the next step is scheduled)")
            if not self.allocator.supports_fork:
                why = ("layer groups cannot fork (kv_grouping=shared): set kv_grouping=none or beam_width=1"
                       if getattr(self.allocator, "plan", None) is not None
                       else f"'{self.config.allocator}' cannot")
                raise ValueError(f"request '{request_id}': beam search needs an allocator that can fork ({why})")
            # every live beam runs in each step of the search (Scheduler._beam_cap)
            most = self.config.step_sequences
            if params.beam_width > most:
                raise ValueError(f"request '{request_id}': beam_width={params.beam_width} beams run in one step "
                                 f"but a step holds at most {most} sequences (max_num_seqs="
                                 f"{self.config.max_num_seqs}, max_num_batched_tokens="
                                 f"{self.config.max_num_batched_tokens}): lower beam_width or raise them")
        max_tokens = self.max_model_len if params.max_tokens is None else params.max_tokens
        need = min(n + max(max_tokens, 1), self.max_model_len)
        fit = self.allocator.max_fit_tokens()
        if need > fit:
            raise ValueError(
                f"request '{request_id}' may need {need} KV tokens but allocator '{self.config.allocator}' "
                f"can give one request at most {fit}: raise kv_cache_memory / kv_cache_tokens, "
                "or lower max_tokens")
        k = params.num_seqs
        if k > 1 and self.allocator.supports_fork:
            # a request's samples (beams) are scheduled and preempted together, so they must fit the
            # pool together: else the group is admitted, preempted and readmitted for ever
            group = group_kv_tokens(n, [need] * k, self.allocator.block_size,
                                    share_prompt=self.allocator.mode == Addressing.PAGED)  # copies share nothing
            if group > self.allocator.capacity_tokens:
                raise ValueError(
                    f"request '{request_id}': its {k} samples may need {group} KV tokens together but allocator "
                    f"'{self.config.allocator}' holds {self.allocator.capacity_tokens}: raise kv_cache_memory / "
                    f"kv_cache_tokens, or lower {'beam_width' if params.beam_width > 1 else 'n'} or max_tokens")
