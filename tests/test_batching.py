"""Continuous batching against running each request alone, bitwise.

The oracle for a finished request is one prefill of prompt + generated ids on a fresh pool
of the same block size (attention reduces block by block, so the block size is part of
the computation): its rows from the last prompt position on must equal, bit for bit, the
logits each token was sampled from in the engine, and a fresh Sampler with the request's
parameters must draw the same tokens from them. A hypothesis state machine drives random
arrivals, priorities, cancellations, token budgets and a pool small enough to preempt, on
a tiny synthetic model (no tokenizer: requests are token ids). Text, stop strings and
streaming use the tiny model with SmolLM2's tokenizer; the real model is used twice (greedy
batched == generate alone, and the `refinfer batch` command).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gguf_factory import write_tiny_model
from refinfer.cli import main
from refinfer.decoding.batching import Completion, Engine, Request
from refinfer.errors import InvalidParameterError
from refinfer.gguf import read_gguf
from refinfer.kv_pool import KVPool
from refinfer.model import Batch, Model
from refinfer.sampling import Sampler, SamplingParams
from refinfer.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one Numba thread

BS = 4  # block size of the tiny engines: small, so a few tokens fill a pool
SYSTEM = [7, 3, 99, 12, 5, 64, 31, 8, 100, 2, 77, 41]  # a shared prompt prefix, 3 blocks


@pytest.fixture(scope="module", autouse=True)
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A tiny synthetic Llama without a vocabulary (also the state machine's model)."""
    path = write_tiny_model(tmp_path_factory.mktemp("batching") / "tiny.gguf")
    BatchMachine.model = Model(read_gguf(path), tokenizer=None)
    return BatchMachine.model


