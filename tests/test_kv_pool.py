"""The paged KV pool against a model of its contents: a list of token values per sequence.

A hypothesis state machine makes, appends to (writing K/V values unique to each token),
truncates, forks and frees sequences on a small pool, and after every step reads every
sequence back through its block table: a fork writing into a shared block would change
its parent's values here, so copy-on-write is proven, not assumed. `check()` must hold
throughout, and a full pool must raise KVPoolFullError having changed nothing.

The same machine drives the prefix cache: it names sequences' full blocks by the hashes of
their token values and starts new sequences from cache hits of earlier ones (live or freed).
Reading those back proves a cached block is never overwritten, by an append, a truncate
then append, or a reuse after eviction that forgot the hash.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from refinfer.config import ModelConfig, RopeScaling
from refinfer.errors import InvalidParameterError, KVPoolFullError, RefinferError
from refinfer.kv_pool import KVPool, hash_blocks

L, KVH, HD = 2, 2, 3
N_BLOCKS, BS = 8, 4  # the state machine's pool: small, so that caching meets eviction


def tiny_config() -> ModelConfig:
    """A config with just the sizes the pool reads: L layers, KVH heads of HD."""
    return ModelConfig(
        architecture="llama", n_layers=L, dim=KVH * HD, n_heads=KVH, n_kv_heads=KVH,
        head_dim=HD, ffn_dim=8, vocab_size=16, context_length=64, rope_base=10000.0,
        rope_base_local=None, rope_dim=HD - 1, rope_scaling=RopeScaling(), norm_eps=1e-5,
        sliding_window=None, tied_embeddings=True, attention_scale=HD**-0.5,
    )  # fmt: skip


def keys_of(values: list[int]) -> np.ndarray:
    """float32[L, len(values), KVH, HD]: keys unique to each token value; its values are -keys."""
    ramp = np.arange(L * KVH * HD, dtype=np.float32).reshape(L, 1, KVH, HD)
    return np.asarray(values, np.float32).reshape(1, -1, 1, 1) * 100 + ramp


def stored(pool: KVPool, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K and V at the flat slots, every layer: float32[L, len(slots), KVH, HD] each."""
    k, v = zip(*(pool.read(layer, slots) for layer in range(L)), strict=True)
    return np.stack(k), np.stack(v)


