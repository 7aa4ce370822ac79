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
# # 01 · GGUF and quantisation
#
# A GGUF file is what llama.cpp and refinfer read: a header, key/value **metadata** (the
# hyper-parameters, the vocabulary, the chat template), a table of **tensor infos** (name,
# shape, type, offset) and then the tensors' raw bytes, aligned. Most tensors are stored
# *quantised*: in blocks of 32 or 256 weights, each block a few small integers plus a
# float16 scale. This notebook opens a real file, draws three blocks byte by byte, decodes
# one by hand, and measures what each format costs in accuracy. Every claim is asserted
# against `gguf.quants`, the reference (de)quantisers that ship with llama.cpp.

# %%
import collections

import gguf.quants
import matplotlib.pyplot as plt
import numpy as np
from walkthrough import gemma3_path, pick

from refinfer import quant
from refinfer.gguf import read_gguf, summary
from refinfer.models import default_model_path

# %% [markdown]
# ## A file's anatomy
#
# `read_gguf` memory-maps the file: metadata is parsed, tensors are *views* into the map.
# Nothing is copied or dequantised at load time.

# %%
gf = read_gguf(default_model_path())  # SmolLM2-135M-Instruct, Q4_1
info = summary(gf)
print(
    f"{info['file']}: {info['file_size'] / 1e6:.1f} MB, {info['n_tensors']} tensors, "
    f"{info['n_parameters'] / 1e6:.1f} M parameters, {info['bytes_per_parameter']:.2f} B each"
)
for key in [
    "general.architecture",
    "llama.block_count",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.freq_base",
]:
    print(f"  {key:32} {gf.metadata[key]}")
print("tensor types:", info["tensor_types"])

# %%
w = gf.tensors["blk.0.ffn_up.weight"]
print(w.name, w.format.name, "shape (N, K) =", w.shape, "raw", w.data.shape, w.data.dtype)
assert np.shares_memory(w.data, gf.reader.data)  # a view into the mmap: no copy

# %% [markdown]
# Where do the bytes go? Each layer repeats the same nine tensors; the embedding
# `token_embd` (V x D, shared with the output head here) is the largest single one.

# %%
bytes_by_role = collections.Counter()
for name, t in gf.tensors.items():
    role = name.split(".", 2)[-1] if name.startswith("blk.") else name
    bytes_by_role[f"{role} ({t.format.name})"] += t.nbytes
roles, sizes = zip(*bytes_by_role.most_common(), strict=True)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.barh(roles[::-1], np.array(sizes[::-1]) / 1e6)
ax.set_xlabel("MB in the file (all layers)")
ax.set_title("SmolLM2-135M Q4_1: bytes per tensor role")
plt.show()
assert sum(sizes) <= info["file_size"]

# %% [markdown]
# ## Three blocks, byte by byte
#
# A format is a row of `refinfer.quant`: weights per block and the fields of one block, in
# storage order, named as in ggml's `ggml-common.h`.
#
# | format | block | fields | dequantised weight |
# |---|---|---|---|
# | Q8_0 | 32 | `d` f16, `qs` int8[32] | $w_j = d \cdot q_j$ |
# | Q4_0 | 32 | `d` f16, `qs` uint8[16] (two 4-bit $q$ each) | $w_j = d\,(q_j - 8)$ |
# | Q4_K | 256 | `d`, `dmin` f16, `scales` (8 x 6-bit scale $sc_i$ and min $m_i$), `qs` 4-bit | $w_j = d\,sc_i\,q_j - d_{min}\,m_i$, $i = \lfloor j / 32 \rfloor$ |
#
# The Q8_0 and Q4_0 blocks come from quantising 32 weights of Gemma 3's embedding (stored
# as Q8_0: 255 levels, close to the original); the Q4_K block is the first of a Gemma 3
# tensor that llama.cpp quantised.

# %%
gemma = read_gguf(gemma3_path())  # Gemma 3 270M, Q4_K_M
x32 = gemma.tensors["token_embd.weight"].data[1000:1001].copy()  # one row's raw blocks
x32 = quant.dequantize(x32, quant.Q8_0).ravel()[:32]  # (32,) one block's worth of weights
blocks = {fmt: quant.quantize(x32, fmt) for fmt in (quant.Q8_0, quant.Q4_0)}
w_q4k = gemma.tensors["blk.0.attn_output.weight"]
blocks[quant.Q4_K] = w_q4k.data[0, : quant.Q4_K.type_size]
for fmt in blocks:
    print(
        f"{fmt.name}: {fmt.type_size} bytes per {fmt.block_size} weights = "
        f"{fmt.bits_per_weight} bits/weight; fields {[(n, b) for n, _, b in fmt.fields]}"
    )


