"""`refinfer serve` under load: throughput, time to first token and latency by concurrency.

Starts `refinfer serve` in its own process (so the clients do not share its interpreter),
waits for /health, warms it up with one request, then for each concurrency C (default 1,
4, 16) sends N streamed chat requests (default 16, each a different question, greedy, at
most M new tokens, default 64) from C concurrent clients (httpx, asyncio) and reports:
generated tok/s over the whole level (all completion tokens / wall time), requests per
second, time to first token (request sent -> first text chunk) and latency (request sent ->
[DONE]) at the 50th/90th/99th percentiles, and the prefix-cache hit rate from /metrics.

    python bench/bench_server.py                                # SmolLM2 Q4_1, 1 thread
    python bench/bench_server.py --model models/x.gguf --concurrency 1,8 --requests 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from timing import log  # noqa: E402

TOPICS = ["rivers", "bread", "bicycles", "volcanoes", "owls", "chess", "glass", "tides",
          "maps", "bees", "clocks", "salt", "kites", "moss", "copper", "lighthouses"]  # fmt: skip


def start_server(args: argparse.Namespace) -> subprocess.Popen:
    """`refinfer serve` in a child process; returns once /health answers."""
    cmd = [sys.executable, "-m", "refinfer", "serve", "--port", str(args.port),
           "--threads", str(args.threads), "--max-seqs", str(max(args.concurrency))]  # fmt: skip
    server = subprocess.Popen(cmd + (["--model", args.model] if args.model else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{base(args)}/health").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start (run `refinfer serve` to see why)")


def base(args: argparse.Namespace) -> str:
    return f"http://127.0.0.1:{args.port}"


async def one_request(client: httpx.AsyncClient, topic: str, max_tokens: int) -> dict:
    """One streamed chat request: seconds to the first text and to [DONE], tokens made."""
    body = {"messages": [{"role": "user", "content": f"Tell me three facts about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, usage = time.perf_counter(), None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    return {"ttft": first, "latency": time.perf_counter() - start,
            "tokens": usage["completion_tokens"]}  # fmt: skip


async def level(args: argparse.Namespace, concurrency: int) -> dict:
    """args.requests requests, at most `concurrency` at a time; the level's figures."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(client: httpx.AsyncClient, i: int) -> dict:
        async with gate:
            return await one_request(client, TOPICS[i % len(TOPICS)], args.max_tokens)

    async with httpx.AsyncClient(base_url=base(args), timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(client, i) for i in range(args.requests)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    latency = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "tok/s": tokens / wall, "req/s": len(results) / wall,
            "tokens": tokens, "ttft": np.percentile(ttft, [50, 90, 99]),
            "latency": np.percentile(latency, [50, 90, 99])}  # fmt: skip


def prefix_hit_rate(args: argparse.Namespace) -> float:
    for line in httpx.get(f"{base(args)}/metrics").text.splitlines():
        if line.startswith("refinfer_prefix_cache_hit_rate "):
            return float(line.split()[1])
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: SmolLM2-135M-Instruct Q4_1")
    parser.add_argument("--concurrency", default="1,4,16", help="levels (1,4,16)")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (64)")
    parser.add_argument("--threads", type=int, default=1, help="the server's threads (1)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    server = start_server(args)
    try:
        log("warming up")
        asyncio.run(level(argparse.Namespace(**{**vars(args), "requests": 1}), 1))
        rows = []
        for c in args.concurrency:
            log(f"concurrency {c}: {args.requests} requests")
            rows.append(asyncio.run(level(args, c)))
        hits = prefix_hit_rate(args)
    finally:
        server.terminate()
        server.wait()
    print(
        f"{args.requests} streamed chat requests per level, at most {args.max_tokens} new "
        f"tokens, greedy, {args.threads} thread(s); prefix-cache hit rate {hits:.0%}\n"
    )
    print("| concurrency | generated tok/s | req/s | TTFT p50 / p90 / p99 (s) "
          "| latency p50 / p90 / p99 (s) |\n|---|---|---|---|---|")  # fmt: skip
    one = rows[0]["tok/s"]
    for r in rows:
        ttft, lat = ("{:.2f} / {:.2f} / {:.2f}".format(*r[k]) for k in ("ttft", "latency"))
        print(f"| {r['concurrency']} | {r['tok/s']:.1f} ({r['tok/s'] / one:.2f}x) "
              f"| {r['req/s']:.2f} | {ttft} | {lat} |")  # fmt: skip


if __name__ == "__main__":
    main()
