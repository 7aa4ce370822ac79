"""Generation: prefill the prompt, then decoding steps until EOS or the length limit.

    prompt ids --prefill--> logits of the last position --sample--> first token
    loop: speculative.step (propose, verify in one forward call, keep the accepted tokens)
          --> one or more tokens --> EOS? length? --> text pieces, streamed

Plain decoding is the same loop with a proposer that proposes nothing (T = 1 per step);
`decoding=` picks the strategy (see make_proposer). Every strategy emits exactly the tokens
of plain decoding when greedy, and samples from the same distribution otherwise.

The text is streamed through the tokenizer's incremental decoder, so a piece is only
handed out once its UTF-8 is complete. Timings follow the usual definitions: time to first
token = prefill + first sample; decode tok/s counts the tokens after the first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from refinfer.decoding.speculative import DecodeState, DraftLength, Proposer, StepCounts, step
from refinfer.errors import InvalidParameterError, RefinferError
from refinfer.kernels import compile_seconds
from refinfer.kv_pool import BLOCK_SIZE, KVPool, blocks_for
from refinfer.model import Batch, Model
from refinfer.sampling import Sampler, SamplingParams

STRATEGIES = ("plain", "speculative", "self-speculative", "lookahead", "prompt-lookup")


@dataclass
class GenerationStats:
    """Counts and timings of one generation (seconds)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0  # wall time, a first use's compile included
    compile_seconds: float = 0.0  # Numba compiling kernels on first use (not in the speeds)
    steps: StepCounts = field(default_factory=StepCounts)  # the decoding steps after prefill
    draft_cost: float = 0.0  # the proposer's cost per drafted token, in decoding steps

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens processed per second of prefill."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens generated per second after the first (the decoding steps)."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


@dataclass
class Generation:
    """The result: generated ids (prompt excluded), their text, why it stopped, and stats."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # 'eos' or 'length'
    stats: GenerationStats = field(default_factory=GenerationStats)


class Stream:
    """Iterate to get text pieces as they are produced; `.result` is complete afterwards."""

    def __init__(self, pieces: Iterator[str], result: Generation):
        self._pieces = pieces
        self.result = result

    def __iter__(self) -> Iterator[str]:
        return self._pieces


def prompt_ids(model: Model, prompt_or_ids: str | Sequence[int]) -> list[int]:
    """The prompt as token ids: text is encoded with the model's tokenizer, ids are checked."""
    if isinstance(prompt_or_ids, str):
        if model.tokenizer is None:
            raise RefinferError(f"{model.path.name} has no vocabulary: give token ids, not text")
        return model.tokenizer.encode(prompt_or_ids)
    ids = [int(i) for i in prompt_or_ids]
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise RefinferError(
            f"token id {bad[0]} is outside the vocabulary (0..{model.config.vocab_size - 1})"
        )
    return ids


class _Emitter:
    """Hands out accepted tokens: stops at EOS or the length limit, decodes text as it goes."""

    def __init__(self, model: Model, max_new_tokens: int, result: Generation):
        tok = model.tokenizer  # None for a model without a vocabulary: ids only, no EOS
        self.detok = tok.stream_decoder() if tok else None
        self.eos = tok.eos_ids if tok else set()
        self.max_new_tokens = max_new_tokens
        self.result = result

    def push(self, tokens: Sequence[int]) -> Iterator[str]:
        """Emit tokens in order until one finishes the generation; yield text pieces."""
        r = self.result
        for token in tokens:
            r.ids.append(token)
            r.stats.generated_tokens += 1
            if token in self.eos:
                r.finish_reason = "eos"
            elif self.detok:
                yield from self._text(self.detok.push(token))
            if not r.finish_reason and len(r.ids) == self.max_new_tokens:
                r.finish_reason = "length"
            if r.finish_reason:
                if self.detok:
                    yield from self._text(self.detok.flush())
                return

    def _text(self, piece: str) -> Iterator[str]:
        self.result.text += piece
        if piece:
            yield piece


