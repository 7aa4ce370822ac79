"""Paged attention: online softmax over the KV pool, in KV chunks of a fixed number of keys.

The NumPy twin is `refinfer.reference.attention` with `reference.attention_mask`
(float64, a full score matrix); tests/test_attention.py holds the two together.

What is computed. For a query token t of sequence s at position p, query head h
reads K/V head g = h // (H / KVH) and the keys j = lo .. p of its own sequence,
where lo = max(0, p - window + 1) with a window and lo = 0 without (so a token
sees at most `window` positions, itself included: Mistral's convention, as in
`reference.attention_mask`):

    s_j = (q . k_j) * scale,    out = sum_j softmax(s)_j v_j

(scale = 1 / sqrt(HD), ModelConfig.attention_scale.)

Online softmax in chunks (FlashAttention-2, with flash-decoding's split). The key
positions are cut into chunks of C keys aligned to absolute positions: chunk c
holds the keys c C .. (c + 1) C - 1, C = `chunk_keys(BS)`, the smallest multiple
of the pool's block size BS that is at least CHUNK_KEYS (64 keys at BS = 16).
A query visits the chunks lo // C .. p // C, each cut to its visible keys
a_c .. b_c = [c C, (c + 1) C) intersected with [lo, p], never empty. A chunk's
keys lie in C / BS pool blocks, found through the sequence's block table. For
each query head a chunk gives a partial (m_c, l_c, acc_c[HD]):

    m_c = max_j s_j,   p_j = exp(s_j - m_c),   l_c = sum_j p_j,   acc_c = sum_j p_j v_j

(j = a_c .. b_c). The partials are folded in increasing c into (m, l, acc),
starting from m = -inf, l = 0, acc = 0:

    M   = max(m, m_c)
    l   = l * exp(m - M) + l_c * exp(m_c - M)
    acc = acc * exp(m - M) + acc_c * exp(m_c - M)
    m   = M

and at the end out = acc / l. Every exponent is <= 0, so nothing overflows; on
the first fold exp(-inf) = 0 and exp(0) = 1, so (m, l, acc) = (m_c, l_c, acc_c)
exactly. Every chunk holds a visible key, so l >= 1 at the end.

Reduction order (the determinism contract, invariant 4 of DESIGN.md). Each
out[t, h] is reduced in one fixed order that depends only on q[t, h], the K/V
of its own sequence, its position, the window and BS (through C):
- s_j: the products q_d k_jd added in increasing d, from 0, then times scale;
- m_c: a max, exact in any order;
- p_j = expf(s_j - m_c), with `kernels.expf.expf` (float32, a fixed polynomial);
- l_c: the p_j added in increasing j, from 0; acc_c[d]: the products p_j v_jd
  added in increasing j, from 0;
- the fold above, chunk by chunk in increasing c, each line as written: a
  multiply, a multiply, an add (exp(m - M) and exp(m_c - M) with expf);
- out = acc / l, one division.
No fastmath: no FMA contraction, no reassociation; expf gives the same bits on
every CPU. Nothing depends on T, on the other tokens of the batch, on the thread
count or on how the work is split, so a token's output is bitwise the same in a
prefill batch, alone in decode, or batched with other sequences.

How it runs. A chunk of one token and one kv head is computed for the G = H / KVH
query heads of that kv head together, so each K and V row is read once for the
G heads. Two work splits give the same bits, because the fold is the same
arithmetic whether the partials are stored and folded afterwards, or folded as
they are made:
- few tokens (T < SPLIT_BELOW, decode): a work item is (token, chunk, kv head);
  items run in parallel and store their partials; then each (token, kv head)
  folds its partials in increasing c (in one thread: cheaper than a second
  parallel region at these sizes). Decode of one sequence at 512 keys has
  24 items instead of 3 (flash-decoding's split-K);
- many tokens (prefill): a work item is (token, kv head), which computes its
  chunks one after the other and folds each at once; items are dealt
  round-robin to at most MAX_SETS scratch sets (item i to set i mod n_sets),
  which balances causal prefill, where later tokens see more keys.
Scratch is allocated once per call, outside the prange bodies.

The pool layout serves the vector lanes (see kv_pool.py): a block holds K as
[KVH, HD, BS], each kv head's keys already transposed, so the scores of a block
are s[j] += q[d] * K[d, j] over d, elementwise over the keys j (a dot product
over d would need a lane reduction, which the loop vectoriser does not do
without reassociation); and V as [KVH, BS, HD], so acc[d] += p_j V[j, d] is
elementwise over d. Both run through `_axpy_run`, explicit 8-lane vector code:
the scores of 16 keys for 3 heads at a time stay in 6 ymm registers for the whole
sweep over d, and acc[0:64] of a head in 8 ymm registers over a block's keys
(Numba's loop vectoriser steps 32 lanes at a time, so it left a 16-key block to its
scalar remainder, and it keeps the accumulators in memory: a chunk of 64 keys and
3 heads took 6.1 us that way, 3.4 us this way, one thread). The exps are expf
inline in a plain loop, vectorised by LLVM (ymm vroundps/vmulps in
`inspect_asm`). Indices in inner loops are unsigned (`U(...)`) or flat int64,
as in matmul.py.

Block size. The bits depend on BS only through C: every BS that divides 64
(1, 2, 4, 8, 16, 32, 64) gives C = 64 and so the same bits.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from refinfer.kernels.expf import expf

U = np.uint64  # index type: unsigned indices skip Numba's negative-index checks
F32 = np.float32
CHUNK_KEYS = 64  # keys per KV chunk, rounded up to whole pool blocks (chunk_keys)
SPLIT_BELOW = 16  # below this many tokens, chunks of one token run in parallel (decode)
MAX_SETS = 64  # prefill scratch sets per call; many more than threads, so uneven items balance


@njit(inline="always")
def chunk_keys(block_size):
    """C: keys per chunk, the smallest multiple of block_size that is >= CHUNK_KEYS."""
    return -(-CHUNK_KEYS // block_size) * block_size


@njit(inline="always")
def _first_key(pos, window):
    """lo: the first key position a query at `pos` sees."""
    return max(0, pos - window + 1) if window > 0 else 0


@njit(inline="always")
def _chunk_keys_seen(c, C, lo, pos):
    """(a, b): the keys a .. b of chunk c (keys c C .. c C + C - 1) that lie in lo .. pos."""
    return max(c * C, lo), min(c * C + C - 1, pos)


@njit(inline="always")
def _block_slots(a, b, i, BS):
    """(j0, j1): the slots j0 .. j1 - 1 of pool block i (keys i BS .. i BS + BS - 1) in a .. b."""
    return max(a - i * BS, 0), min(b - i * BS + 1, BS)


# ---- runs of multiply-adds in vector registers -------------------------------------


def _c_float32(a):
    return isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"


@intrinsic
def _axpy_run(typingctx, y, yi, y_stride, a, ai, a_stride, x, xi, x_stride, n, rows, vecs):
    """y[yi + r y_stride + l] += a[ai + r a_stride + s] * x[xi + s x_stride + l], in steps s.

    For s = 0 .. n - 1 in turn, rows r < `rows`, lanes l < 8 `vecs` (rows, vecs:
    compile-time constants); flat indices into C-contiguous float32 arrays. Per element
    it is the scalar loop `y += a * x` over s, a multiply then an add, but the rows x
    vecs ymm registers of y stay in registers for the whole run (loaded before it, stored
    after it) instead of going through memory every step, and each x vector is loaded
    once for all the rows. (Numba's loop vectoriser steps 32 lanes at a time and keeps y
    in memory; see the module docstring.) No bounds checks: callers keep every lane
    inside its array (whole runs of 8 lanes only, within one block row of K or V).
    """
    literal = (types.IntegerLiteral,)
    if not (_c_float32(y) and _c_float32(a) and _c_float32(x)) or not (
        isinstance(rows, literal) and isinstance(vecs, literal)
    ):
        return None
    R, NV = rows.literal_value, vecs.literal_value

    def codegen(context, builder, signature, args):
        ys, yi_, ys_, as_, ai_, as__, xs, xi_, xs_, n_ = args[:10]
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        v8 = ir.VectorType(f32, 8)
        zeros = ir.Constant(ir.VectorType(i32, 8), [0] * 8)  # a shuffle mask: lane 0 everywhere
        yd = make_array(y)(context, builder, ys).data
        ad = make_array(a)(context, builder, as_).data
        xd = make_array(x)(context, builder, xs).data

        def vec_ptr(data, index):
            return builder.bitcast(builder.gep(data, [index]), v8.as_pointer())

        def y_ptr(r, v):  # y[yi + r y_stride + 8 v]
            offset = builder.add(builder.mul(i64(r), ys_), i64(8 * v))
            return vec_ptr(yd, builder.add(yi_, offset))

        acc = [[cgutils.alloca_once(builder, v8) for _ in range(NV)] for _ in range(R)]
        for r in range(R):
            for v in range(NV):
                builder.store(builder.load(y_ptr(r, v), align=4), acc[r][v])
        with cgutils.for_range(builder, n_) as loop:
            step = loop.index
            x_row = builder.add(xi_, builder.mul(step, xs_))
            xv = [builder.load(vec_ptr(xd, builder.add(x_row, i64(8 * v))), align=4)
                  for v in range(NV)]  # fmt: skip
            for r in range(R):
                index = builder.add(builder.add(ai_, builder.mul(i64(r), as__)), step)
                ar = builder.load(builder.gep(ad, [index]))
                splat = builder.insert_element(ir.Constant(v8, ir.Undefined), ar, i64(0))
                splat = builder.shuffle_vector(splat, splat, zeros)
                for v in range(NV):
                    product = builder.fmul(splat, xv[v])
                    builder.store(builder.fadd(builder.load(acc[r][v]), product), acc[r][v])
        for r in range(R):
            for v in range(NV):
                builder.store(builder.load(acc[r][v]), y_ptr(r, v), align=4)
        return context.get_dummy_value()

    index = types.int64
    sig = types.none(y, index, index, a, index, index, x, index, index, index, rows, vecs)
    return sig, codegen


@njit(inline="always")
def _rows_run(y, yi, y_stride, a, ai, a_stride, x, xi, x_stride, n, rows, vecs):
    """_axpy_run for rows = 1, 2 or 3 (a run-time count, dispatched to constants)."""
    if rows == 3:
        _axpy_run(y, yi, y_stride, a, ai, a_stride, x, xi, x_stride, n, 3, vecs)
    elif rows == 2:
        _axpy_run(y, yi, y_stride, a, ai, a_stride, x, xi, x_stride, n, 2, vecs)
    else:
        _axpy_run(y, yi, y_stride, a, ai, a_stride, x, xi, x_stride, n, 1, vecs)


# ---- one chunk: its partial (m_c, l_c, acc_c) ------------------------------------


@njit(inline="always")
def _scores(q, t, h0, k_cache, blk, g, j0, j1, col, scores):
    """scores[r, col + j] += q[t, h0 + r] . K[blk, g, :, j] for the slots j = j0 .. j1 - 1.

    In increasing d, vectorised over the keys: 16 or 8 keys a run, in registers for
    3 heads at a time, then key by key. scores: float32[G, C] (flat row r at r C).
    """
    G, C = scores.shape
    H, HD = q.shape[1], q.shape[2]
    KVH, BS = k_cache.shape[1], k_cache.shape[3]
    k0 = (blk * KVH + g) * HD * BS  # flat index of K[blk, g, 0, 0]
    for r0 in range(0, G, 3):
        rows = min(3, G - r0)
        q0 = (t * H + h0 + r0) * HD  # flat index of q[t, h0 + r0, 0]
        s0 = r0 * C + col  # flat index of scores[r0, col]
        j = j0
        while j + 16 <= j1:
            _rows_run(scores, s0 + j, C, q, q0, HD, k_cache, k0 + j, BS, HD, rows, 2)
            j += 16
        if j + 8 <= j1:
            _rows_run(scores, s0 + j, C, q, q0, HD, k_cache, k0 + j, BS, HD, rows, 1)
            j += 8
        for r in range(r0, r0 + rows):
            for d in range(HD):
                qd = q[U(t), U(h0 + r), U(d)]
                for jj in range(j, j1):
                    scores[U(r), U(col + jj)] += qd * k_cache[U(blk), U(g), U(d), U(jj)]


@njit(inline="always")
def _values(scores, v_cache, blk, g, j0, j1, col, acc):
    """acc[r] += scores[r, col + j] * V[blk, g, j] for the slots j = j0 .. j1 - 1, in turn.

    Vectorised over d: 64 or 8 dimensions a run, in registers, then one by one.
    """
    G, C = scores.shape
    HD = acc.shape[1]
    KVH, BS = v_cache.shape[1], v_cache.shape[2]
    v0 = ((blk * KVH + g) * BS + j0) * HD  # flat index of V[blk, g, j0, 0]
    for r in range(G):
        p0 = r * C + col + j0  # flat index of scores[r, col + j0]
        d = 0
        while d + 64 <= HD:
            _axpy_run(acc, r * HD + d, HD, scores, p0, C, v_cache, v0 + d, HD, j1 - j0, 1, 8)
            d += 64
        while d + 8 <= HD:
            _axpy_run(acc, r * HD + d, HD, scores, p0, C, v_cache, v0 + d, HD, j1 - j0, 1, 1)
            d += 8
        for j in range(j0, j1):
            p = scores[U(r), U(col + j)]
            for dd in range(d, HD):
                acc[U(r), U(dd)] += p * v_cache[U(blk), U(g), U(j), U(dd)]


@njit(inline="always")
def _partial(q, t, h0, k_cache, v_cache, table, g, a, b, scale, scores, m, lsum, acc):
    """(m, l, acc) of the G heads h0 .. h0 + G - 1 over the keys j = a .. b of one chunk.

    m, lsum (= l): float32[G];  acc: float32[G, HD];  scores: float32[G, C] (scratch).
    """
    G, HD = acc.shape
    BS = k_cache.shape[3]
    n = U(b - a + 1)
    for r in range(G):
        for j in range(n):
            scores[U(r), U(j)] = F32(0)
    blocks = range(a // BS, b // BS + 1)  # the pool blocks of the chunk, in order
    for i in blocks:  # s_j = q . k_j  (slot j of block i is key i BS + j: column i BS + j - a)
        j0, j1 = _block_slots(a, b, i, BS)
        _scores(q, t, h0, k_cache, table[i], g, j0, j1, i * BS - a, scores)
    for r in range(G):
        ru = U(r)
        m_c = F32(-np.inf)  # m_c = max_j s_j
        for j in range(n):
            s = scores[ru, U(j)] * scale
            scores[ru, U(j)] = s
            m_c = max(m_c, s)
        m[ru] = m_c
        lsum[ru] = F32(0)
        for j in range(n):  # p_j = exp(s_j - m_c);  l = sum_j p_j, in increasing j
            p = expf(scores[ru, U(j)] - m_c)
            scores[ru, U(j)] = p
        for j in range(n):
            lsum[ru] += scores[ru, U(j)]
        for d in range(HD):
            acc[ru, U(d)] = F32(0)
    for i in blocks:  # acc = sum_j p_j v_j, in increasing j
        j0, j1 = _block_slots(a, b, i, BS)
        _values(scores, v_cache, table[i], g, j0, j1, i * BS - a, acc)


# ---- folding partials, and the end ------------------------------------------------


@njit(inline="always")
def _start(m, lsum, acc):
    """(m, l, acc) = (-inf, 0, 0) for the G heads."""
    G, HD = acc.shape
    for r in range(G):
        m[U(r)] = -np.inf
        lsum[U(r)] = F32(0)
        for d in range(HD):
            acc[U(r), U(d)] = F32(0)


@njit(inline="always")
def _fold(m, lsum, acc, m_c, l_c, acc_c):
    """(m, l, acc) <- the fold of a chunk's partial (m_c, l_c, acc_c), for the G heads."""
    G, HD = acc.shape
    for r in range(G):
        ru = U(r)
        big = max(m[ru], m_c[ru])  # M = max(m, m_c)
        alpha = expf(m[ru] - big)  # exp(m - M): 0 on the first fold (m = -inf)
        beta = expf(m_c[ru] - big)  # exp(m_c - M)
        m[ru] = big
        # l = l * exp(m - M) + l_c * exp(m_c - M);  acc likewise
        lsum[ru] = lsum[ru] * alpha + l_c[ru] * beta
        for d in range(HD):
            acc[ru, U(d)] = acc[ru, U(d)] * alpha + acc_c[ru, U(d)] * beta


