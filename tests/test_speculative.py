"""Accelerated decoding is exact (DESIGN.md invariant 5) and leaves the KV pool exact too.

What this file proves, on tiny synthetic models (ids only, no tokenizer):
- greedy: every strategy (prompt lookup, a draft model, the target as its own draft,
  self-speculative layer subsets, lookahead, and a test proposer of
  several branches, which makes step() fork) emits plain greedy decoding's tokens, token
  for token, on hypothesis-generated prompts, random draft_k and repetition penalties.
  Exact equality: the verifier must accept exactly the target's argmax.
- sampled: speculative decoding's first three tokens follow the target's joint distribution
  p(t1) p(t2 | t1) p(t3 | t1, t2), computed exactly from the target's logits; and the
  verifier, fed synthetic logits and draft distributions, emits tokens distributed as p
  (draft-model q, a second-position q, several one-hot candidates).
- the pool: after every step (random k, including 0) the sequence holds bitwise the K/V a
  fresh prefill of the accepted tokens gives (invariant 4 makes this exact), and every
  block is free again when generation ends. These steps never pause (generate()'s
  DraftLength does when proposals fail), so they also check greedy exactness under
  rollback at every step.
- clear one-line errors, DraftLength's adaptation, the greedy verifier on synthetic rows,
  and layer calibration.

Statistics: a chi-square goodness-of-fit test rejects at p = 1e-4, with the critical value
from the Wilson-Hilferty approximation (scipy is not a dependency; for df >= 2 it is at most
~5% above the exact quantile, i.e. slightly conservative). Cells expected to hold fewer than
5 draws are pooled into one so the chi-square approximation holds. Draws are seeded, so a
run is deterministic: 1e-4 is the chance that a correct verifier fails for these seeds, not
a flake rate. Each chi-square test also shows its power: the same draws reject the
distribution a biased verifier would give (accept every draft token; resample from p
instead of the residual; forget the residual between candidates).

Numba runs on one thread here: the results do not depend on the thread count (invariant 4,
tests/test_model.py), and on a loaded 2-core machine each OpenMP parallel region of a tiny
forward call costs ~15 ms of spinning instead of microseconds.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gguf_factory import write_tiny_model
from refinfer.decoding.calibrate import (
    Calibration,
    calibrate,
    calibration_path,
    read_calibration,
    write_calibration,
)
from refinfer.decoding.draft import DraftModelProposer
from refinfer.decoding.generate import generate, make_proposer
from refinfer.decoding.prompt_lookup import PromptLookupProposer, latest_match
from refinfer.decoding.speculative import (
    VERIFY_COST,
    DecodeState,
    DraftLength,
    Proposal,
    Proposer,
    step,
)
from refinfer.decoding.verify import verify_greedy, verify_sampled
from refinfer.errors import InvalidParameterError, RefinferError
from refinfer.gguf import read_gguf
from refinfer.kv_pool import KVPool, blocks_for
from refinfer.model import Batch, Model
from refinfer.sampling import Sampler, SamplingParams, probabilities

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one Numba thread

Z_1E4 = 3.719016  # standard normal quantile at 1 - 1e-4
MIN_EXPECTED = 5  # cells expected to hold fewer draws are pooled into one


def tiny(path: Path, **sizes) -> Model:
    """A synthetic model without a vocabulary: generate() works on ids."""
    return Model(read_gguf(write_tiny_model(path, **sizes)), tokenizer=None)


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The models: a 3-layer target (vocab 128) and drafts; a vocab-16 pair for statistics."""
    d = tmp_path_factory.mktemp("speculative")
    return SimpleNamespace(
        target=tiny(d / "target.gguf", n_layers=3),
        # another model with the same vocabulary: smaller, other weights, low acceptance
        other=tiny(d / "other.gguf", n_layers=1, dim=32, ffn_dim=64, seed=1),
        vocab64=tiny(d / "vocab64.gguf", vocab_size=64),
        small=tiny(d / "small.gguf", vocab_size=16),
        small_draft=tiny(d / "small-draft.gguf", vocab_size=16, seed=1),
    )


