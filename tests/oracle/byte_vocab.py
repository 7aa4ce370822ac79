"""A tiny model that reads text: 256 byte tokens, BOS and one merge, so oracle tests run in seconds.

Where this sits: test input. gguf_factory.write_tiny_model writes the weights; this adds a
byte-level 'gpt2' vocabulary (one token per byte, 'ab' merged: 257) and BOS = 256, added at
the start of a text when `add_bos`, as llama.cpp's SentencePiece vocabularies do.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from gguf_factory import write_tiny_model
from refinfer.tokenizer import _byte_to_unicode

BOS = 256


def write_byte_vocab_model(path: Path, add_bos: bool = True, **options) -> Path:
    """A tiny random Llama (options: gguf_factory.tiny_config's) with the byte vocabulary."""
    T = gguf.GGUFValueType
    alphabet = _byte_to_unicode()
    tokens = [alphabet[b] for b in range(256)] + ["<s>", "ab"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": ([1] * 256 + [3, 1], T.ARRAY, T.INT32),
        "tokenizer.ggml.merges": (["a b"], T.ARRAY, T.STRING),
        "tokenizer.ggml.bos_token_id": (BOS, T.UINT32),
        "tokenizer.ggml.add_bos_token": (add_bos, T.BOOL),
    }
    return write_tiny_model(path, metadata=metadata, vocab_size=len(tokens), **options)
