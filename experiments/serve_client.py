"""The client side of ``kvlab bench serve``: what talks to the server.

The requests (``Request``: a prompt of token ids or words and its lengths; ``make_requests``), the
JSON body of one (``build_payload``), one streamed request timed on the client (``send``: TTFT, ITL
and E2EL from the SSE chunks, which ``_has_text`` / ``_error_of`` read without parsing each one) and
the load (``run_requests`` in one event loop, ``run_clients`` over K spawned processes, ``_worker``).
It is apart from ``experiments/bench_serve.py`` (the command: its flags, the checks against the
server, the result table), which imports and re-exports these names: this is the code on the clock
and the code the worker processes run, and it never imports ``bench_serve``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import time
from dataclasses import dataclass, field

import numpy as np

from experiments.workloads import SHAREGPT

# ~1 token each in common BPE vocabularies; text prompts are only approximately input_len long
WORDS = np.array("the of and to in is was for on that with as by at from his her an be it are this which or "
                 "had not but one all were they there been has would more when time some into only other new "
                 "could may than first any people water after way over".split())
VOCAB_HIGH = 1000  # token-id prompts' bound when the server does not publish its vocabulary (vLLM's default)


@dataclass
class Request:
    prompt: list[int] | str
    prompt_len: int
    output_len: int


@dataclass
class Output:
    prompt_len: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0  # s, 0 when no content arrived
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    start: float = 0.0  # wall clock (time.time), comparable across worker processes


# ---------------------------------------------------------------- prompts


def make_requests(args: argparse.Namespace) -> list[Request]:
    lens_ss, tok_ss = np.random.SeedSequence(args.seed).spawn(2)
    lrng, trng = np.random.default_rng(lens_ss), np.random.default_rng(tok_ss)
    n = args.num_prompts
    if args.dataset_name == "sharegpt":
        inp, out = SHAREGPT.sample(lrng, n, args.max_model_len)
    else:  # vLLM's random dataset: uniform in [len*(1-r), len*(1+r)]
        r = args.random_range_ratio
        def uniform(L: int) -> np.ndarray:
            return lrng.integers(max(1, math.floor(L * (1 - r))), max(1, math.ceil(L * (1 + r))) + 1, size=n)
        inp, out = uniform(args.random_input_len), uniform(args.random_output_len)
    reqs = []
    for i, o in zip(inp.tolist(), out.tolist()):
        if args.text:
            prompt: list[int] | str = " ".join(trng.choice(WORDS, size=i).tolist())
        else:
            high = VOCAB_HIGH if args.vocab_high is None else args.vocab_high
            prompt = trng.integers(args.vocab_low, high, size=i).tolist()
        reqs.append(Request(prompt, i, o))
    return reqs


# ---------------------------------------------------------------- one streamed request


def _has_text(data: bytes, key: bytes) -> bool:
    """Whether ``key`` ("text": / "content":) is followed by a non-empty string, without json.loads."""
    i = data.find(key)
    while i >= 0:
        j = i + len(key)
        while data[j:j + 1] == b" ":
            j += 1
        if data[j:j + 1] == b'"' and data[j + 1:j + 2] != b'"':
            return True
        i = data.find(key, j)
    return False


def _error_of(data: bytes, event: bytes) -> str | None:
    """The message of an SSE error (``event: error`` or a JSON object with an "error" key), else None."""
    try:
        obj = json.loads(data)
    except ValueError:
        return data.decode(errors="replace") if event == b"error" else None
    if isinstance(obj, dict) and ("error" in obj or obj.get("object") == "error"):
        err = obj.get("error", obj)
        return str(err.get("message", err) if isinstance(err, dict) else err)
    return data.decode(errors="replace") if event == b"error" else None


async def send(client, url: str, headers: dict, payload: dict, req: Request, chat: bool) -> Output:
    out = Output(prompt_len=req.prompt_len)
    key = b'content":' if chat else b'"text":'  # content": also matches "reasoning_content":
    chunks, last, t0 = 0, 0.0, time.perf_counter()
    out.start = time.time()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace").strip()
                raise RuntimeError(f"HTTP {resp.status_code}: {body[:300]}")
            buf, event = b"", b""
            async for piece in resp.aiter_bytes():
                now = time.perf_counter()
                *lines, buf = (buf + piece).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        if line.startswith(b"event:"):
                            event = line[6:].strip()
                        elif not line.strip():  # a blank line ends an SSE event
                            event = b""
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    if (event == b"error" or b'"error"' in data) and (msg := _error_of(data, event)):
                        raise RuntimeError(f"stream error: {msg}")
                    if b'"completion_tokens"' in data:  # the usage chunk (or continuous usage stats)
                        usage = json.loads(data).get("usage") or {}
                        out.output_tokens = usage.get("completion_tokens", out.output_tokens)
                        out.prompt_len = usage.get("prompt_tokens", out.prompt_len)
                    if _has_text(data, key):
                        if chunks == 0:
                            out.ttft = now - t0
                        else:
                            out.itl.append(now - last)
                        chunks, last = chunks + 1, now
        out.output_tokens = out.output_tokens or chunks
        out.success = True
    except Exception as e:  # a failed request is a result, never a crash
        out.error = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
    out.e2el = time.perf_counter() - t0
    return out


def build_payload(args: argparse.Namespace, req: Request, chat: bool) -> dict:
    p: dict = {"model": args.model, "stream": True, "stream_options": {"include_usage": True},
               "temperature": args.temperature}
    if chat:
        p["messages"] = [{"role": "user", "content": req.prompt}]
        p["max_completion_tokens"] = req.output_len
    else:
        p["prompt"], p["max_tokens"] = req.prompt, req.output_len
    if args.ignore_eos:
        p["ignore_eos"] = True  # vLLM extension: exact output lengths
    return p


async def run_requests(args: argparse.Namespace, reqs: list[Request], arrivals: list[float],
                       concurrency: int | None, on_done=None, wait_start=None):
    """Send ``reqs`` at their arrival offsets; returns (wall start, wall end, outputs)."""
    import httpx

    url, headers = args.base_url.rstrip("/") + args.endpoint, _headers(args)
    payloads = [build_payload(args, r, args.chat) for r in reqs]  # built before the clock starts
    sem = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    # One single-connection client per stream in flight rather than one pooled client: httpcore's
    # pool rescans all its connections (O(n^2) with idle ones) whenever a response closes, which at
    # 256 streams costs more CPU than the streams themselves.  At most `concurrency` exist.
    ssl_ctx, clients = httpx.create_ssl_context(), []  # one CA load, not one per client
    limits, timeout = httpx.Limits(max_connections=1, max_keepalive_connections=1), httpx.Timeout(args.timeout)

    def new_client():
        clients.append(httpx.AsyncClient(limits=limits, timeout=timeout, verify=ssl_ctx, http2=False, trust_env=False))
        return clients[-1]

    idle = [new_client() for _ in range(min(concurrency or len(reqs), 1024))]  # made before the clock starts

    async def one(i: int) -> Output:
        async with sem:
            client = idle.pop() if idle else new_client()
            o = await send(client, url, headers, payloads[i], reqs[i], args.chat)
            idle.append(client)
        if on_done:
            on_done()
        return o

    try:
        if wait_start is not None:  # all worker processes start their clocks together
            await asyncio.to_thread(wait_start)
        start, t0, tasks = time.time(), time.perf_counter(), []
        for i, at in enumerate(arrivals):
            if (delay := at - (time.perf_counter() - t0)) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        outs = await asyncio.gather(*tasks)
        return start, time.time(), list(outs)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def _headers(args: argparse.Namespace) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _worker(w, args, reqs, arrivals, concurrency, ready, go, queue, counter) -> None:
    def tick() -> None:
        with counter.get_lock():
            counter.value += 1

    def wait_start() -> None:
        with ready.get_lock():
            ready.value += 1
        go.wait()
    try:
        queue.put((w, asyncio.run(run_requests(args, reqs, arrivals, concurrency, tick, wait_start))))
    except BaseException as e:
        queue.put((w, f"{type(e).__name__}: {e}"))


def run_clients(args: argparse.Namespace, reqs: list[Request], arrivals: list[float], bar):
    """Split the requests round-robin (the merged arrivals stay Poisson) over K processes."""
    k, ctx = args.num_clients, mp.get_context("spawn")
    ready, go, queue, counter = ctx.Value("i", 0), ctx.Event(), ctx.Queue(), ctx.Value("i", 0)
    procs = []
    for w in range(k):
        conc = None if args.max_concurrency is None else args.max_concurrency // k + (w < args.max_concurrency % k)
        procs.append(ctx.Process(target=_worker, daemon=True, args=(
            w, args, reqs[w::k], arrivals[w::k], conc, ready, go, queue, counter)))
        procs[-1].start()
    results: dict[int, tuple | str] = {}
    while ready.value < k and all(p.is_alive() for p in procs) and queue.empty():
        time.sleep(0.02)  # spawning imports numpy/httpx: seconds; the clocks start after
    go.set()
    while len(results) < k:
        if not queue.empty():
            w, r = queue.get()
            results[w] = r
        elif any(not procs[w].is_alive() for w in range(k) if w not in results) and queue.empty():
            raise RuntimeError("a client process died without a result")  # its queue item is flushed before exit
        else:
            time.sleep(0.1)
        bar.update(counter.value - bar.n)
    for p in procs:
        p.join()
    if errs := [r for r in results.values() if isinstance(r, str)]:
        raise RuntimeError(f"client process failed: {errs[0]}")
    outs: list = [None] * len(reqs)
    for w, (_, _, o) in results.items():
        outs[w::k] = o  # back to request order
    return min(r[0] for r in results.values()), max(r[1] for r in results.values()), outs
