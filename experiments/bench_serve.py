"""``kvlab bench serve``: load generator for any OpenAI-compatible server (like ``vllm bench serve``).

Streams N requests (random or ShareGPT-like lengths) at a Poisson/gamma request rate and/or a
concurrency cap, times every stream on the client (TTFT, ITL, TPOT, E2EL) and prints vLLM's
result table; ``--save-result`` writes vLLM's JSON field names.  ``--num-clients K`` splits the
load over K processes when one Python event loop cannot keep up; ``--server-metrics`` adds the
server's own token rate from /metrics, which does not depend on the client keeping up.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

from experiments.atomic import write_json
from experiments.serve_client import (  # noqa: F401  (re-exported: the client side lives in serve_client.py now)
    VOCAB_HIGH, WORDS, Output, Request, _error_of, _has_text, _headers, _worker, build_payload, make_requests,
    run_clients, run_requests, send)
from experiments.workloads import arrival_times

PROG = "kvlab bench serve"
COUNTERS = ("vllm:generation_tokens_total", "kvlab_generation_tokens_total")  # /metrics, first found


# ---------------------------------------------------------------- results


def _pkey(p: float) -> str:
    return str(int(p)) if p == int(p) else str(p)


def summarize(args: argparse.Namespace, outs: list[Output], duration: float) -> dict:
    ok = [o for o in outs if o.success]
    samples = {  # seconds; TTFT/TPOT only where content arrived
        "ttft": [o.ttft for o in ok if o.ttft > 0],
        "tpot": [(o.e2el - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1 and o.ttft > 0],
        "itl": [x for o in ok for x in o.itl],
        "e2el": [o.e2el for o in ok],
    }
    tin, tout = sum(o.prompt_len for o in ok), sum(o.output_tokens for o in ok)
    res = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if args.chat else "openai",
        "model_id": args.model, "tokenizer_id": args.model,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "duration": duration, "completed": len(ok), "failed": len(outs) - len(ok),
        "total_input_tokens": tin, "total_output_tokens": tout,
        "request_throughput": len(ok) / duration, "request_goodput": None,
        "output_throughput": tout / duration, "total_token_throughput": (tin + tout) / duration,
        "input_lens": [o.prompt_len for o in outs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outs],
        "ttfts": [o.ttft for o in outs], "itls": [o.itl for o in outs],
        "generated_texts": ["" for _ in outs],  # not kept: the client does no per-chunk text work
        "errors": [o.error for o in outs],
    }
    for m, xs in samples.items():
        ms = np.asarray(xs) * 1000
        stats = {"mean": np.mean, "median": np.median, "std": np.std,
                 **{f"p{_pkey(p)}": lambda x, p=p: np.percentile(x, p) for p in args.percentiles}}
        for stat, fn in stats.items():  # null where nothing was timed (every request failed): not a 0 ms figure
            res[f"{stat}_{m}_ms"] = float(fn(ms)) if len(ms) else None
    return res


def print_table(args: argparse.Namespace, r: dict) -> None:
    def row(name: str, v) -> None:
        print(f"{name:<40} {'n/a' if v is None else v:<10{'.2f' if isinstance(v, float) else ''}}")

    print(f"{' Serving Benchmark Result ':=^50}")
    for name, key in [("Successful requests", "completed"), ("Failed requests", "failed"),
                      ("Maximum request concurrency", "max_concurrency"), ("Benchmark duration (s)", "duration"),
                      ("Total input tokens", "total_input_tokens"), ("Total generated tokens", "total_output_tokens"),
                      ("Request throughput (req/s)", "request_throughput"),
                      ("Output token throughput (tok/s)", "output_throughput"),
                      ("Server output throughput (tok/s)", "server_output_throughput"),
                      ("Total Token throughput (tok/s)", "total_token_throughput")]:
        if r.get(key) is not None:
            row(name + ":", r[key])
    for m, title in [("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                     ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")]:
        print(f"{title:-^50}")
        for stat in ["mean", "median"] + [f"p{_pkey(p)}" for p in args.percentiles]:
            row(f"{stat.capitalize()} {m.upper()} (ms):", r[f"{stat}_{m}_ms"])
    print("=" * 50)
    if r["failed"]:
        print(f"first error: {next(e for e in r['errors'] if e)}")


def scrape_counters(args: argparse.Namespace) -> dict[str, float]:
    """Generation-token counters of GET /metrics (Prometheus text), summed over label sets."""
    import httpx

    try:
        text = httpx.get(args.base_url.rstrip("/") + "/metrics", headers=_headers(args), timeout=10,
                         trust_env=False).raise_for_status().text
    except httpx.HTTPError as e:
        print(f"warning: GET /metrics failed: {e}", file=sys.stderr)
        return {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        for name in COUNTERS:
            rest = line[len(name):]
            if line.startswith(name) and rest[:1] in ("{", " "):
                rest = rest[rest.rindex("}") + 1:] if rest.startswith("{") else rest
                totals[name] = totals.get(name, 0.0) + float(rest.split()[0])
    return totals


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from experiments.cli import Parser  # errors in one line

    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--base-url", default="http://127.0.0.1:8000", help="server root (default %(default)s)")
    a("--endpoint", default="/v1/completions", help="/v1/completions (default) or /v1/chat/completions")
    a("--model", help="model name (default: the first id of GET /v1/models)")
    a("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("KVLAB_API_KEY"),
      help="bearer token (default: $OPENAI_API_KEY or $KVLAB_API_KEY)")
    a("--dataset-name", choices=["random", "sharegpt"], default="random",
      help="random: --random-* lengths; sharegpt: synthetic ShareGPT-like lengths (mean 161 in / 338 out)")
    a("--num-prompts", type=int, default=1000)
    a("--request-rate", type=float, default=math.inf, help="req/s (default inf: all at once)")
    a("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson, <1 burstier")
    a("--max-concurrency", type=int, help="most requests in flight (default: unlimited)")
    a("--seed", type=int, default=0)
    a("--random-input-len", type=int, default=1024)
    a("--random-output-len", type=int, default=128)
    a("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]")
    a("--max-model-len", type=int, default=2048, help="sharegpt: cap prompt + output (prompt <= half)")
    a("--prompt-format", choices=["tokens", "text"], help="tokens: prompt as token ids (exact length, "
      "/v1/completions only; default there); text: random words the server tokenizes (chat: always)")
    a("--vocab-low", type=int, default=10, help="token-id prompts: ids uniform in [low, high)")
    a("--vocab-high", type=int, help="default: the server's vocabulary where it publishes it (kvlab: in "
      f"/openapi.json), at most {VOCAB_HIGH}; else {VOCAB_HIGH}")
    a("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
      help="send vLLM's ignore_eos so every request makes exactly its output length (default on)")
    a("--temperature", type=float, default=0.0)
    a("--timeout", type=float, default=6 * 3600, help="per-request timeout in s")
    a("--num-clients", type=int, default=1, help="worker processes sharing the load and concurrency")
    a("--server-metrics", action="store_true", help="also report the server's token rate from GET /metrics")
    a("--metric-percentiles", default="99", help='comma-separated, e.g. "50,90,99"')
    a("--save-result", action="store_true")
    a("--result-dir", default=".")
    a("--result-filename", help="default: {backend}-{rate}qps[-concurrency{C}]-{model}-{date}.json")
    a("--disable-tqdm", action="store_true")
    args = ap.parse_args(argv)

    def need(ok: bool, msg: str) -> None:
        if not ok:
            ap.error(msg)
    need(args.num_prompts >= 1, f"--num-prompts must be >= 1 (got {args.num_prompts})")
    need(args.request_rate > 0, f"--request-rate must be > 0 req/s, or inf (got {args.request_rate})")
    need(args.burstiness > 0, f"--burstiness must be > 0 (got {args.burstiness})")
    need(args.max_concurrency is None or args.max_concurrency >= 1,
         f"--max-concurrency must be >= 1 (got {args.max_concurrency}); leave it out for no limit")
    need(args.random_input_len >= 1 and args.random_output_len >= 1, "--random-input-len and --random-output-len must be >= 1")
    need(0 <= args.random_range_ratio < 1, f"--random-range-ratio must be in [0, 1) (got {args.random_range_ratio})")
    need(args.max_model_len >= 2, "--max-model-len must be >= 2")
    need(0 <= args.vocab_low < (VOCAB_HIGH if args.vocab_high is None else args.vocab_high),
         "--vocab-low must be >= 0 and below --vocab-high")
    need(args.temperature >= 0, f"--temperature must be >= 0 (0: greedy; got {args.temperature})")
    need(args.timeout > 0, "--timeout must be > 0 seconds")
    # the client speaks the completions and chat protocols only: another path is a 404 per request
    need(args.endpoint.startswith("/") and args.endpoint.rstrip("/").endswith("/completions"),
         f"--endpoint must be /v1/completions or /v1/chat/completions (got {args.endpoint!r})")
    need(args.base_url.startswith(("http://", "https://")), f"--base-url must start with http:// or https:// (got {args.base_url!r})")
    args.chat = args.endpoint.rstrip("/").endswith("chat/completions")
    need(not (args.chat and args.prompt_format == "tokens"), "--prompt-format tokens needs /v1/completions; "
         "the chat endpoint takes text (leave --prompt-format out)")
    args.text = args.chat or args.prompt_format == "text"
    need(1 <= args.num_clients <= args.num_prompts, f"--num-clients must be in [1, --num-prompts] (got {args.num_clients})")
    need(args.max_concurrency is None or args.num_clients <= args.max_concurrency,
         "--num-clients must be <= --max-concurrency (each client gets a share of it)")
    try:
        args.percentiles = [float(p) for p in args.metric_percentiles.split(",")]
        assert all(0 < p <= 100 for p in args.percentiles)
    except (ValueError, AssertionError):
        ap.error(f'--metric-percentiles must be numbers in (0, 100], e.g. "50,90,99" (got {args.metric_percentiles!r})')
    return args


class FlagError(RuntimeError):
    """A flag the server shows to be wrong (before any load is sent): exit code 2."""


def resolve_model(args: argparse.Namespace) -> str:
    """GET /v1/models: the first id, and a reachability check before any load is sent."""
    import httpx

    url = args.base_url.rstrip("/") + "/v1/models"
    try:
        r = httpx.get(url, headers=_headers(args), timeout=10, trust_env=False)
    except httpx.TransportError as e:
        raise RuntimeError(f"cannot reach {url} ({type(e).__name__}: {e}); start the server or fix --base-url") from None
    try:
        cards = r.raise_for_status().json()["data"]
        model = args.model or cards[0]["id"]
    except Exception as e:
        if args.model:
            return args.model
        raise RuntimeError(f"GET {url} gave no model id ({e}); pass --model") from None
    card = next((c for c in cards if isinstance(c, dict) and c.get("id") == model), {})
    if isinstance(card.get("max_model_len"), int):  # kvlab and vLLM publish it
        check_lengths(args, card["max_model_len"])
    return model


def check_lengths(args: argparse.Namespace, server_len: int) -> None:
    """Requests within the server's context: longer ones fail every request (HTTP 400)."""
    if args.dataset_name == "sharegpt":
        if args.max_model_len > server_len:
            raise FlagError(f"--max-model-len {args.max_model_len}: more than the server's max_model_len "
                            f"{server_len}: give --max-model-len {server_len} or less")
        return
    r = args.random_range_ratio
    longest = [max(1, math.ceil(n * (1 + r))) for n in (args.random_input_len, args.random_output_len)]
    if sum(longest) > server_len:
        raise FlagError(f"--random-input-len {args.random_input_len} and --random-output-len "
                        f"{args.random_output_len}: requests of up to {sum(longest)} tokens, more than the server's "
                        f"max_model_len {server_len}: lower them")


