"""Tiny synthetic GGUF files of every architecture for tests, written with gguf.GGUFWriter.

The weights are random (seeded), one per tensor the architecture's config expects
(config.expected_shapes, so a new architecture needs no code here); the metadata is
what llama.cpp's converter writes. Tests change one thing at a time through the
keyword arguments.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quant_blocks import random_rows_with_rms
from refinfer.architectures import ARCHITECTURES
from refinfer.config import ModelConfig, RopeScaling
from refinfer.quant import F32, FORMATS, QUANTIZE_FORMATS, Format, quantize


def tiny_config(
    arch: str = "llama", n_layers: int = 2, dim: int = 64, n_heads: int = 4,
    n_kv_heads: int = 2, head_dim: int | None = None, ffn_dim: int = 96, vocab_size: int = 128,
    tied: bool = False, sliding_window: int | None = None, long_rope: bool = False,
    rope_base: float = 10000.0,
) -> ModelConfig:  # fmt: skip
    """The config of a tiny model (context 256); long_rope: Phi-3's LongRoPE, original 32."""
    return ModelConfig(
        architecture=arch, n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim or dim // n_heads, ffn_dim=ffn_dim, vocab_size=vocab_size,
        context_length=256, rope_base=rope_base, rope_base_local=None,
        rope_dim=head_dim or dim // n_heads,
        rope_scaling=RopeScaling(
            original_context_length=32, attn_factor=1.2, freq_factors="rope_factors_long.weight"
        ) if long_rope else RopeScaling(),
        norm_eps=1e-5, sliding_window=sliding_window, tied_embeddings=tied,
        attention_scale=0.0,  # not written to the file
    )  # fmt: skip


def tiny_tensors(config: ModelConfig | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of every tensor `config` expects, NumPy-order shapes.

    Matrices ~ N(0, 1 / K); norms ~ 1 + N(0, 0.1^2) (Gemma's are stored as 1 + w too);
    biases ~ N(0, 0.1^2); RoPE frequency divisors in [1, 4).
    """
    config = config or tiny_config()
    rng = np.random.default_rng(seed)
    t = {}
    for name, shape in config.expected_shapes().items():
        if len(shape) == 2:
            t[name] = rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif name.endswith("norm.weight"):
            t[name] = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            t[name] = 0.1 * rng.standard_normal(shape)
        else:  # rope_freqs / rope_factors_*
            t[name] = rng.uniform(1, 4, shape)
    if config.rope_scaling.freq_factors == "rope_factors_long.weight":
        t["rope_factors_short.weight"] = rng.uniform(1, 2, config.rope_dim // 2)
    return {name: a.astype(np.float32) for name, a in t.items()}


def _stored(array: np.ndarray, fmt: Format, seed: int) -> np.ndarray:
    """The bytes of `array` in `fmt`: quantised where refinfer can; otherwise (K-quants,
    IQ4) random blocks of the same RMS, which is all a forward-vs-reference test needs."""
    if fmt.name in QUANTIZE_FORMATS:
        return quantize(array, fmt)
    rms = float(np.sqrt(np.mean(np.square(array, dtype=np.float64))))
    return random_rows_with_rms(fmt, *array.shape, rms=rms, seed=seed)


def write_tiny_model(
    path: Path,
    fmt: Format | str = F32,
    metadata: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    **options: Any,
) -> Path:
    """Write a tiny model GGUF: matrices in `fmt` (rows it cannot hold and vectors F32).

    `options` go to tiny_config (arch, sizes, window, long_rope); `tensors` replace
    the random ones. Formats of 256-weight blocks need dim and ffn_dim multiples of 256.
    Returns `path`."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    c = tiny_config(**options)
    if tensors is None:  # an architecture refinfer does not read gets Llama's (error tests)
        known = c.architecture in ARCHITECTURES
        tensors = tiny_tensors(c if known else replace(c, architecture="llama"), seed)
    writer = gguf.GGUFWriter(str(path), c.architecture)
    writer.add_name("tiny-test-model")
    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    if c.head_dim != c.dim // c.n_heads:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_base)
    writer.add_rope_dimension_count(c.rope_dim)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.sliding_window:
        writer.add_sliding_window(c.sliding_window)
    if c.rope_scaling.freq_factors == "rope_factors_long.weight":  # as the converter writes
        #                                                           Phi-3's LongRoPE
        writer.add_rope_scaling_attn_factors(c.rope_scaling.attn_factor)
        writer.add_rope_scaling_orig_ctx_len(c.rope_scaling.original_context_length)
    for key, value in (metadata or {}).items():  # a str, or (value, GGUFValueType)
        if isinstance(value, tuple):
            writer.add_key_value(key, *value)
        else:
            writer.add_string(key, value)
    for i, (name, array) in enumerate(tensors.items()):
        out = fmt if array.ndim == 2 and array.shape[-1] % fmt.block_size == 0 else F32
        writer.add_tensor(name, _stored(array, out, seed=i), raw_dtype=out.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
