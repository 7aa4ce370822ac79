"""`refinfer perplexity`: llama-perplexity's chunking, PPL = exp(mean NLL) of m.logits, and
llama.cpp's KL-divergence base file both ways (its layout byte for byte, a file written by
a literal transcription of perplexity.cpp read back, the round trip within the rounding)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from byte_vocab import BOS

import refinfer
from refinfer.cli import main
from refinfer.oracle import kld_file, perplexity

pytestmark = pytest.mark.usefixtures("one_thread")
N_CTX, CHUNKS = 32, 7  # 7 chunks x 15 scored positions: over llama.cpp's 100 for statistics
f32 = np.float32


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text((Path(__file__).parents[2] / "README.md").read_text()[:1200])
    return path


@pytest.fixture(scope="module")
def model(byte_model: Path):
    return refinfer.load(byte_model)


def _expected_rows(model, text: Path) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Independently of perplexity.py: the chunks as in the text, and per chunk the m.logits
    rows of positions 16..30 (first token set to BOS) and the tokens they predict."""
    ids = np.array(model.tokenizer.encode(text.read_text()))
    chunks = ids[: CHUNKS * N_CTX].reshape(CHUNKS, N_CTX)
    logits, targets = [], []
    for c in chunks:
        logits.append(model.logits([BOS, *c[1:]])[N_CTX // 2 : N_CTX - 1])
        targets.append(c[N_CTX // 2 + 1 :])
    return chunks, logits, targets


def _ppl(capsys, *args: str) -> dict:
    assert main(["perplexity", *args, "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ppl_is_exp_mean_nll_of_m_logits(model, byte_model: Path, text: Path, capsys) -> None:
    _, logits, targets = _expected_rows(model, text)
    nll = []
    for x, t in zip(logits, targets, strict=True):
        x = x.astype(np.float64)
        log_z = x.max(axis=1) + np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1))
        nll.extend(log_z - x[np.arange(len(t)), t])  # -log softmax(x)[t]
    r = _ppl(capsys, str(byte_model), "-f", str(text), "-c", str(N_CTX), "--chunks", str(CHUNKS))
    assert r["tokens_scored"] == CHUNKS * 15 and r["chunks"] == CHUNKS
    assert r["ppl"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-12)
    sigma = np.sqrt((np.mean(np.square(nll)) - np.mean(nll) ** 2) / (len(nll) - 1))
    assert r["ppl_uncertainty"] == pytest.approx(r["ppl"] * sigma, rel=1e-9)


def test_batch_size_does_not_change_the_figures(byte_model: Path, text: Path, capsys) -> None:
    runs = [_ppl(capsys, str(byte_model), "-f", str(text), "-c", str(N_CTX), "--chunks", "3",
                 "-b", b) for b in ("7", "32", "96")]  # fmt: skip
    assert runs[0] == runs[1] == runs[2]  # bitwise: pieces of a chunk, or 3 chunks in one call


def _llama_cpp_row(logits: np.ndarray) -> bytes:
    """perplexity.cpp's log_softmax(n_vocab, logits, log_prob, tok), transcribed line by line."""
    max_logit = min_logit = logits[0]
    for x in logits[1:]:
        max_logit, min_logit = max(max_logit, x), min(min_logit, x)
    min_logit = max(min_logit, max_logit - f32(16))
    sum_exp = 0.0  # double
    for x in logits:
        sum_exp += float(np.exp(f32(x - max_logit)))
    log_sum_exp = f32(np.log(sum_exp))
    min_log_prob = f32(min_logit - max_logit) - log_sum_exp
    scale = (max_logit - min_logit) / f32(65535)
    inv_scale = f32(1) / scale

    def nearest_int(fval):  # float val = fval + 12582912.f; (bits & 0x007fffff) - 0x00400000
        return int((fval + f32(12582912)).view(np.int32) & 0x007FFFFF) - 0x00400000

    q = [nearest_int(inv_scale * (x - min_logit)) if x > min_logit else 0 for x in logits]
    q += [0] * (len(q) % 2)
    return struct.pack("<ff", scale, min_log_prob) + struct.pack(f"<{len(q)}H", *q)


def _llama_cpp_file(path: Path, chunks: np.ndarray, logits: list[np.ndarray], V: int) -> Path:
    """A base file written as perplexity.cpp writes it, with struct."""
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<Iii", N_CTX, V, len(chunks)))
        f.write(struct.pack(f"<{chunks.size}i", *chunks.ravel().tolist()))
        for rows in logits:
            f.write(b"".join(_llama_cpp_row(r) for r in rows.astype(f32)))
    return path


def test_written_file_is_llama_cpp_byte_for_byte(model, byte_model, text, tmp_path) -> None:
    chunks, logits, _ = _expected_rows(model, text)
    ours = tmp_path / "ours.kld"
    assert main(["perplexity", str(byte_model), "-f", str(text), "-c", str(N_CTX), "--chunks",
                 str(CHUNKS), "--kl-divergence-base", str(ours), "-q"]) == 0  # fmt: skip
    theirs = _llama_cpp_file(tmp_path / "theirs.kld", chunks, logits, model.config.vocab_size)
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.stat().st_size == 20 + 4 * CHUNKS * N_CTX + CHUNKS * 15 * (8 + 2 * 258)


def test_reads_a_llama_cpp_file_within_its_rounding(model, text, tmp_path) -> None:
    """Base logits = the model's + noise; the KLD read back from the 16-bit file equals the
    exact float64 KLD within the format's rounding (log-probs within scale / 2 = 1.2e-4)."""
    chunks, logits, targets = _expected_rows(model, text)
    rng = np.random.default_rng(0)
    base = [x + rng.normal(0, 0.3, x.shape).astype(f32) for x in logits]
    path = _llama_cpp_file(tmp_path / "base.kld", chunks, base, model.config.vocab_size)
    s = perplexity.kl_divergence(model, str(path)).summary()
    exact = []
    for p_logits, q_logits in zip(base, logits, strict=True):
        logp = p_logits - np.logaddexp.reduce(p_logits.astype(np.float64), axis=1, keepdims=True)
        logq = q_logits - np.logaddexp.reduce(q_logits.astype(np.float64), axis=1, keepdims=True)
        exact.extend((np.exp(logp) * (logp - logq)).sum(axis=1))
    assert s["kld"][0] == pytest.approx(np.mean(exact), abs=2e-4)
    assert s["kld_percentiles"]["Maximum"] == pytest.approx(max(exact), abs=5e-4)
    assert s["positions"] == CHUNKS * 15 and 0 < s["same_top_p"][0] <= 1


def test_round_trip_prints_llama_cpp_block(byte_model: Path, text: Path, tmp_path, capsys):
    base = str(tmp_path / "self.kld")
    args = ["perplexity", str(byte_model), "-c", str(N_CTX), "--kl-divergence-base", base, "-q"]
    assert main([*args, "-f", str(text), "--chunks", str(CHUNKS)]) == 0
    capsys.readouterr()
    assert main([*args, "--kl-divergence"]) == 0
    out = capsys.readouterr().out
    for line in (
        "====== Perplexity statistics ======",
        "Mean PPL(Q)                   :",
        "Cor(ln(PPL(Q)), ln(PPL(base))): 100.00%",
        "====== KL divergence statistics",
        "99.9%   KLD:",
        "Minimum KLD:",
        "RMS Δp    :",
        "Same top p: 100.000 ± 0.000 %",
    ):
        assert line in out
    kld_line = next(x for x in out.splitlines() if x.startswith("Maximum KLD:"))
    assert abs(float(kld_line.split(":")[1])) < 1e-5  # itself, through 16-bit log-probs


def test_decode_is_within_half_a_step(model, text) -> None:
    _, logits, _ = _expected_rows(model, text)
    x = logits[0].astype(np.float64)
    logp = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
    rows = kld_file.encode(logits[0])
    err = np.abs(kld_file.decode(rows, x.shape[1]) - logp)
    kept = x > x.max(axis=1, keepdims=True) - 16
    assert np.all(err[kept] <= rows["scale"][:, None].repeat(x.shape[1], 1)[kept] / 2 + 1e-5)


def _bad(tmp: Path, byte_model: Path, text: Path) -> dict[str, tuple[list[str], str]]:
    short = tmp / "short.txt"
    short.write_text("too short")
    good = tmp / "good.kld"
    main(["perplexity", str(byte_model), "-f", str(text), "-c", "8", "--chunks", "2",
          "--kl-divergence-base", str(good), "-q"])  # fmt: skip
    (tmp / "cut.kld").write_bytes(good.read_bytes()[:-3])
    other = tmp / "other.kld"
    other.write_bytes(good.read_bytes()[:12] + struct.pack("<i", 300) + good.read_bytes()[16:])
    kld = ["--kl-divergence", "--kl-divergence-base"]
    return {
        "short text": (["-f", str(short)], "needs at least 1024"),
        "truncated": ([*kld, str(tmp / "cut.kld")], "truncated or damaged"),
        "not kld": ([*kld, str(text)], "not a llama.cpp KL-divergence base file"),
        "vocabulary": ([*kld, str(other)], "bytes where n_ctx 8, n_vocab 300"),
    }


@pytest.mark.parametrize("case", ["short text", "truncated", "not kld", "vocabulary"])
def test_bad_input_is_one_line_and_status_2(case, byte_model, text, tmp_path, capsys) -> None:
    args, message = _bad(tmp_path, byte_model, text)[case]
    capsys.readouterr()
    assert main(["perplexity", str(byte_model), "-q", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_numerics_is_in_the_json_and_on_stderr(byte_model: Path, text: Path, tmp_path, capsys):
    base = str(tmp_path / "b.kld")
    args = ["perplexity", str(byte_model), "-c", str(N_CTX), "--json", "-q"]
    assert main([*args, "-f", str(text), "--chunks", "2", "--kl-divergence-base", base]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["numerics"] == "exact" and "numerics exact (bytes.gguf)" in err
    assert "b.kld, in llama.cpp's format, records no numerics" in err
    assert main([*args, "-f", str(text), "--chunks", "2", "--numerics", "ggml"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["numerics"] == "ggml" and "numerics ggml" in err
    assert main([*args, "--kl-divergence-base", base, "--kl-divergence", "--numerics", "ggml"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["numerics"] == "ggml" and "numerics ggml" in err
