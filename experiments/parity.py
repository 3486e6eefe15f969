"""Greedy parity of kvlab against HF transformers, with a tie-aware verdict for bf16.

Where tokens diverge, the first divergence is judged by HF's own logits on the shared
prefix: the gap between HF's choice and kvlab's is a near tie when it is within bf16's
rounding of the logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Divergence:
    prompt: int
    matched: int  # tokens equal before the first difference
    total: int
    logit_gap: float  # HF logit of HF's token minus HF logit of kvlab's token (0 if equal)


@torch.inference_mode()
def hf_greedy(hf, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    dev = next(hf.parameters()).device
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p], device=dev), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


@torch.inference_mode()
def compare(hf, prompts, expected, got) -> list[Divergence]:
    dev = next(hf.parameters()).device
    result = []
    for i, (p, e, g) in enumerate(zip(prompts, expected, got)):
        k = next((j for j, (a, b) in enumerate(zip(e, g)) if a != b), None)
        if k is None:
            result.append(Divergence(i, len(e), len(e), 0.0))
            continue
        logits = hf(torch.tensor([p + e[:k]], device=dev)).logits[0, -1].float()
        result.append(Divergence(i, k, len(e), float(logits[e[k]] - logits[g[k]])))
    return result


def match_rate(divs: list[Divergence]) -> float:
    return sum(d.matched for d in divs) / max(1, sum(d.total for d in divs))