def solo_logits(model: Model, prompt: list[int], ids: list[int], block_size: int) -> np.ndarray:
    """float32[len(ids), V]: the logits each of ids is drawn from, prompt + ids run alone."""
    tokens = prompt + ids[:-1]
    pool = KVPool(model.config, -(-len(tokens) // block_size), block_size)
    seq = pool.new_sequence()
    return model.forward(Batch.append(pool, [(seq, tokens)]), pool)[len(prompt) - 1 :]


def check_solo(model: Model, r: Request, c: Completion, block_size: int = BS) -> None:
    """c is bitwise what r gives alone: logits, tokens (re-drawn), and a consistent end."""
    assert c.finish_reason in ("eos", "length", "cancelled"), c.error
    if not c.ids:
        assert c.finish_reason == "cancelled"
        return
    want = solo_logits(model, c.prompt_ids, c.ids, block_size)
    np.testing.assert_array_equal(c.logits, want)
    sampler, history = Sampler(r.params), list(c.prompt_ids)
    for token, row in zip(c.ids, want, strict=True):
        assert sampler.sample(row, history) == token
        history.append(token)
    assert len(c.ids) <= r.max_tokens
    if c.finish_reason == "length":
        assert len(c.ids) == r.max_tokens
    if c.finish_reason == "eos":
        assert c.ids[-1] in r.stop_token_ids
    assert not set(c.ids[:-1]) & set(r.stop_token_ids)


def run(engine: Engine) -> dict:
    """Step until nothing is left; id -> Completion."""
    done = {}
    while engine.has_unfinished():
        done.update((c.id, c) for c in engine.step())
    return done


class BatchMachine(RuleBasedStateMachine):
    """Random arrivals, cancellations and steps on a small engine; every end checked solo."""

    model: Model  # set by the `tiny` fixture

    @initialize(
        max_seqs=st.integers(1, 4),
        extra_budget=st.integers(0, 8),
        kv_blocks=st.integers(6, 14),
        prefix_caching=st.booleans(),
    )
    def make_engine(self, max_seqs, extra_budget, kv_blocks, prefix_caching) -> None:
        self.engine = Engine(
            self.model, max_seqs=max_seqs, max_tokens_per_step=max_seqs + extra_budget,
            kv_blocks=kv_blocks, block_size=BS, prefix_caching=prefix_caching,
        )  # fmt: skip
        self.requests: dict[int, Request] = {}
        self.unfinished: set[int] = set()
        self.too_big: set[int] = set()  # requests larger than the pool: errors at once
        self.next_id = 0

    @rule(
        prefix=st.sampled_from([[], SYSTEM[:5], SYSTEM]),
        tail=st.lists(st.integers(0, 127), min_size=1, max_size=8),
        greedy=st.booleans(),
        seed=st.integers(0, 3),
        max_tokens=st.integers(1, 8),
        priority=st.integers(0, 2),
        stop=st.sampled_from([(), (5,), (5, 17, 99)]),
    )
    def add(self, prefix, tail, greedy, seed, max_tokens, priority, stop) -> None:
        params = SamplingParams(temperature=0.0 if greedy else 1.0, seed=seed)
        r = Request(
            prefix + tail, params, max_tokens, stop_token_ids=stop, priority=priority,
            id=self.next_id, keep_logits=True,
        )  # fmt: skip
        self.next_id += 1
        self.requests[self.engine.add_request(r)] = r
        too_big = -(-(len(r.prompt) + max_tokens) // BS) > self.engine.pool.n_blocks
        (self.too_big if too_big else self.unfinished).add(r.id)

    @precondition(lambda self: self.unfinished)
    @rule(data=st.data())
    def cancel(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.unfinished)))
        free_before = self.engine.pool.n_free_blocks
        self.engine.cancel(rid)
        self.unfinished.discard(rid)
        assert self.engine.pool.n_free_blocks >= free_before  # freed at once

    @rule(n=st.integers(1, 6))
    def step(self, n: int) -> None:
        for _ in range(n):
            self.finish(self.engine.step())

    def finish(self, completions: list[Completion]) -> None:
        for c in completions:
            if c.id in self.too_big:
                assert c.finish_reason == "error" and "more than the whole pool" in c.error
            else:
                check_solo(self.model, self.requests[c.id], c)
            self.unfinished.discard(c.id)

    @invariant()
    def pool_is_consistent(self) -> None:
        if hasattr(self, "engine"):
            self.engine.pool.check()
            assert len(self.engine.running) <= self.engine.max_seqs

    def teardown(self) -> None:
        if not hasattr(self, "engine"):
            return
        while self.engine.has_unfinished():
            self.finish(self.engine.step())
        assert not self.unfinished
        pool = self.engine.pool
        pool.check()  # no leak: every block is free, cached ones still reusable
        assert pool.n_free_blocks == pool.n_blocks


TestBatchMachine = BatchMachine.TestCase
TestBatchMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def random_requests(n: int, seed: int, **fields) -> list[Request]:
    """n id-only requests of mixed lengths, greedy and sampled, each with its own seed."""
    rng = np.random.default_rng(seed)
    return [
        Request(
            SYSTEM[: rng.integers(0, 13)] + rng.integers(0, 128, rng.integers(1, 10)).tolist(),
            SamplingParams(temperature=float(rng.choice([0.0, 0.9])), top_k=20, seed=i),
            max_tokens=int(rng.integers(1, 9)),
            keep_logits=True,
            **fields,
        )
        for i in range(n)
    ]


def test_preemption_recomputes_exactly(tiny: Model) -> None:
    m = tiny
    requests = random_requests(12, seed=1)
    engine = Engine(m, max_seqs=4, max_tokens_per_step=8, kv_blocks=7, block_size=BS)
    ids = [engine.add_request(r) for r in requests]
    done = run(engine)
    assert engine.stats.preemptions >= 3  # the pool really was too small
    assert sum(done[i].preemptions for i in ids) == engine.stats.preemptions
    for r, i in zip(requests, ids, strict=True):
        check_solo(m, r, done[i])


def test_prefix_cache_changes_nothing_and_computes_shared_blocks_once(tiny: Model) -> None:
    m = tiny
    tails = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]]
    requests = [Request(SYSTEM + t, max_tokens=3, keep_logits=True) for t in tails]
    results, stats = {}, {}
    for caching in (False, True):
        engine = Engine(m, max_seqs=5, max_tokens_per_step=64, block_size=BS,
                        prefix_caching=caching)  # fmt: skip
        ids = [engine.add_request(r) for r in requests]
        done = run(engine)
        results[caching] = [done[i] for i in ids]
        stats[caching] = engine.stats
        engine.pool.check()
        assert engine.pool.n_free_blocks == engine.pool.n_blocks  # nothing leaked
    for off, on in zip(results[False], results[True], strict=True):
        assert off.ids == on.ids
        np.testing.assert_array_equal(off.logits, on.logits)
    # without the cache: 5 prompts of 15, then 2 decode steps each
    assert stats[False].tokens_computed == 5 * 15 + 5 * 2
    # with it: the 3 blocks of SYSTEM once (the others wait a step for them), then tails only
    assert stats[True].tokens_computed == 15 + 4 * 3 + 5 * 2
    assert stats[True].cached_prompt_tokens == 4 * len(SYSTEM)
    assert stats[True].prefix_cache_hit_rate == pytest.approx(48 / 75)
    assert [c.cached_tokens for c in results[True]] == [0, 12, 12, 12, 12]


