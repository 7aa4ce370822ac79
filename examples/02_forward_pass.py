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
# # 02 · The forward pass, step by step
#
# SmolLM2-135M is a Llama: 30 identical blocks on a residual stream.
#
# $$x = E[\mathrm{ids}], \qquad
#   x \mathrel{+}= \mathrm{Attn}(\mathrm{RMSNorm}(x)), \quad
#   x \mathrel{+}= \mathrm{MLP}(\mathrm{RMSNorm}(x)) \ \text{(per layer)}, \qquad
#   \mathrm{logits} = \mathrm{RMSNorm}(x)\, E^\top$$
#
# We run layer 0 by hand in float64 with the functions of `refinfer/reference.py` (the
# oracle), printing every shape, then compare the fast engine (float32 Numba kernels over
# quantised weights) with the reference at every layer.

# %%
import matplotlib.pyplot as plt
import numpy as np

import refinfer
from refinfer import reference
from refinfer.oracle.trace import trace

m = refinfer.load()
c = m.config
ids = m.tokenizer.encode("The capital of France is")
T = len(ids)
print("tokens:", [m.tokenizer.decode([i]) for i in ids])
print(
    f"T={T} D={c.dim} H={c.n_heads} KVH={c.n_kv_heads} HD={c.head_dim} F={c.ffn_dim} "
    f"V={c.vocab_size} L={c.n_layers}"
)

# %% [markdown]
# ## Embedding
# Each id picks a row of the embedding matrix $E$ (V x D); SmolLM2 ties it to the output
# head.

# %%
E = m.tensors["token_embd.weight"].dequantize().astype(np.float64)  # (V, D)
x0 = E[ids]  # (T, D): the residual stream
w = {
    name: t.dequantize().astype(np.float64)  # layer 0's weights, dequantised
    for name, t in reference.layer_tensors(m, 0).items()
}
print("x", x0.shape)

# %% [markdown]
# ## RMSNorm
# $\mathrm{RMSNorm}(x) = \dfrac{x}{\sqrt{\frac{1}{D}\sum_i x_i^2 + \epsilon}} \odot g$:
# every token's vector is scaled to unit RMS, then by a learnt gain $g$ per dimension.

# %%
h = reference.rms_norm(x0, w["attn_norm.weight"], c.norm_eps)  # (T, D)
rms = np.sqrt(np.mean(x0**2, axis=1))  # (T,)
print(
    "h",
    h.shape,
    "; RMS of each token's x:",
    np.round(rms, 4),
    "; of x / RMS:",
    np.round(np.sqrt(np.mean((h / w["attn_norm.weight"]) ** 2, axis=1)), 4),
    "(eps aside)",
)

# %% [markdown]
# ## Queries, keys, values
# $q = h W_q^\top$, $k = h W_k^\top$, $v = h W_v^\top$, split into heads: 9 query heads of
# 64, and 3 key/value heads shared by groups of 3 query heads (grouped-query attention).

# %%
q = (h @ w["attn_q.weight"].T).reshape(T, c.n_heads, c.head_dim)  # (T, H, HD)
k = (h @ w["attn_k.weight"].T).reshape(T, c.n_kv_heads, c.head_dim)  # (T, KVH, HD)
v = (h @ w["attn_v.weight"].T).reshape(T, c.n_kv_heads, c.head_dim)  # (T, KVH, HD)
print("q", q.shape, "k", k.shape, "v", v.shape)

# %% [markdown]
# ## RoPE
# Position enters by rotation. Each pair of dimensions $(a_i, b_i)$ of a query or key at
# position $p$ turns by the angle $p\,\theta_i$, $\theta_i = \mathrm{base}^{-2i/HD}$:
#
# $$\begin{pmatrix} x_{a_i} \\ x_{b_i} \end{pmatrix} \leftarrow
#   \begin{pmatrix} \cos p\theta_i & -\sin p\theta_i \\ \sin p\theta_i & \cos p\theta_i
#   \end{pmatrix} \begin{pmatrix} x_{a_i} \\ x_{b_i} \end{pmatrix}$$
#
# so $q_p \cdot k_{p'}$ depends on the positions only through $p - p'$. Early pairs turn
# fast (they tell neighbours apart), late pairs slowly (they carry long distances).