def read_back(pool: KVPool, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V of seq read through its block table: float32[L, length, KVH, HD] each."""
    table, bs = np.array(pool.block_table(seq), np.int64), pool.block_size
    p = np.arange(pool.length(seq))
    return stored(pool, table[p // bs] * bs + p % bs)


def snapshot(pool: KVPool) -> tuple:
    """Everything a failed append must leave as it was."""
    tables = {s: (pool.block_table(s), pool.length(s)) for s in pool._seqs}
    return tables, pool.ref_count.copy(), list(pool._free), pool.k_cache.copy()


class PoolMachine(RuleBasedStateMachine):
    """Random pool operations, checked against `self.model`: seq -> token values."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = KVPool(tiny_config(), n_blocks=N_BLOCKS, block_size=BS)
        self.model: dict[int, list[int]] = {}
        self.next_value = 1
        self.cached_values: list[list[int]] = []  # token values of sequences when cached
        self.block_values: dict[bytes, list[int]] = {}  # block hash -> the block's values

    def pick(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.model)))

    @rule()
    def new_sequence(self) -> None:
        seq = self.pool.new_sequence()
        assert seq not in self.model and self.pool.length(seq) == 0
        self.model[seq] = []

    @precondition(lambda self: self.model)
    @rule(data=st.data(), n=st.integers(0, 9))
    def append(self, data: st.DataObject, n: int) -> None:
        seq = self.pick(data)
        length, bs = len(self.model[seq]), self.pool.block_size
        table = self.pool.block_table(seq)
        shared_or_cached = table and (
            self.pool.ref_count[table[-1]] > 1 or table[-1] in self.pool._block_hash
        )
        copy = n > 0 and length % bs != 0 and shared_or_cached
        needed = -(-(length + n) // bs) - len(table) + copy
        assert self.pool.blocks_needed(seq, n) == needed
        before = snapshot(self.pool)
        if needed > self.pool.n_free_blocks:
            with pytest.raises(KVPoolFullError, match=f"{needed} blocks needed"):
                self.pool.append(seq, n)
            after = snapshot(self.pool)
            assert after[0] == before[0] and after[2] == before[2]
            assert np.array_equal(after[1], before[1]) and np.array_equal(after[3], before[3])
            return
        slots = self.pool.append(seq, n)
        assert slots.dtype == np.int64 and slots.shape == (n,)
        values = list(range(self.next_value, self.next_value + n))
        self.next_value += n
        k = keys_of(values)  # (L, n, KVH, HD)
        for layer in range(L):
            self.pool.write(layer, slots, k[layer], -k[layer])
        self.model[seq] += values

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        seq = self.pick(data)
        new_length = data.draw(st.integers(0, len(self.model[seq])))
        self.pool.truncate(seq, new_length)
        del self.model[seq][new_length:]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        seq = self.pick(data)
        free_before = self.pool.n_free_blocks
        child = self.pool.fork(seq)
        assert self.pool.block_table(child) == self.pool.block_table(seq)
        assert self.pool.n_free_blocks == free_before  # sharing, not copying
        self.model[child] = list(self.model[seq])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = self.pick(data)
        self.pool.free(seq)
        del self.model[seq]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def cache(self, data: st.DataObject) -> None:
        seq = self.pick(data)
        values = self.model[seq]
        hashes = hash_blocks(values, BS)
        self.pool.cache_blocks(seq, hashes)
        for i, h in enumerate(hashes):
            self.block_values[h] = values[i * BS : (i + 1) * BS]
        if len(values) >= BS:
            self.cached_values.append(list(values))

    @precondition(lambda self: self.cached_values)
    @rule(data=st.data())
    def new_sequence_from_cache(self, data: st.DataObject) -> None:
        values = data.draw(st.sampled_from(self.cached_values))
        values = values[: data.draw(st.integers(BS, len(values)))]
        hashes = hash_blocks(values, BS)
        hits = self.pool.cached_prefix(hashes)
        free_before = self.pool.n_free_blocks
        evictable = sum(self.pool.ref_count[b] == 0 for b in hits)
        seq = self.pool.new_sequence(cached=hits)
        assert self.pool.n_free_blocks == free_before - evictable  # hits leave the queue
        assert self.pool.length(seq) == len(hits) * self.pool.block_size
        self.model[seq] = values[: self.pool.length(seq)]

    @invariant()
    def contents_match_the_model(self) -> None:
        self.pool.check()
        for seq, values in self.model.items():
            assert self.pool.length(seq) == len(values)
            k, v = read_back(self.pool, seq)
            np.testing.assert_array_equal(k, keys_of(values))
            np.testing.assert_array_equal(v, -keys_of(values))
        seqs = sorted(self.model)
        tables = self.pool.block_tables(seqs)
        for row, seq in zip(tables, seqs, strict=True):
            table = self.pool.block_table(seq)
            assert list(row[: len(table)]) == table and np.all(row[len(table) :] == -1)

    @invariant()
    def cached_blocks_are_never_overwritten(self) -> None:
        for h, b in self.pool._cached.items():
            k = keys_of(self.block_values[h])  # (L, BS, KVH, HD)
            in_pool = stored(self.pool, b * self.pool.block_size + np.arange(self.pool.block_size))
            np.testing.assert_array_equal(in_pool[0], k)
            np.testing.assert_array_equal(in_pool[1], -k)

    @invariant()
    def utilisation_is_consistent(self) -> None:
        s = self.pool.stats()
        assert s.slots_allocated == (N_BLOCKS - s.n_free_blocks) * BS
        assert s.slots_used <= s.slots_allocated
        assert s.slots_used >= max((len(v) for v in self.model.values()), default=0)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_cache_hit_takes_a_free_block_out_of_the_middle_and_evicts_lru() -> None:
    pool = KVPool(tiny_config(), n_blocks=4, block_size=4)
    a, b = pool.new_sequence(), pool.new_sequence()
    pool.append(a, 8)  # blocks 0, 1
    pool.append(b, 4)  # block 2
    pool.cache_blocks(a, hash_blocks(list(range(8)), 4))
    pool.cache_blocks(b, hash_blocks([9, 9, 9, 9], 4))
    pool.free(a)  # queue: 3, then a's blocks tail first: 1, 0
    pool.free(b)  # queue: 3, 1, 0, 2
    assert pool.stats().n_cached_blocks == 3 and pool.n_free_blocks == 4
    hits = pool.cached_prefix(hash_blocks(list(range(8)) + [5, 5, 5, 5], 4))
    assert hits == [0, 1]  # the third block was never cached
    c = pool.new_sequence(cached=hits[:1])  # takes block 0 out of the middle
    assert list(pool._free) == [3, 1, 2] and pool.length(c) == 4
    d = pool.new_sequence()
    pool.append(d, 8)  # takes 3, then evicts 1: the least recently freed cached block
    assert pool.block_table(d) == [3, 1]
    assert pool.cached_prefix(hash_blocks(list(range(8)), 4)) == [0]  # block 1 is gone
    assert pool.cached_prefix(hash_blocks([9, 9, 9, 9], 4)) == [2]  # still reusable
    pool.check()


def test_a_cached_block_cut_short_is_copied_before_it_is_written() -> None:
    pool = KVPool(tiny_config(), n_blocks=4, block_size=4)
    a = pool.new_sequence()
    pool.append(a, 4)
    pool.cache_blocks(a, hash_blocks([1, 2, 3, 4], 4))
    pool.truncate(a, 2)  # block 0 is partial for a, still cached with 4 tokens
    assert pool.blocks_needed(a, 1) == 1
    np.testing.assert_array_equal(pool.append(a, 1), [4 + 2])  # written into a copy, block 1
    assert pool.cached_prefix(hash_blocks([1, 2, 3, 4], 4)) == [0]
    pool.check()


def test_fresh_pool_hands_out_lowest_ids_then_fifo() -> None:
    pool = KVPool(tiny_config(), n_blocks=6, block_size=4)
    assert pool.k_cache.shape == (L, 6, KVH, HD, 4) and pool.k_cache.dtype == np.float32
    assert pool.v_cache.shape == (L, 6, KVH, 4, HD) and pool.v_cache.dtype == np.float32
    a, b = pool.new_sequence(), pool.new_sequence()
    np.testing.assert_array_equal(pool.append(a, 6), [0, 1, 2, 3, 4, 5])  # blocks 0, 1
    np.testing.assert_array_equal(pool.append(b, 1), [8])  # block 2
    pool.free(a)  # queue: 3, 4, 5, then a's blocks tail first: 1, 0
    c = pool.new_sequence()
    pool.append(c, 20)
    assert pool.block_table(c) == [3, 4, 5, 1, 0]


def test_full_pool_error_message_and_nothing_changed() -> None:
    pool = KVPool(tiny_config(), n_blocks=3, block_size=4)
    seq = pool.new_sequence()
    pool.append(seq, 5)
    with pytest.raises(KVPoolFullError) as e:
        pool.append(seq, 8)  # 13 tokens need 4 blocks: 2 more, 1 free
    assert isinstance(e.value, RefinferError)
    assert str(e.value).startswith("KV pool full: 2 blocks needed, 1 free (of 3 blocks of 4")
    assert "free finished sequences" in str(e.value)
    assert pool.length(seq) == 5 and pool.block_table(seq) == [0, 1] and pool.n_free_blocks == 1


def test_copy_on_write_needs_a_free_block() -> None:
    pool = KVPool(tiny_config(), n_blocks=2, block_size=4)
    parent = pool.new_sequence()
    pool.append(parent, 6)  # blocks 0 and 1 (half full): the pool is full
    child = pool.fork(parent)
    with pytest.raises(KVPoolFullError, match="1 blocks needed, 0 free"):
        pool.append(child, 1)  # would write into shared block 1
    pool.truncate(child, 4)  # now child's last block is full: no copy needed
    assert pool.blocks_needed(child, 1) == 1 and pool.ref_count.tolist() == [2, 1]
    pool.free(parent)
    np.testing.assert_array_equal(pool.append(child, 1), [4])  # block 1 came back
    pool.check()


def test_utilisation_counts_shared_tokens_once() -> None:
    pool = KVPool(tiny_config(), n_blocks=8, block_size=4)
    assert pool.stats().utilisation == 0.0
    a = pool.new_sequence()
    pool.append(a, 6)  # 2 blocks, 6 of 8 slots
    b = pool.fork(a)
    s = pool.stats()
    assert (s.slots_used, s.slots_allocated, s.n_free_blocks) == (6, 8, 6)
    pool.append(b, 1)  # copy-on-write: b's block 1 is private now, 3 of its 4 slots used
    s = pool.stats()
    assert (s.slots_used, s.slots_allocated) == (6 + 3, 12) and s.utilisation == 0.75
    assert pool.n_free_blocks == s.n_free_blocks == 5


@pytest.mark.parametrize("n_blocks, block_size", [(0, 16), (4, 0)])
def test_bad_pool_sizes(n_blocks: int, block_size: int) -> None:
    with pytest.raises(InvalidParameterError, match="at least one block"):
        KVPool(tiny_config(), n_blocks, block_size)


def test_unknown_sequence_and_bad_truncate() -> None:
    pool = KVPool(tiny_config(), n_blocks=2, block_size=4)
    seq = pool.new_sequence()
    pool.free(seq)
    with pytest.raises(KeyError, match="not in the KV pool"):
        pool.length(seq)
    seq = pool.new_sequence()
    with pytest.raises(ValueError, match="cannot truncate"):
        pool.truncate(seq, 1)
