"""Offline tokenizers: bytes for the presets, HF's own for a local model directory.

A model directory without tokenizer files gets ``NoTokenizer``: token-id prompts run as usual
(outputs carry token ids and no text), a text prompt is an error naming the directory and the
files expected. Bytes in place of the model's own vocabulary would be garbage in and out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    eos_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict]) -> str: ...

    def encode_chat(self, messages: list[dict]) -> tuple[str, list[int]]: ...


class ChatTemplateError(ValueError):
    """The model's chat template refused the messages (``raise_exception`` in the template, e.g.
    "System role not supported", or a message it cannot render): the request's fault."""


def default_chat_prompt(messages: list[dict]) -> str:
    """A plain template for tokenizers without one."""
    lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids; ids beyond the byte range print as ``<id>``, and
    so do the special ids (BOS, EOS, those below the bytes) where they are not skipped."""

    OFFSET = 3

    def __init__(self, vocab_size: int, bos_token_id: int | None = 1, eos_token_ids: list[int] | None = None):
        if vocab_size < 256 + self.OFFSET:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {256 + self.OFFSET}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids or [2])

    def encode(self, text: str) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, run = [], bytearray()
        for i in ids:
            if self.OFFSET <= i < 256 + self.OFFSET:
                run.append(i - self.OFFSET)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if not skip_special_tokens or (i != self.bos_token_id and i not in self.eos_token_ids
                                           and i >= self.OFFSET):
                out.append(f"<{i}>")
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return default_chat_prompt(messages)

    def encode_chat(self, messages: list[dict]) -> tuple[str, list[int]]:
        text = self.apply_chat_template(messages)  # the plain template writes no BOS: encode adds it
        return text, self.encode(text)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes the token stands for (one byte may be part of a UTF-8 character)."""
        if self.OFFSET <= token_id < 256 + self.OFFSET:
            return bytes([token_id - self.OFFSET])
        return self.decode([token_id]).encode("utf-8")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-ins for the 256 byte values, inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """A tokenizer saved beside the model (tokenizer.json etc.), loaded offline."""

    def __init__(self, path: str | Path, eos_token_ids: list[int], vocab_size: int | None = None):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # a damaged file: JSON's, tokenizers' or transformers' error names none
            files = ", ".join(f for f in TOKENIZER_FILES if (Path(path) / f).exists())
            raise ValueError(f"the tokenizer files in {path} ({files}) cannot be loaded ({type(e).__name__}: {e}): "
                             "save the tokenizer again (tokenizer.save_pretrained(dir)), or remove its files to "
                             "run on token ids") from e
        ids = list(eos_token_ids)
        eos = self.tok.eos_token_id
        # the tokenizer's own EOS too, unless the model cannot produce it: an id past the model's
        # vocabulary (a tokenizer with more tokens) failed every request with min_tokens inside a
        # step, where the sampler bans EOS by index
        if eos is not None and eos not in ids and (vocab_size is None or 0 <= eos < vocab_size):
            ids.append(eos)
        self.eos_token_ids = ids

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes the token stands for: byte-level BPE and SentencePiece byte tokens exactly."""
        piece = self.tok.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        table = self._bytes_table
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def _bytes_table(self) -> dict[str, int]:
        table = getattr(self, "_table", None)
        if table is None:
            table = self._table = _byte_decoder()
        return table

    def apply_chat_template(self, messages: list[dict]) -> str:
        if getattr(self.tok, "chat_template", None):
            from jinja2 import TemplateError

            try:
                return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except TemplateError as e:  # the template's own refusal (raise_exception) or an undefined value
                raise ChatTemplateError(f"the model's chat template cannot render these messages: {e}") from None
        return default_chat_prompt(messages)

    def encode_chat(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The chat prompt's text and ids. A model's template writes its special tokens (BOS)
        itself, so they are not added again (a second BOS changes the output), as HF's
        ``apply_chat_template(tokenize=True)`` and vLLM's chat endpoint tokenize it."""
        text = self.apply_chat_template(messages)
        templated = bool(getattr(self.tok, "chat_template", None))
        return text, self.tok.encode(text, add_special_tokens=not templated)


# any of these beside config.json: HF's fast tokenizer, its config, a SentencePiece model, a BPE vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerMissingError(ValueError):
    """A text prompt for a model directory that has no tokenizer files."""


class NoTokenizer:
    """The tokenizer of a model directory without tokenizer files: ids only, no text."""

    def __init__(self, path: str | Path, eos_token_ids: list[int]):
        self.path = Path(path)
        self.eos_token_ids = list(eos_token_ids)

    def error(self, what: str = "text prompts") -> TokenizerMissingError:
        return TokenizerMissingError(
            f"model directory {self.path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), so it cannot "
            f"take {what}: save the tokenizer beside the model (tokenizer.save_pretrained(dir)), "
            "or give prompts as token ids")

    def encode(self, text: str) -> list[int]:
        raise self.error()

    def apply_chat_template(self, messages: list[dict]) -> str:
        raise self.error("chat messages")

    def encode_chat(self, messages: list[dict]) -> tuple[str, list[int]]:
        raise self.error("chat messages")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""  # outputs of token-id prompts carry their token ids; there is no text to give

    def token_bytes(self, token_id: int) -> bytes:
        return b""


def decode_text(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """``tokenizer.decode``, the keyword only where it is not the default: a tokenizer with
    ``decode(ids)`` alone (one of its own, a test's stand-in) still serves every request that
    skips special tokens."""
    return tokenizer.decode(ids) if skip_special_tokens else tokenizer.decode(ids, skip_special_tokens=False)


def has_text(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer turns text into ids and back (stop strings, text prompts)."""
    return not isinstance(tokenizer, NoTokenizer)


def load_tokenizer(source: str, vocab_size: int, bos: int | None, eos: list[int]) -> Tokenizer:
    """A preset (or a shape-only model) gets bytes; a model directory its own tokenizer files."""
    from engine.presets import PRESETS

    path = Path(source)
    if source in PRESETS or not path.is_dir():
        return ByteTokenizer(vocab_size, bos, eos)
    if any((path / f).exists() for f in TOKENIZER_FILES):
        return HFTokenizer(path, eos, vocab_size)
    return NoTokenizer(path, eos)
