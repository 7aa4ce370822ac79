# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Attention: online softmax over a paged KV pool
#
# For a query $q$ at position $p$ and the keys and values $k_j, v_j$ of positions
# $j \le p$ of its sequence:
#
# $$s_j = (q \cdot k_j)\,\mathrm{scale}, \qquad
#   \mathrm{out} = \sum_j \frac{e^{s_j}}{\sum_{j'} e^{s_{j'}}}\, v_j,
#   \qquad \mathrm{scale} = 1/\sqrt{HD}.$$
#
# `reference.attention` computes it as written: a full score matrix, softmax, then a
# product. The engine's kernel (`kernels/attention.py`) never forms the score row: it walks
# the keys a chunk (a *tile* of C = 64 keys, a few KV-pool blocks) at a time and keeps three
# running quantities per query head (FlashAttention's online softmax). This notebook does
# that by hand, checks it against the reference, then calls the kernel itself.

# %%
import dataclasses

import matplotlib.pyplot as plt
import numpy as np
from walkthrough import pick

import refinfer
from refinfer import reference
from refinfer.kernels.attention import attention_working_memory, chunk_keys, paged_attention
from refinfer.kv_pool import KVPool

# %% [markdown]
# Shapes are SmolLM2-135M's: $H = 9$ query heads share $KVH = 3$ key/value heads
# (grouped-query attention, $G = H / KVH = 3$), $HD = 64$. The pool blocks hold $BS = 16$
# tokens. Queries, keys and values are random here; notebook 02 runs them from the model.

# %%
config = refinfer.load().config
H, KVH, HD, BS = config.n_heads, config.n_kv_heads, config.head_dim, 16
G, C = H // KVH, chunk_keys(BS)  # C: keys per tile (chunk) of the kernel
T = pick(200, 70)  # tokens of one sequence
rng = np.random.default_rng(0)
q = rng.standard_normal((T, H, HD)).astype(np.float32)  # (T, H, HD), after RoPE
k = rng.standard_normal((T, KVH, HD)).astype(np.float32)  # (T, KVH, HD)
v = rng.standard_normal((T, KVH, HD)).astype(np.float32)  # (T, KVH, HD)
positions = np.arange(T)
scale = config.attention_scale
print(f"q {q.shape}, k {k.shape}, v {v.shape}, G = {G}, scale = {scale}")

naive = reference.attention(
    q.astype(np.float64),
    k.astype(np.float64),
    v.astype(np.float64),
    reference.attention_mask(positions, None),
    scale,
)  # (T, H, HD)
print("reference:", naive.shape)

# %% [markdown]
# ## Online softmax, one tile at a time
#
# Start from $m = -\infty$, $\ell = 0$, $\mathrm{acc} = 0$. For each tile of scores $s_j$:
#
# $$m' = \max(m, \max_j s_j), \quad
#   \ell \leftarrow \ell\, e^{m - m'} + \sum_j e^{s_j - m'}, \quad
#   \mathrm{acc} \leftarrow \mathrm{acc}\, e^{m - m'} + \sum_j e^{s_j - m'} v_j, \quad
#   m \leftarrow m'$$
#
# and at the end $\mathrm{out} = \mathrm{acc} / \ell$. Every exponent is $\le 0$, so nothing
# overflows; when a tile raises the maximum, what was summed so far is rescaled by
# $e^{m - m'}$. The working memory is $m$, $\ell$, $\mathrm{acc}[HD]$ and one tile of
# scores, whatever the number of keys.


# %%
def online_softmax_attention(q_t, k_g, v_g, tile):
    """out[HD] of one query q_t[HD] over keys k_g, v_g [n, HD], `tile` keys at a time.

    Also returns the running (m, l) after each tile."""
    m, lsum, acc = -np.inf, 0.0, np.zeros(len(q_t))
    history = []
    for j0 in range(0, len(k_g), tile):
        s = k_g[j0 : j0 + tile] @ q_t * scale  # (tile,) this tile's scores
        m_new = max(m, s.max())
        alpha = np.exp(m - m_new)  # 0 on the first tile
        p = np.exp(s - m_new)  # (tile,)
        lsum = lsum * alpha + p.sum()
        acc = acc * alpha + p @ v_g[j0 : j0 + tile]
        m = m_new
        history.append((m, lsum))
    return acc / lsum, np.array(history)


t, h = T - 1, 4  # the last query, query head 4 (reads kv head 4 // G = 1)
g = h // G
qk = [a.astype(np.float64) for a in (q[t, h], k[: t + 1, g], v[: t + 1, g])]
out, history = online_softmax_attention(*qk, tile=C)
print(f"query {t}, head {h} (kv head {g}): {len(history)} tiles, out {out.shape}")
assert np.allclose(out, naive[t, h], rtol=0, atol=1e-12)

# %%
scores = k[: t + 1, g].astype(np.float64) @ q[t, h] * scale  # (t + 1,), for the figure
ends = np.minimum(np.arange(1, len(history) + 1) * C, t + 1) - 1  # last key of each tile
fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
ax1.plot(scores, ".", ms=3, color="grey", label="$s_j$")
ax1.step(ends, history[:, 0], where="post", color="tab:red", label="running max $m$")
for x in range(0, t + 1, C):
    ax1.axvline(x - 0.5, color="lightgrey", lw=0.5)
