"""Draft proposers: a cheaper model guesses k tokens, one forward call each, for the target.

Two strategies share this one proposer, they differ only in where the draft runs:
- speculative decoding (Leviathan et al. 2023; Chen et al. 2023): the draft is another GGUF
  with the target's vocabulary (a smaller or more quantised model), in its own KV pool;
- self-speculative decoding (Draft & Verify, Zhang et al. 2023; LayerSkip, Elhoushi et al.
  2024): the draft is the target itself run through a subset of its layers
  (`model.forward(..., layers=...)`), on the target's own sequence and pool, so it reads the
  keys and values the full model wrote for the prefix. decoding/calibrate.py picks the layers.

Each proposal feeds the draft the accepted tokens it has not seen yet (at least the pending
one) and then its own guesses, one at a time:

    d_1 ~ q_1 = draft(history),  d_2 ~ q_2 = draft(history + d_1), ...,  d_k ~ q_k

drawn as plain sampling would (argmax when greedy), and keeps q_i for the verifier. Then
the draft's sequence is truncated back to the accepted tokens before the pending one, which
for the self-speculative draft is exactly where the target's sequence was: what the draft
wrote past it is rolled back before the target verifies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from refinfer.decoding.speculative import DecodeState, Proposal, Proposer
from refinfer.errors import InvalidParameterError
from refinfer.kv_pool import KVPool
from refinfer.model import Batch, Model
from refinfer.sampling import probabilities


class DraftModelProposer(Proposer):
    """k tokens from a draft model (another model, or the target through `layers` only)."""

    def __init__(
        self, draft: Model, layers: Sequence[int] | None = None, target: Model | None = None
    ) -> None:
        """A draft for `target`; with `layers` and no target, `draft` is the target itself
        run through those layers (self-speculative)."""
        if layers is not None:
            _check_layers(layers, draft.config.n_layers)
        self.draft = draft
        self.layers = None if layers is None else list(layers)
        self.name = "speculative" if layers is None else "self-speculative"
        # a drafted token's cost in decoding steps of the target (speculative.DraftLength)
        self.draft_cost = _weights_per_token(draft, self.layers) / _weights_per_token(
            target or draft
        )
        self.pool: KVPool | None = None  # the draft's own pool (a separate draft model only)
        self.seq = -1

    @classmethod
    def for_target(
        cls, target: Model, draft: str | os.PathLike | Model | None
    ) -> DraftModelProposer:
        """A separate draft model for `target`, loaded if given as a path; vocabularies checked."""
        from refinfer.model import load

        if draft is None:
            raise InvalidParameterError(
                "speculative decoding needs a draft model: pass draft_model= (CLI: --draft-model "
                "FILE.gguf), e.g. a smaller or more quantised model with the same vocabulary"
            )
        model = draft if isinstance(draft, Model) else load(draft)
        _check_vocabulary(target, model)
        return cls(model, target=target)

    def propose(self, state: DecodeState, k: int) -> Proposal:
        """k draft tokens after state.history, with the distributions they were drawn from."""
        pool, seq = self._pool_and_sequence(state)
        chunk = state.history[pool.length(seq) :]  # what the draft has not seen, pending included
        params, drafted, q = state.sampler.params, [], []
        for _ in range(k):
            batch = Batch.append(pool, [(seq, chunk)], all_logits=False)
            logits = self.draft.forward(batch, pool, self.layers)[-1]  # (V,)
            q.append(probabilities(logits, params, [*state.history, *drafted]))
            drafted.append(_draw(q[-1], params.greedy, state))
            chunk = drafted[-1:]
        pool.truncate(seq, len(state.history) - 1)  # the accepted tokens before the pending one
        return Proposal([drafted], draft_probs=None if params.greedy else q)

    def close(self, state: DecodeState) -> None:
        """Free the draft's own sequence (the self-speculative draft has none)."""
        if self.pool is not None:
            self.pool.free(self.seq)
            self.pool = None

    def _pool_and_sequence(self, state: DecodeState) -> tuple[KVPool, int]:
        """Where the draft runs: the target's sequence, or its own (made on first use)."""
        if self.layers is not None:
            return state.pool, state.seq
        if self.pool is None:  # as large as the target's: it holds the same tokens
            self.pool = KVPool(self.draft.config, state.pool.n_blocks, state.pool.block_size)
            self.seq = self.pool.new_sequence()
        return self.pool, self.seq


def _draw(q: np.ndarray, greedy: bool, state: DecodeState) -> int:
    """The drafted token: the argmax of q when greedy (q is one-hot), else a draw from q."""
    return int(np.argmax(q)) if greedy else state.sampler.draw(q)


def _weights_per_token(model: Model, layers: Sequence[int] | None = None) -> int:
    """Weights a decoding step multiplies through `layers` (default all) and the output head.

    Decoding one token streams every one of them from memory once, so the ratio of two
    such counts estimates the ratio of their decoding times (draft_cost).
    """
    weights = [model.output.n_elements]
    for i in range(model.config.n_layers) if layers is None else layers:
        w = model.layers[i]
        weights += [m.n_elements for m in (w.wq, w.wk, w.wv, w.wo, w.w_gate, w.w_up, w.w_down)]
    return sum(weights)


def _check_layers(layers: Sequence[int], n_layers: int) -> None:
    """InvalidParameterError unless layers is a non-empty increasing list of layer indices."""
    if not layers:
        raise InvalidParameterError(
            "the self-speculative draft needs at least one layer; run `refinfer calibrate` or "
            "pass draft_layers, e.g. [0, 1, 2, ...]"
        )
    if list(layers) != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < n_layers:
        raise InvalidParameterError(
            f"draft layers must be increasing indices in 0..{n_layers - 1}, got {list(layers)}"
        )


def _check_vocabulary(target: Model, draft: Model) -> None:
    """InvalidParameterError unless the draft's token ids mean what the target's mean."""
    t, d = target.tokenizer, draft.tokenizer
    same = target.config.vocab_size == draft.config.vocab_size and (
        t is None or d is None or t.tokens == d.tokens
    )
    if not same:
        sizes = (draft.config.vocab_size, target.config.vocab_size)
        detail = f"{sizes[0]} vs {sizes[1]} tokens" if sizes[0] != sizes[1] else "other pieces"
        raise InvalidParameterError(
            f"the draft model {draft.path.name} has another vocabulary than "
            f"{target.path.name} ({detail}); a draft must use the target's tokenizer"
        )
