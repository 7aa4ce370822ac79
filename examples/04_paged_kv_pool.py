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
# # 04 · The paged KV pool
#
# Every token's keys and values, in every layer, are kept for the tokens after it. refinfer
# keeps them as vLLM does: all storage is allocated once as `n_blocks` blocks of `BS` token
# slots, and a sequence is a **block table** (its blocks, in token order) plus a length.
# Token $p$ of a sequence lives in slot
#
# $$\mathrm{slot}(p) = \mathrm{table}[\lfloor p / BS \rfloor] \cdot BS + p \bmod BS.$$
#
# Blocks are shared by reference count: `fork` branches a sequence without copying, and a
# shared block that is only partly filled is copied just before it is written
# (copy-on-write). Full blocks are named by a chained hash of their tokens, so a later
# request with the same prefix reuses them (prefix caching). `pool.check()` asserts the
# invariants after every step; the model's logits prove the K/V survive every operation.

# %%
import matplotlib.pyplot as plt
import numpy as np

import refinfer
from refinfer.kv_pool import KVPool, hash_blocks
from refinfer.model import Batch

m = refinfer.load()
BS = 4  # small blocks, so that the pictures have several
pool = KVPool(m.config, n_blocks=10, block_size=BS)
print(
    "k_cache",
    pool.k_cache.shape,
    "= (L, n_blocks, KVH, HD, BS);",
    f"{pool.k_cache.nbytes / 2**20:.1f} MiB for K, as much for V, allocated once",
)


# %% [markdown]
# Two small tools: `run` appends tokens to sequences in the pool and runs the model on them
# (one forward call, as the engine does), and `fresh` computes the same tokens in a new pool
# from scratch, the baseline that every shared or copied block must reproduce bit for bit.


# %%
def run(*chunks):
    """One forward call over (seq, tokens) chunks; logits of every token, the pool checked."""
    logits = m.forward(Batch.append(pool, list(chunks)), pool)
    pool.check()
    return logits


def fresh(ids):
    """Logits of ids prefilled alone in a new pool of the same block size."""
    alone = m.new_pool(len(ids), block_size=BS)
    return m.forward(Batch.append(alone, [(alone.new_sequence(), ids)]), alone)


snapshots = []  # (what happened, {name: block table}, {name: length}) for the figure


def snapshot(what, seqs):
    snapshots.append(
        (
            what,
            {n: pool.block_table(s) for n, s in seqs.items()},
            {n: pool.length(s) for n, s in seqs.items()},
        )
    )
    stats = pool.stats()
    print(
        f"{what:34} free {stats.n_free_blocks:2}/{stats.n_blocks}  "
        f"utilisation {stats.utilisation:.2f}  ref_count {pool.ref_count.tolist()}"
    )


# %% [markdown]
# ## Append, fork, copy-on-write, truncate, free

# %%
encode = m.tokenizer.encode
a_ids, b_ids = encode("The quick brown fox jumps over the"), encode("Hello there, friend")
seqs = {"A": pool.new_sequence(), "B": pool.new_sequence()}
run((seqs["A"], a_ids), (seqs["B"], b_ids))
snapshot(f"prefill A ({len(a_ids)}), B ({len(b_ids)})", seqs)
seqs["C"] = pool.fork(seqs["A"])  # C shares all of A's blocks
snapshot("fork A -> C", seqs)
assert pool.block_table(seqs["C"]) == pool.block_table(seqs["A"])

# %% [markdown]
# Now A and C continue differently. A's last block is partly filled and shared, so A,
# which writes first, gets a private copy of it (C, its last holder, writes in place); the
# full blocks stay shared for good.

# %%
shared_last = pool.block_table(seqs["A"])[-1]
a_next, c_next = encode(" lazy dog"), encode(" sleepy cat")
logits_a, logits_c = np.split(run((seqs["A"], a_next), (seqs["C"], c_next)), [len(a_next)])
snapshot("A, C append (copy-on-write)", seqs)
a_table, c_table = pool.block_table(seqs["A"]), pool.block_table(seqs["C"])
print("A:", a_table, " C:", c_table)
assert shared_last not in a_table and shared_last in c_table  # A wrote into a copy
n_full = len(a_ids) // BS
assert a_table[:n_full] == c_table[:n_full]  # full blocks still shared
assert np.array_equal(logits_a, fresh(a_ids + a_next)[len(a_ids) :])  # bitwise
assert np.array_equal(logits_c, fresh(a_ids + c_next)[len(a_ids) :])

