"""ModelConfig: the hyper-parameters of a Llama-family model, read from GGUF metadata.

This is the first thing built from a file (gguf.py calls `ModelConfig.from_metadata`)
and the one place every other module asks for a size, an epsilon or a rope base:
nothing is buried in a kernel. `validate` checks the tensors of the file against
these numbers, so a mismatch is reported here, by name, and not as a shape error
deep in the forward pass. Each value is checked for its type and range as it is
read (a size is a positive integer, epsilon a finite number >= 0, ...), so a
damaged file names its key instead of failing in int() or a kernel.

Shape legend, used in comments across the package:
    T    tokens in a batch             D    model dim (embedding_length)
    H    query heads                   KVH  key/value heads (grouped-query attention)
    HD   head_dim                      F    ffn dim (feed_forward_length)
    V    vocabulary size               L    layers (block_count)
    BS   tokens per KV-pool block      N, K output rows and inputs of a weight matrix
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any

from refinfer.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama",)
# The longest context a file may claim: the rope tables are built for all of it, and the
# longest-context open models have 10M positions; a larger number is a damaged file.
MAX_CONTEXT_LENGTH = 1 << 24
MAX_INT64 = (1 << 63) - 1  # sizes go to the kernels as int64


@dataclass(frozen=True)
class RopeScaling:
    """How positions are stretched beyond the trained context (none, linear, yarn, ...)."""

    type: str = "none"  # as in the GGUF key rope.scaling.type
    factor: float = 1.0  # positions are divided by this (linear)
    original_context_length: int = 0  # the context the model was trained with
    has_freq_factors: bool = False  # a rope_freqs[HD/2] tensor scales each frequency (Llama 3.1)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one model; sizes in the legend's names."""

    architecture: str  # general.architecture: 'llama' (Mistral is stored as 'llama' too)
    n_layers: int  # L
    dim: int  # D
    n_heads: int  # H
    n_kv_heads: int  # KVH; H % KVH == 0, each K/V head serves H / KVH query heads
    head_dim: int  # HD; usually D / H
    ffn_dim: int  # F, hidden size of the SwiGLU MLP
    vocab_size: int  # V
    context_length: int  # positions the model was trained for
    rope_base: float  # theta in freq_i = theta^(-2i / rope_dim)
    rope_dim: int  # leading dimensions of each head that rotate (usually HD)
    rope_scaling: RopeScaling
    norm_eps: float  # RMSNorm epsilon
    sliding_window: int | None  # Mistral: a token sees at most this many positions, itself included
    tied_embeddings: bool  # no output.weight: the head reuses token_embd

    @property
    def family(self) -> str:
        """'mistral' for sliding-window models, else 'llama' (both are stored as 'llama')."""
        return "mistral" if self.sliding_window else "llama"

    def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """KV-cache bytes one token occupies: K and V, every layer, KVH * HD values each."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (for `refinfer info --json`)."""
        d = asdict(self)
        d["family"] = self.family
        return d

    @classmethod
    def from_metadata(
        cls, md: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]
    ) -> ModelConfig:
        """Build from GGUF key/values; `tensor_shapes` (NumPy order) fills gaps and is validated."""
        arch = md.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {_show(arch)} is not supported; refinfer runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama, Mistral, SmolLM2, TinyLlama, ...)"
            )

        def key(name: str, default: Any = None) -> Any:
            value = md.get(f"{arch}.{name}", default)
            if value is None:
                raise UnsupportedModelError(f"the GGUF metadata has no {arch}.{name}")
            return value

        def size(name: str, default: Any = None, low: int = 1, high: int | None = None) -> int:
            return _integer(f"{arch}.{name}", key(name, default), low, high)

        def real(name: str, default: Any = None, positive: bool = True) -> float:
            return _real(f"{arch}.{name}", key(name, default), positive)

        dim = size("embedding_length")
        n_heads = size("attention.head_count")
        head_dim = size("attention.key_length", max(1, dim // n_heads))  # validate checks it
        window = md.get(f"{arch}.attention.sliding_window")
        config = cls(
            architecture=arch,
            n_layers=size("block_count"),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=size("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            ffn_dim=size("feed_forward_length"),
            vocab_size=_vocab_size(md, arch, tensor_shapes),
            context_length=size("context_length", high=MAX_CONTEXT_LENGTH),
            rope_base=real("rope.freq_base", 10000.0),
            rope_dim=size("rope.dimension_count", head_dim),
            rope_scaling=RopeScaling(
                type=_string(f"{arch}.rope.scaling.type", key("rope.scaling.type", "none")),
                factor=real("rope.scaling.factor", 1.0),
                original_context_length=size(
                    "rope.scaling.original_context_length", 0, low=0, high=MAX_CONTEXT_LENGTH
                ),
                has_freq_factors="rope_freqs.weight" in tensor_shapes,
            ),
            norm_eps=real("attention.layer_norm_rms_epsilon", positive=False),
            sliding_window=size("attention.sliding_window") if window else None,
            tied_embeddings="output.weight" not in tensor_shapes,
        )
        config.validate(tensor_shapes)
        _check_vocabulary(md, config.vocab_size)
        return config

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a model with this config has, with its shape in NumPy order."""
        return dict(self._expected_shapes())

    def _expected_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of each tensor, layer by layer (validate stops at the first missing)."""
        D, H, KVH, HD, F, V = (
            self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.ffn_dim, self.vocab_size
        )  # fmt: skip
        yield from {"token_embd.weight": (V, D), "output_norm.weight": (D,)}.items()
        if not self.tied_embeddings:
            yield "output.weight", (V, D)
        if self.rope_scaling.has_freq_factors:
            yield "rope_freqs.weight", (self.rope_dim // 2,)
        for i in range(self.n_layers):
            yield from {
                f"blk.{i}.attn_norm.weight": (D,),
                f"blk.{i}.attn_q.weight": (H * HD, D),
                f"blk.{i}.attn_k.weight": (KVH * HD, D),
                f"blk.{i}.attn_v.weight": (KVH * HD, D),
                f"blk.{i}.attn_output.weight": (D, H * HD),
                f"blk.{i}.ffn_norm.weight": (D,),
                f"blk.{i}.ffn_gate.weight": (F, D),
                f"blk.{i}.ffn_up.weight": (F, D),
                f"blk.{i}.ffn_down.weight": (D, F),
            }.items()

    def validate(self, tensor_shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise UnsupportedModelError naming the first inconsistency, if any."""
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"head_count {self.n_heads} is not a multiple of head_count_kv {self.n_kv_heads}"
            )
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            raise UnsupportedModelError(
                f"rope.dimension_count {self.rope_dim} must be even and at most "
                f"head_dim {self.head_dim}"
            )
        for name, shape in self._expected_shapes():
            if name not in tensor_shapes:
                raise UnsupportedModelError(f"tensor {name} is missing from the file")
            if tuple(tensor_shapes[name]) != shape:
                raise UnsupportedModelError(
                    f"tensor {name} has shape {tuple(tensor_shapes[name])}, but the metadata "
                    f"implies {shape}"
                )


# ---- reading one value --------------------------------------------------------


def _integer(key: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in [low, high] (high: int64's largest), or UnsupportedModelError."""
    high = MAX_INT64 if high is None else high
    try:
        n = operator.index(value)  # int and NumPy integers; not float, str, list
    except TypeError:
        n = None
    if n is None or isinstance(value, bool):
        raise UnsupportedModelError(f"{key} is {_show(value)}, not an integer: the file is damaged")
    if not low <= n <= high:
        raise UnsupportedModelError(
            f"{key} is {n}; it must be from {low} to {high}: the file is damaged"
        )
    return n


def _real(key: str, value: Any, positive: bool) -> float:
    """`value` as a finite float, > 0 if `positive` else >= 0; or UnsupportedModelError."""
    if (
        not isinstance(value, Real)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        bound = "> 0" if positive else ">= 0"
        raise UnsupportedModelError(
            f"{key} is {_show(value)}; it must be a finite number {bound}: the file is damaged"
        )
    return float(value)


def _string(key: str, value: Any) -> str:
    """`value` if it is a str, else UnsupportedModelError naming `key`."""
    if not isinstance(value, str):
        raise UnsupportedModelError(f"{key} is {_show(value)}, not a string: the file is damaged")
    return value


def _vocab_size(md: dict[str, Any], arch: str, tensor_shapes: dict[str, tuple[int, ...]]) -> int:
    """V: {arch}.vocab_size, else the rows of token_embd, else the number of tokens."""
    key = f"{arch}.vocab_size"
    embd = tensor_shapes.get("token_embd.weight")
    vocab = md.get(key) or (embd[0] if embd else None)
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise UnsupportedModelError(f"the GGUF metadata has no {key}")
        vocab = len(tokens)
    return _integer(key, vocab)


def _check_vocabulary(md: dict[str, Any], vocab_size: int) -> None:
    """UnsupportedModelError if the tokenizer has ids the embedding has no row for."""
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > vocab_size:
        raise UnsupportedModelError(
            f"tokenizer.ggml.tokens has {len(tokens)} tokens but the model only {vocab_size} "
            f"(token_embd.weight rows): the file is damaged"
        )


def _show(value: Any, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters (a damaged value may be a long list)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