# ---- chi-square ------------------------------------------------------------------------


def chi2_critical(df: int, z: float = Z_1E4) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = Z_1E4: p = 1e-4)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """(X^2, degrees of freedom) of counts against p; infinite if p = 0 was drawn."""
    if counts[p == 0].any():
        return math.inf, 1
    e = counts.sum() * p
    big = e >= MIN_EXPECTED
    observed = [*counts[big], counts[~big & (p > 0)].sum()]
    expected = [*e[big], e[~big].sum()]
    if expected[-1] == 0:  # nothing to pool
        observed, expected = observed[:-1], expected[:-1]
    o, e = np.array(observed, float), np.array(expected)
    # X^2 = sum (O - E)^2 / E
    return float(np.sum((o - e) ** 2 / e)), len(e) - 1


def assert_fits(counts: np.ndarray, p: np.ndarray) -> None:
    """The draws are consistent with p at p-value 1e-4."""
    stat, df = chi2(counts, p)
    assert stat < chi2_critical(df), (stat, df, counts, counts.sum() * p)


def assert_rejects(counts: np.ndarray, biased: np.ndarray) -> None:
    """The same test rejects the draws against a biased verifier's distribution."""
    stat, df = chi2(counts, biased)
    assert stat > chi2_critical(df), (stat, df)


def test_chi2_critical_is_close_to_exact_quantiles() -> None:
    # exact chi2 quantiles at 1 - 1e-4; df = 2 has the closed form -2 ln(1e-4)
    for df, exact in ((2, -2 * math.log(1e-4)), (4, 23.513), (8, 31.828), (26, 61.657)):
        assert 0 <= chi2_critical(df) / exact - 1 < 0.06


# ---- exactness, greedy -----------------------------------------------------------------


class SeveralMatches(Proposer):
    """Several branches at once, so step() forks: what followed each of the last three
    earlier occurrences of the pending token (a test proposer; lookahead also forks)."""

    name = "several-matches"

    def propose(self, state: DecodeState, k: int) -> Proposal:
        h = state.history
        starts = [i + 1 for i in range(len(h) - 2, -1, -1) if h[i] == h[-1]][:3]
        return Proposal([h[s : s + k] for s in starts])

    def extra_blocks(self, block_size: int) -> int:
        """Three forks of at most 2 * 6 + 1 tokens (generate's k_max for draft_k <= 6),
        each with a copy of the shared partial block."""
        return 3 * (blocks_for(13, block_size) + 1)


PROMPTS = st.one_of(
    st.lists(st.integers(0, 127), min_size=1, max_size=40),  # random: drafts rarely match
    st.builds(  # repetitive: prompt lookup and lookahead find matches
        lambda pattern, times: (pattern * times)[:40],
        st.lists(st.integers(0, 127), min_size=1, max_size=6),
        st.integers(2, 10),
    ),
)
CASES = ["prompt-lookup", "several-matches", "draft-other", "draft-self", "self-speculative"]
CASES += ["lookahead"]


def strategy(case: str, m: SimpleNamespace, draw) -> tuple[str | Proposer, dict]:
    """(decoding, generate options) of a case, its free parameters drawn with `draw`."""
    if case == "prompt-lookup":
        return case, {"ngram": draw(st.integers(1, 4))}
    if case == "several-matches":
        return SeveralMatches(), {}
    if case == "draft-other":
        return "speculative", {"draft_model": m.other}
    if case == "draft-self":
        return "speculative", {"draft_model": m.target}
    if case == "self-speculative":
        layers = draw(st.sets(st.integers(0, m.target.config.n_layers - 1), min_size=1))
        return case, {"draft_layers": sorted(layers)}
    assert case == "lookahead"
    sizes = st.tuples(st.integers(1, 6), st.integers(2, 4), st.integers(1, 5))
    window, ngram, guesses = draw(sizes)
    return case, {"window": window, "ngram": ngram, "guesses": guesses}


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=40)
@given(
    prompt=PROMPTS,
    n=st.integers(1, 24),
    draft_k=st.integers(1, 6),
    penalty=st.sampled_from([1.0, 0.7, 1.5]),
    data=st.data(),
)
def test_greedy_emits_exactly_the_plain_greedy_tokens(case, m, prompt, n, draft_k, penalty, data):
    decoding, options = strategy(case, m, data.draw)
    plain = generate(m.target, prompt, n, repetition_penalty=penalty)
    fast = generate(
        m.target, prompt, n, repetition_penalty=penalty, decoding=decoding, draft_k=draft_k,
        adaptive=data.draw(st.booleans()), **options,
    )  # fmt: skip
    assert fast.ids == plain.ids


