"""The length distributions workloads draw from (``experiments.workloads``): a lognormal clipped
to the context with its published mean kept (:class:`LogNormalLengths`), a dataset's input and
output lengths (:class:`DatasetLengths`), and ShareGPT's and Alpaca's (``SHAREGPT``, ``ALPACA``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

_NORMAL = NormalDist()


@dataclass(frozen=True)
class LogNormalLengths:
    """A heavy-tailed length distribution: lognormal with a given mean and shape ``sigma``.

    Lengths are clipped to ``[1, cap]``.  Clipping the tail lowers the mean, so ``mu`` is
    solved (bisection on the closed-form mean of a clipped lognormal) such that the mean
    *after* clipping equals the published one.  The correction is bounded (the scale grows
    at most ``max_boost``x): when ``max_model_len`` is far too short for the target mean, the
    lengths pile up at the cap instead of the whole distribution sliding there.
    """

    mean: float
    sigma: float
    max_boost: float = 1.25

    def _mu0(self) -> float:
        return math.log(self.mean) - self.sigma**2 / 2

    def clipped_mean(self, mu: float, caps: np.ndarray) -> float:
        """E[min(X, cap)] for X ~ LogNormal(mu, sigma), averaged over the given caps."""
        s, log_caps = self.sigma, np.log(caps)
        below = np.array([_NORMAL.cdf(z) for z in (log_caps - mu - s * s) / s])
        above = 1 - np.array([_NORMAL.cdf(z) for z in (log_caps - mu) / s])
        return float(np.mean(math.exp(mu + s * s / 2) * below + caps * above))

    def solve_mu(self, caps: np.ndarray) -> float:
        lo, hi = self._mu0(), self._mu0() + math.log(self.max_boost)
        if self.clipped_mean(hi, caps) <= self.mean:
            return hi
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.clipped_mean(mid, caps) < self.mean else (lo, mid)
        return (lo + hi) / 2

    def quantiles(self, mu: float, cap: float, k: int = 64) -> np.ndarray:
        """k equal-probability points of the clipped distribution (to average over)."""
        z = np.array([_NORMAL.inv_cdf((i + 0.5) / k) for i in range(k)])
        return np.clip(np.exp(mu + self.sigma * z), 1, cap)

    def sample(self, rng: np.random.Generator, size: int, mu: float, caps) -> np.ndarray:
        x = np.rint(rng.lognormal(mu, self.sigma, size))
        return np.clip(x, 1, caps).astype(np.int64)


@dataclass(frozen=True)
class DatasetLengths:
    """Independent input and output length distributions of a chat/instruction dataset."""

    input: LogNormalLengths
    output: LogNormalLengths

    def sample(self, rng: np.random.Generator, size: int, max_model_len: int):
        # Prompts are capped at half the context (vLLM's ShareGPT filter: prompt <= 1024,
        # prompt + output <= 2048); outputs take what the prompt leaves.
        in_cap = max(1, max_model_len // 2)
        mu_in = self.input.solve_mu(np.array([float(in_cap)]))
        out_caps = max_model_len - np.rint(self.input.quantiles(mu_in, in_cap))
        mu_out = self.output.solve_mu(out_caps)
        prompt = self.input.sample(rng, size, mu_in, in_cap)
        output = self.output.sample(rng, size, mu_out, max_model_len - prompt)
        return prompt, output


# ShareGPT (PagedAttention paper, SOSP'23, Fig. 11a; vLLM benchmarks): mean input 161.3,
# mean output 338.0 tokens, both long-tailed.  sigma 1.0 for prompts (std ~1.3x mean:
# many one-line questions, a tail of pasted documents), 0.8 for answers (std ~0.95x mean:
# chat answers are less skewed).  Medians ~98 and ~245 tokens.
SHAREGPT = DatasetLengths(LogNormalLengths(161.0, 1.0), LogNormalLengths(338.0, 0.8))
# Alpaca (same paper, Fig. 11b): mean input 19.3, mean output 58.5; short instructions with
# a moderate tail (sigma 0.7, median ~15) and answers from one word to a paragraph
# (sigma 0.9, median ~39).
ALPACA = DatasetLengths(LogNormalLengths(19.0, 0.7), LogNormalLengths(58.0, 0.9))
