"""`refinfer logits` files and `refinfer compare`: the file is lossless and says where it came
from; the statistics equal values computed here by hand; tolerances give exit 1 naming the
worst position; bad input gives one line and exit 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import refinfer
from refinfer.cli import main
from refinfer.oracle.files import OracleFile

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = [3, 17, 99, 5, 64, 2, 120, 7, 33, 8]


@pytest.fixture(scope="module")
def files(byte_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fast and reference logits files of IDS on the tiny model."""
    d = tmp_path_factory.mktemp("logits")
    ids = ",".join(map(str, IDS))
    assert main(["logits", str(byte_model), "--ids", ids, "-o", str(d / "fast.npz")]) == 0
    assert (
        main(["logits", str(byte_model), "--ids", ids, "-o", str(d / "ref.npz"), "--reference"])
        == 0
    )
    return {"fast": d / "fast.npz", "ref": d / "ref.npz", "dir": d}


def _perturbed(path: Path, out: Path, position: int, entry: int, delta: float) -> np.ndarray:
    """A copy of a logits file with logits[position, entry] += delta; returns the original."""
    z = np.load(path)
    logits = z["logits"].copy()
    logits[position, entry] += delta
    OracleFile("logits", z["ids"], {"logits": logits}, json.loads(str(z["provenance"]))).save(out)
    return z["logits"]


def _compare(capsys, *args: str) -> tuple[int, dict, str]:
    status = main(["compare", *args, "--json"])
    out, err = capsys.readouterr()
    return status, json.loads(out) if out else {}, err


def test_logits_file_is_lossless_with_provenance(files: dict, byte_model: Path) -> None:
    m = refinfer.load(byte_model)
    z = np.load(files["fast"])
    assert str(z["format"]) == "refinfer-logits/1" and z["ids"].tolist() == IDS
    np.testing.assert_array_equal(z["logits"], m.logits(IDS))  # bitwise: lossless
    p = json.loads(str(z["provenance"]))
    assert p["model_sha256"] == hashlib.sha256(byte_model.read_bytes()).hexdigest()
    assert p["computed_by"] == "model.forward" and p["numerics"] == "exact"
    assert p["threads"] == 1 and p["kv_block_size"] == 16 and p["refinfer_version"]
    r = np.load(files["ref"])
    assert r["logits"].dtype == np.float64 and "reference.py" in str(r["provenance"])


def test_identical_files_compare_to_zero(files: dict, capsys) -> None:
    status, r, _ = _compare(capsys, str(files["fast"]), str(files["fast"]), "--max-abs", "0")
    assert status == 0 and r["pass"]
    assert r["max_abs"] == r["nmse"] == r["kld_mean"] == 0 and r["top1"] == 1
    assert r["first_argmax_diff"] is None and r["top_k_violations"] == []


def test_fast_against_reference_is_close(files: dict, capsys) -> None:
    status, r, _ = _compare(capsys, str(files["ref"]), str(files["fast"]), "--max-abs", "1e-4",
                            "--max-kld", "1e-9", "--min-top1", "1")  # fmt: skip
    assert status == 0 and 0 < r["max_abs"] < 1e-4 and r["nmse"] < 1e-10


def test_one_perturbed_logit_gives_the_analytic_figures(files: dict, capsys) -> None:
    b = files["dir"] / "bumped.npz"
    t, v, d = 4, 11, 0.75
    a = _perturbed(files["fast"], b, t, v, d).astype(np.float64)
    status, r, err = _compare(capsys, str(files["fast"]), str(b), "--max-abs", "0.5")
    assert status == 1 and r["max_abs"] == pytest.approx(d, rel=1e-6)
    assert (r["max_abs_position"], r["max_abs_entry"]) == (t, v)
    assert f"at position {t} (input token id {IDS[t]}), vocabulary entry {v}" in err
    # NMSE = d^2 / sum a^2 (ggml); KL(p || q) when logit v moves by d:
    #   log q_v' = log p_v' - log Z, Z = 1 + p_v (e^d - 1), so KL = log Z - p_v d
    assert r["nmse"] == pytest.approx(d * d / np.square(a).sum(), rel=1e-5)
    p_v = np.exp(a[t, v] - a[t].max()) / np.exp(a[t] - a[t].max()).sum()
    kl = np.log1p(p_v * np.expm1(d)) - p_v * d
    assert r["per_position"]["kld"][t] == pytest.approx(kl, rel=1e-4)
    assert r["kld_mean"] == pytest.approx(kl / len(IDS), rel=1e-4)


