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
# # 05 · Accelerated decoding: guess, verify in one call, keep what the model agrees with
#
# Plain decoding runs the model once per token. Every strategy in `refinfer/decoding/`
# instead **proposes** $k$ tokens cheaply, runs the pending token and the $k$ guesses in
# **one** forward call, and keeps the longest prefix of guesses that equals the model's own
# greedy choice, plus the model's token after it. So a step emits between 1 and $k + 1$
# tokens, and the output is *exactly* plain greedy decoding's.
#
# The proposers: **prompt lookup** copies what followed the last n-gram earlier in the
# text; **lookahead** keeps n-grams the model produced by Jacobi iteration on a window of
# guesses; **self-speculative** drafts with the model itself through a subset of its layers.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from walkthrough import pick

import refinfer
from refinfer.decoding.generate import make_proposer
from refinfer.decoding.speculative import VERIFY_COST, DecodeState, step
from refinfer.kv_pool import BLOCK_SIZE, KVPool, blocks_for
from refinfer.model import Batch
from refinfer.sampling import Sampler, SamplingParams

m = refinfer.load()
PASSAGE = (
    "The river rises in the high meadows, where snow lies late into the spring. It "
    "runs north through a narrow valley of pine and birch, past the old mill."
)
chat = m.tokenizer.apply_chat_template(
    [{"role": "user", "content": f"Repeat this passage word for word:\n\n{PASSAGE}"}]
)
prompt = m.tokenizer.encode(chat, parse_special=True)
N_NEW = pick(40, 12)
plain = m.generate(prompt, max_new_tokens=N_NEW)
print(f"prompt {len(prompt)} tokens; plain greedy: {plain.text!r}")


# %% [markdown]
# ## One step at a time
#
# `decode` is `generate`'s loop opened up: prefill, then `speculative.step` (propose,
# one forward call, verify, roll back the rejected tokens with `kv_pool.truncate`) with a
# fixed $k$, recording what each step proposed and accepted.


# %%
def decode(proposer, k, n_new=N_NEW):
    """Greedy tokens up to EOS or n_new and, per step, (tokens proposed, accepted, emitted)."""
    n_blocks = blocks_for(len(prompt) + n_new + k + 1, BLOCK_SIZE)
    pool = KVPool(m.config, n_blocks + proposer.extra_blocks(BLOCK_SIZE))
    sampler = Sampler(SamplingParams(temperature=0.0))
    state = DecodeState(m, pool, pool.new_sequence(), list(prompt), sampler)
    logits = m.forward(Batch.append(pool, [(state.seq, prompt)], all_logits=False), pool)
    state.history.append(sampler.sample(logits[-1], prompt))
    steps = []
    generated = state.history[len(prompt) :]
    while len(generated) < n_new and m.tokenizer.eos_ids.isdisjoint(generated):
        verdict, proposed, _ = step(state, proposer, k)
        steps.append((proposed, verdict.n_accepted, verdict.tokens))
        pool.check()
        generated = state.history[len(prompt) :]
    proposer.close(state)
    return generated[:n_new], steps


K = 4
strategies = {
    "prompt lookup": make_proposer(m, "prompt-lookup"),
    "lookahead": make_proposer(m, "lookahead"),
    "self-speculative": make_proposer(
        m, "self-speculative", draft_layers=[*range(0, 12), *range(20, 30)]
    ),
}
runs = {}
for name, proposer in strategies.items():
    tokens, steps = decode(proposer, K)
    runs[name] = steps
    emitted = sum(len(e) for _, _, e in steps)
    same = tokens[: len(plain.ids)] == plain.ids  # (plain decoding stops at EOS)
    print(
        f"{name:17} {emitted} tokens in {len(steps):2} forward calls (plain decoding: "
        f"{emitted}); the same tokens as plain greedy: {same}"
    )
    assert same  # exactness: every strategy emits plain greedy decoding's tokens


# %% [markdown]
# Each column is one forward call: green tokens were proposed and accepted, blue is the
# model's own token, red cells are the proposed tokens it rejected (rolled back).


# %%
def strip(ax, steps, title):
    for x, (proposed, accepted, emitted) in enumerate(steps):
        for y, token in enumerate(emitted):
            colour = "tab:green" if y < accepted else "tab:blue"
            ax.add_patch(plt.Rectangle((x, -y), 0.9, -0.9, fc=colour, alpha=0.6))
            ax.text(
                x + 0.45,
                -y - 0.45,
                m.tokenizer.decode([token]).strip()[:5],
                ha="center",
                va="center",
                fontsize=5,
                rotation=90,
            )
        for y in range(accepted + 1, proposed + 1):
            ax.add_patch(plt.Rectangle((x, -y), 0.9, -0.9, fc="tab:red", alpha=0.4))
    ax.set_xlim(0, max(len(s) for s in runs.values()))
    ax.set_ylim(-(K + 1), 0)
    ax.set_title(title, fontsize=9)
    ax.set_yticks([])


