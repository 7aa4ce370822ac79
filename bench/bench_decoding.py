"""Decode speed of every decoding strategy next to plain decoding, on three kinds of prompt.

SmolLM2 Q8_0 (models/, `make models`), greedy, 128 new tokens. The prompts, in the chat
template: continue a code file with repetitive structure (the instruct model writes the file
out again and extends it); quote a passage given in the prompt; an open story. Each
strategy runs `--repeats` times per prompt, strategies interleaved so that the machine's
noise spreads over all of them; the table gives median decode tok/s [min-max], the ratio to
plain decoding's median in the same run, the acceptance rate and tokens per forward call.
Every run's tokens are checked against plain decoding's (greedy strategies are exact).

The draft model of `speculative` is the Q4_0 copy of SmolLM2 unless --draft says otherwise.
`self-speculative` uses the calibration beside the model; without one it is made first on
--calibration-text (default: this repository's README and a source file, not the prompts).

The first table explains the rest: the time of one forward call of T tokens over that of
T = 1, after a 256-token prompt (what verifying T - 1 proposed tokens costs).

    python bench/bench_decoding.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from timing import log

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("plain", "prompt-lookup", "lookahead", "self-speculative", "speculative")

CODE = '''import math


def area_of_circle(radius: float) -> float:
    """The area of a circle of the given radius."""
    return math.pi * radius**2


def area_of_square(side: float) -> float:
    """The area of a square of the given side."""
    return side**2


def area_of_rectangle(width: float, height: float) -> float:
    """The area of a rectangle of the given width and height."""
    return width * height


def perimeter_of_circle(radius: float) -> float:
    """The perimeter of a circle of the given radius."""
    return 2 * math.pi * radius
'''

PASSAGE = (
    "The river rises in the high meadows, where snow lies late into the spring. It runs "
    "north through a narrow valley of pine and birch, past the old mill and the stone "
    "bridge that the villagers built in the year of the great flood. Below the bridge it "
    "widens and slows, and farmers along its banks grow barley, apples and pears. In the "
    "autumn the town holds a market on the bridge, and boats carry the harvest down to "
    "the sea."
)

PROMPTS = {
    "code": (
        "chat",
        "Continue this Python file: write perimeter_of_square, "
        "perimeter_of_rectangle, volume_of_cube and volume_of_sphere in the same style."
        f"\n\n```python\n{CODE}```",
    ),  # fmt: skip
    "quote": ("chat", f"Repeat this passage word for word:\n\n{PASSAGE}"),
    "story": ("chat", "Write a short story about a lighthouse keeper who finds a map."),
}


def prompt_ids(model, kind: str, text: str) -> list[int]:
    """Token ids of a prompt: raw text, or a user message in the chat template."""
    tok = model.tokenizer
    if kind == "chat":
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                          parse_special=True)  # fmt: skip
    return tok.encode(text)


def forward_cost(model, Ts: list[int], repeats: int) -> dict[int, float]:
    """Median time of a forward call of T tokens after a 256-token prefix, over that of T=1."""
    from refinfer.model import Batch

    pool = model.new_pool(256 + max(Ts))
    seq = pool.new_sequence()
    model.forward(Batch.append(pool, [(seq, list(range(256)))], all_logits=False), pool)
    seconds = {}
    for T in Ts:
        samples = []
        for _ in range(repeats + 1):  # the first allocates the work buffers
            start = time.perf_counter()
            model.forward(Batch.append(pool, [(seq, list(range(T)))]), pool)
            samples.append(time.perf_counter() - start)
            pool.truncate(seq, 256)
        seconds[T] = statistics.median(samples[1:])
    return {T: seconds[T] / seconds[1] for T in Ts}


def ensure_calibration(model, text_path: list[Path]) -> None:
    """Calibrate the self-speculative layers unless a calibration is beside the model."""
    from refinfer.decoding.calibrate import calibrate, calibration_path, write_calibration

    path = calibration_path(model.path)
    if path.exists():
        log(f"using {path.name}")
        return
    text = "\n\n".join(p.read_text() for p in text_path)
    log(f"calibrating the self-speculative draft on {', '.join(p.name for p in text_path)}")
    write_calibration(calibrate(model, model.tokenizer.encode(text)[:512], progress=log), path)


def main() -> int:
    """Run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models/smollm2-135m-q8_0.gguf"))
    parser.add_argument("--draft", default=str(ROOT / "models/smollm2-135m-q4_0.gguf"))
    parser.add_argument("--calibration-text", nargs="+", type=Path,
                        default=[ROOT / "README.md", ROOT / "refinfer/kv_pool.py"])  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-n", type=int, default=128, help="new tokens per run")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = parser.parse_args()

    import numba

    from refinfer.model import load

    numba.set_num_threads(args.threads)
    model = load(args.model)
    draft = load(args.draft) if "speculative" in args.strategies else None
    if "self-speculative" in args.strategies:
        ensure_calibration(model, args.calibration_text)

    cost = forward_cost(model, [1, 2, 4, 8, 16, 32], args.repeats)
    print(f"\n{Path(args.model).name}, {args.threads} threads: forward(T) / forward(1)")
    print("| T | " + " | ".join(map(str, cost)) + " |\n|---|" + "---|" * len(cost))
    print("| time | " + " | ".join(f"{c:.2f}" for c in cost.values()) + " |")

    rows = []
    for name, (kind, text) in PROMPTS.items():
        ids = prompt_ids(model, kind, text)
        runs = {s: [] for s in args.strategies}
        for r in range(args.repeats):
            for s in args.strategies:
                g = model.generate(ids, max_new_tokens=args.n, decoding=s, draft_model=draft)
                runs[s].append(g)
                log(f"{name} #{r + 1} {s}: {g.stats.decode_tokens_per_second:.1f} tok/s")
        plain_ids = runs["plain"][0].ids if "plain" in runs else None
        plain = statistics.median(g.stats.decode_tokens_per_second for g in runs.get("plain", []))
        for s, gens in runs.items():
            speeds = [g.stats.decode_tokens_per_second for g in gens]
            steps = gens[0].stats.steps
            exact = plain_ids is None or all(g.ids == plain_ids for g in gens)
            rows.append((name, len(ids), s, statistics.median(speeds), min(speeds), max(speeds),
                         statistics.median(speeds) / plain, steps.acceptance_rate,
                         steps.tokens_per_call, exact))  # fmt: skip

    print(f"\n{args.n} new tokens, greedy, median of {args.repeats} [min-max]; "
          f"speculative draft: {Path(args.draft).name}")  # fmt: skip
    print("| prompt | strategy | decode tok/s | vs plain | acceptance | tokens/call | exact |")
    print("|---|---|---|---|---|---|---|")
    for name, n, s, med, lo, hi, ratio, acc, tpc, exact in rows:
        print(f"| {name} ({n} tok) | {s} | {med:.1f} [{lo:.1f}-{hi:.1f}] | {ratio:.2f}x | "
              f"{acc:.0%} | {tpc:.2f} | {'yes' if exact else 'NO'} |")  # fmt: skip
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
