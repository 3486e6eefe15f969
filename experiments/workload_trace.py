"""Trace replay (``experiments.workloads``): the ``trace`` workload reads a local JSONL file, one
request per line, each line checked (``_trace_record``); text prompts are tokenized by the caller
(``tokenize_requests``), and requests cut to fit ``max_model_len`` are said once (``_say_cut``)."""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

from allocators.checks import is_int, is_real
from experiments.workload_types import RequestSpec, WorkloadConfig, WorkloadContext, register_workload

log = logging.getLogger("kvlab.workloads")

MAX_ARRIVAL_S = 1e9  # arrivals (a trace's, a simulated run's): beyond it a float clock loses its resolution

_TRACE_KEYS = {"prompt_len", "prompt", "output_len", "arrival_s", "n", "request_id"}
MAX_TRACE_N = 1024  # SamplingParams' bound on n


@register_workload("trace", uses=("trace_path",))
def trace(cfg: WorkloadConfig, ctx: WorkloadContext) -> list[RequestSpec]:
    """Replay a local JSONL trace, one request per line, file order, the first
    ``num_requests`` lines (all of them if the trace is shorter).

    A line is ``{"prompt_len": int, "output_len": int, "arrival_s": float}`` (random token ids
    of that length) or ``{"prompt": str, "output_len": int, "arrival_s": float}``; ``n`` and
    ``request_id`` are optional.  ``arrival_s`` is kept when ``request_rate`` is inf and every
    line has it; a finite ``request_rate`` replaces it with generated arrivals.

    Text prompts stay in ``prompt_text`` with ``prompt_token_ids == []``: the caller
    tokenizes them (``tokenize_requests``), which also clips them to ``max_model_len``;
    until then only ``output_len`` is clipped (to ``max_model_len - 1``).
    """
    path = Path(cfg.trace_path)
    records = []
    named: dict[str, int] = {}  # request id -> its line
    with path.open("rb") as f:  # bytes: each line decoded by itself, so an error names its line
        for lineno, raw in enumerate(f, 1):
            try:  # utf-8-sig: a byte-order mark some editors write is not part of the first line
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"trace {path} line {lineno}: not UTF-8 text ({e.reason}): save the trace "
                                 "as UTF-8") from None
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"trace {path} line {lineno}: not valid JSON ({e.msg})") from None
                except (ValueError, RecursionError) as e:  # a number past Python's 4300 digits; nesting too deep
                    why = "nested too deeply" if isinstance(e, RecursionError) else "a number with too many digits"
                    raise ValueError(f"trace {path} line {lineno}: not a trace line ({why})") from None
                r = _trace_record(record, path, lineno)
                rid = str(r["request_id"]) if "request_id" in r else None
                if rid is not None:
                    if rid in named:
                        raise ValueError(f"trace {path} line {lineno}: request_id {rid!r} is also on line {named[rid]}: "
                                         "give each request its own id (or none)")
                    named[rid] = lineno
                if cfg.beam_width > 1 and r.get("n", cfg.n) > cfg.beam_width:
                    raise ValueError(f"trace {path} line {lineno}: 'n' ({r['n']}) must be <= workload.beam_width "
                                     f"({cfg.beam_width}): beam search returns the n best of its beams")
                records.append((lineno, r))
            if len(records) == cfg.num_requests:
                break
    if not records:
        raise ValueError(f"trace {path} has no requests: write one JSON object per line")
    timed = sum("arrival_s" in r for _, r in records)
    if 0 < timed < len(records):
        raise ValueError(f"trace {path}: give arrival_s on every line or on none")
    specs, cut = [], []
    for i, (lineno, r) in enumerate(records):
        output = int(min(max(r["output_len"], 1), ctx.max_model_len - 1))
        if "prompt" in r:  # (tokenize_requests cuts text prompts)
            ids, text, whole = [], r["prompt"], True
        else:
            prompt, output = ctx.clip(r["prompt_len"], output)
            ids, text, whole = ctx.tokens(prompt), None, prompt == r["prompt_len"]
        if not whole or output != r["output_len"]:
            cut.append(lineno)
        rid = str(r.get("request_id", ""))
        if not rid:  # unnamed: the id make_workload gives it, unless another line took that
            rid = f"{cfg.name}-{i}"
            if rid in named:
                raise ValueError(f"trace {path} line {named[rid]}: request_id {rid!r} is the id of the unnamed request on "
                                 f"line {lineno}: give it another id (or give every line one)")
        spec = RequestSpec(rid, ids, int(output),
                           float(r.get("arrival_s", 0.0)), int(r.get("n", cfg.n)), text)
        specs.append(spec)
    if cut:
        _say_cut(f"trace {path}", len(cut), len(records), f"line {cut[0]}", ctx.max_model_len)
    return specs


