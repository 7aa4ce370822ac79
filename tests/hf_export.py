"""Tiny random HF transformers models, written to F32 GGUF as llama.cpp's converter does.

This is the first step of the independent check `reference == HF`: a model built in HF
(the implementation we trust) goes through this exporter into a GGUF file, which
refinfer reads (gguf.py -> config.py) and runs (reference.py, model.py); both must give
HF's logits. The exporter mirrors `convert_hf_to_gguf.py` (llama.cpp, conversion/*.py)
for each HF class, and tests/test_architectures_hf.py checks it, key by key and tensor
by tensor, against the real converter when one is at hand.

What differs per architecture is one row of `ARCHS`; the rest is the converter's
common path (`TextModel.set_gguf_parameters`, `gguf.TensorNameMap`):
- RoPE pairing: HF rotates the halves of each head (x[i], x[i + HD/2]). GGUF 'llama'
  rotates neighbours (x[2i], x[2i + 1]), so `LlamaModel.permute` reorders the rows of
  q/k; every other architecture here is run by llama.cpp with NEOX RoPE (the halves, as
  HF) and is stored unpermuted.
- Gemma 3's RMSNorm multiplies by (1 + w); `Gemma3Model.norm_shift` stores w + 1 for
  every tensor whose name ends in "norm.weight" (input, post-attention, pre- and
  post-feed-forward, q/k norms and the final norm).
- Phi-3 keeps HF's fused tensors: attn_qkv = [Q | K | V] rows, ffn_up = [gate | up] rows.
- Tied embeddings: no output.weight (HF saves no lm_head.weight).
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

K = gguf.Keys.LLM  # metadata key templates, "{arch}.block_count", ...
KA = gguf.Keys.Attention
KR = gguf.Keys.Rope


@dataclass(frozen=True)
class Arch:
    """How convert_hf_to_gguf.py writes one HF class: the switches that differ."""

    gguf_arch: gguf.MODEL_ARCH  # general.architecture and the TensorNameMap used
    permute_qk: bool = False  # LlamaModel.undo_permute: q/k rows to interleaved RoPE pairs
    norm_shift: float = 0.0  # Gemma3Model.norm_shift: added to every "*norm.weight"
    rope_dim_key: bool = False  # writes rope.dimension_count (qwen2/3, gemma3 do not)
    vocab_size_key: bool = False  # LlamaModel writes {arch}.vocab_size
    window_key: str = "none"  # attention.sliding_window: "none", "config", "zero_if_none"
    common_keys: bool = True  # TextModel.set_gguf_parameters runs (Phi3MiniModel skips it)


ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_dim_key=True,
                             vocab_size_key=True),
    # The real converter drops Mistral's window (llama.cpp's 'llama' has no SWA); refinfer
    # reads it, so this exporter keeps it.
    "MistralForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_dim_key=True,
                               vocab_size_key=True, window_key="config"),
    "Qwen2ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN3),
    "Gemma3ForCausalLM": Arch(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, window_key="config"),
    "Phi3ForCausalLM": Arch(gguf.MODEL_ARCH.PHI3, rope_dim_key=True,
                            window_key="zero_if_none", common_keys=False),
}  # fmt: skip


def arch_of(model) -> Arch:
    """The ARCHS row of an HF model, by its class name (as the converter's registry)."""
    name = type(model).__name__
    if name not in ARCHS:
        raise ValueError(f"{name} is not exported; known: {', '.join(ARCHS)}")
    return ARCHS[name]


# ---- metadata ------------------------------------------------------------------


def rope_parameters(c) -> dict[str, Any]:
    """HF's rope dict for full-attention layers (transformers >= 5: rope_parameters), with
    original_max_position_embeddings mirrored from the config as TextModel.__init__ does."""
    rp = getattr(c, "rope_parameters", None) or {}
    rp = dict(rp.get("full_attention", rp))
    if (n_orig := getattr(c, "original_max_position_embeddings", None)) is not None:
        rp.setdefault("original_max_position_embeddings", n_orig)
    return rp


def metadata(c, arch: Arch) -> dict[str, Any]:
    """{GGUF key: value} as the converter writes them for HF config `c` (no tokenizer).

    Ints are written as uint32, floats as float32 and strings as strings, as gguf-py's
    typed add_* calls do.
    """
    a = gguf.MODEL_ARCH_NAMES[arch.gguf_arch]
    rp = rope_parameters(c)
    head_dim = getattr(c, "head_dim", None)
    md = {
        K.BLOCK_COUNT: c.num_hidden_layers,
        K.CONTEXT_LENGTH: c.max_position_embeddings,
        K.EMBEDDING_LENGTH: c.hidden_size,
        K.FEED_FORWARD_LENGTH: c.intermediate_size,
        KA.HEAD_COUNT: c.num_attention_heads,
        KA.HEAD_COUNT_KV: c.num_key_value_heads,
        KR.FREQ_BASE: float(rp["rope_theta"]),
        KA.LAYERNORM_RMS_EPS: c.rms_norm_eps,
    }
    if head_dim is not None and arch.common_keys:
        md |= {KA.KEY_LENGTH: head_dim, KA.VALUE_LENGTH: head_dim}
    if arch.rope_dim_key:  # llama: head_dim; phi3: int(partial_rotary_factor * D) // H
        rot = rp.get("partial_rotary_factor", 1.0)
        md[KR.DIMENSION_COUNT] = head_dim or int(rot * c.hidden_size) // c.num_attention_heads
    if arch.vocab_size_key:
        md[K.VOCAB_SIZE] = c.vocab_size
    if arch.window_key != "none" and (window := getattr(c, "sliding_window", None) or 0):
        md[KA.SLIDING_WINDOW] = window
    elif arch.window_key == "zero_if_none":
        md[KA.SLIDING_WINDOW] = 0
    swa = (getattr(c, "rope_parameters", None) or {}).get("sliding_attention")
    if swa is not None:  # gemma3: the local layers' base
        md[KR.FREQ_BASE_SWA] = float(swa["rope_theta"])
    if getattr(c, "final_logit_softcapping", None):
        md[K.FINAL_LOGIT_SOFTCAPPING] = float(c.final_logit_softcapping)
    md |= rope_scaling_metadata(c, rp, arch)
    return {key.format(arch=a): value for key, value in md.items()}


def rope_scaling_metadata(c, rp: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """The rope.scaling.* keys (linear and LongRoPE, the types the tiny models use)."""
    rope_type = rp.get("rope_type", "default")
    md: dict[str, Any] = {}
    if arch.common_keys and rope_type == "linear":
        md = {KR.SCALING_TYPE: "linear", KR.SCALING_FACTOR: float(rp["factor"])}
    elif arch.common_keys and rope_type == "longrope":
        md = {KR.SCALING_TYPE: "longrope"}
    if arch.gguf_arch == gguf.MODEL_ARCH.PHI3:  # Phi3MiniModel writes this always
        md[KR.SCALING_ORIG_CTX_LEN] = rp["original_max_position_embeddings"]
        if rp.get("long_factor"):
            md[KR.SCALING_ATTN_FACTOR] = longrope_attn_factor(c, rp)
    return md


def longrope_attn_factor(c, rp: dict[str, Any]) -> float:
    """sqrt(1 + ln(s) / ln(n_orig)), s = context / n_orig: cos and sin are scaled by it."""
    n_orig = rp["original_max_position_embeddings"]
    scale = c.max_position_embeddings / n_orig
    return float(np.sqrt(1 + np.log(scale) / np.log(n_orig))) if scale > 1.0 else 1.0


# ---- tensors -------------------------------------------------------------------


def permute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection, per head, from half-split order to interleaved pairs."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model, arch: Arch) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 array} from the HF state dict, as the converter maps it."""
    c = model.config
    names = gguf.get_tensor_name_map(arch.gguf_arch, c.num_hidden_layers)
    sd = {k: v.detach().cpu().double().numpy().astype(np.float32)
          for k, v in model.state_dict().items()}  # fmt: skip
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # save_pretrained drops the tied copy
    out = {}
    for hf_name, t in sd.items():
        if arch.permute_qk and ".q_proj." in hf_name:
            t = permute_for_rope(t, c.num_attention_heads)
        if arch.permute_qk and ".k_proj." in hf_name:
            t = permute_for_rope(t, c.num_key_value_heads)
        if hf_name.endswith("norm.weight"):
            t = t + np.float32(arch.norm_shift)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{hf_name} has no GGUF name for {arch.gguf_arch.name}")
        out[name] = t
    return out | rope_factor_tensors(c, arch)


def rope_factor_tensors(c, arch: Arch) -> dict[str, np.ndarray]:
    """Phi-3 LongRoPE: rope_factors_long / rope_factors_short [rope_dim / 2] (divisors)."""
    rp = rope_parameters(c)
    if arch.gguf_arch != gguf.MODEL_ARCH.PHI3 or not rp.get("long_factor"):
        return {}
    return {
        "rope_factors_long.weight": np.asarray(rp["long_factor"], dtype=np.float32),
        "rope_factors_short.weight": np.asarray(rp["short_factor"], dtype=np.float32),
    }


# ---- the file ------------------------------------------------------------------


def export_hf_to_gguf(model, path: Path, arch: Arch | None = None) -> Path:
    """Write `model` (an HF *ForCausalLM of ARCHS) as an F32 GGUF at `path`.

    `arch` replaces the model's ARCHS row (a test may switch one difference off).
    """
    arch = arch or arch_of(model)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in metadata(model.config, arch).items():
        add_value(w, key, value)
    add_placeholder_vocab(w, model.config.vocab_size)
    for name, t in gguf_tensors(model, arch).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_placeholder_vocab(w: gguf.GGUFWriter, n: int) -> None:
    """A SentencePiece-style vocabulary of `n` made-up pieces: real files carry one, and HF's
    GGUF loader takes the vocabulary size from it (only llama writes {arch}.vocab_size)."""
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([gguf.TokenType.NORMAL] * n)


def add_value(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """One key with the converter's type: uint32, float32 or string."""
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (int, np.integer)):
        w.add_uint32(key, int(value))
    else:
        w.add_float32(key, float(value))


# ---- tiny random models ----------------------------------------------------------

# D 64, H 4, KVH 2 (gemma3: 1), V 128. qwen3 and gemma3 have a head_dim other than D / H;
# gemma3 has 6 layers so that layer 5 is global (llama.cpp: local when il % 6 < 5) and a
# window of 4; phi3-longrope is trained for 32 positions and stretched to 128. Weights
# are drawn 10x wider than HF's default (0.02), so that attention is sharp (the top key
# holds ~0.3-0.7 of each query's weight) and a wrong RoPE or mask shows in the logits.
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=float(np.float32(1e-5)), tie_word_embeddings=False,
               initializer_range=0.2)  # fmt: skip
_LONG = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]  # one divisor per frequency (HD/2 = 8)
_SHORT = [1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0]
TINY_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # kind: (config class, model class, config fields beside _COMMON)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, num_hidden_layers=3)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=6, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=4, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        pad_token_id=0, eos_token_id=2, original_max_position_embeddings=128)),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        pad_token_id=0, eos_token_id=2, original_max_position_embeddings=32,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "long_factor": _LONG, "short_factor": _SHORT,
                         "original_max_position_embeddings": 32})),
}  # fmt: skip


