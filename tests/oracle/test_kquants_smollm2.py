"""SmolLM2 quantised by llama.cpp (K-quants, IQ4_XS): the engine against the reference.

The files come from llama.cpp's own quantiser (tests/llama_cpp_files.py; skipped
without llama-cpp-python, which `make peers` installs and CI runs), so their blocks
and their per-tensor type choices are llama.cpp's, not refinfer's. Each preset
mixes formats (SmolLM2's rows of 576 weights are no multiple of 256, so llama.cpp
falls back to Q4_0, Q5_0, Q5_1, Q8_0 or IQ4_NL for them), and the type test pins
that mix: a loader that typed tensors by the file's preset would fail it (refinfer's
type of each tensor must be gguf-py's), and a forward pass that chose its kernel by
the preset would disagree with the reference, which dequantises tensor by tensor.

Tolerances, as in tests/test_model.py for SmolLM2 (30 layers, logits up to ~30):
- engine (float32) vs reference (float64) on the same dequantised weights:
  max |diff| <= 1e-3 over the prompt and the teacher-forced continuation (observed
  3e-5 to 7e-5). Decoding bugs in one matrix (blk.3.ffn_down, Q4_K, of Q4_K_M) move
  logits by far more: its nibbles swapped 13, its 12 scale bytes reversed 22, every
  d 1 % off 0.26, one super-block's d doubled 0.26 (in a Q6_K matrix of layer 0, 2e-3);
- greedy decoding emits the reference's argmax at every step;
- refinfer's NumPy dequantiser equals gguf-py's (an independent implementation)
  bit for bit on the smallest matrix of each format in each file.
Cost: one reference pass (float64, 5-10 s) per file; about two minutes in all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from gguf import quants
from llama_cpp_files import PRESETS, make_preset

from refinfer import reference
from refinfer.gguf import GGUFFile, read_gguf
from refinfer.model import Model
from refinfer.tokenizer import Tokenizer

pytest.importorskip("llama_cpp")

SMOLLM2_ATOL = 1e-3
PROMPT = "The three primary colours of light are red, green and"  # 11 tokens -> " blue."
MAX_NEW_TOKENS = 4

# The tensor types each preset gives SmolLM2-135M (llama-cpp-python 0.3.36, counts of
# its 272 tensors); a file must hold all of its set (a superset is allowed). Only the
# 30 ffn_down matrices (rows of 1536) can take a K-quant; the rest fall back. The
# recipes raise some types: Q3_K_M's ffn_down are Q4_K/Q5_K and Q2_K's are Q3_K, so
# neither file holds its namesake type; q2_k_pure is there for Q2_K.
EXPECTED_TYPES = {
    "q4_k_m": {"f32", "q4_k", "q6_k", "q5_0", "q8_0"},  # 61 16 14 166 15
    "q5_k_m": {"f32", "q5_k", "q6_k", "q5_1", "q8_0"},  # 61 16 14 166 15
    "q6_k": {"f32", "q6_k", "q8_0"},  # 61 30 181
    "q3_k_m": {"f32", "q4_k", "q5_k", "q4_0", "q5_0", "q5_1", "q8_0"},  # 61 29 1 120 58 2 1
    "q2_k": {"f32", "q3_k", "q4_0", "q8_0"},  # 61 30 180 1
    "q2_k_pure": {"f32", "q2_k", "q4_0"},  # 61 30 181
    "iq4_xs": {"f32", "iq4_xs", "q5_k", "iq4_nl", "q8_0"},  # 61 27 3 180 1
}
NEW_FORMATS = {"q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"}


def test_the_presets_cover_every_new_format() -> None:
    assert set(EXPECTED_TYPES) == set(PRESETS)
    assert set().union(*EXPECTED_TYPES.values()) >= NEW_FORMATS


@dataclass
class Opened:
    """One preset's file, opened once: the GGUF (with gguf-py's reader) and the Model."""

    preset: str
    gf: GGUFFile
    model: Model


@pytest.fixture(scope="module", params=list(PRESETS))
def opened(request) -> Opened:
    """The llama.cpp-made file of a preset (made once, cached in models/), as refinfer.load
    opens it, keeping the GGUFFile so that tests can read gguf-py's view of the tensors."""
    gf = read_gguf(make_preset(request.param))
    return Opened(request.param, gf, Model(gf, Tokenizer.from_metadata(gf.metadata)))


def test_each_preset_mixes_the_expected_types(opened: Opened) -> None:
    tensors = opened.gf.tensors
    for t in opened.gf.reader.tensors:  # gguf-py's reading of each tensor's type
        assert tensors[t.name].format.ggml_type == t.tensor_type, t.name
        assert tensors[t.name].format.name == t.tensor_type.name.lower(), t.name
    found = {t.format.name for t in tensors.values()}
    missing = EXPECTED_TYPES[opened.preset] - found
    assert not missing, f"{opened.gf.path.name} holds {sorted(found)}, lacking {sorted(missing)}"


def test_dequantize_equals_gguf_py_on_llama_cpp_blocks(opened: Opened) -> None:
    by_format = {}
    for t in opened.gf.tensors.values():  # the smallest matrix of each format
        if len(t.shape) == 2 and t.format.block_size > 1:
            best = by_format.get(t.format.name)
            if best is None or t.n_elements < best.n_elements:
                by_format[t.format.name] = t
    assert set(by_format) >= EXPECTED_TYPES[opened.preset] - {"f32"}
    for t in by_format.values():
        want = quants.dequantize(t.data, t.format.ggml_type)
        np.testing.assert_array_equal(t.dequantize(), want, err_msg=f"{t.name} ({t.format.name})")


@dataclass
class Run:
    """One preset's greedy run and the reference's logits over the same tokens."""

    model: Model
    prompt: list[int]
    generated: list[int]
    ids: list[int]  # prompt + generated[:-1]: every token the engine's logits were taken at
    want: np.ndarray  # float64 reference logits[len(ids), V]


@pytest.fixture(scope="module")
def run(opened: Opened) -> Run:
    m = opened.model
    prompt = m.tokenizer.encode(PROMPT)
    generated = m.generate(prompt, max_new_tokens=MAX_NEW_TOKENS).ids
    ids = prompt + generated[:-1]
    return Run(m, prompt, generated, ids, reference.logits(m, ids))


def test_engine_equals_reference(run: Run) -> None:
    got = run.model.logits(run.ids)
    diff = np.abs(got - run.want).max()
    assert diff <= SMOLLM2_ATOL, f"max |engine - reference| = {diff:.3g}"


def test_greedy_continuation_is_the_references(run: Run) -> None:
    # Teacher-forced: the reference's argmax at the last prompt position and at every
    # generated token must be the token greedy decoding chose next.
    assert len(run.generated) == MAX_NEW_TOKENS
    want = run.want[len(run.prompt) - 1 :].argmax(axis=-1)
    assert run.generated == want.tolist()
