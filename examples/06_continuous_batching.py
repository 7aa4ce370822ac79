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
# # 06 · Continuous batching
#
# A decode step of one sequence reads every weight of the model to produce one token. The
# batching engine (`refinfer/decoding/batching.py`) puts the next token of *every* running
# sequence into the same forward call, so the weights are read once for all of them. Each
# step it also admits waiting requests and feeds their prompts in **chunks**, under a
# budget of tokens per step, so a long prompt never stalls the others' decoding. When the
# KV pool cannot hold the step, the most recently admitted sequence is **preempted**: its
# blocks are freed, and later it recomputes its tokens and carries on.
#
# Because a token's logits do not depend on what else is in the batch (the kernels reduce
# in a fixed order), every request gets bitwise the tokens and logits it would get alone.
# This notebook draws the schedule and checks that claim.

# %%
import time
from collections import defaultdict

import matplotlib.pyplot as plt
import numpy as np
from walkthrough import pick

import refinfer
from refinfer.decoding.batching import Engine, Request

m = refinfer.load()
N_NEW = pick(24, 8)
texts = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "A list of the planets of the solar system:",
    "Water boils at",
    "The three primary colours are",
]
requests = [Request(t, max_tokens=N_NEW, ignore_eos=True, keep_logits=True) for t in texts]
print([len(m.tokenizer.encode(t)) for t in texts], "prompt tokens")


# %% [markdown]
# ## Watching the scheduler
#
# `Recorder` stands in for the model and notes, at each forward call, how many tokens each
# running request contributed and at which position. A chunk is *prefill* (prompt tokens
# seen for the first time), *decode* (one new token) or *recompute* (tokens the request
# had computed before it was preempted).


# %%
class Recorder:
    """The model, plus a log of (step, request id, tokens, first position) per chunk."""

    def __init__(self, model):
        self.model, self.engine, self.log = model, None, []

    def __getattr__(self, name):  # config, tokenizer, check_length: the model's
        return getattr(self.model, name)

    def forward(self, batch, pool, layers=None):
        owner = {tuple(pool.block_table(s.seq)): s.id for s in self.engine.running}
        step = len({entry[0] for entry in self.log})
        for row, table in enumerate(batch.block_tables):
            tokens = np.flatnonzero(batch.seq_index == row)  # (n,) this chunk's tokens
            rid = owner[tuple(table[table >= 0])]
            self.log.append((step, rid, len(tokens), int(batch.positions[tokens[0]])))
        return self.model.forward(batch, pool, layers)


BS, BUDGET = 4, 8
recorder = Recorder(m)
engine = recorder.engine = Engine(
    recorder, max_seqs=4, max_tokens_per_step=BUDGET, kv_blocks=pick(18, 12), block_size=BS
)
for r in requests:
    engine.add_request(r)
done = {}
while engine.has_unfinished():
    for c in engine.step():
        done[c.id] = c
    engine.pool.check()
print(
    f"{engine.stats.steps} steps, {engine.stats.tokens_per_step:.1f} tokens per step, "
    f"{engine.stats.preemptions} preemption(s), "
    f"KV utilisation {engine.stats.kv_utilisation:.2f}"
)
assert engine.stats.preemptions >= 1  # the pool is too small to run all four at once

# %%
kinds = {"prefill": "tab:blue", "decode": "tab:green", "recompute": "tab:orange"}
reached = defaultdict(int)  # request -> positions computed so far
chunks = []  # (step, request, tokens, kind)
for step, rid, n, start in recorder.log:
    prompt_len = len(done[rid].prompt_ids)
    kind = "recompute" if start < reached[rid] else "decode" if start >= prompt_len else "prefill"
    reached[rid] = max(reached[rid], start + n)
    chunks.append((step, rid, n, kind))

fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True, height_ratios=[2, 1])
for step, rid, n, kind in chunks:
    ax1.add_patch(plt.Rectangle((step, rid - 0.4), 0.9, 0.8, fc=kinds[kind], alpha=0.7))
    if n > 1:
        ax1.text(step + 0.45, rid, str(n), ha="center", va="center", fontsize=7)