def server_vocab(args: argparse.Namespace) -> int | None:
    """The server's vocabulary size, where it publishes it: kvlab's /openapi.json bounds the
    prompt's token ids (0..vocab-1); None for a server that does not (vLLM) or an unreadable one."""
    import httpx

    try:
        doc = httpx.get(args.base_url.rstrip("/") + "/openapi.json", headers=_headers(args), timeout=10,
                        trust_env=False).raise_for_status().json()
        prompt = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    except Exception:  # noqa: BLE001 (no schema, another layout: nothing learnt)
        return None
    tops = []

    def walk(node) -> None:  # token ids: integers with a maximum, at any depth of the prompt's anyOf
        if isinstance(node, dict):
            if node.get("type") == "integer" and isinstance(node.get("maximum"), int):
                tops.append(node["maximum"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(prompt)
    return min(tops) + 1 if tops else None


def check_vocab(args: argparse.Namespace) -> None:
    """Token-id prompts inside the server's vocabulary: ids beyond it fail every request (HTTP 400)."""
    vocab = server_vocab(args)
    if vocab is None:
        return
    if args.vocab_high is not None and args.vocab_high > vocab:
        raise FlagError(f"--vocab-high {args.vocab_high}: the server's model has {vocab} token ids: give "
                        f"--vocab-high {vocab} or less, or leave it out")
    if args.vocab_high is None:
        args.vocab_high = min(VOCAB_HIGH, vocab)
    if args.vocab_low >= args.vocab_high:
        raise FlagError(f"--vocab-low {args.vocab_low}: the server's model has {vocab} token ids: give "
                        f"--vocab-low below {args.vocab_high}")


def benchmark(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    args.model = resolve_model(args)
    if not args.text:
        check_vocab(args)
    reqs = make_requests(args)
    rng = np.random.default_rng(np.random.SeedSequence(args.seed).spawn(3)[2])
    arrivals = arrival_times(len(reqs), args.request_rate, "poisson" if args.burstiness == 1 else "gamma",
                             args.burstiness, rng).tolist()
    before = scrape_counters(args) if args.server_metrics else {}
    with tqdm(total=len(reqs), disable=args.disable_tqdm, desc="requests") as bar:
        if args.num_clients == 1:
            start, end, outs = asyncio.run(run_requests(args, reqs, arrivals, args.max_concurrency,
                                                        lambda: bar.update(1)))
        else:
            start, end, outs = run_clients(args, reqs, arrivals, bar)
    res = summarize(args, outs, end - start)
    if args.server_metrics:
        after = scrape_counters(args)
        name = next((n for n in COUNTERS if n in before and n in after), None)
        res["server_output_throughput"] = (after[name] - before[name]) / (end - start) if name else None
        if name is None:
            print(f"warning: no {' or '.join(COUNTERS)} in /metrics; server_output_throughput is null", file=sys.stderr)
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = benchmark(args)
        print_table(args, res)
        if not res["completed"]:  # a table of failures is no measurement: nothing saved, exit 1
            print(f"{PROG}: every request failed ({res['failed']}); nothing saved", file=sys.stderr)
            return 1
        if args.save_result:
            conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
            name = args.result_filename or (
                f"{res['backend']}-{args.request_rate}qps{conc}-{args.model.split('/')[-1]}-{res['date']}.json")
            write_json(Path(args.result_dir) / name, res)  # temp file + os.replace: complete or absent
            print(f"saved {Path(args.result_dir) / name}")
    except (RuntimeError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, FlagError) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
