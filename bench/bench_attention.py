"""Benchmark kernels.attention.paged_attention: decode and prefill, and working memory.

Run from the repository root (`make bench` can call it):

    python bench/bench_attention.py [--quick] [--threads 1 2] [--repeats 30] [--against REV]

Prints two tables to stdout (progress goes to stderr), in SmolLM2-135M's attention
shapes (H = 9, KVH = 3, HD = 64; one layer; KV-pool blocks of BS = 16):
(a) time per call, median [min-max] over repeats, for each thread count, for decode
    (T = 1 query per sequence at the end of a context of 128 / 512 / 2048 keys, for 1
    and 8 sequences) and causal prefill (T = 512 queries of one sequence, positions
    0..511), with GB/s of K/V bytes read, next to the naive form in NumPy float32
    (gather K/V, repeat per query head, full score matrix, softmax) on the same data,
    and with --against REV, next to kernels/attention.py of git revision REV (old vs
    new in the same run, on the same data; revisions whose pool stored K/V as
    [n_blocks, BS, KVH, HD] get the data in that layout).
(b) working memory, tiled vs naive, from attention_working_memory.
K/V blocks are scattered randomly in the pool, as after a while of serving.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import log, time_call  # noqa: E402  (bench/timing.py)

from refinfer.kernels.attention import (  # noqa: E402
    attention_working_memory,
    paged_attention,
)

H, KVH, HD, BS = 9, 3, 64, 16  # SmolLM2-135M attention, default pool block size


class Workload:
    """S sequences of n_keys keys in a scattered pool, and a flat batch of query tokens."""

    def __init__(self, n_seqs: int, n_keys: int, prefill: bool, rng: np.random.Generator):
        per_seq = -(-n_keys // BS)  # blocks per sequence
        n_blocks = n_seqs * per_seq
        k = rng.standard_normal((n_blocks, BS, KVH, HD), dtype=np.float32)  # token-major
        v = rng.standard_normal((n_blocks, BS, KVH, HD), dtype=np.float32)
        self.kv_token_major = k, v  # the layout of the pool before the chunked kernel
        self.k_cache = np.ascontiguousarray(k.transpose(0, 2, 3, 1))  # (n_blocks, KVH, HD, BS)
        self.v_cache = np.ascontiguousarray(v.transpose(0, 2, 1, 3))  # (n_blocks, KVH, BS, HD)
        self.tables = rng.permutation(n_blocks).astype(np.int32).reshape(n_seqs, per_seq)
        if prefill:  # one sequence, queries at positions 0 .. n_keys - 1
            self.seq_index = np.zeros(n_keys, dtype=np.int32)
            self.positions = np.arange(n_keys, dtype=np.int32)
        else:  # one query per sequence, at its last position
            self.seq_index = np.arange(n_seqs, dtype=np.int32)
            self.positions = np.full(n_seqs, n_keys - 1, dtype=np.int32)
        T = len(self.positions)
        self.q = rng.standard_normal((T, H, HD), dtype=np.float32)  # (T, H, HD)
        self.out = np.empty_like(self.q)
        self.n_keys = n_keys

    def tiled(self, kernel=None) -> None:
        """paged_attention, or another revision's (`load_revision`) on its own layout."""
        attend, k, v = paged_attention, self.k_cache, self.v_cache
        if kernel is not None:
            attend = kernel.paged_attention
            k, v = self.kv_token_major if kernel.token_major else (k, v)
        attend(
            self.q, k, v, self.tables, self.seq_index,
            self.positions, 0, 1 / np.sqrt(self.q.shape[-1]), self.out,
        )  # fmt: skip

    def naive(self) -> None:
        """The full-score-matrix form in NumPy float32, sequence by sequence."""
        for s in np.unique(self.seq_index):
            rows = np.flatnonzero(self.seq_index == s)
            blocks = self.tables[s]
            k = self.kv_token_major[0][blocks].reshape(-1, KVH, HD)[: self.n_keys]  # (n, KVH, HD)
            v = self.kv_token_major[1][blocks].reshape(-1, KVH, HD)[: self.n_keys]
            k, v = np.repeat(k, H // KVH, axis=1), np.repeat(v, H // KVH, axis=1)  # (n, H, HD)
            q = self.q[rows]  # (t, H, HD)
            scores = np.einsum("ihd,jhd->hij", q, k) / np.float32(np.sqrt(HD))  # (H, t, n)
            keys = np.arange(self.n_keys)
            scores[:, keys[None, :] > self.positions[rows][:, None]] = -np.inf  # causal
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            self.out[rows] = np.einsum("hij,jhd->ihd", p, v)

    def kv_bytes(self) -> int:
        """K and V bytes the tiled kernel reads: every visible key once per kv head."""
        return int(2 * (self.positions + 1).sum() * KVH * HD * 4)


def load_revision(rev: str):
    """kernels/attention.py as of git revision `rev`, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:refinfer/kernels/attention.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / f"attention_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.token_major = "float32[n_blocks, BS, KVH, HD]" in source  # the pool's old layout
    return module


def fmt(t: tuple[float, float, float]) -> str:
    """'median [min-max]' in ms."""
    return f"{t[0] * 1e3:8.3f} [{t[1] * 1e3:.3f}-{t[2] * 1e3:.3f}]"


def timing_table(quick: bool, repeats: int, rng: np.random.Generator, threads, against) -> None:
    """(a) decode and prefill timings, tiled kernel vs the naive form and another revision."""
    import numba

    old = load_revision(against) if against else None
    print(f"\n(a) one layer, H={H} KVH={KVH} HD={HD} BS={BS}: ms per call, median [min-max]")
    other = f"{against} ms" if against else "naive f32 ms"
    print(f"{'case':<24} {'thr':>3} {'T':>4} {'tiled ms':>26} {'K/V GB/s':>9} {other:>26} {'x':>6}")
    contexts = [128, 512] if quick else [128, 512, 2048]
    cases = [(f"decode ctx={n} S={s}", s, n, False) for s in (1, 8) for n in contexts]
    cases.append(("prefill causal", 1, 256 if quick else 512, True))
    for name, n_seqs, n_keys, prefill in cases:
        w = Workload(n_seqs, n_keys, prefill, rng)
        for n_threads in threads:
            numba.set_num_threads(n_threads)
            log(f"{name} ({n_keys} keys), {n_threads} threads")
            tiled = time_call(w.tiled, repeats)
            if old is not None:
                base = time_call(functools.partial(w.tiled, old), repeats)
            else:
                base = time_call(w.naive, max(3, repeats // 3))
            gbs = w.kv_bytes() / tiled[0] / 1e9
            T = len(w.positions)
            label = f"{name} ({n_keys})" if prefill else name
            print(f"{label:<24} {n_threads:>3} {T:>4} {fmt(tiled):>26} {gbs:>9.2f} "
                  f"{fmt(base):>26} {base[0] / tiled[0]:>6.1f}", flush=True)  # fmt: skip


def memory_table() -> None:
    """(b) working memory, tiled vs naive, from attention_working_memory."""
    print("\n(b) attention working memory (float32), all heads of one layer")
    print(f"{'queries':>8} {'keys':>6} {'tiled KiB':>10} {'naive KiB':>10} {'naive/tiled':>12}")
    for n_queries, n_keys in [(1, 128), (1, 2048), (512, 512), (2048, 2048), (8192, 8192)]:
        wm = attention_working_memory(n_queries, n_keys, H, HD, BS)
        print(f"{n_queries:>8} {n_keys:>6} {wm['tiled'] / 1024:>10.1f} "
              f"{wm['naive'] / 1024:>10.1f} {wm['ratio']:>12.1f}")  # fmt: skip
    print(
        f"(tiled: {attention_working_memory(1, 1, H, HD, BS)['tiled_per_item']} B per "
        "(query, head): m, l, acc[HD], scores[C]; naive: scores[H, T, keys])"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    parser.add_argument("--threads", type=int, nargs="+", help="Numba thread counts (default all)")
    parser.add_argument("--against", metavar="REV", help="git revision of the kernel to compare")
    parser.add_argument("--repeats", type=int, default=30, help="timed samples per case")
    args = parser.parse_args()
    import numba

    threads = args.threads or [numba.get_num_threads()]
    print(f"paged_attention benchmark, {threads} Numba threads")
    repeats = 10 if args.quick else args.repeats
    timing_table(args.quick, repeats, np.random.default_rng(0), threads, args.against)
    memory_table()


if __name__ == "__main__":
    main()