def test_acceptance_is_total_for_an_identical_draft_and_low_for_another_model(m) -> None:
    prompt = list(range(20))

    def steps(**options):
        return generate(m.target, prompt, 40, draft_k=4, adaptive=False, **options).stats.steps

    for same in (
        steps(decoding="speculative", draft_model=m.target),
        steps(decoding="self-speculative", draft_layers=[0, 1, 2]),  # every layer
    ):  # bitwise the target's logits (invariant 4), so every drafted token is accepted
        assert same.proposed > 0 and same.accepted == same.proposed
    other = steps(decoding="speculative", draft_model=m.other)
    assert other.proposed > 0 and other.acceptance_rate < 0.5  # rollback is exercised


# ---- exactness, sampled: whole generations --------------------------------------------

SAMPLED = SamplingParams(temperature=1.0, top_k=3)  # 3 tokens per position: 27 joint cells
SAMPLED_PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
N_DRAWS = 1000


def joint_of_first_three(m: SimpleNamespace, later: Model | None = None) -> np.ndarray:
    """float64[V^3]: P(t1, t2, t3) = p(t1) p(t2 | t1) p(t3 | t1, t2) of the small target,
    flattened at t1 V^2 + t2 V + t3; with `later`, t2 and t3 come from that model instead.
    """
    V, later = m.small.config.vocab_size, later or m.small

    def p(model: Model, ids: list[int]) -> np.ndarray:
        return probabilities(model.logits(ids)[-1], SAMPLED, ids)  # (V,)

    joint = np.zeros((V, V, V))
    p1 = p(m.small, SAMPLED_PROMPT)
    for a in np.flatnonzero(p1):
        p2 = p(later, [*SAMPLED_PROMPT, a])
        for b in np.flatnonzero(p2):
            joint[a, b] = p1[a] * p2[b] * p(later, [*SAMPLED_PROMPT, a, b])
    return joint.ravel()


@pytest.fixture(scope="module")
def sampled_draws(m) -> dict[str, tuple[np.ndarray, float]]:
    """case -> (counts of the first three tokens over seeds 0..N_DRAWS-1, acceptance rate).

    4 new tokens with draft_k = 2: the first token comes from the prefill, then one step
    drafts 2 (generate never drafts past the length limit, so with 2 new tokens it would
    not speculate at all). t2 is a draft token accepted or a residual draw, t3 the second
    draft token (checked against q_2), a residual, or the next step's.
    """
    V = m.small.config.vocab_size
    cases = {
        "bad draft": {"decoding": "speculative", "draft_model": m.small_draft},
        "self-speculative": {"decoding": "self-speculative", "draft_layers": [1]},
    }
    out = {}
    for case, options in cases.items():
        counts, proposed, accepted = np.zeros(V**3, np.int64), 0, 0
        for seed in range(N_DRAWS):
            g = generate(
                m.small, SAMPLED_PROMPT, 4, temperature=SAMPLED.temperature, top_k=SAMPLED.top_k,
                seed=seed, draft_k=2, adaptive=False, **options,
            )  # fmt: skip
            a, b, c = g.ids[:3]
            counts[(a * V + b) * V + c] += 1
            proposed += g.stats.steps.proposed
            accepted += g.stats.steps.accepted
        out[case] = counts, accepted / proposed
    return out


@pytest.mark.parametrize("case", ["bad draft", "self-speculative"])
def test_sampled_speculative_first_tokens_follow_the_target(m, sampled_draws, case) -> None:
    counts, acceptance = sampled_draws[case]
    assert 0.05 < acceptance < 0.95  # both the accept and the reject paths were taken
    assert_fits(counts, joint_of_first_three(m))


