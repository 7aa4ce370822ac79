"""Architectures as data: what each GGUF `general.architecture` changes in Llama's block.

config.py reads `general.architecture` and looks its row up here; model.py and
reference.py each keep one transformer block that reads these switches, so a
new architecture is a row in ARCHITECTURES, not a copy of the forward pass.
Llama's block, with every variation a row can switch on in brackets:

    x = token_embd[ids]                                   [* sqrt(D)        embedding_scale]
    per layer i:
      h = RMSNorm(x)
      q, k, v = h Wq^T, h Wk^T, h Wv^T                    [+ biases         qkv_bias]
                                                          [one fused Wqkv   fused_qkv]
      q, k = RMSNorm_per_head(q), RMSNorm_per_head(k)     [                 qk_norm]
      q, k = RoPE(q), RoPE(k)                             [pairing          rope_neox]
                                                          [base of layer i  local_rope_base]
      a = Attn(q, k, v) Wo^T                              [window of i      swa_pattern]
      x = x + a                                           [RMSNorm(a)       post_norms]
      h = RMSNorm(x)
      m = (act(h Wgate^T) * h Wup^T) Wdown^T              [silu | gelu_tanh activation]
                                                          [one fused Wup    fused_gate_up]
      x = x + m                                           [RMSNorm(m)       post_norms]
    logits = RMSNorm(x) Wout^T                            [Wout = token_embd when tied]

Facts per row are those of llama.cpp (src/llama-model.cpp, src/models/*.cpp) and
of its converter (convert_hf_to_gguf.py), checked against HF transformers by
tests/test_architectures_hf.py:
- RoPE pairing: the converter permutes the q/k rows of 'llama' so that
  neighbours (x[2i], x[2i+1]) rotate together; every other row keeps HF's
  halves (x[i], x[i + rope_dim/2]), llama.cpp's NEOX mode.
- Gemma's RMSNorm multiplies by (1 + w); the converter stores w + 1, so all
  architectures share one RMSNorm.
- swa_pattern is llama.cpp's `set_swa_pattern(n)`: layer i uses the sliding
  window when n == 0 or i % n < n - 1. 0: every layer (Mistral, when the file
  gives a window); 6: Gemma 3's five local layers, then one global; 1: none
  (llama.cpp ignores Phi-3's window, and so does refinfer).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """The switches one block definition reads; a row of ARCHITECTURES."""

    name: str  # general.architecture
    models: str  # model families stored under this name, for messages and the README
    rope_neox: bool = False  # RoPE pairs (x[i], x[i + rope_dim/2]) instead of (x[2i], x[2i+1])
    qkv_bias: bool = False  # attn_{q,k,v}.bias added after the projections
    qk_norm: bool = False  # per-head RMSNorm attn_{q,k}_norm[HD] on q and k, before RoPE
    post_norms: bool = False  # post_attention_norm / post_ffw_norm on each sub-block's output
    activation: str = "silu"  # the gate's activation: 'silu' (SwiGLU) or 'gelu_tanh' (GeGLU)
    embedding_scale: bool = False  # the embedding rows are multiplied by sqrt(D)
    fused_qkv: bool = False  # one attn_qkv matrix, rows [Q | K | V]
    fused_gate_up: bool = False  # one ffn_up matrix, rows [gate | up]; no ffn_gate
    swa_pattern: int = 0  # layer i is windowed when swa_pattern == 0 or i % n < n - 1
    local_rope_base: float | None = None  # RoPE base of windowed layers unless the file gives
    #                                        rope.freq_base_swa; None: rope.freq_base

    def features(self) -> list[str]:
        """What this row changes in Llama's block, in words (for `refinfer info`)."""
        named = {
            "rope_neox": "NEOX RoPE pairs", "qkv_bias": "q/k/v biases",
            "qk_norm": "q/k RMSNorm per head", "post_norms": "post-attention/MLP norms",
            "embedding_scale": "embeddings x sqrt(D)", "fused_qkv": "fused attn_qkv",
            "fused_gate_up": "fused gate|up",
        }  # fmt: skip
        words = [text for switch, text in named.items() if getattr(self, switch)]
        words.append("GeGLU (GELU tanh)" if self.activation == "gelu_tanh" else "SwiGLU")
        if self.swa_pattern > 1:
            n = self.swa_pattern
            words.append(f"window on {n - 1} of {n} layers")
        return words


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("llama", "Llama 1-3, Mistral, SmolLM2, TinyLlama"),
        Architecture("qwen2", "Qwen2, Qwen2.5", rope_neox=True, qkv_bias=True),
        Architecture("qwen3", "Qwen3 (dense)", rope_neox=True, qk_norm=True),
        Architecture(
            "gemma3",
            "Gemma 3 (text)",
            rope_neox=True,
            qk_norm=True,
            post_norms=True,
            activation="gelu_tanh",
            embedding_scale=True,
            swa_pattern=6,
            local_rope_base=10000.0,
        ),  # fmt: skip
        Architecture(
            "phi3",
            "Phi-3, Phi-3.5 (mini)",
            rope_neox=True,
            fused_qkv=True,
            fused_gate_up=True,
            swa_pattern=1,
        ),  # fmt: skip
    )
}
