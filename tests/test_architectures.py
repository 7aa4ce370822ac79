"""Every architecture of architectures.py keeps every invariant of DESIGN.md.

On tiny synthetic models of each row (gguf_factory writes the tensors its config
expects, with the metadata llama.cpp's converter writes), with and without windows:
- engine == reference (float32 fast path vs float64 NumPy) within TINY_ATOL, in F32
  and Q8_0; a wrong pairing, norm, bias, window or RoPE base moves logits by > 1e-2;
- bitwise determinism: prefill in chunks == token-by-token decode == one prefill,
  alone == batched with other sequences, one thread == many;
- every decoding strategy (prompt lookup, speculative with another model, self-
  speculative, lookahead, continuous batching) emits exactly plain greedy's tokens;
- the per-layer switches (Gemma 3's window pattern and RoPE bases) as llama.cpp sets
  them, and a file whose tensors contradict its architecture names the tensor.
That the switches compute what HF transformers computes is tests/test_architectures_hf.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numba
import numpy as np
import pytest

from gguf_factory import tiny_config, tiny_tensors, write_tiny_model
from refinfer import reference
from refinfer.architectures import ARCHITECTURES
from refinfer.decoding.generate import generate
from refinfer.errors import UnsupportedModelError
from refinfer.gguf import load_weights, read_gguf
from refinfer.model import Batch, Model

TINY_ATOL = 1e-4  # as tests/test_model.py: float32 rounding through 2-7 layers is ~1e-6

# name -> tiny_config options: one model per architecture row, plus windows and LongRoPE
VARIANTS = {
    "llama": {"arch": "llama"},
    "mistral": {"arch": "llama", "sliding_window": 5},
    "qwen2": {"arch": "qwen2", "tied": True},
    "qwen3": {"arch": "qwen3", "head_dim": 24},  # HD != D / H, as Qwen3's key_length
    # 7 layers: 0-4 local (window 5, RoPE base 10000), 5 global, 6 local again
    "gemma3": {"arch": "gemma3", "n_layers": 7, "n_kv_heads": 1, "head_dim": 32,
               "sliding_window": 5, "tied": True, "rope_base": 1e6},
    "phi3": {"arch": "phi3"},
    "phi3-longrope": {"arch": "phi3", "long_rope": True},
}  # fmt: skip
IDS = np.random.default_rng(1).integers(0, 128, 37)  # crosses two 16-token pool blocks


def tiny_model(path: Path, **options) -> Model:
    """A synthetic model without a vocabulary (forward and generate take ids)."""
    return Model(read_gguf(write_tiny_model(path, **options)), tokenizer=None)


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory) -> Model:
    path = tmp_path_factory.mktemp("arch") / f"{request.param}.gguf"
    return tiny_model(path, **VARIANTS[request.param])


# ---- engine == reference ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_equals_reference(variant: str, fmt: str, tmp_path: Path) -> None:
    m = tiny_model(tmp_path / "m.gguf", fmt=fmt, **VARIANTS[variant])
    assert m.config.architecture == VARIANTS[variant]["arch"]
    np.testing.assert_allclose(m.logits(IDS), reference.logits(m, IDS), rtol=0, atol=TINY_ATOL)


@pytest.mark.parametrize(
    "switch, variant",
    [("rope_neox", "qwen2"), ("qk_norm", "qwen3"), ("post_norms", "gemma3"),
     ("embedding_scale", "gemma3"), ("swa_pattern", "gemma3"), ("rope_base_local", "gemma3")],
)  # fmt: skip
def test_each_switch_matters(switch: str, variant: str, tmp_path: Path, monkeypatch) -> None:
    """The reference with one switch flipped is far from the engine: the tests can fail."""
    m = tiny_model(tmp_path / "m.gguf", **VARIANTS[variant])
    config = m.config
    if switch == "rope_base_local":  # read from the file into the config
        config = replace(config, rope_base_local=None)
    else:  # a row of ARCHITECTURES
        row = ARCHITECTURES[config.architecture]
        flipped = 0 if switch == "swa_pattern" else not getattr(row, switch)
        monkeypatch.setitem(ARCHITECTURES, row.name, replace(row, **{switch: flipped}))
    want = reference.logits(SimpleNamespace(config=config, tensors=m.tensors), IDS)
    monkeypatch.undo()
    assert np.abs(m.logits(IDS) - want).max() > 1e-2


# ---- bitwise determinism -----------------------------------------------------------


def test_prefill_chunks_and_decode_are_bitwise_equal(tiny: Model) -> None:
    whole = tiny.logits(IDS)
    pool = tiny.new_pool(len(IDS))
    seq = pool.new_sequence()
    chunks = [tiny.forward(Batch.append(pool, [(seq, p)]), pool) for p in (IDS[:11], IDS[11:])]
    np.testing.assert_array_equal(whole, np.concatenate(chunks))
    pool = tiny.new_pool(len(IDS))
    seq = pool.new_sequence()
    one_by_one = [tiny.forward(Batch.append(pool, [(seq, [t])]), pool) for t in IDS]
    np.testing.assert_array_equal(whole, np.concatenate(one_by_one))


def test_alone_equals_batched_with_others(tiny: Model) -> None:
    rng = np.random.default_rng(7)
    parts = [rng.integers(0, 128, n) for n in (21, 5, 33)]
    pool = tiny.new_pool(100)
    seqs = [pool.new_sequence() for _ in parts]
    batched = tiny.forward(Batch.append(pool, list(zip(seqs, parts, strict=True))), pool)
    np.testing.assert_array_equal(batched, np.concatenate([tiny.logits(p) for p in parts]))


def test_thread_count_does_not_change_logits(tiny: Model, logits_on_threads) -> None:
    one = logits_on_threads(tiny, IDS, 1)
    many = logits_on_threads(tiny, IDS, numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(one, many)


# ---- exact accelerated decoding ----------------------------------------------------------

PROMPTS = [list(IDS[:9]), [5, 6, 7, 8] * 5, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
STRATEGIES = {
    "prompt-lookup": {},
    "speculative": {"draft_model": "other"},  # another model of the same architecture
    "self-speculative": {"draft_layers": [0]},
    "lookahead": {"window": 2, "ngram": 3, "guesses": 2},
}


@pytest.mark.usefixtures("one_thread")
def test_every_strategy_emits_plain_greedy_tokens(tiny: Model, tmp_path: Path) -> None:
    # a draft of the same architecture and vocabulary, with other weights
    variant = next(v for v in VARIANTS.values() if v["arch"] == tiny.config.architecture)
    other = tiny_model(tmp_path / "other.gguf", seed=1, **variant)
    strategies = {
        decoding: {k: other if v == "other" else v for k, v in opts.items()}
        for decoding, opts in STRATEGIES.items()
    }
    for prompt in PROMPTS:
        plain = generate(tiny, prompt, 20)
        for decoding, opts in strategies.items():
            fast = generate(tiny, prompt, 20, decoding=decoding, adaptive=False, **opts)
            assert fast.ids == plain.ids, (decoding, prompt)
    batched = tiny.generate_batch(PROMPTS, max_seqs=3)
    assert [b.ids for b in batched] == [generate(tiny, p, 32).ids for p in PROMPTS]


# ---- per-layer switches and validation ---------------------------------------------


def test_gemma3_layers_alternate_local_and_global() -> None:
    cfg = read_gguf_config(**VARIANTS["gemma3"])
    assert [cfg.layer_window(i) for i in range(7)] == [5, 5, 5, 5, 5, None, 5]
    assert [cfg.layer_rope(i)[0] for i in range(7)] == [1e4] * 5 + [cfg.rope_base, 1e4]
    mistral = read_gguf_config(**VARIANTS["mistral"])
    assert [mistral.layer_window(i) for i in range(2)] == [5, 5]
    phi3 = read_gguf_config(arch="phi3", sliding_window=5)
    assert phi3.layer_window(0) is None  # llama.cpp ignores Phi-3's window


def read_gguf_config(**options):
    """The config refinfer reads back from a tiny file written with `options`."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return read_gguf(write_tiny_model(Path(d) / "m.gguf", **options)).config