def test_the_chi_square_rejects_a_verifier_that_accepts_every_draft_token(m, sampled_draws):
    counts, _ = sampled_draws["bad draft"]
    assert_rejects(counts, joint_of_first_three(m, later=m.small_draft))


# ---- exactness, sampled: the verifier on synthetic rows -------------------------------

P6 = np.array([0.05, 0.30, 0.20, 0.0, 0.25, 0.20])  # the target's p
Q6 = np.array([0.40, 0.05, 0.0, 0.30, 0.15, 0.10])  # a draft's q: mass where p is 0, and
# none on token 2, which only the residual can emit
N_VERIFY = 4000


def logits_of(p: np.ndarray) -> np.ndarray:
    """float32 logits whose softmax (temperature 1) is p; -inf where p = 0."""
    with np.errstate(divide="ignore"):
        return np.log(p).astype(np.float32)


def one_hot(x: int, V: int = 6) -> np.ndarray:
    q = np.zeros(V)
    q[x] = 1.0
    return q


def sampler(seed: int) -> Sampler:
    return Sampler(SamplingParams(temperature=1.0, seed=seed))


def test_verify_sampled_emits_p_whatever_the_draft_q() -> None:
    s, counts = sampler(1), np.zeros(6, np.int64)
    rows = np.stack([logits_of(P6), np.zeros(6, np.float32)])  # after x: the bonus row
    for _ in range(N_VERIFY):
        x = s.draw(Q6)  # the draft's token, x ~ q
        counts[verify_sampled([[x]], [rows], s, [], [Q6]).tokens[0]] += 1
    assert_fits(counts, probabilities(rows[0], s.params))
    overlap = np.minimum(P6, Q6)
    assert_rejects(counts, overlap + (1 - overlap.sum()) * P6)  # rejection resampling from p


def test_verify_sampled_checks_the_second_token_against_the_second_q() -> None:
    s, counts = sampler(2), np.zeros(6, np.int64)
    rows = np.stack([logits_of(one_hot(4)), logits_of(P6), np.zeros(6, np.float32)])
    for _ in range(N_VERIFY):
        x = s.draw(Q6)
        verdict = verify_sampled([[4, x]], [rows], s, [], [one_hot(4), Q6])
        assert verdict.tokens[0] == 4  # p = q = one-hot(4): always accepted
        counts[verdict.tokens[1]] += 1
    assert_fits(counts, P6)
    assert_rejects(counts, Q6)  # a verifier that accepted the draft's token outright


def test_verify_sampled_with_several_one_hot_candidates_emits_p() -> None:
    # candidates 1, 4, 3 (p = 0) in branch order; branch 2 repeats 1 and must not count twice
    branches = [[1, 0], [4], [1, 2], [3]]
    rows = [np.tile(logits_of(P6), (len(b) + 1, 1)) for b in branches]
    s, counts = sampler(3), np.zeros(6, np.int64)
    for _ in range(N_VERIFY):
        verdict = verify_sampled(branches, rows, s, [])
        accepted = verdict.tokens[:-1]
        assert branches[verdict.branch][: len(accepted)] == accepted
        counts[verdict.tokens[0]] += 1
    assert_fits(counts, P6)
    # a verifier trying each candidate against the original p, never the residual:
    stale = np.array([0, 0.30, 0, 0, 0.7 * 0.25, 0])
    rest = P6 * np.isin(np.arange(6), [0, 2, 5])
    assert_rejects(counts, stale + 0.7 * 0.75 * rest / rest.sum())


# ---- the pool after every step ---------------------------------------------------------


