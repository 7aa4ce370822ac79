"""The naive forward pass in float64 NumPy: the oracle for everything else.

No cache, no tiling, no quantised arithmetic: weights are dequantised to float64
layer by layer, every token attends through a full score matrix, and each step
reads like its equation. The fast path (model.py and its kernels) must match it
within a stated tolerance; HF transformers and llama.cpp check it in turn.

    ids -> token_embd -> L x [ x += Attn(RMSNorm(x));  x += MLP(RMSNorm(x)) ]
        -> RMSNorm -> output head -> logits[T, V]

One block serves every architecture: `block` reads the switches of
architectures.py (`c.arch`), which the module docstring there draws on this
picture. Shapes follow the legend in config.py (T, D, H, KVH, HD, F, V).
"""

from __future__ import annotations

from collections.abc import Callable
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


def rope_frequencies(
    config: ModelConfig, freq_factors: np.ndarray | None = None, layer: int = 0
) -> np.ndarray:
    """float64[rope_dim / 2] of layer `layer`: freq_i = base^(-2i / rope_dim) / factor_i / s.

    base is the layer's (config.layer_rope); the divisors factor_i (rope_freqs, Phi-3's
    rope_factors) and the linear scaling s apply where the layer's RoPE is scaled.
    """
    scaling = config.rope_scaling
    if scaling.type not in ("none", "linear", "longrope"):
        raise UnsupportedModelError(
            f"rope scaling {scaling.type!r} is not supported (none, linear, longrope, rope_freqs)"
        )
    base, scaled = config.layer_rope(layer)
    i = np.arange(config.rope_dim // 2, dtype=np.float64)
    freqs = base ** (-2.0 * i / config.rope_dim)
    if scaled and freq_factors is not None:  # one divisor per frequency
        freqs = freqs / freq_factors.astype(np.float64)
    if scaled and scaling.type == "linear":  # position p is read as p / factor
        freqs = freqs / scaling.factor
    return freqs


def rope_pairs(rope_dim: int, neox: bool) -> tuple[np.ndarray, np.ndarray]:
    """The dimensions (a_i, b_i) that rotate together, i < rope_dim / 2.

    Interleaved ('llama'; llama.cpp's converter permuted HF's q/k rows to get there):
    (2i, 2i + 1). NEOX (qwen2, qwen3, gemma3, phi3; HF's rotate_half): (i, i + rope_dim / 2).
    """
    i = np.arange(rope_dim // 2)
    return (i, i + rope_dim // 2) if neox else (2 * i, 2 * i + 1)


def rope(
    x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, neox: bool = False,
    attn_factor: float = 1.0,
) -> np.ndarray:  # fmt: skip
    """Rotate x[T, heads, HD]: each pair (x[a_i], x[b_i]) by the angle position * freq_i.

        x[a_i] <- (x[a_i] cos - x[b_i] sin) * attn_factor
        x[b_i] <- (x[a_i] sin + x[b_i] cos) * attn_factor

    Dimensions past rope_dim are left as they are.
    """
    a, b = rope_pairs(2 * len(freqs), neox)
    angle = positions[:, None].astype(np.float64) * freqs[None, :]  # (T, rope_dim/2)
    cos = attn_factor * np.cos(angle)[:, None, :]  # (T, 1, rope_dim/2)
    sin = attn_factor * np.sin(angle)[:, None, :]
    out = x.copy()
    out[..., a] = x[..., a] * cos - x[..., b] * sin
    out[..., b] = x[..., a] * sin + x[..., b] * cos
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
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float | None = None
) -> np.ndarray:  # fmt: skip
    """Grouped-query attention: q[T, H, HD], k and v [T, KVH, HD] -> [T, H, HD].

    Query head h reads K/V head h // (H / KVH); scores = q k^T * scale (default
    1 / sqrt(HD)), softmax over keys.
    """
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)  # (T, H, HD): the naive form copies K/V per query head
    v = np.repeat(v, group, axis=1)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("ihd,jhd->hij", q, k) * scale  # (H, T, T)
    scores = np.where(mask[None], scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", p, v)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x)."""
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}  # Architecture.activation -> function


def layer_tensors(model: Weights, i: int) -> dict[str, QTensor]:
    """Layer i's tensors under their unfused GGUF names (attn_q, ffn_gate, ...), no copies.

    Phi-3's fused matrices are cut into row blocks (views of the stored rows):
    attn_qkv = [Q | K | V], ffn_up = [gate | up]. model.py loads its layers through this too.
    """
    c, p = model.config, f"blk.{i}."
    t = {name.removeprefix(p): w for name, w in model.tensors.items() if name.startswith(p)}
    if c.arch.fused_qkv:
        qkv, q_rows = t.pop("attn_qkv.weight"), c.n_heads * c.head_dim
        kv_rows = c.n_kv_heads * c.head_dim
        t["attn_q.weight"] = qkv.rows(0, q_rows)
        t["attn_k.weight"] = qkv.rows(q_rows, q_rows + kv_rows)
        t["attn_v.weight"] = qkv.rows(q_rows + kv_rows, q_rows + 2 * kv_rows)
    if c.arch.fused_gate_up:
        up, F = t.pop("ffn_up.weight"), c.ffn_dim
        t["ffn_gate.weight"], t["ffn_up.weight"] = up.rows(0, F), up.rows(F, 2 * F)
    return t


def no_tap(name: str, value: np.ndarray) -> None:
    """The default tap: record nothing (Model.trace / oracle/trace.py pass a recorder)."""


def block(
    c: ModelConfig, w: dict[str, np.ndarray], i: int, x: np.ndarray, positions: np.ndarray,
    freqs: np.ndarray, tap: Callable[[str, np.ndarray], None] = no_tap,
) -> np.ndarray:  # fmt: skip
    """Layer i of the model on the residual stream x[T, D]; returns the new x.

    The switches of c.arch are the only differences between architectures. `tap` sees
    the intermediates by llama.cpp's names (attn_norm-i, Qcur-i, ..., l_out-i).
    """
    a, T = c.arch, len(x)

    def project(h: np.ndarray, name: str) -> np.ndarray:  # h W^T + b: (T, rows)
        y = h @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y  # qkv_bias: qwen2

    def heads_norm(y: np.ndarray, name: str) -> np.ndarray:  # RMSNorm of each head: (T, heads, HD)
        return rms_norm(y, w[name], c.norm_eps) if a.qk_norm else y

    h = rms_norm(x, w["attn_norm.weight"], c.norm_eps)
    q = project(h, "attn_q").reshape(T, c.n_heads, c.head_dim)
    k = project(h, "attn_k").reshape(T, c.n_kv_heads, c.head_dim)
    v = project(h, "attn_v").reshape(T, c.n_kv_heads, c.head_dim)
    q, k = heads_norm(q, "attn_q_norm.weight"), heads_norm(k, "attn_k_norm.weight")
    factor = c.rope_scaling.attn_factor
    q = rope(q, positions, freqs, a.rope_neox, factor)
    k = rope(k, positions, freqs, a.rope_neox, factor)
    for name, y in (("attn_norm", h), ("Qcur", q), ("Kcur", k), ("Vcur", v)):
        tap(f"{name}-{i}", y)
    mask = attention_mask(positions, c.layer_window(i))
    o = attention(q, k, v, mask, c.attention_scale).reshape(T, c.n_heads * c.head_dim)
    tap(f"kqv_out-{i}", o)
    o = o @ w["attn_output.weight"].T  # (T, D)
    if a.post_norms:
        o = rms_norm(o, w["post_attention_norm.weight"], c.norm_eps)
    tap(f"attn_out-{i}", o)
    x = x + o
    tap(f"ffn_inp-{i}", x)

    h = rms_norm(x, w["ffn_norm.weight"], c.norm_eps)
    # GLU: down(act(gate h) * up h), act = silu (SwiGLU) or gelu_tanh (GeGLU)
    g = ACTIVATIONS[a.activation](project(h, "ffn_gate")) * project(h, "ffn_up")  # (T, F)
    m = g @ w["ffn_down.weight"].T
    if a.post_norms:
        m = rms_norm(m, w["post_ffw_norm.weight"], c.norm_eps)
    tap(f"ffn_out-{i}", m)
    tap(f"l_out-{i}", x + m)
    return x + m


def forward(
    model: Weights, ids: list[int] | np.ndarray, tap: Callable[[str, np.ndarray], None] = no_tap
) -> np.ndarray:
    """float64 logits[T, V] for one fresh sequence of token ids at positions 0..T-1.

    `tap` sees the intermediates by llama.cpp's names (block, then result_norm, result_output).
    """
    c = model.config

    def w(name: str) -> np.ndarray:  # dequantised weights, one tensor at a time
        return model.tensors[name].dequantize().astype(np.float64)

    ids = np.asarray(ids, dtype=np.int64)
    positions = np.arange(len(ids))
    freq_factors = w(c.rope_scaling.freq_factors) if c.rope_scaling.freq_factors else None

    x = w("token_embd.weight")[ids]  # (T, D)
    if c.arch.embedding_scale:
        x = x * np.sqrt(c.dim)
    for i in range(c.n_layers):
        freqs = rope_frequencies(c, freq_factors, i)
        weights = {n: t.dequantize().astype(np.float64) for n, t in layer_tensors(model, i).items()}
        x = block(c, weights, i, x, positions, freqs, tap)

    x = rms_norm(x, w("output_norm.weight"), c.norm_eps)
    tap("result_norm", x)
    head = "token_embd.weight" if c.tied_embeddings else "output.weight"
    logits = x @ w(head).T  # (T, V)
    tap("result_output", logits)
    return logits


def logits(
    model: Weights, ids: list[int] | np.ndarray, tap: Callable[[str, np.ndarray], None] = no_tap
) -> np.ndarray:
    """The public oracle: float64 logits[len(ids), V] of one fresh sequence (`tap`: forward)."""
    if len(ids) == 0:
        raise ValueError("ids is empty: the forward pass needs at least one token")
    if len(ids) > model.config.context_length:
        raise UnsupportedModelError(
            f"{len(ids)} tokens exceed the model's context of {model.config.context_length}"
        )
    return forward(model, ids, tap)
