"""Continuous batching: many requests share one model, one forward call per step.

Where it sits: above `Model.forward` and the KV pool, beside generate.py (which runs one
request). Each step the scheduler gives every running sequence a chunk of tokens under a
token budget (one decode token, or the next piece of a prompt: chunked prefill), admits
waiting requests into what is left, and runs all the chunks as ONE flat batch through
`model.forward`; every sequence whose chunk reaches the end of its known tokens samples its
next token with its own Sampler; finished requests are retired and their blocks freed.

    add_request --> waiting (larger priority first, then earlier arrival)
      --admit (budget and free blocks allow; cached prefix blocks taken by reference)-->
    running --step: Batch.append(chunks) -> model.forward -> sample--> tokens, text streamed
      --EOS / max_tokens / stop string / cancel--> finished: blocks freed (cached ones kept)
    running --the pool cannot hold the step--> preempted: blocks freed, back to waiting

One rule drives prefill, decode and recompute: a sequence's known tokens are
`tokens = prompt + generated`; `n_computed` of them have K/V in the pool; a step computes
tokens[n_computed : n_computed + n]; when that reaches len(tokens), the logits of its last
token are the next token's distribution, and one token is sampled. A decode step is the
case len(tokens) - n_computed == 1. Preemption frees the blocks and sets n_computed to 0
but keeps `generated` and the Sampler (with its generator's state): re-admitted, the
sequence recomputes prompt + generated as a prefill, samples none of them again, and draws
its next token exactly as it would have without the preemption. Since a position's logits
do not depend on the batch it is computed in (DESIGN.md, invariant 4), every request's
tokens and logits are bitwise those of running it alone.

Prefix caching (kv_pool.py, as vLLM's): each full block of `tokens` is named by a chained
hash; on admission a sequence takes every cached block of tokens[:-1] by reference (the
last token is always computed, for its logits) and computes only the rest; after each step
its newly full blocks are offered to the cache. A request whose first uncached block is
still being computed by a running sequence waits, so a shared system prompt is computed
once. Preemption victims are the lowest-priority running sequences, most recently admitted
first (vLLM's rule); a waiting request never preempts a running one.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import numpy as np

from refinfer.decoding.generate import prompt_ids
from refinfer.errors import InvalidParameterError, RefinferError
from refinfer.kv_pool import BLOCK_SIZE, KVPool, blocks_for, hash_blocks
from refinfer.model import Batch, Model
from refinfer.sampling import Sampler, SamplingParams

FINISH_REASONS = ("eos", "length", "stop", "cancelled", "error")


def _is_int(x: Any) -> bool:
    """Whether x is an integer (JSON's true and false are not)."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    """Whether x is a real number (JSON's true and false are not)."""
    return isinstance(x, Real) and not isinstance(x, bool)


def _is_list_of(kind: type, x: Any) -> bool:
    """Whether x is a list of kind (booleans are not ints)."""
    return isinstance(x, list) and all(isinstance(i, kind) and not isinstance(i, bool) for i in x)


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
JSON_FIELDS: dict[str, Callable[[Any], bool]] = {  # key -> its type check
    "prompt": lambda x: isinstance(x, str) or _is_list_of(int, x),
    "messages": lambda x: _is_list_of(dict, x),
    "temperature": _is_number,
    "top_k": _is_int,
    "top_p": _is_number,
    "min_p": _is_number,
    "repetition_penalty": _is_number,
    "seed": _is_int,
    "max_tokens": lambda x: _is_int(x) and x >= 1,
    "stop": lambda x: isinstance(x, str) or _is_list_of(str, x),
    "priority": _is_int,
    "id": lambda x: isinstance(x, (str, int)) and not isinstance(x, bool),
}


@dataclass
class Request:
    """One generation to run: a prompt and how to continue it."""

    prompt: str | Sequence[int] | Sequence[dict]  # text, token ids, or chat messages
    params: SamplingParams = field(default_factory=SamplingParams)  # its own seed
    max_tokens: int = 32  # tokens to generate at most
    stop: Sequence[str] = ()  # finish when the text contains one (cut off before it)
    stop_token_ids: Sequence[int] = ()  # finish on these ids too (besides the tokenizer's EOS)
    ignore_eos: bool = False  # do not stop at EOS: run to max_tokens (benchmarks)
    priority: int = 0  # larger runs first; the smallest is preempted first
    id: Any = None  # the caller's name for it; default: its arrival number in the engine
    on_text: Callable[[str], None] | None = None  # called with each new piece of text
    on_token: Callable[[int, np.ndarray], None] | None = None  # each token, logits[V] drawn from
    keep_logits: bool = False  # keep the logits row each generated token was sampled from

    @classmethod
    def from_dict(cls, d: Any) -> Request:
        """A Request from one JSON object (the `refinfer batch` input line format).

        Keys: prompt (text or ids) or messages (chat), temperature, top_k, top_p, min_p,
        repetition_penalty, seed, max_tokens, stop (a string or a list), priority, id.
        InvalidParameterError names the first wrong key or value.
        """
        if not isinstance(d, dict):
            raise InvalidParameterError(f"expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(JSON_FIELDS))
        if unknown:
            raise InvalidParameterError(
                f"unknown field {unknown[0]!r}; fields are {', '.join(JSON_FIELDS)}"
            )
        for key, value in d.items():
            if not JSON_FIELDS[key](value):
                raise InvalidParameterError(f"field {key!r} has the wrong type: {value!r}")
        if ("prompt" in d) == ("messages" in d):
            raise InvalidParameterError("give exactly one of 'prompt' and 'messages'")
        sampling = {k: d[k] for k in SAMPLING_FIELDS if k in d}
        stop = d.get("stop", ())
        return cls(
            prompt=d["prompt"] if "prompt" in d else d["messages"],
            params=SamplingParams(**sampling),
            max_tokens=d.get("max_tokens", cls.max_tokens),
            stop=[stop] if isinstance(stop, str) else stop,
            priority=d.get("priority", 0),
            id=d.get("id"),
        )


@dataclass
class Completion:
    """A finished request: its tokens, text, why it ended and when (seconds from arrival)."""

    id: Any
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated ids, EOS included if reached
    text: str = ""
    finish_reason: str = ""  # one of FINISH_REASONS
    error: str = ""  # what was wrong, when finish_reason is 'error'
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache at first admission
    preemptions: int = 0
    time_to_first_token: float | None = None  # None if no token was generated
    total_seconds: float = 0.0
    logits: np.ndarray | None = None  # float32[len(ids), V] with Request.keep_logits


class _Text:
    """A request's text: decoded as tokens come, streamed to its consumer, held back while
    its end could still become a stop string (the stop string itself is never shown)."""

    def __init__(self, model: Model, stop: Sequence[str], on_text: Callable[[str], None] | None):
        self.detok = model.tokenizer.stream_decoder() if model.tokenizer else None
        self.stop = list(stop)
        self.hold = max(map(len, self.stop), default=1) - 1  # chars a stop may still need
        self.on_text = on_text
        self.text = ""
        self.sent = 0  # text[:sent] has been streamed

    def push(self, token: int) -> bool:
        """Add a token's text; True if the text now holds a stop string (cut before it)."""
        return self._add(self.detok.push(token)) if self.detok else False

    def finish(self) -> None:
        """End of the request: flush the decoder and stream everything kept back."""
        if self.detok and not self._add(self.detok.flush()):
            self._send(len(self.text))

    def _add(self, piece: str) -> bool:
        old = len(self.text)
        self.text += piece
        # a new stop string ends after `old`, so starts at or after old - len(stop) + 1
        found = [i for s in self.stop if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
        if found:
            self.text = self.text[: min(found)]
            self._send(len(self.text))
            return True
        self._send(len(self.text) - self.hold)
        return False

    def _send(self, end: int) -> None:
        if end > self.sent:
            piece, self.sent = self.text[self.sent : end], end
            if self.on_text:
                self.on_text(piece)


@dataclass(eq=False)
class _Sequence:
    """The engine's state of one request, from arrival to retirement."""

    request: Request
    id: Any
    arrival: int  # arrival number: order among equal priorities
    prompt_len: int
    tokens: list[int]  # prompt + generated
    hashes: list[bytes]  # chained hashes of the full blocks of tokens
    sampler: Sampler
    eos: set[int]
    text: _Text
    out: Completion
    start: float  # perf_counter at arrival
    seq: int | None = None  # its sequence in the pool while running
    n_computed: int = 0  # tokens[:n_computed] have K/V in the pool
    admitted: int = -1  # admission number: the most recent is preempted first
    logits: list[np.ndarray] = field(default_factory=list)

    def order(self) -> tuple[int, int]:
        """Scheduling order, smallest first: larger priority, then earlier arrival."""
        return (-self.request.priority, self.arrival)


@dataclass
class EngineStats:
    """What the engine has done so far; means are over the steps run."""

    running: int = 0  # sequences running now
    waiting: int = 0  # requests waiting now (never admitted, or preempted)
    steps: int = 0  # forward calls
    tokens_computed: int = 0  # tokens through model.forward: prefill chunks + decode tokens
    generated_tokens: int = 0
    prompt_tokens: int = 0  # of admitted requests
    cached_prompt_tokens: int = 0  # of those, taken from the prefix cache
    preemptions: int = 0
    kv_utilisation_sum: float = 0.0  # sum over steps of PoolStats.utilisation after forward

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens in one forward call."""
        return self.tokens_computed / self.steps if self.steps else 0.0

    @property
    def kv_utilisation(self) -> float:
        """Mean over steps of slots holding live tokens / slots allocated."""
        return self.kv_utilisation_sum / self.steps if self.steps else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Cached prompt tokens / prompt tokens."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Engine:
    """Continuous batching over one model and one KV pool; see the module docstring.

    Add requests at any time (`add_request`), `cancel` them, and call `step` until
    `has_unfinished()` is False; each step returns the requests finished since the last.
    Text streams to each Request's on_text. Requests given as token ids need no tokenizer.
    """

    def __init__(
        self,
        model: Model,
        max_seqs: int = 16,
        max_tokens_per_step: int = 256,
        kv_blocks: int = 512,
        block_size: int = BLOCK_SIZE,
        prefix_caching: bool = True,
    ) -> None:
        """An engine running at most max_seqs sequences, max_tokens_per_step tokens a step,
        on a pool of kv_blocks blocks of block_size tokens (allocated now)."""
        if max_seqs < 1 or max_tokens_per_step < max_seqs:
            raise InvalidParameterError(
                f"need 1 <= max_seqs <= max_tokens_per_step (every running sequence decodes a "
                f"token each step), got max_seqs {max_seqs}, max_tokens_per_step "
                f"{max_tokens_per_step}"
            )
        self.model = model
        self.max_seqs = max_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.prefix_caching = prefix_caching
        self.pool = KVPool(model.config, kv_blocks, block_size)
        self.waiting: list[_Sequence] = []  # sorted by _Sequence.order
        self.running: list[_Sequence] = []  # in admission order
        self._ids: set[Any] = set()  # ids of unfinished requests
        self._finished: list[Completion] = []  # since the last step()
        self._arrivals = 0
        self._admissions = 0
        self._stats = EngineStats()

    # -- the caller's side -----------------------------------------------------------------

    def add_request(self, request: Request | str | Sequence[int]) -> Any:
        """Queue a request (a Request, or a prompt with default parameters); return its id.

        A request that cannot run (empty prompt, longer than the context, larger than the
        whole pool, stop strings without a tokenizer) finishes at once with reason 'error'.
        """
        r = request if isinstance(request, Request) else Request(request)
        rid = self._arrivals if r.id is None else r.id
        if rid in self._ids:
            raise InvalidParameterError(f"request id {rid!r} is already queued or running")
        now = time.perf_counter()
        try:
            prompt = self._prompt(r)
        except RefinferError as e:
            self._finished.append(Completion(rid, [], finish_reason="error", error=str(e)))
            self._arrivals += 1
            return rid
        tok = self.model.tokenizer
        eos = set(r.stop_token_ids) | (tok.eos_ids if tok and not r.ignore_eos else set())
        s = _Sequence(
            request=r, id=rid, arrival=self._arrivals, prompt_len=len(prompt),
            tokens=list(prompt), hashes=hash_blocks(prompt, self.pool.block_size),
            sampler=Sampler(r.params), eos=eos, text=_Text(self.model, r.stop, r.on_text),
            out=Completion(rid, list(prompt)), start=now,
        )  # fmt: skip
        self._arrivals += 1
        self._ids.add(rid)
        bisect.insort(self.waiting, s, key=_Sequence.order)
        return rid

    def cancel(self, request_id: Any) -> None:
        """Finish a waiting or running request now (reason 'cancelled'), freeing its blocks."""
        for s in self.running + self.waiting:
            if s.id == request_id:
                return self._finish(s, "cancelled")
        raise InvalidParameterError(f"no waiting or running request has id {request_id!r}")

    def has_unfinished(self) -> bool:
        """Whether a request is waiting or running, or a finished one is not yet returned."""
        return bool(self.waiting or self.running or self._finished)

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the statistics (counts now, totals and means so far)."""
        s = self._stats
        return EngineStats(
            **{**vars(s), "running": len(self.running), "waiting": len(self.waiting)}
        )

    def step(self) -> list[Completion]:
        """Schedule, run one forward call, sample; return the requests finished since the last
        step (also those that ended in add_request or cancel)."""
        plan = self._schedule()
        assert plan or not (self.running or self.waiting), "the scheduler made no progress"
        if plan:
            self._run(plan)
        done, self._finished = self._finished, []
        return done

    # -- scheduling ------------------------------------------------------------------------

    def _schedule(self) -> dict[_Sequence, int]:
        """This step's chunks, sequence -> tokens to compute, within the budget and the pool.

        Running sequences first, decodes before prefill chunks, each in scheduling order;
        when the pool cannot hold a chunk, victims are preempted until it can. Then, unless
        someone was preempted (their blocks would be handed straight back), waiting requests
        are admitted in order while the budget, max_seqs and the free blocks allow.
        """
        plan: dict[_Sequence, int] = {}
        n_preempted = self._stats.preemptions
        for s in sorted(self.running, key=lambda s: (len(s.tokens) - s.n_computed > 1, s.order())):
            n = min(len(s.tokens) - s.n_computed, self._budget(plan))
            if s.seq is None or n == 0:  # preempted for an earlier one, or no budget left
                continue
            while self.pool.blocks_needed(s.seq, n) > self._free_blocks(plan):
                victim = self._victim()
                self._preempt(victim)
                plan.pop(victim, None)
                if victim is s:
                    break
            if s.seq is not None:
                plan[s] = n
        if self._stats.preemptions == n_preempted:
            self._admit(plan)
        return plan

    def _admit(self, plan: dict[_Sequence, int]) -> None:
        """Move waiting requests to running, in order, adding their first chunks to plan."""
        bs = self.pool.block_size
        computing = {h for s in self.running for h in s.hashes[s.n_computed // bs :]}
        for s in list(self.waiting):
            budget = self._budget(plan)
            if len(self.running) == self.max_seqs or budget == 0:
                return
            cacheable = s.hashes[: (len(s.tokens) - 1) // bs]  # the last token is computed
            hits = self.pool.cached_prefix(cacheable) if self.prefix_caching else []
            first_miss = cacheable[len(hits) : len(hits) + 1]  # [] when all are cached
            if self.prefix_caching and first_miss and first_miss[0] in computing:
                continue  # a running sequence is computing this block: wait, then reuse it
            n = min(len(s.tokens) - len(hits) * bs, budget)
            # blocks taken: new ones for the chunk, and the hits now in the free queue
            taken = blocks_for(len(hits) * bs + n, bs) - len(hits)
            taken += sum(self.pool.ref_count[b] == 0 for b in hits)
            if taken > self._free_blocks(plan):
                return
            self._start(s, hits)
            plan[s] = n
            computing.update(s.hashes[s.n_computed // bs :])

    def _start(self, s: _Sequence, hits: list[int]) -> None:
        """Admit s into the pool holding the cached blocks `hits`."""
        s.seq = self.pool.new_sequence(cached=hits)
        s.n_computed = self.pool.length(s.seq)
        s.admitted, self._admissions = self._admissions, self._admissions + 1
        self.waiting.remove(s)
        self.running.append(s)
        if s.out.preemptions == 0:  # the first admission: count the prompt once
            s.out.cached_tokens = s.n_computed
            self._stats.prompt_tokens += s.prompt_len
            self._stats.cached_prompt_tokens += s.n_computed

    def _budget(self, plan: dict[_Sequence, int]) -> int:
        """Tokens this step can still take."""
        return self.max_tokens_per_step - sum(plan.values())

    def _free_blocks(self, plan: dict[_Sequence, int]) -> int:
        """Free blocks left once the planned chunks have taken theirs."""
        return self.pool.n_free_blocks - sum(
            self.pool.blocks_needed(s.seq, n) for s, n in plan.items()
        )

    def _victim(self) -> _Sequence:
        """The running sequence to preempt: lowest priority, then most recently admitted."""
        return min(self.running, key=lambda s: (s.request.priority, -s.admitted))

    def _preempt(self, s: _Sequence) -> None:
        """Free s's blocks and queue it again; it keeps its tokens and its Sampler."""
        self.pool.free(s.seq)
        s.seq, s.n_computed = None, 0
        self.running.remove(s)
        bisect.insort(self.waiting, s, key=_Sequence.order)
        s.out.preemptions += 1
        self._stats.preemptions += 1

    # -- running a step --------------------------------------------------------------------

    def _run(self, plan: dict[_Sequence, int]) -> None:
        """One forward call over every planned chunk; sample where a chunk ends the tokens."""
        chunks = [(s.seq, s.tokens[s.n_computed : s.n_computed + n]) for s, n in plan.items()]
        batch = Batch.append(self.pool, chunks, all_logits=False)  # fits: planned above
        logits = self.model.forward(batch, self.pool)  # (len(plan), V): each chunk's last
        self._stats.steps += 1
        self._stats.tokens_computed += len(batch.tokens)
        self._stats.kv_utilisation_sum += self.pool.stats().utilisation
        for (s, n), row in zip(plan.items(), logits, strict=True):
            s.n_computed += n
            if self.prefix_caching:
                self.pool.cache_blocks(s.seq, s.hashes)
            if s.n_computed == len(s.tokens):
                self._accept(s, row)

    def _accept(self, s: _Sequence, logits: np.ndarray) -> None:
        """Sample s's next token from logits[V]; finish s if the token ends it."""
        token = s.sampler.sample(logits, s.tokens)
        if s.request.on_token:
            s.request.on_token(token, logits)
        if s.request.keep_logits:
            s.logits.append(logits.copy())  # a row of this step's logits: keep only it
        s.tokens.append(token)
        bs = self.pool.block_size
        if len(s.tokens) % bs == 0:  # a new full block: extend the hash chain
            parent = s.hashes[-1] if s.hashes else b""
            s.hashes += hash_blocks(s.tokens[-bs:], bs, parent)
        if s.out.time_to_first_token is None:
            s.out.time_to_first_token = time.perf_counter() - s.start
        self._stats.generated_tokens += 1
        if token in s.eos:
            self._finish(s, "eos")
        elif s.text.push(token):
            self._finish(s, "stop")
        elif len(s.tokens) - s.prompt_len == s.request.max_tokens:
            self._finish(s, "length")

    def _finish(self, s: _Sequence, reason: str) -> None:
        """Retire s: free its blocks, complete its text and its Completion."""
        if s.seq is not None:
            self.pool.free(s.seq)
            s.seq = None
            self.running.remove(s)
        else:
            self.waiting.remove(s)
        if reason != "stop":
            s.text.finish()
        out = s.out
        out.ids, out.text, out.finish_reason = s.tokens[s.prompt_len :], s.text.text, reason
        out.total_seconds = time.perf_counter() - s.start
        if s.request.keep_logits:
            V = self.model.config.vocab_size
            out.logits = np.array(s.logits, np.float32).reshape(len(s.logits), V)
        self._ids.discard(s.id)
        self._finished.append(out)

    # -- requests --------------------------------------------------------------------------

    def _prompt(self, r: Request) -> list[int]:
        """r's prompt as token ids, checked against the model, the pool and the tokenizer."""
        if r.stop and self.model.tokenizer is None:
            raise InvalidParameterError("stop strings need a tokenizer; use stop_token_ids")
        if r.max_tokens < 1:
            raise InvalidParameterError(f"max_tokens must be at least 1, not {r.max_tokens}")
        prompt = r.prompt
        if len(prompt) and isinstance(prompt[0], dict):  # chat messages
            if self.model.tokenizer is None:
                raise RefinferError("chat messages need a tokenizer; give token ids")
            text = self.model.tokenizer.apply_chat_template(list(prompt))
            ids = self.model.tokenizer.encode(text, parse_special=True)
        else:
            ids = prompt_ids(self.model, prompt)
        if not ids:
            raise RefinferError("the prompt is empty (no tokens); give some text or ids")
        n = len(ids) + r.max_tokens
        self.model.check_length(n)
        bs, n_blocks = self.pool.block_size, self.pool.n_blocks
        if blocks_for(n, bs) > n_blocks:
            raise RefinferError(
                f"{len(ids)} prompt + {r.max_tokens} new tokens need {blocks_for(n, bs)} KV "
                f"blocks, more than the whole pool ({n_blocks} blocks of {bs}); ask for fewer "
                f"tokens or make the pool larger"
            )
        return ids


def generate_batch(
    model: Model, requests: Iterable[Request | str | Sequence[int]], **engine_options
) -> list[Completion]:
    """Run every request to completion with continuous batching; results in request order.

    engine_options go to Engine (max_seqs, max_tokens_per_step, kv_blocks, block_size,
    prefix_caching). A request that cannot run gets a Completion with reason 'error'.
    """
    engine = Engine(model, **engine_options)
    ids = [engine.add_request(r) for r in requests]
    done: dict[Any, Completion] = {}
    while engine.has_unfinished():
        done.update((c.id, c) for c in engine.step())
    return [done[i] for i in ids]
