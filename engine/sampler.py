"""Token sampling for a batch: greedy, temperature, top-k, top-p, min-p, min_tokens, penalties,
seeds, logprobs.

One vectorised pass on the logits' device; rows with their own seed draw from their own
generator so that a seeded request gives the same tokens whatever it is batched with.
Every per-request value was range-checked before the request was queued (SamplingParams,
LLMEngine.validate), so nothing here can fail for one request's sake.

The order is vLLM's (v1 ``Sampler``): raw logprobs; min_tokens' bans and the penalties (on
float32 logits; greedy takes the argmax of these); then, for random sampling, temperature,
min-p, top-k and top-p. Penalties cost nothing to a batch where no sequence has one: the
greedy fast path is unchanged; only the rows with one build token counts (on the device, by
``scatter_add`` of their ids).
"""
from __future__ import annotations

import numpy as np
import torch

from engine.sequence import PENDING, Sequence


class Sampler:
    def __init__(self, device: torch.device | str, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}
        # beam search: seq_id -> its k best (token, logprob) of the last step, read by the engine
        self.beam_candidates: dict[int, list[tuple[int, float]]] = {}
        self.staging = None  # the runner's HostStaging: host-to-device copies that never wait for the GPU

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        g = self._seq_generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(seq.params.generator_seed(seq.index))
            self._seq_generators[seq.seq_id] = g
        return g

    def forget(self, seq: Sequence) -> None:
        self._seq_generators.pop(seq.seq_id, None)
        self.beam_candidates.pop(seq.seq_id, None)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int], inflight=None):
        """(token ids, packed logprobs or None), both still on the logits' device: no sync.

        Packed logprobs, one row per sequence: the sampled token's logprob, then the K largest
        logprobs and then their token ids (as floats: exact below 2**24), K the batch's largest
        ``logprobs``; see ``unpack_logprobs``.

        ``inflight``: the step whose sampled tokens are not read back yet (asynchronous
        scheduling; a ``StepHandle``): a sequence's last output token may be one of them
        (``PENDING``), and the penalties count it from that step's tokens on the device.
        """
        want = [s.params.logprobs for s in seqs if s.params.logprobs is not None]
        # logprobs of the model's own distribution, before min_tokens bans EOS and stop tokens
        # (vLLM's default raw logprobs; penalties, temperature, min-p, top-k and top-p never touch them)
        logprobs = torch.log_softmax(logits.float(), dim=-1) if want else None
        self._apply_min_tokens(logits, seqs, eos_ids)
        penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
        if penalized:
            logits = logits.float()  # penalties in float32, as vLLM (in place, as min_tokens' bans)
            self._apply_penalties(logits, seqs, penalized, inflight)
        beams = [i for i, s in enumerate(seqs) if s.params.beam_width > 1]
        greedy = all(s.params.greedy for s in seqs)
        if greedy and not want and not beams:
            # widening is exact and monotone: the argmax of bf16 logits is float32's, at a
            # fraction of the bytes (256 x 128k logits: ~0.1 ms a step on an H200)
            return logits.argmax(dim=-1), None
        logits = logits.float()
        tokens = logits.argmax(dim=-1) if greedy else self._sample(logits, seqs)
        if beams:
            self._beam_topk(logits, seqs, beams)
        if not want:
            return tokens, None
        packed = [logprobs.gather(1, tokens[:, None])]
        k = min(max(want), logprobs.shape[1])
        if k > 0:
            top = logprobs.topk(k, dim=-1)
            packed += [top.values, top.indices.float()]
        return tokens, torch.cat(packed, dim=1)

    def _beam_topk(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        """Each beam's ``beam_width`` best continuations (greedy: the argmax is the first)."""
        k = min(max(seqs[i].params.beam_width for i in rows), logits.shape[1])
        idx = torch.tensor(rows, device=logits.device)
        top = torch.log_softmax(logits[idx], dim=-1).topk(k, dim=-1)
        for i, vals, ids in zip(rows, top.values.tolist(), top.indices.tolist()):
            w = seqs[i].params.beam_width
            self.beam_candidates[seqs[i].seq_id] = list(zip(ids[:w], vals[:w]))

    def pop_beam_candidates(self, seq: Sequence, k: int) -> list[tuple[int, float]]:
        return self.beam_candidates.pop(seq.seq_id)[:k]

    @staticmethod
    def _apply_min_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> None:
        for row, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                banned = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else eos_ids)
                if banned:
                    logits[row, banned] = float("-inf")

    def _to_device(self, name: str, array: np.ndarray, device: torch.device) -> torch.Tensor:
        if self.staging is not None:
            return self.staging.to_device(name, array)
        return torch.from_numpy(array).to(device)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int], inflight) -> None:
        """vLLM's ``apply_penalties`` on the float32 ``logits`` (in place), rows ``rows`` only:
        repetition_penalty over the tokens of the prompt and of the output so far (a logit > 0
        divided by it, else multiplied: HF's ``RepetitionPenaltyLogitsProcessor``), then
        ``logits -= frequency_penalty * count + presence_penalty * (count > 0)`` over the output's
        token counts (OpenAI's definition).

        Asynchronous scheduling: this step was launched before the previous step's tokens were
        read back, so a sequence's last output token may be ``PENDING``; it is counted from the
        in-flight step's sampled tokens, which are still on the device (no wait, and the steps
        stay overlapped: a request with penalties does not make steps synchronous, as beam
        search does). A token sampled past a stop found late belongs to a sequence that is then
        finished and never sampled again, so counting it cannot change an output."""
        dev = logits.device
        vocab = logits.shape[1]
        outputs: list[list[int]] = []
        pending: list[tuple[int, int]] = []  # (row among ``rows``, row of the in-flight step's tokens)
        for j, i in enumerate(rows):
            s = seqs[i]
            out = s.output_token_ids
            if out and out[-1] == PENDING:
                pending.append((j, inflight.rows[s.seq_id]))
                out = out[:-1]
            outputs.append(out)
        counts = self._bin_counts("pen_out", outputs, vocab, dev)
        if pending:
            idx = self._to_device("pen_pending", np.array(pending, dtype=np.int64), dev)
            counts.index_put_((idx[:, 0], inflight.tokens[idx[:, 1]].long()),
                              torch.ones(len(pending), device=dev), accumulate=True)
        params = [seqs[i].params for i in rows]
        rep = np.array([p.repetition_penalty for p in params], dtype=np.float32)
        freq = np.array([p.frequency_penalty for p in params], dtype=np.float32)
        pres = np.array([p.presence_penalty for p in params], dtype=np.float32)
        ridx = self._to_device("pen_rows", np.array(rows, dtype=np.int64), dev)
        x = logits.index_select(0, ridx)
        coef = self._to_device("pen_coef", np.stack([rep, freq, pres]), dev)
        seen = counts > 0
        if (rep != 1).any():
            prompt = self._bin_counts("pen_prompt", [seqs[i].prompt_token_ids for i in rows], vocab, dev) > 0
            r = coef[0][:, None]
            x = torch.where(seen | prompt, torch.where(x > 0, x / r, x * r), x)
        if freq.any() or pres.any():
            x = x - coef[1][:, None] * counts - coef[2][:, None] * seen
        logits.index_copy_(0, ridx, x)

    def _bin_counts(self, name: str, ids: list[list[int]], vocab: int, dev: torch.device) -> torch.Tensor:
        """(len(ids), vocab) float32 counts of each row's token ids, by ``scatter_add`` on the
        device (rows padded with the id ``vocab``, a column dropped after)."""
        width = max(1, max(map(len, ids)))
        arr = np.full((len(ids), width), vocab, dtype=np.int64)
        for j, row in enumerate(ids):
            arr[j, :len(row)] = row
        idx = self._to_device(name, arr, dev)
        counts = torch.zeros(len(ids), vocab + 1, device=dev)
        counts.scatter_add_(1, idx, torch.ones(idx.shape, device=dev))
        return counts[:, :vocab]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev = logits.device
        vocab = logits.shape[1]
        temps = torch.tensor([1.0 if s.params.greedy else s.params.temperature for s in seqs], device=dev)
        greedy_rows = torch.tensor([s.params.greedy for s in seqs], device=dev)
        scaled = logits / temps[:, None]
        min_p = [s.params.min_p for s in seqs]
        if any(min_p):  # vLLM's order: after temperature, before top-k and top-p
            scaled = apply_min_p(scaled, torch.tensor(min_p, device=dev))
        top_k = [min(s.params.top_k, vocab) for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            scaled = _top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        # exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) samples from p
        noise = torch.empty_like(probs)
        shared = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1], device=dev).exponential_(
                generator=self.generator)
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                noise[i].exponential_(generator=self._generator(s))
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy_rows, logits.argmax(dim=-1), sampled)


def unpack_logprobs(row: list[float], k: int) -> tuple[float, list[tuple[int, float]]]:
    """(sampled token's logprob, its k most likely (token, logprob)) from a packed row."""
    width = (len(row) - 1) // 2
    k = min(k, width)
    return row[0], [(int(row[1 + width + j]), row[1 + j]) for j in range(k)]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Tokens whose probability is below ``min_p`` (per row) times the row's largest are dropped
    (-inf): vLLM's min-p and HF's ``MinPLogitsWarper`` (the likeliest token always stays)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    mask = ranks >= k[:, None]
    p = torch.tensor(top_p, device=logits.device)
    probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
    cum = probs.cumsum(dim=-1) - probs  # mass before this token
    # the smallest prefix whose mass reaches p, as vLLM and HF keep; p = 1 keeps everything (float32
    # rounding can bring the mass before a tail token of a large vocabulary to 1.0)
    mask |= (cum >= p[:, None]) & (p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, sorted_logits)
