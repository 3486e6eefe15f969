"""Offline tokenizers: bytes for the presets, HF's own for a local model directory."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    eos_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict]) -> str: ...


def default_chat_prompt(messages: list[dict]) -> str:
    """A plain template for tokenizers without one."""
    lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids; ids beyond the byte range print as ``<id>``."""

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

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if self.OFFSET <= i < 256 + self.OFFSET:
                run.append(i - self.OFFSET)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if i != self.bos_token_id and i not in self.eos_token_ids and i >= self.OFFSET:
                out.append(f"<{i}>")
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return default_chat_prompt(messages)


class HFTokenizer:
    """A tokenizer saved beside the model (tokenizer.json etc.), loaded offline."""

    def __init__(self, path: str | Path, eos_token_ids: list[int]):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        ids = list(eos_token_ids)
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in ids:
            ids.append(self.tok.eos_token_id)
        self.eos_token_ids = ids

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return default_chat_prompt(messages)


def load_tokenizer(source: str, vocab_size: int, bos: int | None, eos: list[int]) -> Tokenizer:
    path = Path(source)
    if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return HFTokenizer(path, eos)
    return ByteTokenizer(vocab_size, bos, eos)
