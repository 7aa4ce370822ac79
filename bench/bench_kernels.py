"""Benchmark kernels.matmul: weight bandwidth, batch amortisation, JIT compile time.

Run from the repository root (`make bench` does):

    python bench/bench_kernels.py [--quick] [--formats q8_0,q4_0] [--threads 2]

Prints three tables to stdout (progress goes to stderr):
(a) T = 1 (decoding one token): GB/s of stored weight bytes that matmul streams,
    next to a NumPy float32 matrix-vector product (BLAS) on the same shape in
    the same run, and their ratio. Memory-bound kernels are judged by bytes/s.
(b) T amortisation: time for T tokens / time for 1 token. A batch reads W once,
    so T = 8 should cost far less than 8 (speculative decoding relies on it).
(c) JIT compile time of each kernel in a fresh process with an empty Numba
    cache, and the start-up time of the same call once the cache is filled.
Timings are medians over repeats, with the min-max spread; weights are random
values quantised with refinfer.quant.quantize (random blocks with finite scales for
the K-quants and IQ4 types, which refinfer reads but does not write), in SmolLM2-135M's
shapes; 256-weight formats skip the shapes whose K = 576 is no multiple of 256, and
one large shape (16384 x 1536, as big as SmolLM2's output head) is common to all.
Table (d) is the summary per format at that shape: GB/s at T = 1 and T = 8 / T = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import log, time_call  # noqa: E402  (bench/timing.py)

sys.path.insert(0, str(ROOT / "tests"))
from quant_blocks import random_rows  # noqa: E402  (tests/quant_blocks.py)
from refinfer import kernels, quant  # noqa: E402
from refinfer.quant import QTensor  # noqa: E402

# (N, K) of SmolLM2-135M: q/o proj, k/v proj, gate/up, down, output (tied embedding)
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (16384, 1536)]
AMORTISATION_SHAPES = [(1536, 576), (576, 1536), (49152, 576), (16384, 1536)]
SUMMARY_SHAPE = (16384, 1536)  # every format's K divides 1536
TOKENS = [1, 2, 4, 8, 16]


def random_qtensor(fmt: quant.Format, n: int, k: int, rng: np.random.Generator) -> QTensor:
    """A random (N, K) matrix of weights ~ N(0, 0.02^2), stored in `fmt` (random blocks
    where refinfer has no quantiser: the kernels' speed does not depend on the values)."""
    if fmt.name not in quant.QUANTIZE_FORMATS:
        return QTensor(f"{n}x{k}", fmt, (n, k), random_rows(fmt, n, k, int(rng.integers(1 << 31))))
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.02)
    return QTensor(f"{n}x{k}", fmt, (n, k), quant.quantize(w, fmt))


def fits(name: str, k: int) -> bool:
    """Whether rows of k weights can be stored in format `name`."""
    return k % quant.FORMATS[name].block_size == 0


def bandwidth_table(formats: list[str], repeats: int, rng: np.random.Generator) -> None:
    """(a) GB/s of weight bytes at T = 1, against a float32 BLAS matrix-vector product."""
    print("\n(a) T = 1: GB/s of stored weight bytes, median [min-max]; BLAS = NumPy f32 W @ x")
    print(
        f"{'N x K':>11} {'format':>6} {'MB':>7} {'ms':>8} {'GB/s':>24} "
        f"{'BLAS GB/s':>24} {'ratio':>6}"
    )
    for n, k in SHAPES:
        log(f"bandwidth {n}x{k}: BLAS")
        w32 = rng.standard_normal((n, k), dtype=np.float32)
        x1 = rng.standard_normal(k, dtype=np.float32)
        b_med, b_min, b_max = time_call(lambda w32=w32, x1=x1: w32 @ x1, repeats)
        blas = w32.nbytes / b_med / 1e9
        blas_txt = f"{blas:.1f} [{w32.nbytes / b_max / 1e9:.1f}-{w32.nbytes / b_min / 1e9:.1f}]"
        for name in (f for f in formats if fits(f, k)):
            log(f"bandwidth {n}x{k}: {name}")
            q = random_qtensor(quant.FORMATS[name], n, k, rng)
            x = rng.standard_normal((1, k), dtype=np.float32)
            out = np.empty((1, n), np.float32)
            med, lo, hi = time_call(lambda q=q, x=x, out=out: kernels.matmul(x, q, out), repeats)
            gbs = q.nbytes / med / 1e9
            gbs_txt = f"{gbs:.1f} [{q.nbytes / hi / 1e9:.1f}-{q.nbytes / lo / 1e9:.1f}]"
            print(
                f"{n:>5} x {k:<4} {name:>6} {q.nbytes / 1e6:7.2f} {med * 1e3:8.3f} "
                f"{gbs_txt:>24} {blas_txt:>24} {gbs / blas:6.2f}",
                flush=True,
            )


