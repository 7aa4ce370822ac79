# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · refinfer as an oracle
#
# Another engine's CI can ask refinfer: *given these token ids, what are the logits at
# every position?* and compare its own, position by position. `refinfer/oracle/` states
# the statistics as llama.cpp, ggml and vLLM define them; for a base $A$ and an engine
# under test $B$, at each position:
#
# - $\max_v |\Delta \mathrm{logit}_v|$, the largest difference of one logit;
# - $\mathrm{KL}(P_A \,\|\, P_B) = \sum_v p_A(v) \log \frac{p_A(v)}{p_B(v)}$, how much the
#   next-token distributions differ (llama-perplexity's `--kl-divergence`);
# - top-1 agreement, whether both would pick the same greedy token.
#
# Here the engine under test is HF transformers (float32) and, where it is installed,
# llama.cpp (through llama-cpp-python), each running the same weights of SmolLM2.

# %%
import importlib.util

import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers
from walkthrough import pick

import refinfer
from refinfer import quant
from refinfer.oracle.compare import Rows, compare_rows
from refinfer.oracle.trace import trace

m = refinfer.load()
c = m.config
text = pick(
    "The river rises in the high meadows, where snow lies late into the spring. It "
    "runs north through a narrow valley of pine and birch, past the old mill and the "
    "stone bridge, and reaches the sea at a small town of fishermen.",
    "The river rises in the high meadows, where snow lies late into the spring.",
)
ids = m.tokenizer.encode(text)
ours = m.logits(ids)  # (T, V) float32: the oracle side
print(f"T = {len(ids)} positions, logits {ours.shape}")

# %% [markdown]
# ## HF transformers from the same weights
#
# HF can read the GGUF itself (`from_pretrained(..., gguf_file=...)`), but parsing
# SmolLM2's 49k-entry vocabulary takes it a minute or more. So we hand HF's
# `LlamaForCausalLM` the dequantised weights directly. One thing to undo: llama.cpp's
# converter permuted the rows of $W_q$ and $W_k$ so that RoPE rotates neighbouring
# dimensions $(2i, 2i + 1)$; HF rotates the halves $(i, i + HD/2)$ of each head.


# %%
def unpermute(w, n_heads):
    """Rows of W_q / W_k back from GGUF's interleaved RoPE pairs to HF's halves."""
    return w.reshape(n_heads, c.head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def hf_weights():
    """HF's state dict, name by name, from the GGUF tensors."""

    def weight(name):
        return torch.tensor(m.tensors[name].dequantize())  # a copy: the file is read-only

    state = {
        "model.embed_tokens.weight": weight("token_embd.weight"),
        "model.norm.weight": weight("output_norm.weight"),
    }
    names = {
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(c.n_layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        for a, b in names.items():
            state[f"{hf}{a}.weight"] = weight(f"{gg}{b}.weight")
        q, k = (m.tensors[f"{gg}attn_{x}.weight"].dequantize() for x in "qk")
        state[f"{hf}self_attn.q_proj.weight"] = torch.tensor(unpermute(q, c.n_heads))
        state[f"{hf}self_attn.k_proj.weight"] = torch.tensor(unpermute(k, c.n_kv_heads))
    return state


config = transformers.LlamaConfig(
    vocab_size=c.vocab_size,
    hidden_size=c.dim,
    intermediate_size=c.ffn_dim,
    num_hidden_layers=c.n_layers,
    num_attention_heads=c.n_heads,
    num_key_value_heads=c.n_kv_heads,
    head_dim=c.head_dim,
    rms_norm_eps=c.norm_eps,
    max_position_embeddings=c.context_length,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
)
hf = transformers.LlamaForCausalLM(config).eval()
missing = hf.load_state_dict(hf_weights(), strict=False).missing_keys
assert missing == ["lm_head.weight"]  # tied to the embedding
with torch.no_grad():
    theirs = {"HF transformers": hf(torch.tensor([ids])).logits[0].numpy()}  # (T, V)

# %% [markdown]
# ## llama.cpp, where installed
#
# `make peers` installs llama-cpp-python; without it this comparison is skipped.

# %%
if importlib.util.find_spec("llama_cpp"):
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(m.path), n_ctx=len(ids), logits_all=True, n_threads=1, verbose=False
    )
    llm.eval(ids)
    theirs["llama.cpp"] = np.array(llm.scores[: len(ids)], np.float32)  # (T, V)
else:
    print("llama-cpp-python is not installed (make peers): comparing with HF only")

# %% [markdown]
# ## Position by position

# %%
reports = {}
for name, logits in theirs.items():
    r = compare_rows(
        Rows.from_logits("refinfer", ids, ours, {}), Rows.from_logits(name, ids, logits, {})
    )
    reports[name] = r
    print(
        f"{name:16} max |Δ| {r['max_abs']:.2e}  mean KL {r['kld_mean']:.2e}  "
        f"top-1 {r['top1']:.3f}  first argmax difference at {r['first_argmax_diff']}"
    )

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5), sharex=True, layout="constrained")
for name, r in reports.items():
    per = r["per_position"]
    kl = np.maximum(per["kld"], 1e-16)  # (T,)
    ax1.semilogy(per["position"], per["max_abs"], ".-", label=name)
    ax2.semilogy(per["position"], kl, ".-", label=name)
    differ = np.flatnonzero(np.not_equal(per["argmax_a"], per["argmax_b"]))
    ax2.plot(differ, kl[differ], "kx", ms=8)
