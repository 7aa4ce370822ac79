"""The paged KV pool: where every sequence's keys and values live between forward calls.

In the data flow it sits beside the model: `model.forward(batch, kv_pool)` asks the pool
for slots (`append`), writes each new token's K and V there, and hands the attention kernel
`k_cache[l]`, `v_cache[l]` and the block tables to read them back. Decoding strategies use
the rest: `truncate` rolls back rejected draft tokens, `fork` branches a sequence without
copying, `free` ends one; the batching engine adds prefix caching (`cache_blocks`,
`cached_prefix`, `new_sequence(cached=...)`).

The design is vLLM's block manager, small:
- All storage is allocated once, at start-up: `n_blocks` blocks of `BS` token slots, for
  every layer, in one contiguous array for K and one for V. A flat slot is
  `block * BS + offset`; `write` stores tokens' K and V at their slots, `read` reads
  them back. Within a block, K is stored transposed, as the attention kernel reads it
  (its keys are the vector lanes of the scores): k_cache[l, block] is [KVH, HD, BS] and
  v_cache[l, block] is [KVH, BS, HD], so token `offset`'s keys are
  k_cache[l, block, :, :, offset] and its values v_cache[l, block, :, offset].
- A sequence is a block table (the blocks holding its tokens, in order) and a length.
- Blocks are shared between sequences by reference count (`fork`); a shared block is never
  written: before `append` writes into a shared, partially filled last block, the sequence
  gets a private copy of it (copy-on-write). Full shared blocks are never written again.
- Free blocks wait in a FIFO queue: `allocate` takes the block freed longest ago, a freed
  block goes to the back. At start-up the queue holds ids 0, 1, ..., n_blocks - 1 in order,
  so a fresh pool hands out the lowest ids first. The queue is an OrderedDict (a doubly
  linked list) so that the prefix cache can also take a block out of its middle in O(1),
  as vLLM's FreeKVCacheBlockQueue does; freed blocks are queued tail block first, so that
  the cache evicts a sequence's last tokens before its prefix.

Prefix caching (vLLM's automatic prefix caching). A full block is named by a chained hash
of its tokens and of every token before it:

    h_0 = H(b"", tokens[0:BS]),  h_i = H(h_{i-1}, tokens[i*BS:(i+1)*BS])   (`hash_blocks`)

so equal hashes mean equal prefixes, and so equal K/V (the forward pass is deterministic).
The owner of a sequence (who knows its tokens) names its computed full blocks with
`cache_blocks`; a new sequence whose tokens start with cached blocks takes them by
reference (`cached_prefix`, then `new_sequence(cached=...)`) and computes only the rest.
A block keeps its hash after its last reference is released: it waits in the free queue,
still reusable (a hit takes it out of the middle, O(1)), until `allocate` takes it from the
front and so evicts it: least recently freed first. A cached block is never written again:
appending into a cached, partially filled last block (possible after `truncate`) copies it
first, as for a shared one.

Invariants (`check` asserts them; tests/test_kv_pool.py drives them with hypothesis):
1. ref_count[b] == the number of block tables that contain b (a table holds b at most once);
2. a block is in the free queue exactly when ref_count[b] == 0;
3. so free blocks + blocks in use == n_blocks;
4. every table holds ceil(length / BS) blocks;
5. a failed `append` (KVPoolFullError) changes nothing: tables, lengths, counts, free queue;
6. the cache maps hash -> block and block -> hash one to one (`_cached`, `_block_hash`);
7. a sequence records hashes only for its full blocks: len(hashes) <= length // BS.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from refinfer.config import ModelConfig
from refinfer.errors import InvalidParameterError, KVPoolFullError


@dataclass
class _Sequence:
    """One sequence's view of the pool."""

    blocks: list[int] = field(default_factory=list)  # block ids, in token order
    length: int = 0  # tokens stored; the last block holds length - (len(blocks) - 1) * BS
    hashes: list[bytes] = field(default_factory=list)  # hashes of blocks[:len(hashes)], all full


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of how full the pool is."""

    n_blocks: int  # blocks in the pool
    n_free_blocks: int  # blocks in the free queue
    slots_used: int  # live tokens; a token in a shared block counts once
    slots_allocated: int  # (n_blocks - n_free_blocks) * BS
    n_cached_blocks: int = 0  # blocks with a prefix-cache hash, in use or free (evictable)

    @property
    def utilisation(self) -> float:
        """slots_used / slots_allocated: 1.0 when no slot is wasted, 0.0 when none is in use."""
        return self.slots_used / self.slots_allocated if self.slots_allocated else 0.0


BLOCK_SIZE = 16  # tokens per block unless a pool is made otherwise (vLLM's default too)


def blocks_for(n_tokens: int, block_size: int) -> int:
    """Blocks that hold n_tokens: ceil(n_tokens / BS)."""
    return -(-n_tokens // block_size)


def hash_blocks(tokens: Sequence[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """Chained hashes of the full blocks of tokens: h_i = sha256(h_{i-1} || tokens of block i).

    `parent` is the hash of the block before tokens[0] (b"" at the start of a sequence), so
    hashes can be extended as a sequence grows. SHA-256, not Python's 64-bit hash(): a
    collision would silently hand one prompt another's keys and values.
    """
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = np.asarray(tokens[start : start + block_size], np.int64).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        hashes.append(parent)
    return hashes


class KVPool:
    """Fixed-size blocks of K/V storage shared by all sequences; see the module docstring."""

    def __init__(self, config: ModelConfig, n_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        """Allocate K and V for n_blocks blocks of block_size tokens, every layer, once."""
        if n_blocks < 1 or block_size < 1:
            raise InvalidParameterError(
                f"a KV pool needs at least one block of at least one token, got {n_blocks} "
                f"blocks of {block_size}; pass positive n_blocks and block_size"
            )
        L, KVH, HD = config.n_layers, config.n_kv_heads, config.head_dim
        self.config = config
        self.n_blocks = n_blocks
        self.block_size = block_size
        # k_cache[l], v_cache[l]: what attention reads for layer l (see the module docstring)
        self.k_cache = np.zeros((L, n_blocks, KVH, HD, block_size), np.float32)  # K transposed
        self.v_cache = np.zeros((L, n_blocks, KVH, block_size, HD), np.float32)
        self.ref_count = np.zeros(n_blocks, np.int32)  # (n_blocks,) tables holding each block
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n_blocks))  # FIFO
        self._seqs: dict[int, _Sequence] = {}
        self._next_seq_id = 0
        self._cached: dict[bytes, int] = {}  # prefix cache: block hash -> block
        self._block_hash: dict[int, bytes] = {}  # its inverse: block -> hash

    # -- sequences ---------------------------------------------------------------------------

    def new_sequence(self, cached: Sequence[int] = ()) -> int:
        """Start a sequence and return its id; ids are never reused.

        It is empty, or, given `cached` (blocks from `cached_prefix`), holds their
        len(cached) * BS tokens by reference: each block gains a reference and leaves the
        free queue if it was there (a cache hit, O(1) per block).
        """
        seq = self._next_seq_id
        self._next_seq_id += 1
        for b in cached:
            if self.ref_count[b] == 0:
                del self._free[b]  # out of the middle of the queue: no longer evictable
            self.ref_count[b] += 1
        hashes = [self._block_hash[b] for b in cached]
        self._seqs[seq] = _Sequence(list(cached), len(cached) * self.block_size, hashes)
        return seq

    def length(self, seq: int) -> int:
        """Tokens stored for seq."""
        return self._get(seq).length

    def block_table(self, seq: int) -> list[int]:
        """The blocks of seq in token order (a copy): token p is in block_table[p // BS]."""
        return list(self._get(seq).blocks)

    def block_tables(self, seqs: Sequence[int]) -> np.ndarray:
        """int32[len(seqs), max blocks] of the seqs' block tables, padded with -1 (for kernels)."""
        tables = [self._get(seq).blocks for seq in seqs]
        width = max((len(t) for t in tables), default=0)
        out = np.full((len(tables), width), -1, np.int32)  # (S, max blocks)
        for row, blocks in zip(out, tables, strict=True):
            row[: len(blocks)] = blocks
        return out

    # -- keys and values -----------------------------------------------------------------------

    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v float32[n, KVH, HD] of n tokens at their flat slots int64[n] of `layer`."""
        block, offset = np.divmod(slots, self.block_size)  # (n,), (n,)
        self.k_cache[layer][block, :, :, offset] = k  # (n, KVH, HD) <- K[block, :, :, offset]
        self.v_cache[layer][block, :, offset] = v  # (n, KVH, HD) <- V[block, :, offset]

    def read(self, layer: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k, v), each float32[n, KVH, HD]: copies of what `write` stored at the slots."""
        block, offset = np.divmod(slots, self.block_size)
        return self.k_cache[layer][block, :, :, offset], self.v_cache[layer][block, :, offset]

    # -- growing and shrinking -----------------------------------------------------------------

    def blocks_needed(self, seq: int, n: int) -> int:
        """Free blocks `append(seq, n)` would take: new blocks, plus one for a copy-on-write."""
        s = self._get(seq)
        new_blocks = blocks_for(s.length + n, self.block_size) - len(s.blocks)
        return new_blocks + int(self._needs_copy(s, n))

    def append(self, seq: int, n: int) -> np.ndarray:
        """Make room for n more tokens of seq; return int64[n], their flat slots, in order.

        The caller writes the tokens' keys and values there with `write`.
        All or nothing: if the free queue is too short, raise KVPoolFullError and change nothing.
        O(n + blocks taken).
        """
        if n < 0:
            raise ValueError(f"cannot append {n} tokens")
        s = self._get(seq)
        needed = self.blocks_needed(seq, n)
        if needed > len(self._free):
            raise KVPoolFullError(
                f"KV pool full: {needed} blocks needed, {len(self._free)} free (of "
                f"{self.n_blocks} blocks of {self.block_size} tokens); free finished sequences, "
                f"shorten the request, or make the pool larger"
            )
        if self._needs_copy(s, n):
            self._copy_last_block(s)
        while len(s.blocks) < blocks_for(s.length + n, self.block_size):
            s.blocks.append(self._allocate())
        positions = np.arange(s.length, s.length + n, dtype=np.int64)  # (n,)
        # slot = block_table[p // BS] * BS + p % BS
        blocks = np.asarray(s.blocks, np.int64)[positions // self.block_size]
        s.length += n
        return blocks * self.block_size + positions % self.block_size

    def truncate(self, seq: int, new_length: int) -> None:
        """Keep the first new_length tokens of seq; blocks no longer needed are released.

        Rolls back rejected draft tokens. The K/V values kept are untouched. O(blocks released).
        """
        s = self._get(seq)
        if not 0 <= new_length <= s.length:
            raise ValueError(f"cannot truncate sequence {seq} of {s.length} tokens to {new_length}")
        keep = blocks_for(new_length, self.block_size)
        self._release(s.blocks[keep:])
        del s.blocks[keep:]
        del s.hashes[new_length // self.block_size :]  # a block cut short is no longer full
        s.length = new_length

    def fork(self, seq: int) -> int:
        """A new sequence with the same tokens, sharing every block of seq. O(blocks), no copy."""
        parent = self._get(seq)
        child = self.new_sequence()
        self._seqs[child] = _Sequence(list(parent.blocks), parent.length, list(parent.hashes))
        self.ref_count[parent.blocks] += 1  # a table holds each block once: no repeated index
        return child

    def free(self, seq: int) -> None:
        """End seq: each of its blocks loses a reference; blocks left with none become free.

        Free blocks that are cached keep their hash until evicted (see the module docstring).
        """
        self._release(self._get(seq).blocks)
        del self._seqs[seq]

    # -- prefix caching ------------------------------------------------------------------------

    def cache_blocks(self, seq: int, hashes: Sequence[bytes]) -> None:
        """Name seq's full blocks by `hashes` (from `hash_blocks` of its tokens) for reuse.

        hashes[i] belongs to block_table[i]; those beyond the full blocks are ignored, those
        named before are skipped. A hash already naming another block (the same prefix
        computed twice) stays with that block. O(new full blocks).
        """
        s = self._get(seq)
        for i in range(len(s.hashes), min(len(hashes), s.length // self.block_size)):
            h, b = hashes[i], s.blocks[i]
            assert self._block_hash.get(b, h) == h, "one block named by two hashes"
            if h not in self._cached and b not in self._block_hash:
                self._cached[h], self._block_hash[b] = b, h
            s.hashes.append(h)

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of leading `hashes` in the cache. O(hits)."""
        blocks = []
        for h in hashes:
            if h not in self._cached:
                break
            blocks.append(self._cached[h])
        return blocks

    # -- figures and invariants ----------------------------------------------------------------

    @property
    def n_free_blocks(self) -> int:
        """Blocks in the free queue."""
        return len(self._free)

    def stats(self) -> PoolStats:
        """Blocks free, live token slots and allocated slots (see PoolStats). O(blocks in use)."""
        fill: dict[int, int] = {}  # block -> most slots any sequence uses in it
        for s in self._seqs.values():
            for i, b in enumerate(s.blocks):
                used = min(self.block_size, s.length - i * self.block_size)
                fill[b] = max(fill.get(b, 0), used)
        n_free = len(self._free)
        allocated = (self.n_blocks - n_free) * self.block_size
        return PoolStats(
            self.n_blocks, n_free, sum(fill.values()), allocated, len(self._block_hash)
        )

    def check(self) -> None:
        """Assert invariants 1-4, 6, 7 of the module docstring. O(n_blocks + blocks in use)."""
        counts = np.zeros(self.n_blocks, np.int64)  # (n_blocks,) tables holding each block
        for s in self._seqs.values():
            assert len(s.blocks) == blocks_for(s.length, self.block_size), "table length"
            assert len(set(s.blocks)) == len(s.blocks), "a block twice in one table"
            assert len(s.hashes) <= s.length // self.block_size, "a hash for a partial block"
            np.add.at(counts, s.blocks, 1)
        assert np.array_equal(counts, self.ref_count), "ref_count != tables holding the block"
        free = np.fromiter(self._free, np.int64, len(self._free))
        assert np.all(self.ref_count[free] == 0), "a free block has references"
        assert len(free) + np.count_nonzero(self.ref_count) == self.n_blocks, "blocks leaked"
        assert len(self._cached) == len(self._block_hash), "cache maps not one to one"
        assert all(self._block_hash[b] == h for h, b in self._cached.items()), "cache maps differ"

    # -- internals -----------------------------------------------------------------------------

    def _get(self, seq: int) -> _Sequence:
        """The state of seq, or a KeyError naming it."""
        try:
            return self._seqs[seq]
        except KeyError:
            raise KeyError(f"sequence {seq} is not in the KV pool (freed or never made)") from None

    def _needs_copy(self, s: _Sequence, n: int) -> bool:
        """Whether appending n tokens would write into a shared or cached, partial last block."""
        if n == 0 or s.length % self.block_size == 0:
            return False
        last = s.blocks[-1]
        return bool(self.ref_count[last] > 1) or last in self._block_hash

    def _copy_last_block(self, s: _Sequence) -> None:
        """Copy-on-write: give s a private copy of its last block (every layer, K and V)."""
        old, new = s.blocks[-1], self._allocate()
        used = s.length - (len(s.blocks) - 1) * self.block_size  # tokens in the last block
        self.k_cache[:, new, ..., :used] = self.k_cache[:, old, ..., :used]  # (L, KVH, HD, used)
        self.v_cache[:, new, :, :used] = self.v_cache[:, old, :, :used]  # (L, KVH, used, HD)
        self._release([old])
        s.blocks[-1] = new

    def _allocate(self) -> int:
        """Take the block freed longest ago, with one reference, evicting its hash. O(1)."""
        block, _ = self._free.popitem(last=False)
        if block in self._block_hash:
            del self._cached[self._block_hash.pop(block)]
        self.ref_count[block] = 1
        return block

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; queue those left with none, last block first."""
        for b in reversed(blocks):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self._free[b] = None
