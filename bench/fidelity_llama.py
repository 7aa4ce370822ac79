"""Fidelity to llama.cpp: refinfer's logits against llama-cpp-python's on the same file and text.

For each model file, both engines run one prefill of the same token ids (FIDELITY_TEXT,
tokenised by llama.cpp, with BOS) and return the logits of every position; this prints
mean and max KL(llama.cpp || refinfer), top-1 agreement and max |logit difference|, for
refinfer's numerics="exact" and numerics="ggml". llama.cpp runs as llama-cpp-python
builds it by default here (CPU, -march=native, no flash attention, f16 K/V cache).

    python bench/fidelity_llama.py [--models q8_0,q4_0,q4_k_m] [--numerics exact,ggml] [--json]

The README's "Numerics" table comes from this script; tests/oracle/test_ggml_fidelity.py
holds the issue's bounds with the same functions. Needs `make peers` (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from llama_cpp_peer import agreement, llama_cpp_logits, model_file  # noqa: E402

import refinfer  # noqa: E402


def measure(name: str, numerics: list[str]) -> list[dict]:
    """One row per numerics for model `name`: agreement with llama.cpp on FIDELITY_TEXT."""
    path = model_file(name)
    ids, theirs = llama_cpp_logits(path)
    rows = []
    for mode in numerics:
        ours = refinfer.load(path, numerics=mode).logits(ids)
        rows.append({"model": name, "numerics": mode, **agreement(theirs, ours)})
    return rows


def main() -> None:
    """Print the fidelity table (or JSON lines)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="q8_0,q4_0,q4_k_m", help="comma-separated (q8_0,q4_0,...)")
    p.add_argument("--numerics", default="exact,ggml", help="comma-separated")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args()
    if not args.json:
        print("| model | numerics | tokens | mean KLD | max KLD | top-1 | max abs(dlogit) |")
        print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for r in measure(name, args.numerics.split(",")):
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"| SmolLM2 {name.upper()} | {r['numerics']} | {r['tokens']} | "
                      f"{r['mean_kld']:.2e} | {r['max_kld']:.2e} | {100 * r['top1']:.1f}% | "
                      f"{r['max_abs_diff']:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