def read_back(pool: KVPool, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V of seq read through its block table: float32[L, length, KVH, HD] each."""
    table, bs = np.array(pool.block_table(seq), np.int64), pool.block_size
    p = np.arange(pool.length(seq))
    slots = table[p // bs] * bs + p % bs
    k, v = zip(*(pool.read(layer, slots) for layer in range(len(pool.k_cache))), strict=True)
    return np.stack(k), np.stack(v)


def assert_holds_prefill(model: Model, pool: KVPool, seq: int, tokens: list[int]) -> None:
    """seq holds exactly the K/V of a fresh prefill of tokens, bitwise.

    The fresh pool has the same block size: a block is an attention tile, so the block size
    is part of the reduction order (kernels/attention.py) and changes the last bits.
    """
    assert pool.length(seq) == len(tokens)
    fresh = KVPool(model.config, blocks_for(len(tokens), pool.block_size), pool.block_size)
    s = fresh.new_sequence()
    model.forward(Batch.append(fresh, [(s, tokens)], all_logits=False), fresh)
    for got, want in zip(read_back(pool, seq), read_back(fresh, s), strict=True):
        np.testing.assert_array_equal(got, want)


POOL_CASES = {  # case -> (decoding, options) given the models
    "draft-other": lambda m: ("speculative", {"draft_model": m.other}),
    "self-speculative": lambda m: ("self-speculative", {"draft_layers": [0, 2]}),
    "prompt-lookup": lambda m: ("prompt-lookup", {}),
    "several-matches": lambda m: (SeveralMatches(), {}),
    "lookahead": lambda m: ("lookahead", {"window": 3, "ngram": 3, "guesses": 3}),
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "case", ["draft-other", "self-speculative", "prompt-lookup", "several-matches", "lookahead"]
)
def test_pool_holds_a_fresh_prefill_of_the_accepted_tokens_after_every_step(
    m, case, temperature
) -> None:
    decoding, options = POOL_CASES[case](m)
    proposer = make_proposer(m.target, decoding, **options)
    block_size = 4  # small blocks: steps cross block boundaries and copy partial blocks often
    pool = KVPool(
        m.target.config, blocks_for(256, block_size) + proposer.extra_blocks(block_size), block_size
    )
    prompt = [5, 6, 7, 8, 9] * 3
    seq = pool.new_sequence()
    logits = m.target.forward(Batch.append(pool, [(seq, prompt)], all_logits=False), pool)
    s = Sampler(SamplingParams(temperature=temperature, seed=5))
    state = DecodeState(m.target, pool, seq, [*prompt, s.sample(logits[-1], prompt)], s)
    rng = np.random.default_rng(9)
    for _ in range(30):  # at most 7 tokens a step: fits the context of 256
        step(state, proposer, int(rng.integers(0, 7)))
        pool.check()
        assert_holds_prefill(m.target, pool, state.seq, state.history[:-1])
        draft_pool = getattr(proposer, "pool", None)
        if draft_pool is not None:  # the separate draft's sequence: a prefix of the history
            n = draft_pool.length(proposer.seq)
            assert n <= len(state.history) - 1
            assert_holds_prefill(proposer.draft, draft_pool, proposer.seq, state.history[:n])
    if temperature == 0:  # random k, never paused: rollback far more than generate() does
        n = len(state.history) - len(prompt)
        assert state.history[len(prompt) :] == generate(m.target, prompt, n).ids
    proposer.close(state)
    pool.free(state.seq)
    for p in [pool] if draft_pool is None else [pool, draft_pool]:
        p.check()
        assert p.n_free_blocks == p.n_blocks  # no leaked blocks or forks


# ---- errors --------------------------------------------------------------------------

ERRORS = {
    "draft of another vocabulary": (
        lambda m: make_proposer(m.target, "speculative", draft_model=m.vocab64),
        r"another vocabulary than target\.gguf \(64 vs 128 tokens\)",
    ),
    "for_target checks the vocabulary": (
        lambda m: DraftModelProposer.for_target(m.target, m.vocab64),
        "another vocabulary",
    ),
    "speculative without a draft": (
        lambda m: generate(m.target, [1, 2], 4, decoding="speculative"),
        "needs a draft model",
    ),
    "empty layer set": (
        lambda m: make_proposer(m.target, "self-speculative", draft_layers=[]),
        "at least one layer",
    ),
    "layer out of range": (
        lambda m: make_proposer(m.target, "self-speculative", draft_layers=[0, 3]),
        r"increasing indices in 0\.\.2",
    ),
    "negative layer": (
        lambda m: DraftModelProposer(m.target, layers=[-1, 0]),
        "increasing indices",
    ),
    "unsorted layers": (
        lambda m: make_proposer(m.target, "self-speculative", draft_layers=[1, 0]),
        "increasing indices",
    ),
    "repeated layer": (
        lambda m: make_proposer(m.target, "self-speculative", draft_layers=[1, 1]),
        "increasing indices",
    ),
    "unknown strategy": (
        lambda m: generate(m.target, [1, 2], 4, decoding="medusa"),
        "unknown decoding strategy 'medusa'",
    ),
    "draft_k < 1": (
        lambda m: generate(m.target, [1, 2], 4, decoding="prompt-lookup", draft_k=0),
        "draft_k must be at least 1",
    ),
    "n-gram of 0": (
        lambda m: generate(m.target, [1, 2], 4, decoding="prompt-lookup", ngram=0),
        "1 <= min_ngram <= max_ngram",
    ),
    "min n-gram above max": (
        lambda m: PromptLookupProposer(max_ngram=2, min_ngram=3),
        "1 <= min_ngram <= max_ngram",
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_parameters_are_one_line_errors(m, case) -> None:
    call, match = ERRORS[case]
    with pytest.raises(InvalidParameterError, match=match) as e:
        call(m)
    assert "\n" not in str(e.value)


def test_self_speculative_without_calibration_or_layers_says_run_calibrate(m) -> None:
    assert not calibration_path(m.target.path).exists()
    with pytest.raises(RefinferError, match="run `refinfer calibrate") as e:
        generate(m.target, [1, 2], 4, decoding="self-speculative")
    assert "\n" not in str(e.value)


# ---- DraftLength ---------------------------------------------------------------------


def test_draft_length_grows_by_two_on_full_acceptance_up_to_k_max() -> None:
    d = DraftLength(k=3, k_max=8)
    for want in (5, 7, 8, 8):
        d.update(proposed=d.k, accepted=d.k, spent=d.k)
        assert d.next_k() == want


def test_draft_length_shrinks_to_accepted_plus_one_and_at_least_by_one() -> None:
    d = DraftLength(k=8, k_max=8)
    d.update(proposed=8, accepted=2, spent=8)
    assert d.k == 3
    d.update(proposed=3, accepted=2, spent=3)  # accepted + 1 = k: shrink by one anyway
    assert d.k == 2
    d.update(proposed=2, accepted=0, spent=2)
    assert d.k == 1
    d.update(proposed=1, accepted=0, spent=1)
    assert d.k == 1  # never below 1


def test_draft_length_ignores_steps_that_spent_nothing() -> None:
    d = DraftLength(k=4, k_max=8)
    d.update(proposed=4, accepted=4, spent=4)
    before = (d.k, d.gain, d.paused)
    for _ in range(5):
        d.update(proposed=0, accepted=0, spent=0)  # plain steps: no cost, no change
    assert (d.k, d.gain, d.paused) == before


def test_draft_length_pauses_when_speculation_does_not_pay_with_doubling_backoff() -> None:
    d = DraftLength(k=1, k_max=4)
    for pause in (4, 8, 16, 32, 64, 64):  # doubling, capped at 64
        assert d.next_k() == 1
        d.update(proposed=1, accepted=0, spent=1)  # gain 1 / 1.2: the average falls below 1
        assert [d.next_k() for _ in range(pause)] == [0] * pause
    assert d.next_k() == 1
    d.update(proposed=1, accepted=1, spent=1)  # a step that pays resets the backoff
    assert (d.backoff, d.paused) == (4, 0)


def test_draft_length_judges_a_moving_average_of_the_gain() -> None:
    d = DraftLength(k=4, k_max=8)
    d.update(proposed=4, accepted=4, spent=4)  # gain 5 / 1.8: the average rises to 1.53
    for _ in range(3):  # gains 1 / 2.2, 1 / 1.2, 1 / 1.2: the average 1.21, 1.10, 1.02
        d.update(proposed=d.k, accepted=0, spent=d.k)
        assert d.next_k() == 1
    d.update(proposed=1, accepted=0, spent=1)  # and now drops below it
    assert d.next_k() == 0


def test_draft_length_counts_the_draft_cost_and_the_tokens_run() -> None:
    free, costly = DraftLength(k=2, k_max=4), DraftLength(k=2, k_max=4, draft_cost=1.0)
    for d in (free, costly):
        d.update(proposed=2, accepted=2, spent=2)  # gain 3 / 1.4, or 3 / 3.4 with the draft
    assert free.next_k() == 4 and costly.next_k() == 0
    window = DraftLength(k=3, k_max=6)
    window.update(proposed=0, accepted=0, spent=10)  # e.g. a lookahead window, no candidate
    assert window.next_k() == 0


def test_a_draft_as_costly_as_the_target_never_speculates_unless_told_to() -> None:
    # all k accepted gains (k + 1) / (1 + (VERIFY_COST + c) k) < 1 once VERIFY_COST + c >= 1
    c = 1 - VERIFY_COST
    assert DraftLength(k=4, k_max=8, draft_cost=c).next_k() == 0
    assert DraftLength(k=4, k_max=8, draft_cost=c - 0.01).next_k() == 4
    fixed = DraftLength(k=4, k_max=8, draft_cost=c, adaptive=False)
    fixed.update(proposed=4, accepted=0, spent=4)  # neither paused nor shrunk
    assert fixed.next_k() == 4


# ---- the greedy verifier on synthetic rows --------------------------------------------

GREEDY = Sampler(SamplingParams())


def argmax_rows(tokens: list[int], V: int = 10) -> np.ndarray:
    """float32[len(tokens), V] logits whose argmax at row i is tokens[i]."""
    rows = np.zeros((len(tokens), V), np.float32)
    rows[np.arange(len(tokens)), tokens] = 1.0
    return rows


@pytest.mark.parametrize(
    ("branch", "argmaxes", "tokens"),
    [
        ([1, 2, 3], [1, 2, 5, 9], [1, 2, 5]),  # longest matching prefix, then the target's
        ([1, 2], [1, 2, 7], [1, 2, 7]),  # all accepted: a bonus token
        ([4, 2], [6, 2, 7], [6]),  # none accepted: the target's own token
        ([], [8], [8]),  # nothing proposed: a plain step
    ],
)
def test_verify_greedy_accepts_the_longest_matching_prefix(branch, argmaxes, tokens) -> None:
    verdict = verify_greedy([branch], [argmax_rows(argmaxes)], GREEDY, [])
    assert (verdict.branch, verdict.tokens, verdict.n_accepted) == (0, tokens, len(tokens) - 1)


def test_verify_greedy_picks_the_longest_branch_and_the_first_on_ties() -> None:
    branches = [[1, 4], [1, 5], [1, 6]]
    rows = [argmax_rows([1, 9, 0]), argmax_rows([1, 5, 8]), argmax_rows([1, 6, 3])]
    verdict = verify_greedy(branches, rows, GREEDY, [])
    assert (verdict.branch, verdict.tokens) == (1, [1, 5, 8])  # branch 2 ties: not taken


def test_verify_greedy_penalises_the_history_and_the_accepted_tokens() -> None:
    s = Sampler(SamplingParams(repetition_penalty=4.0))
    rows = np.array([[0, 2.0, 1.5, 0], [0, 2.0, 1.0, 0.9], [0.6, 2.0, 1.0, 0.9]], np.float32)
    # unpenalised every argmax is 1; row 0: 1 is in the history (2 / 4 < 1.5): 2;
    # row 1: the accepted 2 is penalised too: 3; row 2: 1, 2, 3 all penalised: 0
    assert verify_greedy([[2, 3]], [rows], s, [1]).tokens == [2, 3, 0]


# ---- prompt lookup ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "max_ngram", "min_ngram", "start"),
    [
        ([7, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2], 3, 1, 7),  # [1, 2]: the latest match, at 5
        ([4, 1, 2, 8, 9, 1, 2, 3, 4, 1, 2], 3, 1, 3),  # [4, 1, 2] beats a later [1, 2]
        ([4, 1, 2, 8, 9, 1, 2, 3, 4, 1, 2], 2, 1, 7),  # unless n-grams of 3 are not tried
        ([1, 2, 3, 1], 3, 2, None),  # [3, 1] never occurred before
        ([1, 2, 3, 1], 3, 1, 1),
    ],
)
def test_latest_match_finds_the_longest_then_latest_earlier_n_gram(
    history, max_ngram, min_ngram, start
) -> None:
    assert latest_match(history, max_ngram, min_ngram) == start


def test_prompt_lookup_proposes_the_k_tokens_after_the_match() -> None:
    state = SimpleNamespace(history=[7, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2])  # only history is read
    assert PromptLookupProposer().propose(state, 3).branches == [[5, 6, 1]]
    assert PromptLookupProposer().propose(SimpleNamespace(history=[1, 2]), 3).branches == []


# ---- calibration ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Calibration:
    """The calibration of a 4-layer model on 100 random token ids."""
    model = tiny(tmp_path_factory.mktemp("calibrate") / "four.gguf", n_layers=4)
    ids = np.random.default_rng(4).integers(0, 128, 100).tolist()
    return calibrate(model, ids, draft_k=3)


def test_calibrate_chooses_a_proper_layer_subset(calibrated) -> None:
    layers = calibrated.layers
    assert layers == sorted(set(layers)) and 0 <= layers[0] and layers[-1] < 4
    assert 1 <= len(layers) < 4 and calibrated.n_layers == 4  # at least one layer skipped
    assert 0 <= calibrated.agreement <= 1 and 0 <= calibrated.acceptance_rate <= 1
    assert (calibrated.draft_k, calibrated.text_tokens) == (3, 100)


def test_calibration_round_trips_beside_the_model(calibrated, tmp_path) -> None:
    model_path = tmp_path / "some.gguf"
    write_calibration(calibrated, calibration_path(model_path))
    assert calibration_path(model_path) == tmp_path / "some.self-speculative.json"
    assert read_calibration(model_path) == calibrated


def test_self_speculative_uses_the_calibration_file_and_stays_exact(calibrated, tmp_path):
    model = tiny(tmp_path / "four.gguf", n_layers=4)
    prompt = np.random.default_rng(6).integers(0, 128, 12).tolist()
    write_calibration(calibrated, calibration_path(model.path))
    from_file = generate(model, prompt, 30, decoding="self-speculative")
    given_layers = generate(
        model, prompt, 30, decoding="self-speculative", draft_layers=calibrated.layers
    )
    assert from_file.ids == generate(model, prompt, 30).ids
    assert from_file.stats.steps == given_layers.stats.steps
    # the file is read: layers out of range there are an error here
    write_calibration(dataclasses.replace(calibrated, layers=[7]), calibration_path(model.path))
    with pytest.raises(InvalidParameterError, match=r"0\.\.3, got \[7\]"):
        generate(model, prompt, 4, decoding="self-speculative")


# ---- first-use compile time ---------------------------------------------------------


def test_first_use_compile_is_reported_apart_from_the_speeds(m, monkeypatch) -> None:
    """A kernel compiled during prefill counts in compile_seconds and time to first token,
    not in prefill_seconds; a run that compiles nothing reports 0."""
    import numba

    @numba.njit  # a new function: calling it compiles, as a first use compiles the kernels
    def fresh(x):
        return x + 1

    forward = m.target.forward

    def forward_that_compiles(*args, **kwargs):
        fresh(1)
        return forward(*args, **kwargs)

    assert generate(m.target, [1, 2, 3], 4).stats.compile_seconds == 0
    monkeypatch.setattr(m.target, "forward", forward_that_compiles)
    s = generate(m.target, [1, 2, 3], 4).stats
    assert s.compile_seconds > 0.01
    assert s.prefill_seconds == pytest.approx(s.time_to_first_token - s.compile_seconds)