def _say_cut(what: str, cut: int, total: int, first: str, max_model_len: int) -> None:
    """A replayed request is no longer the one given: said once per workload, not per request."""
    log.warning("%s: %d of %d requests cut to fit max_model_len=%d (prompt + output; the first: %s): "
                "raise engine.max_model_len to replay them whole", what, cut, total, max_model_len, first)


def _trace_record(r, path: Path, lineno: int) -> dict:
    where = f"trace {path} line {lineno}"
    if not isinstance(r, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
    unknown = set(r) - _TRACE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_TRACE_KEYS)}")
    if ("prompt" in r) == ("prompt_len" in r):
        raise ValueError(f"{where}: give exactly one of 'prompt' (text) or 'prompt_len' (int)")
    if "output_len" not in r:
        raise ValueError(f"{where}: missing 'output_len'")
    for key in ("prompt_len", "output_len", "n"):
        if key in r and (not is_int(r[key]) or r[key] < 1):
            raise ValueError(f"{where}: '{key}' must be an integer >= 1, got {r[key]!r}")
    if "prompt" in r and not isinstance(r["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string")
    if r.get("prompt") == "":
        raise ValueError(f"{where}: 'prompt' is empty: give its text (or 'prompt_len')")
    if "prompt" in r:
        try:
            r["prompt"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): no tokenizer can take it
            raise ValueError(f"{where}: 'prompt' is not valid text ({e.reason} at character {e.start})") from None
    if "request_id" in r and not (isinstance(r["request_id"], str) or is_int(r["request_id"])):
        raise ValueError(f"{where}: 'request_id' must be a string, got {r['request_id']!r}")
    if r.get("n", 1) > MAX_TRACE_N:
        raise ValueError(f"{where}: 'n' must be at most {MAX_TRACE_N} samples, got {r['n']!r}")
    a = r.get("arrival_s", 0)
    if not is_real(a) or not 0 <= a <= MAX_ARRIVAL_S:
        raise ValueError(f"{where}: 'arrival_s' must be seconds in [0, {MAX_ARRIVAL_S:g}], got {a!r}")
    return r


def tokenize_requests(specs: list[RequestSpec], encode: Callable[[str], list[int]],
                      max_model_len: int | None = None) -> list[RequestSpec]:
    """Tokenize text prompts (trace replay).  With ``max_model_len``, clip as the generators
    do: the prompt keeps its first ``max_model_len - 1`` tokens, the output what is left.
    Specs that already have token ids pass through unchanged."""
    out, cut = [], []
    for spec in specs:
        if spec.prompt_text is not None and not spec.prompt_token_ids:
            ids = list(encode(spec.prompt_text))
            if not ids:
                raise ValueError(f"request {spec.request_id}: its prompt text tokenizes to nothing")
            output = spec.output_len
            if max_model_len is not None:
                whole = len(ids)
                ids = ids[: max_model_len - 1]
                output = max(1, min(output, max_model_len - len(ids)))
                if len(ids) < whole or output < spec.output_len:
                    cut.append(spec.request_id)
            spec = dataclasses.replace(spec, prompt_token_ids=ids, output_len=output)
        out.append(spec)
    if cut:
        _say_cut("text prompts", len(cut), sum(s.prompt_text is not None for s in specs), f"request {cut[0]}",
                 max_model_len)
    return out
