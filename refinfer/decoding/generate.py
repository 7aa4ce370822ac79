"""Plain autoregressive decoding: one prefill of the prompt, then one forward call per token.

    prompt ids --prefill--> logits of the last position --sample--> token
    token --decode step (T = 1)--> logits --sample--> next token ... until EOS or max

The text is streamed through the tokenizer's incremental decoder, so a piece is
only handed out once its UTF-8 is complete. Timings follow the usual
definitions: time to first token = tokenisation + prefill + first sample;
decode tok/s counts the tokens after the first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from refinfer.errors import RefinferError
from refinfer.model import Batch, Model
from refinfer.sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    """Counts and timings of one generation (seconds)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens processed per second of prefill."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens generated per second after the first (each one decode step)."""
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


def _prompt_ids(model: Model, prompt_or_ids: str | Sequence[int]) -> list[int]:
    if isinstance(prompt_or_ids, str):
        return model.tokenizer.encode(prompt_or_ids)
    ids = [int(i) for i in prompt_or_ids]
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise RefinferError(
            f"token id {bad[0]} is outside the vocabulary (0..{model.config.vocab_size - 1})"
        )
    return ids


def _run(model: Model, prompt: list[int], max_new_tokens: int, sampler: Sampler,
         result: Generation) -> Iterator[str]:  # fmt: skip
    """The decode loop; fills `result` and yields text pieces."""
    stats = result.stats
    stats.prompt_tokens = len(prompt)
    pool = model.new_pool(len(prompt) + max_new_tokens)
    seq = pool.new_sequence()
    detok = model.tokenizer.stream_decoder()
    eos = model.tokenizer.eos_ids
    history = list(prompt)

    start = time.perf_counter()
    logits = model.forward(Batch.append(pool, [(seq, prompt)], all_logits=False), pool)
    token = sampler.sample(logits[-1], history)
    stats.prefill_seconds = time.perf_counter() - start
    stats.time_to_first_token = stats.prefill_seconds
    decode_start = time.perf_counter()
    while True:
        result.ids.append(token)
        history.append(token)
        stats.generated_tokens += 1
        if token in eos:
            result.finish_reason = "eos"
            break
        piece = detok.push(token)
        result.text += piece
        if piece:
            yield piece
        if len(result.ids) == max_new_tokens:
            result.finish_reason = "length"
            break
        logits = model.forward(Batch.append(pool, [(seq, [token])]), pool)
        token = sampler.sample(logits[-1], history)
    tail = detok.flush()
    result.text += tail
    if tail:
        yield tail
    stats.decode_seconds = time.perf_counter() - decode_start
    pool.free(seq)


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
) -> Generation | Stream:
    """Continue a prompt (text, tokenised with BOS as the model asks, or token ids).

    Greedy by default (temperature 0). With stream=True returns a Stream of text
    pieces whose `.result` holds the Generation once iterated.
    """
    if max_new_tokens < 1:
        raise RefinferError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )  # fmt: skip
    prompt = _prompt_ids(model, prompt_or_ids)
    if not prompt:
        raise RefinferError("the prompt is empty (no tokens); give some text or ids")
    model.check_length(len(prompt) + max_new_tokens)
    result = Generation()
    pieces = _run(model, prompt, max_new_tokens, Sampler(params), result)
    if stream:
        return Stream(pieces, result)
    for _ in pieces:
        pass
    return result