ax2.set_title("x: another greedy token than refinfer's", fontsize=9)
ax1.set_ylabel("max |Δ logit|")
ax2.set_ylabel("KL(refinfer || engine)")
for ax in (ax1, ax2):
    ax.set_xlabel("position")
    ax.legend(fontsize=8)
plt.show()
hf_report = reports["HF transformers"]
assert hf_report["max_abs"] < 1e-3 and hf_report["top1"] == 1.0  # float32 against float32

# %% [markdown]
# ## Why llama.cpp differs more
#
# HF and refinfer both multiply float32 activations by the dequantised weights, so they
# differ only by float32 rounding in different summation orders. llama.cpp's CPU kernels
# first **quantise the activations** too, to 8-bit blocks of 32 (Q8_0 / Q8_1: a scale
# $d = \max|x| / 127$ and $q = \mathrm{round}(x / d)$), and multiply integers. That costs
# about $d/2$ per activation, far more than rounding to float32. We reproduce it for one
# matrix product, layer 0's $q = h W_q^\top$, with refinfer's own Q8_0 quantiser.

# %%
taps = trace(m, ids, ["attn_norm-0"])
h = taps["attn_norm-0"]  # (T, D) float32: RMSNorm(x) entering layer 0's attention
Wq = m.tensors["blk.0.attn_q.weight"].dequantize().astype(np.float64)  # (H * HD, D)
exact = h.astype(np.float64) @ Wq.T  # (T, H * HD)
h_q8 = quant.dequantize(quant.quantize(h, quant.Q8_0), quant.Q8_0).reshape(h.shape)
errors = {
    "float32 product": np.abs(h @ Wq.T.astype(np.float32) - exact).max(),
    "Q8 activations": np.abs(h_q8.astype(np.float64) @ Wq.T - exact).max(),
}
for name, e in errors.items():
    print(f"{name:16} max |Δ| of q = h Wq^T: {e:.2e}")
fig, ax = plt.subplots(figsize=(5, 2.5))
ax.barh(list(errors), list(errors.values()))
ax.set_xscale("log")
ax.set_xlabel("max |Δ| against float64, one matrix product")
plt.show()
assert errors["Q8 activations"] > 100 * errors["float32 product"]
if "llama.cpp" in reports:
    assert reports["llama.cpp"]["max_abs"] > 10 * hf_report["max_abs"]
    assert reports["llama.cpp"]["kld_mean"] < 0.05  # different numbers, the same model
