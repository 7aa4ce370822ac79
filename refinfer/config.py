"""ModelConfig: the hyper-parameters of a Llama-family model, read from GGUF metadata.

This is the first thing built from a file (gguf.py calls `ModelConfig.from_metadata`)
and the one place every other module asks for a size, an epsilon or a rope base:
nothing is buried in a kernel. `validate` checks the tensors of the file against
these numbers, so a mismatch is reported here, by name, and not as a shape error
deep in the forward pass.

Shape legend, used in comments across the package:
    T    tokens in a batch             D    model dim (embedding_length)
    H    query heads                   KVH  key/value heads (grouped-query attention)
    HD   head_dim                      F    ffn dim (feed_forward_length)
    V    vocabulary size               L    layers (block_count)
    BS   tokens per KV-pool block      N, K output rows and inputs of a weight matrix
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from refinfer.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama",)


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
                f"architecture {arch!r} is not supported; refinfer runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama, Mistral, SmolLM2, TinyLlama, ...)"
            )

        def key(name: str, default: Any = None) -> Any:
            value = md.get(f"{arch}.{name}", default)
            if value is None:
                raise UnsupportedModelError(f"the GGUF metadata has no {arch}.{name}")
            return value

        dim = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        head_dim = int(md.get(f"{arch}.attention.key_length", dim // n_heads))
        embd = tensor_shapes.get("token_embd.weight")
        vocab = md.get(f"{arch}.vocab_size") or (embd[0] if embd else None)
        if vocab is None:
            tokens = md.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else key("vocab_size")
        window = md.get(f"{arch}.attention.sliding_window")
        config = cls(
            architecture=arch,
            n_layers=int(key("block_count")),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=int(key("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(key("feed_forward_length")),
            vocab_size=int(vocab),
            context_length=int(key("context_length")),
            rope_base=float(key("rope.freq_base", 10000.0)),
            rope_dim=int(key("rope.dimension_count", head_dim)),
            rope_scaling=RopeScaling(
                type=str(md.get(f"{arch}.rope.scaling.type", "none")),
                factor=float(md.get(f"{arch}.rope.scaling.factor", 1.0)),
                original_context_length=int(
                    md.get(f"{arch}.rope.scaling.original_context_length", 0)
                ),
                has_freq_factors="rope_freqs.weight" in tensor_shapes,
            ),
            norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            sliding_window=int(window) if window else None,
            tied_embeddings="output.weight" not in tensor_shapes,
        )
        config.validate(tensor_shapes)
        return config

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a model with this config has, with its shape in NumPy order."""
        D, H, KVH, HD, F, V = (
            self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.ffn_dim, self.vocab_size
        )  # fmt: skip
        shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
        if not self.tied_embeddings:
            shapes["output.weight"] = (V, D)
        if self.rope_scaling.has_freq_factors:
            shapes["rope_freqs.weight"] = (self.rope_dim // 2,)
        for i in range(self.n_layers):
            shapes |= {
                f"blk.{i}.attn_norm.weight": (D,),
                f"blk.{i}.attn_q.weight": (H * HD, D),
                f"blk.{i}.attn_k.weight": (KVH * HD, D),
                f"blk.{i}.attn_v.weight": (KVH * HD, D),
                f"blk.{i}.attn_output.weight": (D, H * HD),
                f"blk.{i}.ffn_norm.weight": (D,),
                f"blk.{i}.ffn_gate.weight": (F, D),
                f"blk.{i}.ffn_up.weight": (F, D),
                f"blk.{i}.ffn_down.weight": (D, F),
            }
        return shapes

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
        for name, shape in self.expected_shapes().items():
            if name not in tensor_shapes:
                raise UnsupportedModelError(f"tensor {name} is missing from the file")
            if tuple(tensor_shapes[name]) != shape:
                raise UnsupportedModelError(
                    f"tensor {name} has shape {tuple(tensor_shapes[name])}, but the metadata "
                    f"implies {shape}"
                )