ax1.set_xlim(0, engine.stats.steps)
ax1.set_ylim(len(requests) - 0.5, -0.5)
ax1.set_ylabel("request")
ax1.legend(
    handles=[plt.Rectangle((0, 0), 1, 1, fc=c, alpha=0.7) for c in kinds.values()],
    labels=list(kinds),
    fontsize=8,
    loc="upper left",
    bbox_to_anchor=(1, 1),
)
ax1.set_title(
    f"slots x steps (numbers: tokens in a chunk); at most 4 running, {BUDGET} tokens a step"
)
steps = np.arange(engine.stats.steps)
bottom = np.zeros(len(steps))
for kind, colour in kinds.items():
    n = np.bincount(
        [s for s, _, _, k in chunks if k == kind],
        [n for *_, n, k in chunks if k == kind],
        minlength=len(steps),
    )
    ax2.bar(steps + 0.45, n, 0.9, bottom=bottom, color=colour, alpha=0.7)
    bottom += n
ax2.axhline(BUDGET, color="grey", ls=":")
ax2.set_ylabel("tokens in the call")
ax2.set_xlabel("step (one forward call)")
plt.show()
assert bottom.max() <= BUDGET  # chunked prefill keeps every step within the budget

# %% [markdown]
# Read the top panel left to right: the first prompts are fed in chunks that fill the
# budget; decodes (one token each) go first in every step and prompts take what is left.
# When the pool runs out, the most recently admitted request is preempted (its row goes
# blank), and once blocks are free again it recomputes its prompt and tokens, then decodes
# on. Its full blocks were offered to the prefix cache, so when they have not been evicted
# in the meantime the recompute is short.
#
# ## Every request, bitwise as if it ran alone
#
# Same block size, one request at a time (`max_seqs=1`), a pool large enough for it:
# the generated tokens and the logits each was drawn from must be identical, bit for bit,
# despite batching, chunking, and the preemption.

# %%
for i, r in enumerate(requests):
    alone = m.generate_batch([r], max_seqs=1, block_size=BS)[0]
    batched = done[i]
    assert batched.ids == alone.ids
    assert np.array_equal(batched.logits, alone.logits)  # (N_NEW, V) bitwise
    print(f"{i} {batched.preemptions} preemption(s)  {texts[i]!r} -> {batched.text!r}")

# %% [markdown]
# ## Throughput and time to first token against concurrency
#
# Eight requests (four in the fast setting) queued at once. With one sequence at a time
# each request waits for the ones before it; with more, decode steps carry several tokens
# for about the price of one (notebook 05's cost curve), so generated tokens per second
# rise and the mean time to first token falls.

# %%
sweep = [Request(t, max_tokens=pick(32, 8), ignore_eos=True) for t in texts[:4] * pick(2, 1)]
concurrency = pick([1, 2, 4, 8], [1, 4])
throughput, ttft = [], []
for max_seqs in concurrency:
    start = time.perf_counter()
    outs = m.generate_batch(sweep, max_seqs=max_seqs, max_tokens_per_step=64)
    seconds = time.perf_counter() - start
    throughput.append(sum(len(o.ids) for o in outs) / seconds)
    ttft.append(np.mean([o.time_to_first_token for o in outs]))
    print(f"max_seqs {max_seqs}: {throughput[-1]:5.1f} generated tok/s, mean TTFT {ttft[-1]:.2f} s")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
ax1.plot(concurrency, throughput, "o-")
ax1.set_xlabel("max concurrent sequences")
ax1.set_ylabel("generated tokens / s")
ax2.plot(concurrency, ttft, "o-", color="tab:orange")
ax2.set_xlabel("max concurrent sequences")
ax2.set_ylabel("mean time to first token (s)")
plt.show()
assert throughput[-1] > 1.2 * throughput[0] and ttft[-1] < ttft[0]
