"""Continuous batching on SmolLM2: throughput against the number of concurrent sequences.

N requests (default 64) with prompts of mixed lengths (uniform in 32-512 tokens of plain
English, each from its own place in the text) and M new tokens each (default 128, greedy,
EOS ignored), all queued at once, run by the batching engine at max 1, 4, 8 and 16
concurrent sequences (prefix cache off, so every prompt is computed). Reported: generated
tok/s over the whole run; decode tok/s, the same over the steps that only decode (no prompt
chunk), which is what batching speeds up (prompt tokens are computed in batches of up to
the budget at any concurrency); mean time to first token (from the queueing of all
requests); mean tokens per forward call; KV utilisation (slots holding live tokens / slots
allocated, mean over steps); preemptions. Then the same requests behind a shared 200-token system
prompt, with and without the prefix cache: the hit rate and the speed-up. Each figure is
the median of --repeats runs.

    python bench/bench_batching.py                       # 64 requests x 128 tokens (long)
    python bench/bench_batching.py --requests 16 --new-tokens 32 --concurrency 1,8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from timing import log  # noqa: E402

from refinfer.decoding.batching import Engine, Request  # noqa: E402
from refinfer.model import Model, load  # noqa: E402

TEXT = (
    "The history of the river begins in the mountains, where snow melts each spring and "
    "runs down through forests of pine and birch. Farmers along its banks have grown wheat, "
    "barley and apples for centuries, and the towns they built trade by boat and by rail. "
    "In the old market square a clock tower still rings every hour, and on summer evenings "
    "musicians play while children chase pigeons across the cobbles. "
)
SYSTEM = (
    "You are a careful assistant for a regional library. Answer questions about local "
    "history, geography and farming clearly and briefly, cite the sources you know, say "
    "when you are unsure, and never invent dates, names or numbers. "
)
SYSTEM_TOKENS = 200


def make_prompts(model: Model, n: int, seed: int) -> list[list[int]]:
    """n prompts of 32-512 token ids, each cut from a different place in a long text."""
    ids = model.tokenizer.encode(TEXT * 200)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(32, 513, n)
    starts = rng.integers(0, len(ids) - 512, n)
    return [ids[s : s + k] for s, k in zip(starts, lengths, strict=True)]


def system_prompt(model: Model) -> list[int]:
    """SYSTEM_TOKENS token ids of a system prompt every request shares."""
    return model.tokenizer.encode(SYSTEM * 10)[:SYSTEM_TOKENS]


def run(model: Model, prompts, new_tokens: int, max_seqs: int, caching: bool, args) -> dict:
    """One batch of every prompt through a fresh engine; its figures."""
    engine = Engine(
        model, max_seqs=max_seqs, max_tokens_per_step=args.max_tokens_per_step,
        kv_blocks=args.kv_blocks, prefix_caching=caching,
    )  # fmt: skip
    for p in prompts:
        engine.add_request(Request(p, max_tokens=new_tokens, ignore_eos=True))
    start = time.perf_counter()
    done, decode_seconds, decode_tokens = [], 0.0, 0
    while engine.has_unfinished():
        before, t0 = engine.stats, time.perf_counter()
        done += engine.step()
        after = engine.stats
        generated = after.generated_tokens - before.generated_tokens
        if after.tokens_computed - before.tokens_computed == generated:  # decode tokens only
            decode_seconds += time.perf_counter() - t0
            decode_tokens += generated
    seconds = time.perf_counter() - start
    s = engine.stats
    return {
        "tok_s": s.generated_tokens / seconds,
        "decode_tok_s": decode_tokens / decode_seconds if decode_seconds else 0.0,
        "ttft": statistics.mean(c.time_to_first_token for c in done),
        "tokens_per_step": s.tokens_per_step,
        "kv_util": s.kv_utilisation,
        "preemptions": s.preemptions,
        "hit_rate": s.prefix_cache_hit_rate,
        "seconds": seconds,
    }


def median_run(repeats: int, *run_args) -> dict:
    """The median of each figure over `repeats` runs."""
    runs = [run(*run_args) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-q8_0.gguf")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,4,8,16", help="max concurrent sequences to try")
    p.add_argument("--max-tokens-per-step", type=int, default=256)
    p.add_argument("--kv-blocks", type=int, default=640, help="blocks of 16 tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not Path(args.model).exists():
        sys.exit(f"{args.model}: missing (run `make models`)")
    numba.set_num_threads(args.threads)
    model = load(args.model)
    prompts = make_prompts(model, args.requests, args.seed)
    run(model, prompts[:2], 2, 2, False, args)  # warm-up: load the compiled kernels
    n_prompt = sum(map(len, prompts)) / len(prompts)
    print(f"SmolLM2-135M {Path(args.model).stem}, {args.threads} threads, {args.requests} "
          f"requests (prompts 32-512 tokens, mean {n_prompt:.0f}) x {args.new_tokens} new "
          f"tokens, budget {args.max_tokens_per_step} tokens/step, {args.kv_blocks} KV blocks "
          f"of 16, median of {args.repeats}")  # fmt: skip
    print("| max seqs | generated tok/s | speed-up | decode tok/s | speed-up | mean TTFT | "
          "tokens/step | KV util | preemptions |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for max_seqs in map(int, args.concurrency.split(",")):
        log(f"... max {max_seqs} concurrent")
        r = median_run(args.repeats, model, prompts, args.new_tokens, max_seqs, False, args)
        base = base or r
        print(f"| {max_seqs} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x "
              f"| {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x "
              f"| {r['ttft']:.1f} s | {r['tokens_per_step']:.1f} | {r['kv_util']:.1%} "
              f"| {r['preemptions']:.0f} |", flush=True)  # fmt: skip

    system = system_prompt(model)
    shared = [system + q for q in prompts]
    max_seqs = max(map(int, args.concurrency.split(",")))
    print(f"\nshared {len(system)}-token system prompt, max {max_seqs} concurrent:")
    print("| prefix cache | generated tok/s | mean TTFT | hit rate | total s |")
    print("|---|---|---|---|---|")
    times = {}
    for caching in (False, True):
        log(f"... prefix cache {'on' if caching else 'off'}")
        r = median_run(args.repeats, model, shared, args.new_tokens, max_seqs, caching, args)
        times[caching] = r["seconds"]
        print(f"| {'on' if caching else 'off'} | {r['tok_s']:.1f} | {r['ttft']:.1f} s | "
              f"{r['hit_rate']:.1%} | {r['seconds']:.1f} |", flush=True)  # fmt: skip
    print(f"prefix-cache speed-up: {times[False] / times[True]:.2f}x")


if __name__ == "__main__":
    main()