def test_cancel_frees_blocks_at_once_waiting_or_running(tiny: Model) -> None:
    m = tiny
    engine = Engine(m, max_seqs=1, max_tokens_per_step=16, kv_blocks=8, block_size=BS)
    running = engine.add_request(Request(list(range(10)), max_tokens=8))
    waiting = engine.add_request(Request(list(range(20, 30)), max_tokens=8))
    engine.step()
    assert engine.pool.n_free_blocks == 8 - 3  # 10 prompt tokens
    engine.cancel(running)
    assert engine.pool.n_free_blocks == 8
    engine.cancel(waiting)
    done = engine.step()
    assert [(c.id, c.finish_reason, len(c.ids)) for c in done] == [
        (running, "cancelled", 1), (waiting, "cancelled", 0),
    ]  # fmt: skip
    assert not engine.has_unfinished()
    with pytest.raises(InvalidParameterError, match="no waiting or running request"):
        engine.cancel(running)


def test_priority_then_arrival_order(tiny: Model) -> None:
    m = tiny
    engine = Engine(m, max_seqs=1, max_tokens_per_step=16, block_size=BS)
    for rid, priority in (("a", 0), ("b", 0), ("c", 5), ("d", 1)):
        engine.add_request(Request([1, 2, 3], max_tokens=2, priority=priority, id=rid))
    order = [c.id for c in run(engine).values()]
    assert order == ["c", "d", "a", "b"]


def test_request_larger_than_the_pool_fails_alone(tiny: Model) -> None:
    m = tiny
    requests = [Request([1, 2, 3], max_tokens=4), Request(list(range(40)), max_tokens=4),
                Request([], max_tokens=4), Request([4, 5], max_tokens=2)]  # fmt: skip
    out = m.generate_batch(requests, kv_blocks=8, block_size=BS)
    assert [c.finish_reason for c in out] == ["length", "error", "error", "length"]
    assert "more than the whole pool (8 blocks of 4)" in out[1].error
    assert "the prompt is empty" in out[2].error


def test_decode_tokens_are_never_stalled_by_a_long_prefill(tiny: Model) -> None:
    m = tiny
    engine = Engine(m, max_seqs=2, max_tokens_per_step=6, block_size=BS)
    short = engine.add_request(Request([1, 2], max_tokens=6))
    engine.step()  # short's prompt; it samples its first token
    engine.add_request(Request(list(range(40)), max_tokens=2))  # 8 chunks of 5 tokens
    for k in range(2, 7):
        done = engine.step()
        assert engine.stats.generated_tokens == k  # short decoded beside each chunk
        assert engine.stats.tokens_computed == 2 + (k - 1) * 6  # budget: 1 decode + 5 prefill
    assert [(c.id, c.finish_reason) for c in done] == [(short, "length")]
    assert engine.stats.running == 1 and run(engine)


@pytest.fixture(scope="module")
def tiny_with_text(tiny: Model, smollm2_path: Path) -> Model:
    """The tiny model with SmolLM2's tokenizer: its ids 17..127 decode to ASCII."""
    from refinfer.gguf import read_metadata

    m = copy.copy(tiny)
    m.tokenizer = Tokenizer.from_metadata(read_metadata(smollm2_path))
    return m