# %%
freqs = reference.rope_frequencies(c)  # (HD / 2,) theta_i
positions = np.arange(T)
q_rot = reference.rope(q, positions, freqs, c.arch.rope_neox)  # (T, H, HD)
k_rot = reference.rope(k, positions, freqs, c.arch.rope_neox)  # (T, KVH, HD)
print(f"theta_0 = {freqs[0]:.3f} rad/token, theta_31 = {freqs[-1]:.2e} rad/token")


def score(p_q, p_k):
    """q . k of query head 0 and kv head 0 (token 0's vectors) placed at p_q and p_k."""
    q_p = reference.rope(q[:1], np.array([p_q]), freqs, c.arch.rope_neox)[0, 0]  # (HD,)
    k_p = reference.rope(k[:1], np.array([p_k]), freqs, c.arch.rope_neox)[0, 0]
    return q_p @ k_p


print(f"score at (3, 1): {score(3, 1):.6f}, at (103, 101): {score(103, 101):.6f}")
assert np.isclose(score(3, 1), score(103, 101), rtol=1e-9)  # only p - p' matters

# %%
P_MAX = 48
pair = np.tile([1.0, 0.0], c.head_dim // 2)[None, None]  # (1, 1, HD): every pair at angle 0
spin = reference.rope(np.repeat(pair, P_MAX, axis=0), np.arange(P_MAX), freqs)  # (P, 1, HD)
a, b = reference.rope_pairs(c.rope_dim, c.arch.rope_neox)
fig, ax = plt.subplots(figsize=(5, 4.5))
for radius, i in zip((1.0, 0.8, 0.6, 0.4), (0, 2, 6, 12), strict=True):
    xa, xb = radius * spin[:, 0, a[i]], radius * spin[:, 0, b[i]]  # (P,) each
    ax.plot(xa, xb, lw=0.3, color="grey")
    dots = ax.scatter(xa, xb, c=np.arange(P_MAX), cmap="viridis", s=12, zorder=2)
    label = f"pair {i}: {freqs[i]:.3f} rad/token"
    ax.text(0, radius, label, ha="center", va="center", fontsize=7, zorder=3,
            bbox={"fc": "white", "ec": "none", "pad": 1})  # fmt: skip
fig.colorbar(dots, label="position p")
ax.set_aspect("equal")
ax.set_title(
    f"pairs of the vector (1, 0, 1, 0, ...) at positions 0..{P_MAX - 1}\n"
    "(each pair drawn at its own radius)",
    fontsize=9,
)
plt.show()

# %% [markdown]
# ## Causal attention
# $P = \mathrm{softmax}\!\left(\frac{q k^\top}{\sqrt{HD}} + M\right)$ with $M_{ij} = -\infty$
# for $j > i$ (a token sees only its past), and $o = P v$. Query head $h$ reads K/V head
# $\lfloor h / 3 \rfloor$.

# %%
G = c.n_heads // c.n_kv_heads
k_h = np.repeat(k_rot, G, axis=1)  # (T, H, HD): each kv head for its 3 query heads
scores = np.einsum("ihd,jhd->hij", q_rot, k_h) * c.attention_scale  # (H, T, T)
mask = reference.attention_mask(positions, None)  # (T, T)
scores = np.where(mask, scores, -np.inf)
P = np.exp(scores - scores.max(axis=-1, keepdims=True))
P /= P.sum(axis=-1, keepdims=True)  # (H, T, T), rows sum to 1
o = np.einsum("hij,jhd->ihd", P, np.repeat(v, G, axis=1))  # (T, H, HD)
print("P", P.shape, "o", o.shape)
assert np.allclose(o, reference.attention(q_rot, k_rot, v, mask, c.attention_scale), atol=1e-12)

# %%
labels = [m.tokenizer.decode([i]) for i in ids]
fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
for ax, head in zip(axes, (0, 4, 8), strict=True):
    ax.imshow(P[head], cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(T), labels, rotation=60, fontsize=7)
    ax.set_yticks(range(T), labels, fontsize=7)
    ax.set_title(f"layer 0, head {head}", fontsize=9)
fig.suptitle("attention weights P: row = query, column = key (upper triangle masked)")
plt.show()

# %% [markdown]
# ## Output projection and the MLP
# $x \mathrel{+}= o\,W_o^\top$; then SwiGLU:
# $\mathrm{MLP}(h) = \left(\mathrm{silu}(h W_{gate}^\top) \odot h W_{up}^\top\right)
# W_{down}^\top$, $\mathrm{silu}(z) = z\,\sigma(z)$, widening D = 576 to F = 1536 and back.

# %%
x1 = x0 + o.reshape(T, -1) @ w["attn_output.weight"].T  # (T, D)
h = reference.rms_norm(x1, w["ffn_norm.weight"], c.norm_eps)  # (T, D)
gate = reference.silu(h @ w["ffn_gate.weight"].T)  # (T, F)
up = h @ w["ffn_up.weight"].T  # (T, F)
x2 = x1 + (gate * up) @ w["ffn_down.weight"].T  # (T, D)
print("gate", gate.shape, "up", up.shape, "x after layer 0", x2.shape)
assert np.allclose(x2, reference.block(c, w, 0, x0, positions, freqs), rtol=0, atol=1e-12)

# %% [markdown]
# ## Every layer: the engine against the reference
# Both forward passes take a *tap* that sees their intermediates by llama.cpp's names
# (`refinfer/oracle/trace.py`): `Qcur-i`, `kqv_out-i`, `l_out-i` (the residual stream after
# layer $i$), ..., `result_output` (the logits). The engine runs float32 over the quantised
# weights with fixed-order reductions; the reference float64 over the same weights,
# dequantised. Their gap stays at float32 rounding, layer after layer: the dotted line is
# the scale of the residual stream, where a few dimensions grow to $10^4$ (SmolLM2's
# "massive activations"), so an absolute gap of $10^{-3}$ there is a relative $10^{-7}$.

# %%
fast = trace(m, ids)  # {name: float32 array}
slow = trace(m, ids, reference=True)  # {name: float64 array}
assert np.allclose(slow["l_out-0"], x2, rtol=0, atol=1e-12)  # our layer 0 is the oracle's
layers = np.arange(c.n_layers)
fig, ax = plt.subplots(figsize=(7, 3.5))
for name in ("Qcur", "kqv_out", "l_out"):
    gap = [np.abs(fast[f"{name}-{i}"] - slow[f"{name}-{i}"]).max() for i in layers]
    ax.semilogy(layers, gap, ".-", label=f"{name}: max |engine - reference|")
scale = np.array([np.abs(slow[f"l_out-{i}"]).max() for i in layers])
ax.semilogy(layers, scale, ":", color="grey", label="l_out: max |reference|")
ax.set_xlabel("layer")
ax.legend(fontsize=8)
plt.show()
assert np.all(np.array(gap) / scale < 100 * np.finfo(np.float32).eps)  # l_out, relative
logits_gap = np.abs(fast["result_output"] - slow["result_output"]).max()
print(f"logits: max |engine - reference| = {logits_gap:.1e}")
assert logits_gap < 1e-3  # the stated tolerance on SmolLM2 (README, tests/test_model.py)
assert np.array_equal(fast["result_output"], m.logits(ids))  # the tap changes nothing

# %% [markdown]
# ## The next token


# %%
def top5(logits):
    p = np.exp(logits - logits.max())
    p /= p.sum()
    best = np.argsort(-p)[:5]
    return best, p[best]


for side in (fast, slow):
    best, p = top5(side["result_output"][-1].astype(np.float64))
    print(", ".join(f"{m.tokenizer.decode([t])!r} {q:.3f}" for t, q in zip(best, p, strict=True)))
assert np.array_equal(top5(fast["result_output"][-1])[0], top5(slow["result_output"][-1])[0])