ax1.legend(fontsize=8)
ax2.semilogy(ends, history[:, 1], "o-", label=r"running sum $\ell$ (relative to $e^{m}$)")
ax2.set_xlabel("key position j (grey lines: tiles = chunks of C keys)")
ax2.legend(fontsize=8)
ax1.set_title("one query, tile by tile: the max only grows; each rise rescales $\\ell$")
plt.show()
assert np.all(np.diff(history[:, 0]) >= 0)

# %% [markdown]
# ## The kernel, on a paged pool
#
# The kernel reads K and V where the forward pass left them: in a KV pool of fixed blocks,
# through the sequence's block table. It computes each chunk's own $(m_c, \ell_c,
# \mathrm{acc}_c)$ from $m = -\infty$ and folds them in order with the same rescaling as
# above, so that decode can compute one sequence's chunks in parallel. To show that the blocks need not be contiguous, two
# sequences grow in turns, one block at a time, and the other one is freed: our sequence
# holds every second block.

# %%
one_layer = dataclasses.replace(config, n_layers=1)
pool = KVPool(one_layer, n_blocks=2 * -(-T // BS), block_size=BS)
seq, other = pool.new_sequence(), pool.new_sequence()
slots = []
for start in range(0, T, BS):
    slots.append(pool.append(seq, min(BS, T - start)))
    pool.append(other, BS)
pool.free(other)
slots = np.concatenate(slots)  # (T,) flat slot = block * BS + offset
print("block table:", pool.block_table(seq))
print("k_cache", pool.k_cache.shape, "= (L, n_blocks, KVH, HD, BS): each block's keys transposed")
print("v_cache", pool.v_cache.shape, "= (L, n_blocks, KVH, BS, HD)")
pool.write(0, slots, k, v)  # as model.forward writes them


# %%
def kernel(q, positions, window=0):
    """paged_attention for the tokens of `seq` at `positions`: out (len, H, HD)."""
    out = np.empty_like(q)
    paged_attention(
        q,
        pool.k_cache[0],
        pool.v_cache[0],
        pool.block_tables([seq]),
        np.zeros(len(q), np.int32),
        positions.astype(np.int32),
        window,
        scale,
        out,
    )
    return out


fast = kernel(q, positions)
print(f"kernel {fast.shape}: max |kernel - reference| = {np.abs(fast - naive).max():.2e}")
assert np.abs(fast - naive).max() < 1e-5  # float32 against float64
alone = kernel(q[t : t + 1], positions[t : t + 1])  # the last token alone, as in decode
assert np.array_equal(alone[0], fast[t])  # bitwise: the order does not depend on the batch

# %% [markdown]
# ## Working memory
#
# The reference forms scores $[H, T, n]$ for $T$ queries over $n$ keys; the tiled kernel
# holds, per query head, $m$, $\ell$, $\mathrm{acc}[HD]$ and $\mathrm{scores}[C]$. The
# ratio grows as $n / (HD + C + 2)$: quadratic against linear in the context.

# %%
n = 2 ** np.arange(4, 15)
memory = [attention_working_memory(x, x, H, HD, BS) for x in n]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(n, [mem["naive"] for mem in memory], "o-", label="naive: scores [H, n, n]")
ax.loglog(n, [mem["tiled"] for mem in memory], "s-", label="tiled: (m, l, acc, tile) per head")
ax.set_xlabel("tokens n (prefill of n queries over n keys)")
ax.set_ylabel("bytes (float32)")
ax.legend(fontsize=8)
plt.show()
for x, mem in zip(n, memory, strict=True):
    assert np.isclose(mem["ratio"], x / (HD + C + 2))
print(
    f"at n = {n[-1]}: naive {memory[-1]['naive'] / 2**20:.0f} MiB, "
    f"tiled {memory[-1]['tiled'] / 2**20:.1f} MiB"
)

# %% [markdown]
# ## Sliding windows
#
# With a window $W$ (Mistral, Gemma 3's local layers) query $p$ sees the keys
# $p - W < j \le p$: at most $W$ positions, itself included. The kernel starts at the first
# block that overlaps the window, so a long sequence costs $O(W)$ per query, not $O(p)$.

# %%
W = pick(40, 24)
window_mask = reference.attention_mask(positions, W)  # (T, T) bool
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, (title, mask) in zip(
    axes,
    [("causal", reference.attention_mask(positions, None)), (f"window W = {W}", window_mask)],
    strict=True,
):
    ax.imshow(mask, cmap="Blues")
    ax.set_title(title)
    ax.set_xlabel("key j")
axes[0].set_ylabel("query i")
plt.show()
assert window_mask.sum(axis=1).max() == W

naive_w = reference.attention(
    q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), window_mask, scale
)
fast_w = kernel(q, positions, window=W)
print(f"window {W}: max |kernel - reference| = {np.abs(fast_w - naive_w).max():.2e}")
assert np.abs(fast_w - naive_w).max() < 1e-5
assert np.array_equal(fast_w[:W], fast[:W])  # the first W queries see all their keys anyway

# %% [markdown]
# ## Grouped-query attention
#
# Query head $h$ reads K/V head $\lfloor h / G \rfloor$. The reference copies K and V for
# each query head (`np.repeat`); the kernel reads each K/V row once for its $G$ heads. So
# changing K/V head 1 changes the output of query heads 3, 4, 5 and of no other.

# %%
pool.k_cache[0, :, 1] = rng.standard_normal((pool.n_blocks, HD, BS))  # new keys, kv head 1
moved = np.abs(kernel(q, positions) - fast).max(axis=(0, 2))  # (H,) change per query head
print("max change per query head:", np.round(moved, 3))
assert np.array_equal(np.nonzero(moved)[0], np.arange(G, 2 * G))