@njit(inline="always")
def _finish(lsum, acc, t, h0, out):
    """out[t, h0 + r] = acc[r] / l[r] for the G heads."""
    G, HD = acc.shape
    for r in range(G):
        for d in range(HD):
            out[U(t), U(h0 + r), U(d)] = acc[U(r), U(d)] / lsum[U(r)]


# ---- the two work splits ------------------------------------------------------------


@njit(cache=True, parallel=True)
def _attend_split(q, k_cache, v_cache, block_tables, seq_index, positions, window, scale, out):
    """Few tokens: one item per (token, chunk, kv head), partials stored, then folded."""
    T, H, HD = q.shape
    KVH, BS = k_cache.shape[1], k_cache.shape[3]
    G, C = H // KVH, chunk_keys(BS)
    first = np.empty(T + 1, dtype=np.int64)  # token t's chunks are parts first[t] .. first[t+1]-1
    first[0] = 0
    for t in range(T):
        first[t + 1] = first[t] + positions[t] // C - _first_key(positions[t], window) // C + 1
    n_parts = first[T]
    token = np.empty(n_parts, dtype=np.int64)  # (n_parts,) part -> its token
    for t in range(T):
        token[first[t] : first[t + 1]] = t
    m_c = np.empty((n_parts, KVH, G), dtype=np.float32)  # the partials of every chunk
    l_c = np.empty((n_parts, KVH, G), dtype=np.float32)
    acc_c = np.empty((n_parts, KVH, G, HD), dtype=np.float32)
    scores = np.empty((n_parts * KVH, G, C), dtype=np.float32)  # one chunk of scores per item
    for item in prange(n_parts * KVH):
        k, g = item // KVH, item % KVH  # part k of token t, kv head g
        t = token[k]
        pos = positions[t]
        lo = _first_key(pos, window)
        c = lo // C + k - first[t]  # the chunk of part k
        a, b = _chunk_keys_seen(c, C, lo, pos)
        _partial(
            q, t, g * G, k_cache, v_cache, block_tables[seq_index[t]], g, a, b, scale,
            scores[item], m_c[k, g], l_c[k, g], acc_c[k, g],
        )  # fmt: skip
    m = np.empty((T, KVH, G), dtype=np.float32)  # the folded (m, l, acc)
    lsum = np.empty((T, KVH, G), dtype=np.float32)
    acc = np.empty((T, KVH, G, HD), dtype=np.float32)
    for item in range(T * KVH):  # serial: a few microseconds, less than a parallel region's start
        t, g = item // KVH, item % KVH
        _start(m[t, g], lsum[t, g], acc[t, g])
        for k in range(first[t], first[t + 1]):  # in increasing c
            _fold(m[t, g], lsum[t, g], acc[t, g], m_c[k, g], l_c[k, g], acc_c[k, g])
        _finish(lsum[t, g], acc[t, g], t, g * G, out)


