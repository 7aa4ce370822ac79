"""Every decoding strategy on the real SmolLM2 emits exactly plain greedy decoding's tokens.

Invariant 5 of DESIGN.md on a real model and real text: a code file with repetitive
structure (prompt lookup and lookahead find long matches), a passage to quote, and a chat
answer (few matches: proposals are rejected and rolled back). The draft model is a Q4_0
copy of the shipped Q4_1 file, written by refinfer's quantiser: its guesses are close to
the target's but not equal, so both acceptance and rejection happen. The
self-speculative draft runs every other layer. Greedy equality is exact (token for
token): a forward call's logits do not depend on how many tokens it holds (invariant 4).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from refinfer.decoding.generate import STRATEGIES
from refinfer.errors import InvalidParameterError
from refinfer.gguf import GGUFFile, read_gguf, write_quantized
from refinfer.model import Model
from refinfer.tokenizer import Tokenizer

NEW_TOKENS = 40
CODE = (
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
)
PASSAGE = (
    "The river rises in the high meadows, where snow lies late into the spring. It runs "
    "north through a narrow valley of pine and birch, past the old mill and the stone bridge."
)


@pytest.fixture(scope="module")
def target(smollm2: GGUFFile) -> Model:
    return Model(smollm2, Tokenizer.from_metadata(smollm2.metadata))


@pytest.fixture(scope="module")
def draft(smollm2: GGUFFile, tmp_path_factory: pytest.TempPathFactory) -> Model:
    path = tmp_path_factory.mktemp("draft") / "smollm2-q4_0.gguf"
    write_quantized(smollm2, path, "q4_0")
    gf = read_gguf(path)
    return Model(gf, Tokenizer.from_metadata(gf.metadata))


def chat(tok: Tokenizer, text: str) -> list[int]:
    """A user message in the model's chat template, as token ids."""
    text = tok.apply_chat_template([{"role": "user", "content": text}])
    return tok.encode(text, parse_special=True)


def prompts(tok: Tokenizer) -> dict[str, list[int]]:
    """The three prompts as token ids."""
    return {
        "code": tok.encode(CODE),
        "quote": chat(tok, f"Repeat this passage word for word:\n\n{PASSAGE}"),
        "chat": chat(tok, "What is the best way to learn to play the piano?"),
    }


def options(decoding: str, target: Model, draft: Model) -> dict:
    """The strategy's options for these tests."""
    layers = list(range(0, target.config.n_layers, 2))
    return {
        "speculative": {"draft_model": draft},
        "self-speculative": {"draft_layers": layers},
    }.get(decoding, {})


@pytest.mark.parametrize("decoding", [s for s in STRATEGIES if s != "plain"])
def test_every_strategy_equals_plain_greedy(decoding: str, target: Model, draft: Model) -> None:
    proposed = 0
    for name, ids in prompts(target.tokenizer).items():
        plain = target.generate(ids, NEW_TOKENS)
        fast = target.generate(  # adaptive=False: speculate every step, even where it is slow
            ids, NEW_TOKENS, decoding=decoding, adaptive=False, **options(decoding, target, draft)
        )
        assert fast.ids == plain.ids, name
        assert fast.text == plain.text and fast.finish_reason == plain.finish_reason
        steps = fast.stats.steps
        assert steps.emitted == len(fast.ids) - 1  # the first token comes from the prefill
        proposed += steps.proposed
    assert proposed > 0  # the strategy did speculate


def test_prompt_lookup_accepts_most_of_a_quote(target: Model) -> None:
    """The quote is copied from the prompt: most proposals are right, steps emit several."""
    ids = prompts(target.tokenizer)["quote"]
    steps = target.generate(ids, NEW_TOKENS, decoding="prompt-lookup").stats.steps
    assert steps.acceptance_rate > 0.5 and steps.tokens_per_call > 2


def test_draft_model_with_another_vocabulary_is_refused(target: Model, tiny_f32: Path) -> None:
    other = Model(read_gguf(tiny_f32), tokenizer=None)
    with pytest.raises(InvalidParameterError, match="another vocabulary"):
        target.generate("Hi", 4, decoding="speculative", draft_model=other)