def test_an_argmax_swap_is_found_and_the_top_k_rule_judged(files: dict, capsys) -> None:
    a = np.load(files["fast"])["logits"]
    t = 6
    second = int(np.argsort(a[t])[-2])
    b = files["dir"] / "swapped.npz"
    _perturbed(files["fast"], b, t, second, float(a[t].max() - a[t, second]) + 0.5)
    status, r, err = _compare(capsys, str(files["fast"]), str(b), "--min-top1", "1")
    assert status == 1 and r["first_argmax_diff"] == t and r["top1"] == 1 - 1 / len(IDS)
    assert f"first at position {t}" in err
    assert _compare(capsys, str(files["fast"]), str(b), "--top-k", "2")[0] == 0  # in the top 2
    status, r, err = _compare(capsys, str(files["fast"]), str(b), "--top-k", "1")
    assert status == 1 and r["top_k_violations"] == [t] and "top-1 rule fails" in err


def test_text_report_names_every_statistic(files: dict, capsys) -> None:
    assert main(["compare", str(files["ref"]), str(files["fast"])]) == 0
    err = capsys.readouterr().err
    for figure in ("max |Δlogit|", "NMSE", "mean KLD", "99.9%", "top-1", "top-5 rule"):
        assert figure in err


def _bad_pairs(files: dict, byte_model: Path) -> dict[str, tuple[Path, str]]:
    d = files["dir"]
    z = np.load(files["fast"])
    prov = json.loads(str(z["provenance"]))
    OracleFile("logits", z["ids"], {"logits": z["logits"][:, :64]}, prov).save(d / "v64.npz")
    ids = z["ids"].copy()
    ids[2] += 1
    OracleFile("logits", ids, {"logits": z["logits"]}, prov).save(d / "ids.npz")
    (d / "cut.npz").write_bytes(files["fast"].read_bytes()[:300])
    return {
        "vocabulary": (d / "v64.npz", "different vocabularies (258 and 64"),
        "ids": (d / "ids.npz", "different token ids (10 and 10 ids, first differing at position 2"),
        "model file": (byte_model, "not a refinfer logits or trace file"),
        "truncated": (d / "cut.npz", "not a refinfer logits or trace file"),
        "missing": (d / "absent.npz", "no such file"),
    }


@pytest.mark.parametrize("case", ["vocabulary", "ids", "model file", "truncated", "missing"])
def test_bad_input_is_one_line_and_status_2(case: str, files: dict, byte_model: Path, capsys):
    path, message = _bad_pairs(files, byte_model)[case]
    assert main(["compare", str(files["fast"]), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.fixture(scope="module")
def ggml_file(files: dict, byte_model: Path) -> Path:
    """The logits file of IDS computed with numerics='ggml'."""
    out = files["dir"] / "ggml.npz"
    args = ["--ids", ",".join(map(str, IDS)), "-o", str(out), "--numerics", "ggml"]
    assert main(["logits", str(byte_model), *args]) == 0
    return out


def test_logits_file_records_the_numerics(files: dict, ggml_file: Path) -> None:
    p = json.loads(str(np.load(ggml_file)["provenance"]))
    assert p["numerics"] == "ggml" and p["computed_by"] == "model.forward"
    assert json.loads(str(np.load(files["fast"])["provenance"]))["numerics"] == "exact"


def test_reference_with_ggml_numerics_is_refused(byte_model: Path, tmp_path: Path, capsys):
    out = tmp_path / "r.npz"
    args = ["logits", str(byte_model), "--ids", "1,2", "-o", str(out), "--reference"]
    assert main([*args, "--numerics", "ggml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --reference" in err and not out.exists()


def test_compare_refuses_mixed_numerics_unless_allowed(files: dict, ggml_file: Path, capsys):
    a, b = str(files["fast"]), str(ggml_file)
    assert main(["compare", a, b]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "numerics exact" in err and "with ggml" in err
    assert "--allow-mixed-numerics" in err
    status, r, _ = _compare(capsys, a, b, "--allow-mixed-numerics")
    assert status == 0 and (r["a_numerics"], r["b_numerics"]) == ("exact", "ggml")
    assert main(["compare", a, b, "--allow-mixed-numerics"]) == 0
    err = capsys.readouterr().err
    assert "(model.forward, numerics exact)" in err and "(model.forward, numerics ggml)" in err


def test_compare_of_one_numerics_reports_it(files: dict, ggml_file: Path, capsys) -> None:
    status, r, _ = _compare(capsys, str(ggml_file), str(ggml_file), "--max-abs", "0")
    assert status == 0 and r["a_numerics"] == r["b_numerics"] == "ggml"


def test_a_side_without_numerics_is_compared_as_not_recorded(files: dict, ggml_file: Path,
                                                             capsys) -> None:  # fmt: skip
    z = np.load(files["fast"])
    prov = json.loads(str(z["provenance"]))
    del prov["numerics"]  # another tool's file, say
    other = files["dir"] / "other.npz"
    OracleFile("logits", z["ids"], {"logits": z["logits"]}, prov).save(other)
    status, r, _ = _compare(capsys, str(other), str(ggml_file))
    assert status == 0 and (r["a_numerics"], r["b_numerics"]) == (None, "ggml")
    assert main(["compare", str(other), str(ggml_file)]) == 0
    assert "numerics not recorded" in capsys.readouterr().err
