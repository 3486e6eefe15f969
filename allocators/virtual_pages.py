"""Page size of the virtual allocator (allocators/virtual.py): the bytes of one token in a virtual
range of each layout (``range_token_bytes``), the candidate page sizes a backend can map (powers of
two from vAttention's 2 MiB down to its granularity, in whole tokens: ``page_sizes``) and the one
chosen when ``page_size`` is left unset (``default_page_size``): the largest that gives every slot a
page group of the pool at once and splits a ``max_model_len`` sequence into at least
``MIN_PAGES_PER_SEQ`` pages, with the reason why (``PageChoice.why``, logged at start-up)."""
from __future__ import annotations

import math
from dataclasses import dataclass

MiB = 1 << 20
MAX_PAGE_SIZE = 2 * MiB  # vAttention's page: the CUDA driver's mapping granularity
MIN_PAGES_PER_SEQ = 4  # a default page splits a max_model_len sequence into at least this many


@dataclass(frozen=True)
class PageChoice:
    page_size: int
    page_tokens: int
    why: str


def range_token_bytes(layout: str, num_layers: int, num_kv_heads: int, head_dim: int,
                      elem_size: int) -> tuple[int, int]:
    """(bytes of one token in one virtual range, number of ranges) of a layout: per_layer has a
    range per layer and K/V, shared one range holding every layer's K and V of a token."""
    if layout == "per_layer":
        return num_kv_heads * head_dim * elem_size, 2 * num_layers
    return 2 * num_layers * num_kv_heads * head_dim * elem_size, 1


def page_sizes(token_bytes: int, grain: int) -> list[int]:
    """Candidate page sizes, largest first: powers of two from 2 MiB down to the backend's
    granularity, each rounded down to whole tokens (and whole granules)."""
    unit = math.lcm(token_bytes, grain)
    sizes, p = [], MAX_PAGE_SIZE
    while p >= grain:
        size = p // unit * unit
        if size and size not in sizes:
            sizes.append(size)
        p //= 2
    return sizes or [unit]


def default_page_size(token_bytes: int, grain: int, capacity_tokens: int, max_num_seqs: int,
                      max_model_len: int) -> PageChoice:
    """The largest candidate whose page group fits each slot's share of the pool and splits a
    max_model_len sequence into MIN_PAGES_PER_SEQ pages; else the smallest that fits the pool."""
    share = capacity_tokens // max(1, max_num_seqs)
    sizes = page_sizes(token_bytes, grain)
    for size in sizes:
        tpp = size // token_bytes
        if tpp <= share and tpp * MIN_PAGES_PER_SEQ <= max_model_len:
            return PageChoice(size, tpp, (
                f"the largest page up to {MAX_PAGE_SIZE >> 20} MiB that gives each of the {max_num_seqs} slots "
                f"a page of the {capacity_tokens}-token pool and at least {MIN_PAGES_PER_SEQ} pages to a "
                f"{max_model_len}-token sequence"))
    size = sizes[-1]
    return PageChoice(size, size // token_bytes, (
        f"no page up to {MAX_PAGE_SIZE >> 20} MiB gives each of the {max_num_seqs} slots a page of the "
        f"{capacity_tokens}-token pool and {MIN_PAGES_PER_SEQ} pages to a {max_model_len}-token sequence; "
        f"this is the smallest the backend maps (granularity {grain} bytes)"))