fig, axes = plt.subplots(
    len(runs), 1, figsize=(10, 1.7 * len(runs)), sharex=True, layout="constrained"
)
for ax, (name, steps) in zip(axes, runs.items(), strict=True):
    strip(ax, steps, f"{name}: {len(steps)} forward calls")
axes[-1].set_xlabel("step (forward call)")
plt.show()

# %% [markdown]
# ## How many tokens a step emits
#
# If each guess is accepted with probability $a$, independently, until the first
# rejection, a step of $k$ guesses emits on average
#
# $$E[\text{tokens per step}] = 1 + a + a^2 + \dots + a^k = \frac{1 - a^{k+1}}{1 - a}.$$
#
# We measure $a$ as accepted guesses over guesses tested (accepted + first rejections) for
# the self-speculative draft at several $k$, and compare the tokens per step.


# %%
def tokens_per_step(steps):
    """Measured tokens per step, and the formula's for the measured acceptance a."""
    accepted = sum(a for _, a, _ in steps)
    rejected = sum(a < p for p, a, _ in steps)  # steps that hit a rejection
    a = accepted / (accepted + rejected)
    k = max(p for p, _, _ in steps)
    return np.mean([len(e) for _, _, e in steps]), (1 - a ** (k + 1)) / (1 - a), a


ks = pick([1, 2, 3, 4, 6], [1, 4])
measured = {k: tokens_per_step(decode(strategies["self-speculative"], k)[1]) for k in ks}
for k, (got, formula, a) in measured.items():
    print(f"k = {k}: a = {a:.2f}, tokens/step measured {got:.2f}, formula {formula:.2f}")
    assert abs(got - formula) <= 0.25 * formula

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(ks, [measured[k][0] for k in ks], "o", label="measured")
ax.plot(ks, [measured[k][1] for k in ks], "x--", label="$(1 - a^{k+1}) / (1 - a)$")
ax.set_xlabel("guesses per step k")
ax.set_ylabel("tokens per forward call")
ax.legend(fontsize=8)
ax.set_title("self-speculative: acceptance falls with k, so returns diminish")
plt.show()

# %% [markdown]
# ## Why a CPU pays for every guess
#
# On a GPU a forward call of $T = k + 1$ tokens costs about what one token costs: the
# weights are read once, and the arithmetic is idle anyway. On a CPU the arithmetic is
# not free, so guesses pay only when enough are accepted. `speculative.VERIFY_COST` is the
# engine's cost model, $\mathrm{cost}(T) \approx 1 + 0.2\,(T - 1)$ decoding steps; the
# strategies pause proposing while the measured gain is below 1. Here is the measured
# cost of one forward call of $T$ tokens after a prompt, relative to $T = 1$.

# %%
Ts = pick([1, 2, 4, 8, 16], [1, 4, 16])
REPEATS = pick(5, 3)
pool = KVPool(m.config, blocks_for(len(prompt) + max(Ts), BLOCK_SIZE))
seq = pool.new_sequence()
m.forward(Batch.append(pool, [(seq, prompt)], all_logits=False), pool)


def forward_seconds(T):
    """Median seconds of a forward call of T tokens appended after the prompt."""
    times = []
    for _ in range(REPEATS):
        batch = Batch.append(pool, [(seq, prompt[:T])])
        start = time.perf_counter()
        m.forward(batch, pool)
        times.append(time.perf_counter() - start)
        pool.truncate(seq, len(prompt))  # roll back, as a rejected step does
    return np.median(times)


cost = np.array([forward_seconds(T) for T in Ts])
cost /= cost[0]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(Ts, cost, "o-", label="measured here")
ax.plot(Ts, 1 + VERIFY_COST * (np.array(Ts) - 1), "--", label="cost model 1 + 0.2 (T - 1)")
ax.plot(Ts, np.ones(len(Ts)), ":", color="grey", label="the GPU ideal")
ax.set_xlabel("tokens in the forward call T")
ax.set_ylabel("cost / cost(T = 1)")
ax.legend(fontsize=8)
plt.show()
print("cost / cost(1):", {T: round(float(c), 2) for T, c in zip(Ts, cost, strict=True)})
assert cost[-1] > 1.5  # 16 tokens are not free on a CPU
