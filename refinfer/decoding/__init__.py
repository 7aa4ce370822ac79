"""Decoding: what happens between one forward call and the next, on top of Model.forward.

Strategies never touch kernels; kernels never know about strategies (DESIGN.md). In the
order a reader meets them:

- generate.py: prefill, then decoding steps until EOS or the length limit, text streamed;
  `decoding=` picks the strategy (plain decoding proposes nothing).
- speculative.py: one step: a Proposer guesses, the target verifies every guess in one
  forward call, rejected tokens are rolled back (kv_pool.truncate), branches are forks.
- verify.py: the verifier every strategy shares (greedy match; speculative sampling).
- Proposers: draft.py (a draft model, or the target through some of its layers:
  self-speculative), calibrate.py (which layers), prompt_lookup.py, lookahead.py.
- batching.py: continuous batching of many requests over one pool (scheduler, chunked
  prefill, prefix caching, preemption).
"""
