"""The naive Llama/Mistral forward pass in float64 NumPy: the oracle for everything else.

No cache, no tiling, no quantised arithmetic: weights are dequantised to float64
layer by layer, every token attends through a full score matrix, and each step
reads like its equation. The fast path (model.py and its kernels) must match it
within a stated tolerance; HF transformers and llama.cpp check it in turn.

    ids -> token_embd -> L x [ x += Attn(RMSNorm(x));  x += MLP(RMSNorm(x)) ]
        -> RMSNorm -> output head -> logits[T, V]

Shapes follow the legend in config.py (T, D, H, KVH, HD, F, V).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from refinfer.config import ModelConfig
from refinfer.errors import UnsupportedModelError
from refinfer.quant import QTensor


class Weights(Protocol):
    """Anything with a config and GGUF-named QTensors (a GGUFFile, a loaded Model)."""

    config: ModelConfig
    tensors: dict[str, QTensor]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x[T, D] -> x / sqrt(mean(x^2) + eps) * weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_frequencies(config: ModelConfig, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """float64[rope_dim / 2]: freq_i = base^(-2i / rope_dim) / factor_i / scaling factor."""
    scaling = config.rope_scaling
    if scaling.type not in ("none", "linear"):
        raise UnsupportedModelError(
            f"rope scaling {scaling.type!r} is not supported (none, linear, rope_freqs)"
        )
    i = np.arange(config.rope_dim // 2, dtype=np.float64)
    freqs = config.rope_base ** (-2.0 * i / config.rope_dim)
    if freq_factors is not None:  # Llama 3.1 style: one divisor per frequency
        freqs = freqs / freq_factors.astype(np.float64)
    if scaling.type == "linear":  # position p is read as p / factor
        freqs = freqs / scaling.factor
    return freqs


def rope(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Rotate x[T, heads, HD]: each pair (x[2i], x[2i+1]) by the angle position * freq_i.

    GGUF 'llama' weights pair neighbouring dimensions (llama.cpp's converter permuted
    HF's q/k rows so that it is so); dimensions past rope_dim are left as they are.
    """
    angle = positions[:, None].astype(np.float64) * freqs[None, :]  # (T, rope_dim/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]  # (T, 1, rope_dim/2)
    out = x.copy()
    even, odd = x[..., 0 : 2 * len(freqs) : 2], x[..., 1 : 2 * len(freqs) : 2]
    out[..., 0 : 2 * len(freqs) : 2] = even * cos - odd * sin
    out[..., 1 : 2 * len(freqs) : 2] = even * sin + odd * cos
    return out


def attention_mask(positions: np.ndarray, window: int | None) -> np.ndarray:
    """bool[T, T]: query i sees key j if j <= i and, with a window, i - j < window.

    So a token sees at most `window` positions, itself included (Mistral's convention).
    """
    i, j = positions[:, None], positions[None, :]
    visible = j <= i
    if window:
        visible &= i - j < window
    return visible


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray
) -> np.ndarray:  # fmt: skip
    """Grouped-query attention: q[T, H, HD], k and v [T, KVH, HD] -> [T, H, HD].

    Query head h reads K/V head h // (H / KVH); scores = q k^T / sqrt(HD), softmax over keys.
    """
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)  # (T, H, HD): the naive form copies K/V per query head
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(q.shape[-1])  # (H, T, T)
    scores = np.where(mask[None], scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", p, v)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x)."""
    return x / (1.0 + np.exp(-x))


def forward(model: Weights, ids: list[int] | np.ndarray) -> np.ndarray:
    """float64 logits[T, V] for one fresh sequence of token ids at positions 0..T-1."""
    c = model.config

    def w(name: str) -> np.ndarray:  # dequantised weights, one tensor at a time
        return model.tensors[name].dequantize().astype(np.float64)

    ids = np.asarray(ids, dtype=np.int64)
    positions = np.arange(len(ids))
    T = len(ids)
    freq_factors = w("rope_freqs.weight") if c.rope_scaling.has_freq_factors else None
    freqs = rope_frequencies(c, freq_factors)
    mask = attention_mask(positions, c.sliding_window)

    x = w("token_embd.weight")[ids]  # (T, D)
    for layer in range(c.n_layers):
        p = f"blk.{layer}."
        h = rms_norm(x, w(p + "attn_norm.weight"), c.norm_eps)
        q = (h @ w(p + "attn_q.weight").T).reshape(T, c.n_heads, c.head_dim)
        k = (h @ w(p + "attn_k.weight").T).reshape(T, c.n_kv_heads, c.head_dim)
        v = (h @ w(p + "attn_v.weight").T).reshape(T, c.n_kv_heads, c.head_dim)
        q, k = rope(q, positions, freqs), rope(k, positions, freqs)
        o = attention(q, k, v, mask).reshape(T, c.n_heads * c.head_dim)
        x = x + o @ w(p + "attn_output.weight").T

        h = rms_norm(x, w(p + "ffn_norm.weight"), c.norm_eps)
        # SwiGLU: down(silu(gate h) * up h)
        g = silu(h @ w(p + "ffn_gate.weight").T) * (h @ w(p + "ffn_up.weight").T)  # (T, F)
        x = x + g @ w(p + "ffn_down.weight").T

    x = rms_norm(x, w("output_norm.weight"), c.norm_eps)
    head = "token_embd.weight" if c.tied_embeddings else "output.weight"
    return x @ w(head).T  # (T, V)


def logits(model: Weights, ids: list[int] | np.ndarray) -> np.ndarray:
    """The public oracle: float64 logits[len(ids), V] of one fresh sequence."""
    if len(ids) == 0:
        raise ValueError("ids is empty: the forward pass needs at least one token")
    if len(ids) > model.config.context_length:
        raise UnsupportedModelError(
            f"{len(ids)} tokens exceed the model's context of {model.config.context_length}"
        )
    return forward(model, ids)
