"""Prompt lookup decoding: propose what followed the last n tokens the previous time.

Saxena 2023 ("Prompt Lookup Decoding"; HF transformers' `prompt_lookup_num_tokens`). Text
that quotes, summarises or edits its prompt, and code with repeated structure, often
continues the way an earlier occurrence of its last few tokens continued. So: take the
last n tokens of prompt + generated text (n from max_ngram down to min_ngram), find their
latest earlier occurrence, and propose the k tokens after it. No model runs to propose;
when nothing matches, the step is a plain one (T = 1) and costs nothing extra.
"""

from __future__ import annotations

from refinfer.decoding.speculative import DecodeState, Proposal, Proposer
from refinfer.errors import InvalidParameterError


class PromptLookupProposer(Proposer):
    """The continuation of the latest earlier match of the last n tokens (longest n first)."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        """Match n-grams of max_ngram down to min_ngram tokens."""
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidParameterError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
            )
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, state: DecodeState, k: int) -> Proposal:
        """One branch: the k tokens after the latest earlier occurrence of the last n tokens."""
        start = latest_match(state.history, self.max_ngram, self.min_ngram)
        return Proposal([] if start is None else [state.history[start : start + k]])


def latest_match(history: list[int], max_ngram: int, min_ngram: int) -> int | None:
    """Where the continuation starts: i + n for the largest i < len - n with
    history[i : i + n] == history[-n:], trying n = max_ngram down to min_ngram. O(len * n).
    """
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        tail = history[-n:]
        for i in range(len(history) - n - 1, -1, -1):  # latest first
            if history[i + n - 1] == tail[-1] and history[i : i + n] == tail:  # cheap test first
                return i + n
    return None
