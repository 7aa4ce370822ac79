"""Every architecture refinfer runs, against HF transformers on tiny random models.

A tiny random HF model of each kind (Llama, Mistral, Qwen2 with q/k/v biases and tied
embeddings, Qwen3 with q/k norms and HD != D/H, Gemma 3 with its four norms, a window of
4 and a global layer, Phi-3 with fused qkv / gate_up, plain and LongRoPE) is written to
GGUF by hf_export (as llama.cpp's converter does) and run on 40 random ids, past the
window and past Phi-3 LongRoPE's 32 trained positions:

1. HF itself loads the GGUF back (its own GGUF reader) and gives bit-identical logits,
   so the file is right independently of refinfer. HF's reader cannot be told some
   things the converter writes or leaves out; those few are passed as config fields
   (HF_LOADER_FIELDS) or the kind is skipped (HF_LOADER_CANNOT).
2. reference.logits (float64) equals HF's float64 logits within REFERENCE_ATOL.
3. Model.logits (the float32 engine) equals them within ENGINE_ATOL.
4. With LLAMA_CPP_CONVERTER=path/to/convert_hf_to_gguf.py the real converter writes
   the same keys and bit-identical tensors as hf_export (about 15 s a model).

Tolerances. HF run "in float64" still has float32 islands: every RMSNorm casts the
hidden state to float32, eager attention takes its softmax in float32, and RoPE's
inv_freq and cos/sin are float32; that alone moves these logits (|logits| <= 8) by up to
6e-6. `hf_float64` removes the islands (float32 casts become float64 while HF runs;
cos/sin recomputed in float64 and checked against HF's own to 1e-5), and the weights are
exact float32 values (Gemma's w + 1 too), so both sides compute the same float64
function: observed 1e-14 for every kind. REFERENCE_ATOL = 1e-10 leaves room for
summation order over a few layers and is 1e8 below what a wrong pairing, norm, +1,
window or RoPE base does (> 1e-2; test_each_difference_matters). The one inexact input
is Phi-3's LongRoPE attn_factor, a float32 in the GGUF: HF is given that same rounded
value. The engine computes in float32 (observed up to ~1e-5 against |logits| <= 8);
ENGINE_ATOL = 1e-4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hf_export import (
    ARCHS,
    TINY_MODELS,
    arch_of,
    convert_with_llama_cpp,
    export_hf_to_gguf,
    model_fields,
    tiny_model,
)

from refinfer import reference
from refinfer.config import SUPPORTED_ARCHITECTURES
from refinfer.gguf import read_gguf
from refinfer.model import Model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE_ATOL = 1e-10
ENGINE_ATOL = 1e-4
N_IDS = 40  # > gemma3's window (4) and > phi3-longrope's original context (32)

# Config fields HF's GGUF reader does not take from the file (transformers 5.24): Qwen3's
# attention.key_length (it assumes D / H), Gemma 3's query_pre_attn_scalar (the converter
# does not write it; llama.cpp uses HD, HF's default is 256) and Phi-3's pad token (its
# default 32000 is outside a 128-token vocabulary).
HF_LOADER_FIELDS = {
    "qwen3": dict(head_dim=32),
    "gemma3": dict(query_pre_attn_scalar=32),
    "phi3": dict(pad_token_id=0),
}
HF_LOADER_CANNOT = {
    "mistral": "HF reads general.architecture 'llama' as Llama: no sliding window",
    "phi3-longrope": "HF's GGUF reader ignores rope_factors_long/short and attn_factor",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """kind -> (HF model, path of its GGUF, HF float64 logits on IDS), built once per kind."""
    cache: dict[str, tuple] = {}
    folder = tmp_path_factory.mktemp("arch")

    def get(kind: str):
        if kind not in cache:
            model = tiny_model(kind, seed=1)
            path = export_hf_to_gguf(model, folder / f"{kind}.gguf")
            cache[kind] = (model, path, hf_logits(model))
        return cache[kind]

    return get


IDS = np.random.default_rng(0).integers(0, 128, N_IDS)


def hf_logits(model) -> np.ndarray:
    """float64 logits[N_IDS, V] of an HF model on IDS, with HF's float32 islands (norms,
    softmax, RoPE tables) in float64 too."""
    with torch.no_grad(), hf_float64(model):
        return model(torch.tensor(IDS[None])).logits[0].numpy()


@contextlib.contextmanager
def hf_float64(model):
    """While inside: casts to float32 give float64, and each RotaryEmbedding's cos/sin
    are computed in float64 (after checking them against HF's float32 ones)."""
    to, softmax = torch.Tensor.to, torch.nn.functional.softmax

    def to64(self, *args, **kwargs):
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        return to(self, *args, **kwargs)

    def softmax64(x, dim=None, dtype=None, **kwargs):
        return softmax(x, dim=dim, dtype=torch.float64 if dtype is torch.float32 else dtype)

    ropes = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    with contextlib.ExitStack() as stack:
        for m in ropes:
            forward = types.MethodType(rope_forward64(m.forward), m)
            stack.enter_context(mock.patch.object(m, "forward", forward))
        stack.enter_context(mock.patch.object(torch.Tensor, "to", to64))
        stack.enter_context(mock.patch.object(torch.Tensor, "float", torch.Tensor.double))
        stack.enter_context(mock.patch.object(torch.nn.functional, "softmax", softmax64))
        yield


def rope_forward64(hf_forward):
    """A RotaryEmbedding.forward giving HF's cos/sin [B, T, HD] computed in float64:
    default RoPE and LongRoPE (long factors past original_max_position_embeddings)."""

    def forward(self, x, position_ids, layer_type=None):
        rp = self.config.rope_parameters
        rp = rp[layer_type] if layer_type else rp
        scaling = getattr(
            self, f"{layer_type}_attention_scaling" if layer_type else "attention_scaling"
        )
        angle = position_ids[..., None].double() * inv_freq64(self.config, rp, position_ids)
        angle = torch.cat((angle, angle), dim=-1)  # (B, T, HD): rotate_half pairs i, i + HD/2
        s = float(np.float32(scaling))  # the GGUF holds attn_factor as a float32
        cos, sin = angle.cos() * s, angle.sin() * s
        cos32, sin32 = hf_forward(x, position_ids, *([layer_type] if layer_type else []))
        assert max((cos - cos32).abs().max(), (sin - sin32).abs().max()) < 1e-5
        return cos.to(x.dtype), sin.to(x.dtype)

    return forward


def inv_freq64(config, rp: dict, position_ids) -> torch.Tensor:
    """float64[rope_dim / 2]: 1 / (factor_i * theta^(2i / rope_dim)), HF's formula."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    factors = torch.ones(dim // 2, dtype=torch.float64)
    if rp["rope_type"] == "longrope":  # HF's choice by sequence length (llama.cpp: by n_ctx)
        long = int(position_ids.max()) + 1 > rp["original_max_position_embeddings"]
        factors = torch.tensor(rp["long_factor" if long else "short_factor"], dtype=torch.float32)
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return 1.0 / (factors.double() * rp["rope_theta"] ** exponent)


def needs_refinfer_support(path: Path) -> None:
    """Skip while refinfer does not read this file's architecture yet."""
    arch = read_arch(path)
    if arch not in SUPPORTED_ARCHITECTURES:
        pytest.skip(f"refinfer does not run {arch!r} yet ({', '.join(SUPPORTED_ARCHITECTURES)})")


def read_arch(path: Path) -> str:
    """general.architecture of a GGUF file."""
    import gguf

    return gguf.GGUFReader(path).fields["general.architecture"].contents()


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_hf_reads_the_export_back(kind: str, exported) -> None:
    if kind in HF_LOADER_CANNOT:
        pytest.skip(HF_LOADER_CANNOT[kind])
    model, path, hf = exported(kind)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float64,
        attn_implementation="eager", **HF_LOADER_FIELDS.get(kind, {}),
    ).eval()  # fmt: skip
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(hf_logits(loaded), hf)


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_reference_matches_hf(kind: str, exported) -> None:
    _, path, hf = exported(kind)
    needs_refinfer_support(path)
    ours = reference.logits(read_gguf(path), IDS)
    np.testing.assert_allclose(ours, hf, rtol=0, atol=REFERENCE_ATOL)


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_engine_matches_hf(kind: str, exported) -> None:
    _, path, hf = exported(kind)
    needs_refinfer_support(path)
    ours = Model(read_gguf(path), tokenizer=None).logits(IDS)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, hf, rtol=0, atol=ENGINE_ATOL)