@njit(cache=True, parallel=True)
def _attend_whole(q, k_cache, v_cache, block_tables, seq_index, positions, window, scale, out):
    """Many tokens: one item per (token, kv head), its chunks made and folded in turn."""
    T, H, HD = q.shape
    KVH, BS = k_cache.shape[1], k_cache.shape[3]
    G, C = H // KVH, chunk_keys(BS)
    n_items = T * KVH  # (token, kv head) pairs
    n_sets = max(1, min(n_items, MAX_SETS))  # (not get_num_threads: it defeats the cache)
    m_c = np.empty((n_sets, G), dtype=np.float32)  # one chunk's partial per set
    l_c = np.empty((n_sets, G), dtype=np.float32)
    acc_c = np.empty((n_sets, G, HD), dtype=np.float32)
    m = np.empty((n_sets, G), dtype=np.float32)  # the folded (m, l, acc) per set
    lsum = np.empty((n_sets, G), dtype=np.float32)
    acc = np.empty((n_sets, G, HD), dtype=np.float32)
    scores = np.empty((n_sets, G, C), dtype=np.float32)  # one chunk of scores per set
    for s in prange(n_sets):
        for item in range(s, n_items, n_sets):  # round-robin: item i -> set i % n_sets
            t, g = item // KVH, item % KVH
            pos = positions[t]
            lo = _first_key(pos, window)
            table = block_tables[seq_index[t]]
            _start(m[s], lsum[s], acc[s])
            for c in range(lo // C, pos // C + 1):  # in increasing c
                a, b = _chunk_keys_seen(c, C, lo, pos)
                _partial(
                    q, t, g * G, k_cache, v_cache, table, g, a, b, scale,
                    scores[s], m_c[s], l_c[s], acc_c[s],
                )  # fmt: skip
                _fold(m[s], lsum[s], acc[s], m_c[s], l_c[s], acc_c[s])
            _finish(lsum[s], acc[s], t, g * G, out)


@njit(cache=True)
def paged_attention(
    q, k_cache, v_cache, block_tables, seq_index, positions, window, scale, out,
    split_below=SPLIT_BELOW,
):  # fmt: skip
    """out[t, h] = causal (and windowed) attention of q[t, h] over its sequence's paged K/V.

    q: float32[T, H, HD] (RoPE applied, not scaled);  out: float32[T, H, HD], written.
    scale: the scores are (q . k) * scale (1 / sqrt(HD) but for Gemma 3 27B).
    k_cache: float32[n_blocks, KVH, HD, BS], v_cache: float32[n_blocks, KVH, BS, HD]:
    one layer of the pool (kv_pool.py). block_tables: int32[S, max_blocks], padded
    with -1;  seq_index, positions: int32[T]. Token t reads the keys
    max(0, p - window + 1) .. p (all of 0 .. p if window == 0) of sequence
    seq_index[t], p = positions[t]; they must already be in the pool.
    split_below: T below which chunks run as separate items (the bits do not depend on it).
    """
    scale = np.float32(scale)
    if q.shape[0] < split_below:
        _attend_split(q, k_cache, v_cache, block_tables, seq_index, positions, window, scale, out)
    else:
        _attend_whole(q, k_cache, v_cache, block_tables, seq_index, positions, window, scale, out)


# ---- working memory ------------------------------------------------------------


def attention_working_memory(
    n_queries: int, n_keys: int, n_heads: int, head_dim: int, block_size: int
) -> dict[str, float]:
    """Bytes of attention working memory in float32, chunked vs naive (the K/V themselves aside).

    tiled_per_item: one (query, head) of the online softmax: m, l, acc[HD] and one
        chunk of scores[C], C = chunk_keys(block_size).
    tiled: all n_queries * n_heads of them at once (prefill holds at most MAX_SETS
        sets of G heads, and decode a partial m, l, acc[HD] per chunk besides).
    naive: the full score matrix [H, n_queries, n_keys] (reference.attention forms
        it, and a probability matrix of the same size after it).
    ratio: naive / tiled; it grows as n_keys / (HD + C).
    """
    per_item = 4 * (2 + head_dim + chunk_keys(block_size))  # m, l, acc[HD], scores[C]
    tiled = per_item * n_queries * n_heads
    naive = 4 * n_heads * n_queries * n_keys  # scores[H, T, n_keys]
    return {"tiled_per_item": per_item, "tiled": tiled, "naive": naive, "ratio": naive / tiled}