def _run(
    model: Model,
    prompt: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    proposer: Proposer,
    draft_length: DraftLength,
    result: Generation,
) -> Iterator[str]:
    """Prefill, then speculative steps until done; fills `result` and yields text pieces."""
    stats = result.stats
    stats.prompt_tokens, stats.draft_cost = len(prompt), draft_length.draft_cost
    n_blocks = blocks_for(len(prompt) + max_new_tokens, BLOCK_SIZE)  # the accepted sequence
    pool = KVPool(model.config, n_blocks + proposer.extra_blocks(BLOCK_SIZE))
    state = DecodeState(model, pool, pool.new_sequence(), list(prompt), sampler)
    emitter = _Emitter(model, max_new_tokens, result)

    compiled = []  # seconds of first-use kernel compiles, excluded from the speeds
    start = time.perf_counter()
    with compile_seconds(compiled.append):
        logits = model.forward(Batch.append(pool, [(state.seq, prompt)], all_logits=False), pool)
        state.history.append(sampler.sample(logits[-1], prompt))
    stats.time_to_first_token = time.perf_counter() - start
    stats.prefill_seconds = stats.time_to_first_token - sum(compiled)
    decode_start, n_compiled = time.perf_counter(), len(compiled)
    yield from emitter.push(state.history[-1:])
    while not result.finish_reason:
        remaining = max_new_tokens - len(result.ids)
        k = min(draft_length.next_k(), remaining - 1)  # never run past the length limit
        with compile_seconds(compiled.append):
            verdict, proposed, spent = step(state, proposer, k)
        draft_length.update(proposed, verdict.n_accepted, spent)
        n_ids = len(result.ids)
        yield from emitter.push(verdict.tokens)
        stats.steps.add(proposed, verdict.n_accepted, len(result.ids) - n_ids)
    stats.decode_seconds = time.perf_counter() - decode_start - sum(compiled[n_compiled:])
    stats.compile_seconds = sum(compiled)
    proposer.close(state)
    pool.free(state.seq)


def make_proposer(
    model: Model,
    decoding: str | Proposer = "plain",
    draft_model: str | os.PathLike | Model | None = None,
    draft_layers: Sequence[int] | None = None,
    window: int | None = None,
    ngram: int | None = None,
    guesses: int | None = None,
) -> Proposer:
    """The proposer of a strategy in STRATEGIES (a Proposer instance is returned as is).

    speculative: draft_model (a path or a loaded Model with the target's vocabulary).
    self-speculative: draft_layers, or the calibration file beside the model
    (`refinfer calibrate`). lookahead: window W, ngram N, guesses G. prompt-lookup: ngram,
    the longest n-gram matched. Options left None take the proposer's defaults.
    """
    from refinfer.decoding.draft import DraftModelProposer

    def given(**options):  # the options the caller set
        return {name: value for name, value in options.items() if value is not None}

    if isinstance(decoding, Proposer):
        return decoding
    if decoding == "plain":
        return Proposer()
    if decoding == "speculative":
        return DraftModelProposer.for_target(model, draft_model)
    if decoding == "self-speculative":
        from refinfer.decoding.calibrate import read_calibration

        layers = read_calibration(model.path).layers if draft_layers is None else draft_layers
        return DraftModelProposer(model, layers=layers)
    if decoding == "lookahead":
        from refinfer.decoding.lookahead import LookaheadProposer

        return LookaheadProposer(**given(W=window, N=ngram, G=guesses))
    if decoding == "prompt-lookup":
        from refinfer.decoding.prompt_lookup import PromptLookupProposer

        return PromptLookupProposer(**given(max_ngram=ngram))
    raise InvalidParameterError(
        f"unknown decoding strategy {decoding!r}; choose one of {', '.join(STRATEGIES)}"
    )


def generate(
    model: Model,
    prompt_or_ids: str | Sequence[int],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
    decoding: str | Proposer = "plain",
    draft_k: int = 5,
    adaptive: bool = True,
    **strategy_options,
) -> Generation | Stream:
    """Continue a prompt (text, tokenised with BOS as the model asks, or token ids).

    Greedy by default (temperature 0). With stream=True returns a Stream of text
    pieces whose `.result` holds the Generation once iterated. `decoding` is one of
    STRATEGIES; draft_k tokens are proposed per step at first, adapted between 1 and
    2 * draft_k, and speculation pauses while it does not pay (speculative.DraftLength);
    adaptive=False proposes draft_k tokens every step (to measure a strategy's acceptance,
    or to exercise it in tests). strategy_options go to make_proposer (draft_model,
    draft_layers, window, ngram, guesses).
    """
    if max_new_tokens < 1:
        raise RefinferError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if draft_k < 1:
        raise InvalidParameterError(f"draft_k must be at least 1, not {draft_k}")
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )  # fmt: skip
    proposer = make_proposer(model, decoding, **strategy_options)
    prompt = prompt_ids(model, prompt_or_ids)
    if not prompt:
        raise RefinferError("the prompt is empty (no tokens); give some text or ids")
    model.check_length(len(prompt) + max_new_tokens)
    result = Generation()
    length = DraftLength(draft_k, 2 * draft_k, proposer.draft_cost, adaptive)
    pieces = _run(model, prompt, max_new_tokens, Sampler(params), proposer, length, result)
    if stream:
        return Stream(pieces, result)
    for _ in pieces:
        pass
    return result