# %%
def draw_block(ax, raw, fmt, width=36):
    """One block as a grid of bytes, `width` a row, each coloured by its field."""
    colours = plt.cm.Pastel1.colors
    for f, (name, _, n_bytes) in enumerate(fmt.fields):
        start = fmt.offset(name)
        for i in range(start, start + n_bytes):
            row, col = divmod(i, width)
            ax.add_patch(plt.Rectangle((col, -row), 1, -1, fc=colours[f], ec="white"))
            ax.text(col + 0.5, -row - 0.5, f"{raw[i]:02x}", ha="center", va="center", fontsize=6)
        row, col = divmod(start, width)
        ax.text(col, -row + 0.15, name, fontsize=8, weight="bold")
    rows = -(-fmt.type_size // width)  # ceil
    ax.set_xlim(0, width)
    ax.set_ylim(-rows, 0.8)
    ax.set_title(f"{fmt.name}: {fmt.type_size} bytes, {fmt.block_size} weights", fontsize=9)
    ax.axis("off")


fig, axes = plt.subplots(3, 1, figsize=(10, 5), height_ratios=[1.3, 1.3, 4.3])
for ax, (fmt, raw) in zip(axes, blocks.items(), strict=True):
    draw_block(ax, raw, fmt)
plt.show()

# %% [markdown]
# Decoding the Q4_0 block by hand: bytes 0-1 are the float16 `d`; each of the 16 bytes of
# `qs` holds weight $j$ in its low nibble and weight $j + 16$ in its high nibble.

# %%
raw = blocks[quant.Q4_0]
d = raw[0:2].view(np.float16).astype(np.float32)[0]
qs = raw[2:18]
q = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float32)  # (32,) in 0..15
by_hand = d * (q - 8)
print(f"d = {d:.6f}; q = {q.astype(int)}")
assert np.array_equal(by_hand, quant.dequantize(raw, quant.Q4_0).ravel())
assert np.array_equal(by_hand, gguf.quants.dequantize(raw, quant.Q4_0.ggml_type).ravel())

# %% [markdown]
# Every weight of a Q4_0 block is one of 16 levels $d\,(q - 8)$, with $d$ chosen so that the
# weight of largest magnitude lands exactly on level $-8$. Q8_0 has 256 levels on the same
# span, so its steps are 16 times finer.

# %%
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(x32, "o", color="black", label="weights (float32)")
for fmt, marker in ((quant.Q8_0, "x"), (quant.Q4_0, "s")):
    ax.plot(quant.dequantize(blocks[fmt], fmt).ravel(), marker, mfc="none", label=fmt.name)
ax.hlines(d * (np.arange(16) - 8), 0, 31, color="tab:orange", lw=0.4, alpha=0.6)
ax.set_xlabel("weight j in the block")
ax.legend(fontsize=8)
ax.set_title("one block: weights and their Q8_0 / Q4_0 values (lines: the 16 Q4_0 levels)")
plt.show()
amax = x32[np.argmax(np.abs(x32))]
assert np.isclose(d * -8, amax, rtol=2**-10)  # the largest weight sets the scale

# %% [markdown]
# ## What each format costs
#
# A file on disk is already quantised, so to measure the error of each format we start
# from float32 weights drawn like real ones: per-row scales and heavy tails (Student's t
# with 5 degrees of freedom). The error of a format is $\hat w - w$, shown relative to each
# row's RMS.

# %%
rng = np.random.default_rng(0)
rows, K = pick((256, 2048), (64, 1024))
W = (rng.standard_t(5, size=(rows, K)) * rng.uniform(0.01, 0.05, (rows, 1))).astype(np.float32)
rms = np.sqrt(np.mean(W**2, axis=1, keepdims=True))  # (rows, 1)
formats = [quant.Q8_0, quant.Q5_1, quant.Q5_0, quant.Q4_1, quant.Q4_0]
error = {}
for fmt in formats:
    raw = quant.quantize(W, fmt)  # (rows, K / block * type_size) uint8
    W_hat = quant.dequantize(raw, fmt).reshape(rows, K)
    assert np.array_equal(raw, gguf.quants.quantize(W, fmt.ggml_type))  # ggml's quantiser
    assert np.array_equal(W_hat, gguf.quants.dequantize(raw, fmt.ggml_type))  # and dequantiser
    error[fmt.name] = ((W_hat - W) / rms).ravel()
    print(
        f"{fmt.name:5} {fmt.bits_per_weight:4.1f} bits/weight  raw {raw.shape}  "
        f"RMS error {np.sqrt(np.mean(error[fmt.name] ** 2)):.4f} x row RMS"
    )

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
bins = np.linspace(-0.5, 0.5, 201)
for name, e in error.items():
    ax.hist(e, bins, histtype="step", label=name, log=True)
ax.set_xlabel("(dequantised - original) / row RMS")
ax.set_ylabel("weights")
ax.legend(fontsize=8)
ax.set_title("error per format: each extra bit halves the step")
plt.show()
rmse = [np.sqrt(np.mean(error[f.name] ** 2)) for f in formats]
assert all(a < b for a, b in zip(rmse, rmse[1:], strict=False))  # fewer bits, more error

# %% [markdown]
# ## Real files dequantise exactly as ggml does
#
# A file mixes formats per tensor (llama.cpp's Q4_K_M preset writes Q4_K, Q6_K, Q5_0 and
# Q8_0). For one tensor of every type in both files, refinfer's NumPy dequantiser gives
# the very float32 bits of `gguf.quants`; the kernels then multiply by exactly these
# weights (`tests/test_kernels.py`).

# %%
first_of_type = {}
for model_file in (gf, gemma):
    for t in model_file.tensors.values():
        first_of_type.setdefault(t.format.name, t)
for name, t in first_of_type.items():
    raw = t.data.reshape(-1, t.data.shape[-1])[:64]  # (up to 64 rows, row bytes)
    ours = quant.dequantize(raw, t.format).reshape(len(raw), -1)
    theirs = gguf.quants.dequantize(raw, t.format.ggml_type).reshape(len(raw), -1)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), t.name
    print(f"{name:5} {t.name:28} {ours.shape}: bit-identical to gguf.quants")
