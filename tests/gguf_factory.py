"""Tiny synthetic Llama/Mistral GGUF files for tests, written with gguf.GGUFWriter.

The weights are random (seeded); the metadata is what llama.cpp's converter
writes. Tests change one thing at a time through the keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quant_blocks import random_rows_with_rms
from refinfer.quant import F32, FORMATS, QUANTIZE_FORMATS, Format, quantize


def tiny_llama_tensors(
    n_layers: int = 2, dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
    ffn_dim: int = 96, vocab_size: int = 128, tied: bool = False, seed: int = 0,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Random float32 weights of a tiny Llama, by GGUF tensor name, NumPy-order shapes."""
    rng = np.random.default_rng(seed)
    hd = dim // n_heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    t = {"token_embd.weight": w(vocab_size, dim), "output_norm.weight": norm()}
    if not tied:
        t["output.weight"] = w(vocab_size, dim)
    for i in range(n_layers):
        t |= {
            f"blk.{i}.attn_norm.weight": norm(),
            f"blk.{i}.attn_q.weight": w(n_heads * hd, dim),
            f"blk.{i}.attn_k.weight": w(n_kv_heads * hd, dim),
            f"blk.{i}.attn_v.weight": w(n_kv_heads * hd, dim),
            f"blk.{i}.attn_output.weight": w(dim, n_heads * hd),
            f"blk.{i}.ffn_norm.weight": norm(),
            f"blk.{i}.ffn_gate.weight": w(ffn_dim, dim),
            f"blk.{i}.ffn_up.weight": w(ffn_dim, dim),
            f"blk.{i}.ffn_down.weight": w(dim, ffn_dim),
        }
    return t


def _stored(array: np.ndarray, fmt: Format, seed: int) -> np.ndarray:
    """The bytes of `array` in `fmt`: quantised where refinfer can; otherwise (K-quants,
    IQ4) random blocks of the same RMS, which is all a forward-vs-reference test needs."""
    if fmt.name in QUANTIZE_FORMATS:
        return quantize(array, fmt)
    rms = float(np.sqrt(np.mean(np.square(array, dtype=np.float64))))
    return random_rows_with_rms(fmt, *array.shape, rms=rms, seed=seed)


def write_tiny_llama(
    path: Path,
    fmt: Format | str = F32,
    arch: str = "llama",
    sliding_window: int | None = None,
    metadata: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    **sizes: Any,
) -> Path:
    """Write a tiny model GGUF: matrices in `fmt` (rows it cannot hold and vectors F32).

    Formats of 256-weight blocks need dim and ffn_dim multiples of 256 (`**sizes`).
    Returns `path`."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    if tensors is None:
        tensors = tiny_llama_tensors(**sizes)
    embd = tensors["token_embd.weight"]
    dim = embd.shape[1]
    q = tensors["blk.0.attn_q.weight"]
    n_heads = sizes.get("n_heads", 4)
    hd = q.shape[0] // n_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test-model")
    writer.add_block_count(sum(1 for n in tensors if n.endswith("attn_q.weight")))
    writer.add_context_length(256)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(tensors["blk.0.ffn_up.weight"].shape[0])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(sizes.get("n_kv_heads", 2))
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hd)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(embd.shape[0])
    if sliding_window:
        writer.add_sliding_window(sliding_window)
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