# Each switch of the exporter, turned off, must move HF's own reading of the file by far
# more than REFERENCE_ATOL: so the tolerances above can tell a right model from a wrong one.
SWITCHES = [
    ("llama", dict(permute_qk=False)),
    ("gemma3", dict(norm_shift=0.0)),
    ("gemma3", dict(window_key="none")),
]


@pytest.mark.parametrize(("kind", "change"), SWITCHES)
def test_each_difference_matters(kind: str, change: dict, exported, tmp_path: Path) -> None:
    model, _, hf = exported(kind)
    wrong = dataclasses.replace(arch_of(model), **change)
    path = export_hf_to_gguf(model, tmp_path / f"{kind}.gguf", arch=wrong)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float64,
        attn_implementation="eager", **HF_LOADER_FIELDS.get(kind, {}),
    ).eval()  # fmt: skip
    assert np.abs(hf_logits(loaded) - hf).max() > 1e-2


def test_longrope_factors_matter(exported) -> None:
    # Phi-3 with and without LongRoPE share their weights (same seed): the factors and the
    # attention factor change the logits, so test_reference_matches_hf checks them.
    plain, longrope = exported("phi3")[2], exported("phi3-longrope")[2]
    assert np.abs(plain - longrope).max() > 1e-2


CONVERTER = os.environ.get("LLAMA_CPP_CONVERTER")


@pytest.mark.skipif(not CONVERTER, reason="set LLAMA_CPP_CONVERTER=.../convert_hf_to_gguf.py")
def test_export_equals_llama_cpp_converter(exported, tmp_path: Path) -> None:
    runs = {
        kind: convert_with_llama_cpp(exported(kind)[0], tmp_path / kind, Path(CONVERTER))
        for kind in TINY_MODELS
    }
    for kind, run in runs.items():
        log, _ = run.communicate()
        assert run.returncode == 0, log[-2000:]
        theirs = model_fields(tmp_path / kind / "converted.gguf")
        ours = model_fields(exported(kind)[1])
        if kind == "mistral":  # hf_export keeps the window the converter drops
            ours[0].pop("llama.attention.sliding_window")
        assert ours[0] == theirs[0], kind
        assert ours[1].keys() == theirs[1].keys(), kind
        for name, t in theirs[1].items():
            np.testing.assert_array_equal(ours[1][name], t, err_msg=f"{kind} {name}")


def test_every_arch_has_a_tiny_model() -> None:
    classes = {model_cls for _, model_cls, _ in TINY_MODELS.values()}
    assert classes == set(ARCHS)
