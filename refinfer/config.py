"""ModelConfig: the hyper-parameters of a model, read from GGUF metadata.

This is the first thing built from a file (gguf.py calls `ModelConfig.from_metadata`)
and the one place every other module asks for a size, an epsilon or a rope base:
nothing is buried in a kernel. What the architecture changes in the block is a row of
architectures.py (`config.arch`); what it changes per layer (window, RoPE base) is
asked here (`layer_window`, `layer_rope`). `validate` checks the tensors of the file against
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

from refinfer.architectures import ARCHITECTURES, Architecture
from refinfer.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
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
    # the tensor of rope_dim/2 divisors of the frequencies: rope_freqs (Llama 3.1), or Phi-3's
    # rope_factors_long when the context exceeds the original one, else rope_factors_short
    freq_factors: str | None = None
    attn_factor: float = 1.0  # cos and sin are multiplied by this (Phi-3's LongRoPE)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one model; sizes in the legend's names."""

    architecture: str  # general.architecture, a key of ARCHITECTURES (Mistral is 'llama')
    n_layers: int  # L
    dim: int  # D
    n_heads: int  # H
    n_kv_heads: int  # KVH; H % KVH == 0, each K/V head serves H / KVH query heads
    head_dim: int  # HD; usually D / H
    ffn_dim: int  # F, hidden size of the SwiGLU MLP
    vocab_size: int  # V
    context_length: int  # positions the model was trained for
    rope_base: float  # theta in freq_i = theta^(-2i / rope_dim)
    rope_base_local: float | None  # theta of the windowed layers where it differs (Gemma 3)
    rope_dim: int  # leading dimensions of each head that rotate (usually HD)
    rope_scaling: RopeScaling
    norm_eps: float  # RMSNorm epsilon
    sliding_window: int | None  # a windowed layer's token sees at most this many positions,
    #                             itself included (which layers: arch.swa_pattern)
    tied_embeddings: bool  # no output.weight: the head reuses token_embd
    attention_scale: float  # scores = (q . k) * attention_scale, usually 1 / sqrt(HD)

    @property
    def arch(self) -> Architecture:
        """The architecture's switches (architectures.py)."""
        return ARCHITECTURES[self.architecture]

    @property
    def family(self) -> str:
        """'mistral' for windowed Llama models, else the architecture's name."""
        windowed_llama = self.architecture == "llama" and self.sliding_window
        return "mistral" if windowed_llama else self.architecture

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i, or None when it attends to every earlier position."""
        n = self.arch.swa_pattern  # llama.cpp's set_swa_pattern(n)
        return self.sliding_window if n == 0 or i % n < n - 1 else None

    def layer_rope(self, i: int) -> tuple[float, bool]:
        """(RoPE base, whether rope_scaling applies) for layer i.

        Gemma 3's windowed layers rotate with base 10000 and no scaling; its global
        layers, and every layer of the other architectures, with rope.freq_base.
        """
        if self.rope_base_local is not None and self.layer_window(i) is not None:
            return self.rope_base_local, False
        return self.rope_base, True

    def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """KV-cache bytes one token occupies: K and V, every layer, KVH * HD values each."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (for `refinfer info --json`)."""
        d = asdict(self)
        d["family"] = self.family
        d["arch"] = asdict(self.arch)
        return d

    @classmethod
    def from_metadata(
        cls, md: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]
    ) -> ModelConfig:
        """Build from GGUF key/values; `tensor_shapes` (NumPy order) fills gaps and is validated."""
        arch = md.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {_show(arch)} is not supported; refinfer reads "
                + "; ".join(f"{a.name} ({a.models})" for a in ARCHITECTURES.values())
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
        if size("attention.value_length", head_dim) != head_dim:
            raise UnsupportedModelError(
                f"{arch}.attention.value_length differs from key_length {head_dim}; refinfer "
                f"needs K and V heads of one size"
            )
        window = md.get(f"{arch}.attention.sliding_window")
        n_layers = size("block_count")
        context = size("context_length", high=MAX_CONTEXT_LENGTH)
        original_context = size(
            "rope.scaling.original_context_length", 0, low=0, high=MAX_CONTEXT_LENGTH
        )
        config = cls(
            architecture=arch,
            n_layers=n_layers,
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=size("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            ffn_dim=size("feed_forward_length"),
            vocab_size=_vocab_size(md, arch, tensor_shapes),
            context_length=context,
            rope_base=real("rope.freq_base", 10000.0),
            rope_base_local=(
                real("rope.freq_base_swa", ARCHITECTURES[arch].local_rope_base)
                if ARCHITECTURES[arch].local_rope_base
                else None
            ),
            rope_dim=size("rope.dimension_count", head_dim),
            rope_scaling=RopeScaling(
                type=_string(f"{arch}.rope.scaling.type", key("rope.scaling.type", "none")),
                factor=real("rope.scaling.factor", 1.0),
                original_context_length=original_context,
                freq_factors=_freq_factors(tensor_shapes, context, original_context),
                attn_factor=real("rope.scaling.attn_factor", 1.0),
            ),
            norm_eps=real("attention.layer_norm_rms_epsilon", positive=False),
            sliding_window=size("attention.sliding_window") if window else None,
            tied_embeddings="output.weight" not in tensor_shapes,
            attention_scale=_query_pre_attn_scalar(arch, n_layers, dim, n_heads, head_dim) ** -0.5,
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
        if self.rope_scaling.freq_factors:
            yield self.rope_scaling.freq_factors, (self.rope_dim // 2,)
        a = self.arch
        for i in range(self.n_layers):
            yield from {f"blk.{i}.{name}": shape for name, shape in {
                "attn_norm.weight": (D,),
                **({"attn_qkv.weight": ((H + 2 * KVH) * HD, D)} if a.fused_qkv else {
                    "attn_q.weight": (H * HD, D),
                    "attn_k.weight": (KVH * HD, D),
                    "attn_v.weight": (KVH * HD, D),
                }),
                **({
                    "attn_q.bias": (H * HD,), "attn_k.bias": (KVH * HD,),
                    "attn_v.bias": (KVH * HD,),
                } if a.qkv_bias else {}),
                **({"attn_q_norm.weight": (HD,), "attn_k_norm.weight": (HD,)} if a.qk_norm else {}),
                "attn_output.weight": (D, H * HD),
                **({"post_attention_norm.weight": (D,)} if a.post_norms else {}),
                "ffn_norm.weight": (D,),
                **({"ffn_up.weight": (2 * F, D)} if a.fused_gate_up else {
                    "ffn_gate.weight": (F, D), "ffn_up.weight": (F, D),
                }),
                "ffn_down.weight": (D, F),
                **({"post_ffw_norm.weight": (D,)} if a.post_norms else {}),
            }.items()}.items()  # fmt: skip

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
                    f"implies {shape} ({self.architecture}.: {self._legend()})"
                )

    def _legend(self) -> str:
        """The metadata fields shapes are made of, with their symbols and values."""
        return (
            f"embedding_length D={self.dim}, attention.head_count H={self.n_heads}, "
            f"head_count_kv KVH={self.n_kv_heads}, key_length HD={self.head_dim}, "
            f"feed_forward_length F={self.ffn_dim}, vocab V={self.vocab_size}"
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


def _freq_factors(
    tensor_shapes: dict[str, tuple[int, ...]], context: int, original_context: int
) -> str | None:
    """The name of the RoPE frequency-divisor tensor the file has, if any (RopeScaling).

    Phi-3's LongRoPE ships two sets; as llama.cpp, the context decides: the long set when
    the context (here the model's whole context_length) exceeds the original one.
    """
    if "rope_freqs.weight" in tensor_shapes:
        return "rope_freqs.weight"
    if "rope_factors_long.weight" in tensor_shapes:
        long = original_context and context > original_context
        return "rope_factors_long.weight" if long else "rope_factors_short.weight"
    return None


def _query_pre_attn_scalar(arch: str, n_layers: int, dim: int, n_heads: int, head_dim: int) -> int:
    """The number whose 1 / sqrt scales the scores: HD, but D / H for Gemma 3 27B.

    Gemma's query_pre_attn_scalar is not in the GGUF; llama.cpp recognises the one model
    that differs by its 62 layers, and so does refinfer.
    """
    return dim // n_heads if arch == "gemma3" and n_layers == 62 else head_dim


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
