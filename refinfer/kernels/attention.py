"""Paged attention: tiled online softmax over the KV pool, one pool block per tile.

The NumPy twin is `refinfer.reference.attention` with `reference.attention_mask`
(float64, a full score matrix); tests/test_attention.py holds the two together.

What is computed. For a query token t of sequence s at position p, query head h
reads K/V head g = h // (H / KVH) and the keys j = lo .. p of its own sequence,
where lo = max(0, p - window + 1) with a window and lo = 0 without (so a token
sees at most `window` positions, itself included: Mistral's convention, as in
`reference.attention_mask`):

    s_j = (q . k_j) * scale,    out = sum_j softmax(s)_j v_j

(scale = 1 / sqrt(HD), ModelConfig.attention_scale.)

Online softmax (FlashAttention-2). The keys are visited in tiles, one block of
the paged pool at a time (BS keys, found through the sequence's block table),
and only the blocks that overlap lo .. p are visited. For each query head the
kernel keeps a running max m, a running sum l and an unnormalised output
accumulator acc[HD], starting from m = -inf, l = 0, acc = 0. For each tile of
scores s_j:

    m_new = max(m, max_j s_j)
    l     = l * exp(m - m_new) + sum_j exp(s_j - m_new)
    acc   = acc * exp(m - m_new) + sum_j exp(s_j - m_new) v_j
    m     = m_new

and at the end out = acc / l. Every exponent is <= 0, so nothing overflows;
when the max grows, what was accumulated so far is rescaled by exp(m - m_new)
(on the first tile exp(-inf) = 0). Every visited tile holds at least one
visible key, so l >= 1 at the end. The working memory per query head is m, l,
acc[HD] and one tile of scores[BS], instead of a score row over all keys (see
`attention_working_memory`).

Reduction order (the determinism contract, invariant 4 of DESIGN.md). Each
out[t, h] is reduced in one fixed order that depends only on q[t, h], the K/V
of its own sequence, its position and the window: tiles in increasing key
position, keys within a tile in increasing position; each dot product q . k_j
is summed in increasing d; l and acc are first rescaled by exp(m - m_new), then
the tile's terms are added key by key (l through one tile sum). No fastmath: no
FMA contraction, no reassociation, and exp is libm's scalar expf. Nothing
depends on T, on the other tokens of the batch or on the thread count, so a
token's output is bitwise the same in a prefill batch, alone in decode, or
batched with other sequences. (Nor on how heads are grouped into work items:
each head's arithmetic is the same whichever item computes it.)

How it runs. A work item is one token and the G = H / KVH query heads of one
K/V head, so each K and V row is read once for the G heads (the naive form
copies K/V per query head). A tile of keys is first transposed into kT[HD, BS]
so that the scores of the tile are computed with the keys as vector lanes:
s[j] += q[d] * kT[d, j] over d, an elementwise loop LLVM vectorises (a dot
product vectorised over d would need a lane reduction, and Numba's disabled SLP
vectoriser leaves a short fixed-length lane loop scalar; see matmul.py). The
transpose is shared by the G heads: splitting items per query head to balance
decode of one sequence on 2 threads (3 items) measured 2-3x slower per item,
so it was not kept. Items are dealt round-robin to at most
MAX_CHUNKS chunks (item i to chunk i mod n_chunks), which balances causal
prefill, where later tokens see more keys; each chunk owns its scratch (m, l,
acc, scores, kT), allocated once per call, outside the prange body, and reset
per item. Indices in inner loops are unsigned (`U(...)`), as in matmul.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

U = np.uint64  # index type: unsigned indices skip Numba's negative-index checks
MAX_CHUNKS = 64  # scratch sets per call; many more than threads, so uneven items balance


# ---- one tile ------------------------------------------------------------------


@njit(inline="always")
def _tile(q, t, h0, k_cache, v_cache, blk, j0, j1, g, scale, m, lsum, acc, scores, kT):
    """Fold keys j0 .. j1 - 1 of pool block `blk` into (m, l, acc) of heads h0 .. h0 + G - 1.

    m, lsum (= l): float32[G];  acc: float32[G, HD];  scores: float32[G, BS];  kT: float32[HD, BS].
    """
    G, HD = acc.shape
    for j in range(j0, j1):  # kT[d, j] = K[blk, j, g, d]: the tile transposed, for G heads
        for d in range(HD):
            kT[U(d), U(j)] = k_cache[blk, U(j), g, U(d)]
    for r in range(G):
        ru = U(r)
        h = U(h0 + r)
        for j in range(j0, j1):
            scores[ru, U(j)] = np.float32(0)
        for d in range(HD):  # s_j = q . k_j, in increasing d; vectorised over the keys j
            qd = q[t, h, U(d)]
            for j in range(j0, j1):
                scores[ru, U(j)] += qd * kT[U(d), U(j)]
        tile_max = np.float32(-np.inf)
        for j in range(j0, j1):
            s = scores[ru, U(j)] * scale
            scores[ru, U(j)] = s
            tile_max = max(tile_max, s)
        m_new = max(m[ru], tile_max)
        alpha = np.exp(m[ru] - m_new)  # 0 on the first tile (m = -inf)
        m[ru] = m_new
        # p_j = exp(s_j - m_new);  l = l * alpha + sum_j p_j
        tile_sum = np.float32(0)
        for j in range(j0, j1):
            p = np.exp(scores[ru, U(j)] - m_new)
            scores[ru, U(j)] = p
            tile_sum += p
        lsum[ru] = lsum[ru] * alpha + tile_sum
        for d in range(HD):  # acc = acc * alpha
            acc[ru, U(d)] *= alpha
    # acc += p_j v_j, key by key; each V row is read once for the G heads
    for j in range(j0, j1):
        for r in range(G):
            p = scores[U(r), U(j)]
            for d in range(HD):
                acc[U(r), U(d)] += p * v_cache[blk, U(j), g, U(d)]


# ---- one work item: a token and the query heads of one kv head-----------------------------------


@njit(inline="always")
def _attend(
    q, k_cache, v_cache, table, pos, window, t, g, h0, scale, m, lsum, acc, scores, kT, out
):
    """out[t, h] for the G query heads h0 .. h0 + G - 1 (all of kv head g), at position `pos`.

    table: int32[max_blocks], the block table of t's sequence. Scratch as in `_tile`.
    """
    G, HD = acc.shape
    BS = k_cache.shape[1]
    for r in range(G):
        m[r] = -np.inf
        lsum[r] = 0
        for d in range(HD):
            acc[r, d] = 0
    lo = max(0, pos - window + 1) if window > 0 else 0  # first visible key position
    for b in range(lo // BS, pos // BS + 1):  # the blocks overlapping lo .. pos, in order
        j0 = max(lo - b * BS, 0)  # visible slots j0 .. j1 - 1 of block b
        j1 = min(pos - b * BS + 1, BS)
        blk = U(table[b])
        _tile(q, U(t), h0, k_cache, v_cache, blk, j0, j1, U(g), scale, m, lsum, acc, scores, kT)
    for r in range(G):
        inv = lsum[r]
        for d in range(HD):
            out[U(t), U(h0 + r), U(d)] = acc[r, d] / inv


@njit(cache=True, parallel=True)
def paged_attention(
    q, k_cache, v_cache, block_tables, seq_index, positions, window, scale, out
):  # fmt: skip
    """out[t, h] = causal (and windowed) attention of q[t, h] over its sequence's paged K/V.

    q: float32[T, H, HD] (RoPE applied, not scaled);  out: float32[T, H, HD], written.
    scale: the scores are (q . k) * scale (1 / sqrt(HD) but for Gemma 3 27B).
    k_cache, v_cache: float32[n_blocks, BS, KVH, HD], one layer of the pool.
    block_tables: int32[S, max_blocks], padded with -1;  seq_index, positions: int32[T].
    Token t reads the keys max(0, p - window + 1) .. p (all of 0 .. p if window == 0)
    of sequence seq_index[t], p = positions[t]; they must already be in the pool.
    """
    T, H, HD = q.shape
    BS, KVH = k_cache.shape[1], k_cache.shape[2]
    G = H // KVH  # query heads per kv head
    scale = np.float32(scale)
    n_items = T * KVH  # (token, kv head) pairs
    n_chunks = max(1, min(n_items, MAX_CHUNKS))  # (not get_num_threads: it defeats the cache)
    m = np.empty((n_chunks, G), dtype=np.float32)  # running max per head
    lsum = np.empty((n_chunks, G), dtype=np.float32)  # running sum l per head
    acc = np.empty((n_chunks, G, HD), dtype=np.float32)  # unnormalised output per head
    scores = np.empty((n_chunks, G, BS), dtype=np.float32)  # one tile of scores per head
    kT = np.empty((n_chunks, HD, BS), dtype=np.float32)  # one tile of keys, transposed
    for c in prange(n_chunks):
        for item in range(c, n_items, n_chunks):  # round-robin: item i -> chunk i % n_chunks
            t, g = item // KVH, item % KVH
            h0 = g * G  # first query head of kv head g
            table = block_tables[seq_index[t]]
            _attend(
                q, k_cache, v_cache, table, positions[t], window, t, g, h0, scale,
                m[c], lsum[c], acc[c], scores[c], kT[c], out,
            )  # fmt: skip


# ---- working memory ------------------------------------------------------------


def attention_working_memory(
    n_queries: int, n_keys: int, n_heads: int, head_dim: int, block_size: int
) -> dict[str, float]:
    """Bytes of attention working memory in float32, tiled vs naive (the K/V themselves aside).

    tiled_per_item: one (query, head) of the online softmax: m, l, acc[HD], scores[BS].
    tiled: all n_queries * n_heads of them at once (paged_attention holds at most
        MAX_CHUNKS sets of G heads, plus one transposed key tile kT[HD, BS] each).
    naive: the full score matrix [H, n_queries, n_keys] (reference.attention forms
        it, and a probability matrix of the same size after it).
    ratio: naive / tiled; it grows as n_keys / (HD + BS).
    """
    per_item = 4 * (2 + head_dim + block_size)  # m, l, acc[HD], scores[BS]
    tiled = per_item * n_queries * n_heads
    naive = 4 * n_heads * n_queries * n_keys  # scores[H, T, n_keys]
    return {"tiled_per_item": per_item, "tiled": tiled, "naive": naive, "ratio": naive / tiled}
