"""Per-layer taps: llama.cpp's names in graph order, each tensor what its name says (checked
against NumPy here), the fast path's taps equal reference.py's, and `refinfer compare` on
two trace files names the first tensor, layer and position that differ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import refinfer
from refinfer.cli import main
from refinfer.oracle.files import OracleFile
from refinfer.oracle.trace import recorder, tap_names, trace

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]


@pytest.fixture(scope="module")
def model(byte_model: Path):
    return refinfer.load(byte_model)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def test_names_order_and_shapes(model) -> None:
    t = model.trace(IDS)
    c, T = model.config, len(IDS)
    assert list(t) == tap_names(c.n_layers) and list(t)[:2] == ["attn_norm-0", "Qcur-0"]
    assert t["Qcur-1"].shape == (T, c.n_heads, c.head_dim)
    assert t["Kcur-1"].shape == (T, c.n_kv_heads, c.head_dim)
    assert t["kqv_out-0"].shape == (T, c.n_heads * c.head_dim)
    np.testing.assert_array_equal(t["result_output"], model.logits(IDS))
    assert list(model.trace(IDS, ["Qcur", "l_out-1"])) == ["Qcur-0", "Qcur-1", "l_out-1"]


def test_each_tensor_is_what_its_name_says(model) -> None:
    t, c = model.trace(IDS), model.config
    w = {n: q.dequantize().astype(np.float64) for n, q in model.tensors.items()}
    x = w["token_embd.weight"][IDS]
    np.testing.assert_allclose(
        t["attn_norm-0"], _rms(x, w["blk.0.attn_norm.weight"], c.norm_eps), rtol=1e-5, atol=1e-6
    )
    for i in range(c.n_layers):
        before = x if i == 0 else t[f"l_out-{i - 1}"]
        np.testing.assert_allclose(t[f"ffn_inp-{i}"], before + t[f"attn_out-{i}"], atol=1e-6)
        np.testing.assert_allclose(
            t[f"l_out-{i}"], t[f"ffn_inp-{i}"] + t[f"ffn_out-{i}"], atol=1e-6
        )
        v = t[f"attn_norm-{i}"] @ w[f"blk.{i}.attn_v.weight"].T  # Vcur has no RoPE
        np.testing.assert_allclose(t[f"Vcur-{i}"].reshape(len(IDS), -1), v, atol=1e-5)
    last = t[f"l_out-{c.n_layers - 1}"]
    np.testing.assert_allclose(
        t["result_norm"], _rms(last, w["output_norm.weight"], c.norm_eps), rtol=1e-5, atol=1e-6
    )


def test_fast_taps_equal_reference_taps(model) -> None:
    fast, ref = model.trace(IDS), trace(model, IDS, reference=True)
    assert list(ref) == list(fast) and all(v.dtype == np.float64 for v in ref.values())
    for name, a in ref.items():
        err = np.square(fast[name] - a).sum() / np.square(a).sum()
        assert err < 1e-10, name


def test_a_tap_changes_nothing(model) -> None:
    tap, taps = recorder(tap_names(model.config.n_layers))
    np.testing.assert_array_equal(model.logits(IDS, tap=tap), model.logits(IDS))
    assert len(taps) == len(tap_names(model.config.n_layers))


def test_compare_names_the_first_tensor_layer_and_position(byte_model, tmp_path, capsys):
    ids = ",".join(map(str, IDS))
    a, b = tmp_path / "ref.npz", tmp_path / "fast.npz"
    assert main(["trace", str(byte_model), "--ids", ids, "-o", str(a), "--reference"]) == 0
    assert main(["trace", str(byte_model), "--ids", ids, "-o", str(b)]) == 0
    assert main(["compare", str(a), str(b)]) == 0  # within test-backend-ops' NMSE 1e-7
    z = np.load(b)
    arrays = {n: z[n] for n in z.files if n not in ("format", "provenance", "ids")}
    arrays["Kcur-1"][5, 1, 3] += 0.5
    bad = tmp_path / "bad.npz"
    OracleFile("trace", z["ids"], arrays, json.loads(str(z["provenance"]))).save(bad)
    capsys.readouterr()
    assert main(["compare", str(a), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "first difference beyond the tolerance: Kcur-1 (layer 1), position 5" in err


def test_unknown_tap_name_is_status_2(byte_model, tmp_path, capsys) -> None:
    args = ["trace", str(byte_model), "--ids", "1,2", "-o", str(tmp_path / "t.npz")]
    assert main([*args, "--names", "Qcur,bogus-3"]) == 2
    assert "unknown tap name(s) bogus-3" in capsys.readouterr().err


def test_trace_records_numerics_and_compare_reports_them(byte_model, tmp_path, capsys) -> None:
    args = ["trace", str(byte_model), "--ids", "256,72,101", "--names", "l_out"]
    exact, ggml = tmp_path / "exact.npz", tmp_path / "ggml.npz"
    assert main([*args, "-o", str(exact)]) == 0
    assert main([*args, "-o", str(ggml), "--numerics", "ggml"]) == 0
    assert json.loads(str(np.load(ggml)["provenance"]))["numerics"] == "ggml"
    assert "numerics ggml" in capsys.readouterr().err
    assert main(["compare", str(exact), str(ggml)]) == 2  # mixed numerics: refused
    assert "--allow-mixed-numerics" in capsys.readouterr().err
    assert main(["compare", str(exact), str(ggml), "--allow-mixed-numerics", "--json"]) in (0, 1)
    r = json.loads(capsys.readouterr().out)
    assert (r["a_numerics"], r["b_numerics"]) == ("exact", "ggml")
    assert main(["compare", str(ggml), str(ggml)]) == 0
    assert "numerics: A ggml, B ggml" in capsys.readouterr().err