def test_text_streams_and_stop_strings_cut_it(tiny_with_text: Model) -> None:
    m, prompt = tiny_with_text, list(range(40, 60))
    pieces: list[str] = []
    free = Request(prompt, max_tokens=30, ignore_eos=True, on_text=pieces.append)
    (whole,) = m.generate_batch([free])
    assert whole.text == m.tokenizer.decode(whole.ids) == "".join(pieces)
    assert len(whole.text) >= 10, whole.text
    stop = whole.text[len(whole.text) // 2 :][:2]
    pieces.clear()
    stopped = Request(prompt, max_tokens=30, ignore_eos=True, stop=["@@@", stop],
                      on_text=pieces.append)  # fmt: skip
    (cut,) = m.generate_batch([stopped])
    assert cut.finish_reason == "stop"
    assert cut.text == whole.text[: whole.text.find(stop)] == "".join(pieces)
    assert whole.ids[: len(cut.ids)] == cut.ids


def test_bad_engine_sizes(tiny: Model) -> None:
    with pytest.raises(InvalidParameterError, match="max_seqs <= max_tokens_per_step"):
        Engine(tiny, max_seqs=8, max_tokens_per_step=4)


def test_request_from_json_dict() -> None:
    r = Request.from_dict({"prompt": "hi", "temperature": 0.5, "seed": 3, "stop": "\n",
                           "priority": 2, "id": "x", "max_tokens": 7})  # fmt: skip
    assert (r.params.temperature, r.params.seed, r.stop, r.priority, r.id, r.max_tokens) == (
        0.5, 3, ["\n"], 2, "x", 7,
    )  # fmt: skip
    for bad, message in [
        ([1], "expected a JSON object"),
        ({"prompt": "a", "temprature": 1}, "unknown field 'temprature'"),
        ({"prompt": "a", "messages": []}, "exactly one of"),
        ({"prompt": "a", "top_k": 1.5}, "'top_k' has the wrong type"),
        ({"prompt": "a", "max_tokens": 0}, "'max_tokens' has the wrong type"),
        ({"prompt": "a", "top_p": 2}, "top_p must be in"),
    ]:
        with pytest.raises(InvalidParameterError, match=message):
            Request.from_dict(bad)


@pytest.fixture(scope="module")
def smollm2_model(smollm2) -> Model:
    return Model(smollm2, Tokenizer.from_metadata(smollm2.metadata))


PROMPTS = ["The capital of France is", "Once upon a time, there was", "def fibonacci(n):"]


def test_greedy_batched_smollm2_equals_generate_alone(smollm2_model: Model) -> None:
    m = smollm2_model
    out = m.generate_batch([Request(p, max_tokens=8) for p in PROMPTS], max_seqs=3)
    for prompt, c in zip(PROMPTS, out, strict=True):
        alone = m.generate(prompt, max_new_tokens=8)
        assert (c.ids, c.text) == (alone.ids, alone.text)
    assert out[0].text.startswith(" Paris")


def test_batch_command(smollm2_path: Path, tmp_path: Path, capsys) -> None:
    lines = [
        json.dumps({"prompt": PROMPTS[0], "max_tokens": 4, "id": "paris"}),
        '{"prompt": "no closing brace"',
        json.dumps({"prompt": "Hi", "temprature": 0.5}),
        json.dumps({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3}),
        json.dumps({"prompt": [1] * 200, "max_tokens": 4}),
        "",
        json.dumps({"prompt": "Hello", "temperature": -1}),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    args = ["batch", "--model", str(smollm2_path), "--input", str(src), "--output", str(dst)]

    assert main([*args, "--on-error", "fail"]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:2: not JSON" in err and "in.jsonl:3: unknown field 'temprature'" in err
    assert "in.jsonl:7: temperature must be" in err and "3 malformed lines" in err
    assert not dst.exists()  # rejected before running anything

    assert main([*args, "--kv-blocks", "8", "--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4, 5, 7]
    assert [o["finish_reason"] for o in out] == ["length", "error", "error", "length", "error",
                                                 "error"]  # fmt: skip
    assert out[0]["id"] == "paris" and out[0]["text"].startswith(" Paris")
    assert len(out[0]["token_ids"]) == 4 and out[0]["time_to_first_token"] > 0
    assert "more than the whole pool (8 blocks of 16)" in out[4]["error"]
    assert "prefix-cache hit rate" in err and "in.jsonl:2: not JSON" in err