@pytest.mark.parametrize(
    "variant, drop",
    [("qwen2", "blk.1.attn_k.bias"), ("qwen3", "blk.0.attn_q_norm.weight"),
     ("gemma3", "blk.3.post_ffw_norm.weight"), ("phi3", "blk.0.attn_qkv.weight")],
)  # fmt: skip
def test_missing_tensor_names_itself(variant: str, drop: str, tmp_path: Path) -> None:
    c = tiny_config(**VARIANTS[variant])
    tensors = tiny_tensors(c)
    del tensors[drop]
    path = write_tiny_model(tmp_path / "m.gguf", tensors=tensors, **VARIANTS[variant])
    with pytest.raises(UnsupportedModelError, match=f"tensor {drop} is missing"):
        load_weights(path)


def test_metadata_contradicting_tensors_names_field_and_tensor(tmp_path: Path) -> None:
    # key_length 24 says Q has 4 x 24 rows; the tensors were written for 4 x 16
    tensors = tiny_tensors(tiny_config(arch="qwen3"))
    path = write_tiny_model(tmp_path / "m.gguf", tensors=tensors, arch="qwen3", head_dim=24)
    with pytest.raises(
        UnsupportedModelError, match=r"blk\.0\.attn_q\.weight has shape .*key_length HD=24"
    ):
        load_weights(path)