def tiny_model(kind: str, seed: int = 0):
    """A random HF model of TINY_MODELS[kind]: float32 values, float64 compute, eager attention.

    Weights are rounded to float32 (what the GGUF stores) and the model then runs in
    float64, so HF and refinfer start from the same numbers. Norm weights and biases are
    drawn around their init too (HF initialises them to 0 or 1, which would hide a missing
    norm, bias or +1), and Gemma's norm weights w such that w + 1 is a float32 as well.
    """
    import torch
    import transformers

    config_cls, model_cls, fields = TINY_MODELS[kind]
    config = getattr(transformers, config_cls)(**(_COMMON | fields))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    shift = arch_of(model).norm_shift
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(0.2 * torch.randn_like(p))
            if name.endswith("norm.weight"):  # so that the stored w + shift is exact too
                p.copy_((p + shift).float().double() - shift)
            p.copy_(p.float())
    return model.double().eval()


# ---- the real converter, as an oracle for this exporter ------------------------------


def convert_with_llama_cpp(model, workdir: Path, converter: Path) -> subprocess.Popen:
    """Start `python convert_hf_to_gguf.py workdir --outtype f32` on `model`, saved there.

    The converter needs a checkpoint directory with a tokenizer: a 128-piece SentencePiece
    model is trained for it (every kind here reads tokenizer.model). Returns the running
    process; the file is workdir / "converted.gguf".
    """
    import sentencepiece as spm

    workdir.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).float().save_pretrained(workdir)
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnop", k=rng.randint(2, 6))) for _ in range(200)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choices(words, k=12)) for _ in range(500)),
        model_prefix=str(workdir / "tokenizer"), vocab_size=model.config.vocab_size,
        model_type="bpe", minloglevel=2,
    )  # fmt: skip
    args = [sys.executable, str(converter), str(workdir), "--outtype", "f32",
            "--outfile", str(workdir / "converted.gguf")]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def model_fields(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """({key: value} without general.* and tokenizer.*, {tensor: float32 array}) of a GGUF."""
    r = gguf.GGUFReader(path)
    kv = {
        name: f.contents()
        for name, f in r.fields.items()
        if not name.startswith(("general.", "tokenizer.", "GGUF."))
    }
    tensors = {
        t.name: np.asarray(t.data, dtype=np.float32).reshape(t.data.shape) for t in r.tensors
    }
    return kv, tensors
