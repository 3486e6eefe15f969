"""Incremental detokenization and stop strings: work per step proportional to the new tokens.

Each sequence keeps a small window of token ids (vLLM's prefix/read offsets): new tokens are
decoded together with the few before them, so that multi-token characters and the spacing
rules of SentencePiece-style tokenizers come out as a whole decode would give them. Text that
may still change is held back: an incomplete UTF-8 character (U+FFFD at the end), and the
last ``len(longest stop string) - 1`` characters, which could be the start of a stop string
(a stop string and what follows it never reach the caller).

As in vLLM: the text of the first ``min_tokens`` output tokens is not searched for stop strings
(a stop string may still end in a later token's text), and a sequence ended by a stop token or
EOS (``stop_terminated``) gets no text for that token. With ``include_stop_str_in_output`` (as
vLLM's detokenizer) the stop string stays (the text ends where it ends), the stop token's text
too, and nothing is held back: the text searched for a stop string's start then reaches back
into what was handed out already (``recent``). With ``skip_special_tokens=False`` special tokens'
text (BOS, EOS, a chat template's markers) stays in the output.
"""
from __future__ import annotations

from engine.tokenizer import Tokenizer, decode_text

PROMPT_CONTEXT = 5  # prompt tokens decoded before the first output token (spacing, merges)


def ended_on_token(finish_reason: str | None, stop_reason) -> bool:
    """A sample that ended on a stop token or EOS (not on a stop string, whose reason is the string):
    that token's text is left out (``IncrementalDetokenizer.add``'s ``stop_terminated``), as in vLLM."""
    return finish_reason == "stop" and not isinstance(stop_reason, str)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str], min_tokens: int = 0,
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.min_tokens = min_tokens
        self.num_tokens = 0  # output tokens given to ``add``
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.parts: list[str] = []  # text handed out (deltas), joined only for whole outputs
        self.pending = ""  # decoded but held back
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        longest = max((len(s) for s in stop), default=1) - 1
        self.holdback = 0 if include_stop_str_in_output else longest
        self.lookback = longest if include_stop_str_in_output else 0  # chars of ``recent`` kept
        self.recent = ""  # the end of the text handed out (include_stop_str_in_output: a stop may start there)
        self.stop_found: str | None = None
        self.check_stop = True

    @classmethod
    def for_params(cls, tokenizer: Tokenizer, prompt_ids: list[int], params) -> IncrementalDetokenizer:
        """The detokenizer of a sample of a request with these SamplingParams."""
        return cls(tokenizer, prompt_ids, params.stop, params.min_tokens, params.include_stop_str_in_output,
                   params.skip_special_tokens)

    def _text_of(self, ids: list[int]) -> str:
        return decode_text(self.tokenizer, ids, self.skip_special)

    def add(self, token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Decode newly sampled tokens; returns the stop string if one now appears in the text.
        ``stop_terminated``: the last of them is the stop token (or EOS) that ends the sequence:
        it counts, but its text is left out (kept with ``include_stop_str_in_output``)."""
        first = self.num_tokens
        self.num_tokens += len(token_ids)
        if stop_terminated and not self.include_stop:
            token_ids = token_ids[:-1]
        quiet = max(0, min(self.min_tokens - first, len(token_ids)))  # tokens within min_tokens
        if quiet:
            self._decode(token_ids[:quiet], check_stop=False)
        if quiet < len(token_ids) and self.stop_found is None:
            self._decode(token_ids[quiet:], check_stop=True)
        return self.stop_found

    def _decode(self, token_ids: list[int], check_stop: bool) -> None:
        self.check_stop = check_stop
        self.ids.extend(token_ids)
        decode = self._text_of
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._append(full[len(prefix):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def flush(self) -> None:
        """The sequence ended: whatever is still undecoded counts (an invalid byte as U+FFFD)."""
        if self.stop_found is None and self.read_offset < len(self.ids):
            decode = self._text_of
            full = decode(self.ids[self.prefix_offset:])
            self._append(full[len(decode(self.ids[self.prefix_offset:self.read_offset])):])
            self.read_offset = len(self.ids)

    def _append(self, new: str) -> None:
        if self.stop_found is not None or not new:
            return
        # a stop string counts where it ends in the new text (it may start in the held-back text;
        # text before min_tokens was never searched and must not match on its own)
        old = len(self.pending)
        self.pending += new
        if not self.check_stop:
            return
        back = self.recent if self.include_stop else ""
        text, old = back + self.pending, old + len(back)
        hits = [(i, s) for s in self.stop if (i := text.find(s, max(0, old - len(s) + 1))) >= 0]
        if hits:
            i, self.stop_found = min(hits)
            # the text ends before the stop string, or with it (it ends in the new text: past ``back``)
            end = i + len(self.stop_found) if self.include_stop else i
            self.pending = self.pending[:end - len(back)]

    def delta(self, finished: bool) -> str:
        """Text not handed out yet, short of what may still change unless ``finished``."""
        keep = 0 if finished or self.stop_found is not None else self.holdback
        n = len(self.pending) - keep
        if n <= 0:
            return ""
        out, self.pending = self.pending[:n], self.pending[n:]
        self.parts.append(out)
        if self.lookback:
            self.recent = (self.recent + out)[-self.lookback:]
        return out

    def text(self) -> str:
        """Everything handed out so far."""
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""
