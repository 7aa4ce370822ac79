"""reference.py against HF transformers, an independent implementation.

Tiny random Llama and Mistral models built in HF are exported to GGUF as llama.cpp's
converter does and must give HF's float64 logits; the real SmolLM2, loaded by both
from the same GGUF, must too.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hf_export import export_hf_to_gguf

from refinfer import reference
from refinfer.gguf import GGUFFile, read_gguf
from refinfer.model import Model
from refinfer.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Both sides compute in float64 from the same float32 weights, but HF builds its RoPE
# cos/sin tables in float32 (relative error ~6e-8), which leaves ~1e-8 in the logits of the
# tiny models (observed 6e-8) and ~1e-5 in SmolLM2's (observed 9e-6; logits reach ~30).
# A wrong RoPE pairing, mask or GQA mapping moves logits by > 1e-2.
TINY_ATOL = 1e-6
SMOLLM2_ATOL = 1e-4
# Both in float32, summing in different orders over 30 layers: observed 7e-5 (logits ~30).
ENGINE_HF_ATOL = 1e-3


def _tiny(kind: str, seed: int):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    if kind == "mistral":
        config = transformers.MistralConfig(sliding_window=5, **common)
        model = transformers.MistralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # float32 values, as the GGUF will store them; computed in float64
        for p in model.parameters():
            p.copy_(p.float())
    return model.double().eval()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_tiny_random_model_matches_hf(kind: str, tmp_path: Path) -> None:
    model = _tiny(kind, seed=3)
    gf = read_gguf(export_hf_to_gguf(model, tmp_path / f"{kind}.gguf"))
    if kind == "mistral":
        assert gf.config.sliding_window == 5
    ids = np.random.default_rng(0).integers(0, 97, 19)  # longer than the window
    with torch.no_grad():
        hf = model(torch.tensor(ids[None])).logits[0].numpy()
    ours = reference.logits(gf, ids)
    np.testing.assert_allclose(ours, hf, rtol=0, atol=TINY_ATOL)


def test_window_changes_the_result(tmp_path: Path) -> None:
    # The Mistral test can fail: without the window the logits differ past position 5.
    model = _tiny("mistral", seed=3)
    gf = read_gguf(export_hf_to_gguf(model, tmp_path / "m.gguf"))
    ids = np.arange(12) % 97
    windowed = reference.logits(gf, ids)
    no_window = SimpleNamespace(
        config=dataclasses.replace(gf.config, sliding_window=None), tensors=gf.tensors
    )
    unwindowed = reference.logits(no_window, ids)
    np.testing.assert_allclose(windowed[:5], unwindowed[:5], rtol=0, atol=1e-12)
    assert np.abs(windowed[5:] - unwindowed[5:]).max() > 1e-3


@pytest.fixture(scope="module")
def hf_smollm2(smollm2: GGUFFile):
    """HF's SmolLM2, loaded (dequantised by transformers) from the same GGUF, float64."""
    pytest.importorskip("accelerate")  # HF's GGUF loader needs it
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.path.parent, gguf_file=smollm2.path.name, dtype=torch.float64
    ).eval()


SMOLLM2_IDS = [504, 3575, 282, 4649, 314]  # "The capital of France is" (SmolLM2 adds no BOS)


def test_smollm2_reference_matches_hf(smollm2: GGUFFile, hf_smollm2) -> None:
    with torch.no_grad():
        hf = hf_smollm2(torch.tensor([SMOLLM2_IDS])).logits[0].numpy()
    ours = reference.logits(smollm2, SMOLLM2_IDS)
    np.testing.assert_allclose(ours, hf, rtol=0, atol=SMOLLM2_ATOL)
    assert int(ours[-1].argmax()) == 7042  # " Paris"


def test_smollm2_engine_matches_hf_float32(smollm2: GGUFFile, hf_smollm2) -> None:
    # The fast engine (float32) against HF in float32: logits within ENGINE_HF_ATOL, and
    # the same 24 greedy tokens.
    m = Model(smollm2, Tokenizer.from_metadata(smollm2.metadata))
    hf32 = copy.deepcopy(hf_smollm2)  # .float() is refused for a model loaded from a GGUF
    for t in [*hf32.parameters(), *hf32.buffers()]:
        t.data = t.data.float()
    ids = m.tokenizer.encode("def fibonacci(n):\n    # return the n-th Fibonacci number\n")
    with torch.no_grad():
        hf = hf32(torch.tensor([ids])).logits[0].numpy()
        hf_greedy = hf32.generate(
            torch.tensor([SMOLLM2_IDS]), max_new_tokens=24, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, len(SMOLLM2_IDS):].tolist()  # fmt: skip
    assert np.abs(m.logits(ids) - hf).max() <= ENGINE_HF_ATOL
    out = m.generate(SMOLLM2_IDS, max_new_tokens=24)
    assert out.ids == hf_greedy[: len(out.ids)] and len(out.ids) >= 8
