"""Timing helpers shared by the benchmarks: medians of repeated samples, progress on stderr."""

from __future__ import annotations

import sys
import time

import numpy as np

MIN_SAMPLE_SECONDS = 0.005  # short calls are timed in loops at least this long


def log(message: str) -> None:
    """Progress for people, on stderr."""
    print(message, file=sys.stderr, flush=True)


def time_call(fn, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) seconds per call of fn() over `repeats` samples."""
    fn()  # warm up: compile (or load the cache), page in, spin up the thread pool
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(MIN_SAMPLE_SECONDS / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return float(np.median(samples)), min(samples), max(samples)