def amortisation_table(formats: list[str], repeats: int, rng: np.random.Generator) -> dict:
    """(b) time(T) / time(1): the cost of a batch of T tokens relative to one token.

    Returns, per format, (GB/s median, min, max at T = 1; T = 8 / T = 1) at SUMMARY_SHAPE.
    """
    summary = {}
    print("\n(b) T amortisation: time(T) / time(T=1), medians; ms is T = 1 [min-max]")
    head = " ".join(f"{'T=' + str(t):>6}" for t in TOKENS[1:])
    print(f"{'N x K':>11} {'format':>6} {'T=1 ms':>22} {head}")
    for n, k in AMORTISATION_SHAPES:
        for name in (f for f in formats if fits(f, k)):
            log(f"amortisation {n}x{k}: {name}")
            q = random_qtensor(quant.FORMATS[name], n, k, rng)
            times = {}
            for t in TOKENS:
                x = rng.standard_normal((t, k), dtype=np.float32)
                out = np.empty((t, n), np.float32)
                times[t] = time_call(lambda q=q, x=x, out=out: kernels.matmul(x, q, out), repeats)
            base, lo, hi = times[1]
            ratios = " ".join(f"{times[t][0] / base:6.2f}" for t in TOKENS[1:])
            t1 = f"{base * 1e3:.3f} [{lo * 1e3:.3f}-{hi * 1e3:.3f}]"
            print(f"{n:>5} x {k:<4} {name:>6} {t1:>22} {ratios}", flush=True)
            if (n, k) == SUMMARY_SHAPE:
                summary[name] = (q.nbytes / base / 1e9, q.nbytes / hi / 1e9, q.nbytes / lo / 1e9,
                                 times[8][0] / base)  # fmt: skip
    return summary


def summary_table(summary: dict[str, tuple[float, float, float, float]]) -> None:
    """(d) per format at SUMMARY_SHAPE: bits per weight, GB/s at T = 1, T = 8 / T = 1."""
    n, k = SUMMARY_SHAPE
    print(f"\n(d) summary at {n} x {k}: GB/s of stored bytes at T = 1, median [min-max]")
    print(f"{'format':>7} {'bits/w':>6} {'GB/s at T=1':>20} {'T=8/T=1':>8}")
    for name, (gbs, lo, hi, t8) in summary.items():
        bits = quant.FORMATS[name].bits_per_weight
        print(f"{name:>7} {bits:6.2f} {f'{gbs:.1f} [{lo:.1f}-{hi:.1f}]':>20} {t8:8.2f}", flush=True)


_FIRST_CALL_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import numpy as np
from refinfer import kernels, quant
from refinfer.quant import QTensor
seconds = {"import": time.perf_counter() - start}
for name in sys.argv[1].split(","):
    fmt = quant.FORMATS[name]
    k = max(64, fmt.block_size)
    q = QTensor("w", fmt, (4, k), np.zeros((4, fmt.row_bytes(k)), np.uint8))
    start = time.perf_counter()
    kernels.matmul(np.ones((1, k), np.float32), q)
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def compile_table(formats: list[str]) -> None:
    """(c) first call in a fresh process: empty Numba cache, then the filled cache."""
    print("\n(c) first matmul call in a fresh process, seconds")
    print(f"{'':>14} {'import':>7} " + " ".join(f"{name:>7}" for name in formats))
    with tempfile.TemporaryDirectory(prefix="refinfer-numba-cache-") as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        for label in ("empty cache", "cached"):
            log(f"compile time: {label}")
            done = subprocess.run(
                [sys.executable, "-c", _FIRST_CALL_SCRIPT, ",".join(formats)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            seconds = json.loads(done.stdout)
            cells = " ".join(f"{seconds[name]:7.2f}" for name in formats)
            print(f"{label:>14} {seconds['import']:7.2f} {cells}", flush=True)


def main() -> None:
    """Parse arguments and print the three tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument(
        "--formats", default=",".join(quant.FORMATS), help="comma-separated formats (default: all)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Numba threads (default: NUMBA_NUM_THREADS or all cores)",
    )
    parser.add_argument("--skip", default="", help="comma-separated tables to skip: a,b,c")
    args = parser.parse_args()
    formats = args.formats.split(",")
    unknown = [name for name in formats if name not in quant.FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {list(quant.FORMATS)}")
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    repeats = 5 if args.quick else 21
    rng = np.random.default_rng(0)
    print(
        f"refinfer matmul benchmark: {numba.get_num_threads()} Numba threads, "
        f"{repeats} repeats, numpy {np.__version__}, numba {numba.__version__}"
    )
    skip = set(args.skip.split(","))
    if "c" not in skip:  # first: the compile table must not find this process's cache
        compile_table(formats)
    if "a" not in skip:
        bandwidth_table(formats, repeats, rng)
    if "b" not in skip:
        summary_table(amortisation_table(formats, repeats, rng))


if __name__ == "__main__":
    main()
