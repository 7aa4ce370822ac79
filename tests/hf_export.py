"""Export a HF transformers Llama/Mistral to GGUF the way llama.cpp's converter does.

The one subtle step is RoPE: HF rotates the halves of each head (x[i], x[i + HD/2]),
GGUF 'llama' models rotate neighbours (x[2i], x[2i + 1]); convert_hf_to_gguf.py
permutes the rows of attn_q / attn_k so that the same model computes the same thing.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def permute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection, per head, from half-split order to interleaved pairs."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def export_hf_to_gguf(model, path: Path) -> Path:
    """Write `model` (a LlamaForCausalLM / MistralForCausalLM) as an F32 GGUF."""
    c = model.config
    sd = {
        k: v.detach().to("cpu").double().numpy().astype(np.float32)
        for k, v in model.state_dict().items()
    }
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(
        float(c.rope_theta if hasattr(c, "rope_theta") else c.rope_parameters["rope_theta"])
    )
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    tensors = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    if "lm_head.weight" in sd and not c.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors |= {
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": permute_for_rope(
                sd[p + "self_attn.q_proj.weight"], c.num_attention_heads
            ),
            f"blk.{i}.attn_k.weight": permute_for_rope(
                sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads
            ),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
        }
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