# %% [markdown]
# A speculative step that is rejected rolls back with `truncate`; a finished request is
# `free`d. Blocks whose last reference goes return to the free queue.

# %%
pool.truncate(seqs["C"], len(a_ids) + 1)
pool.check()
snapshot("truncate C (rejected tokens)", seqs)
pool.free(seqs.pop("B"))
pool.check()
snapshot("free B", seqs)


# %% [markdown]
# Each row is a sequence's block table: cell $i$ is its $i$-th block, the number (and the
# colour) the physical block in the pool, and the filled part the tokens it holds. Shared
# blocks appear in several rows with the same number.


# %%
def draw(ax, what, tables, lengths):
    """Each sequence a row of its logical blocks, coloured and labelled by physical block."""
    colours = plt.cm.tab10.colors
    for row, (name, table) in enumerate(tables.items()):
        for i, block in enumerate(table):
            filled = min(BS, lengths[name] - i * BS) / BS  # the last block may be partial
            ax.add_patch(plt.Rectangle((i, -row), 0.95, -0.8, fc="none", ec="grey"))
            ax.add_patch(
                plt.Rectangle((i, -row), 0.95 * filled, -0.8, fc=colours[block % 10], alpha=0.7)
            )
            ax.text(i + 0.45, -row - 0.4, str(block), ha="center", va="center")
        ax.text(-0.3, -row - 0.4, name, ha="right", va="center", weight="bold")
    ax.set_xlim(-0.8, 5)
    ax.set_ylim(-3, 0.2)
    ax.set_title(what, fontsize=9)
    ax.axis("off")


fig, axes = plt.subplots(1, len(snapshots), figsize=(2.6 * len(snapshots), 2))
for ax, snap in zip(axes, snapshots, strict=True):
    draw(ax, *snap)
plt.show()

# %% [markdown]
# ## Prefix caching
#
# A full block is named by a hash of its tokens and of the hash before it,
# $h_i = \mathrm{sha256}(h_{i-1} \,\|\, \mathrm{tokens}_i)$, so equal hashes mean equal
# prefixes. A new request looks up its leading hashes, takes the blocks it finds by
# reference, and computes only the rest.

# %%
hashes = hash_blocks(a_ids + a_next, BS)
pool.cache_blocks(seqs["A"], hashes)  # A's full blocks are now reusable
d_ids = a_ids + encode(" fence and ran away")
d_hashes = hash_blocks(d_ids, BS)
hits = pool.cached_prefix(d_hashes)
print(f"D: {len(d_ids)} tokens, {len(d_hashes)} full blocks, {len(hits)} cached: {hits}")
print("hashes:", [h.hex()[:8] for h in d_hashes])
assert hits == pool.block_table(seqs["A"])[: len(hits)] and len(hits) == n_full
seqs["D"] = pool.new_sequence(cached=hits)
tail = d_ids[len(hits) * BS :]
logits_d = run((seqs["D"], tail))  # only the uncached tail is computed
snapshot(f"D: {len(hits) * BS} tokens cached, {len(tail)} computed", seqs)
assert np.array_equal(logits_d, fresh(d_ids)[len(hits) * BS :])  # bitwise, as if computed

# %%
fig, ax = plt.subplots(figsize=(4, 2.2))
draw(ax, *snapshots[-1])
plt.show()

# %% [markdown]
# Freed cached blocks keep their hash in the free queue and are evicted least recently
# freed first, when a new block is needed. After every sequence ends, every block is free
# again and the invariants still hold.

# %%
for s in seqs.values():
    pool.free(s)
pool.check()
stats = pool.stats()
print(stats)
assert stats.n_free_blocks == pool.n_blocks and stats.n_cached_blocks > 0
