"""The command line: `info` on the real model, `quantize`, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from gguf_factory import tiny_tensors, write_tiny_model
from refinfer import quant
from refinfer.cli import main
from refinfer.errors import RefinferError
from refinfer.gguf import read_gguf
from refinfer.oracle.kld_file import KLDBaseWriter


def run_cli(*args: str, exe: tuple[str, ...] = (sys.executable, "-m", "refinfer")):
    """Run the CLI in a fresh process: (exit status, stdout, stderr)."""
    p = subprocess.run([*exe, *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_info_smollm2(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(smollm2_path)]) == 0
    out = capsys.readouterr().out
    for expected in (
        "layers (L)      30", "dim (D)         576", "kv heads (KVH)  3 (GQA 3:1)",
        "vocab (V)       49152", "context         8192", "rope            base 100000, 64 dims",
        "272: 210 Q4_1 (63.3 MiB), 1 Q8_0 (28.7 MiB), 61 F32 (137.2 KiB)",
        "file type       MOSTLY_Q4_1", "134.5 M, 0.718 bytes", "46080 bytes/token",
        "tied to token_embd",
    ):  # fmt: skip
        assert expected in out


def test_info_json_smollm2(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(smollm2_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["config"]["n_layers"] == 30 and s["config"]["n_kv_heads"] == 3
    assert s["tensor_types"] == {"q4_1": 210, "f32": 61, "q8_0": 1}
    assert s["file_type"] == "MOSTLY_Q4_1"
    assert sum(s["tensor_bytes"].values()) == sum(
        t.nbytes for t in read_gguf(smollm2_path).tensors.values()
    )
    assert s["tensor_bytes"]["q8_0"] == 49152 * 576 // 32 * 34  # the tied embedding
    assert s["kv_bytes_per_token"] == 46080 and s["file_size"] == smollm2_path.stat().st_size
    assert s["n_parameters"] == 134_515_008
    assert abs(s["bytes_per_parameter"] - 0.71796) < 1e-5


def test_console_script_equals_module(tiny_f32: Path) -> None:
    script = Path(sys.executable).with_name("refinfer")
    a = run_cli("info", str(tiny_f32), "--json")
    b = run_cli("info", str(tiny_f32), "--json", exe=(str(script),))
    assert a[0] == b[0] == 0 and a[1] == b[1]


@pytest.mark.parametrize("fmt", ["q5_0", "q5_1"])
def test_quantize_q5(fmt: str, tiny_f32: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{fmt}.gguf"
    assert run_cli("quantize", str(tiny_f32), str(out), "--type", fmt, "-q")[0] == 0
    src, dst = read_gguf(tiny_f32), read_gguf(out)
    w = dst.tensors["blk.0.ffn_up.weight"]
    assert w.format.name == fmt and dst.metadata["general.file_type"] == int(
        gguf.LlamaFileType[f"MOSTLY_{fmt.upper()}"]
    )
    want = quant.quantize(src.tensors["blk.0.ffn_up.weight"].dequantize(), quant.FORMATS[fmt])
    np.testing.assert_array_equal(w.data, want)


def test_quantize_to_a_k_quant_says_which_tool(tiny_f32: Path, tmp_path: Path) -> None:
    status, _, err = run_cli("quantize", str(tiny_f32), str(tmp_path / "k.gguf"), "--type", "q4_k")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "does not write" in err and "llama-quantize" in err
    assert not (tmp_path / "k.gguf").exists()


def test_quantize_command(tiny_f32: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.gguf"
    status, _, err = run_cli("quantize", str(tiny_f32), str(out), "--type", "q4_0")
    assert status == 0 and f"wrote {out}" in err
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.0.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32


def _iq2_file(path: Path) -> Path:
    """A file with one tensor of a type refinfer does not read (IQ2_XXS: 66 bytes per 256)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("x", np.zeros((2, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def _bad_files(tmp: Path, tiny: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "text.gguf").write_text("not a model")
    (tmp / "cut.gguf").write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    bad_shape = tiny_tensors()
    bad_shape["blk.0.attn_k.weight"] = bad_shape["blk.0.attn_k.weight"][:8]
    return {
        "missing": (tmp / "absent.gguf", "no such file"),
        "not gguf": (tmp / "text.gguf", "not a GGUF file"),
        "truncated": (tmp / "cut.gguf", "truncated"),
        "architecture": (write_tiny_model(tmp / "g.gguf", arch="gpt2"), "architecture 'gpt2'"),
        "tensor type": (_iq2_file(tmp / "k.gguf"), "tensor x has type IQ2_XXS, which refinfer"),
        "shape": (write_tiny_model(tmp / "s.gguf", tensors=bad_shape), "blk.0.attn_k.weight"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "not gguf", "truncated", "architecture", "tensor type", "shape"]
)
def test_bad_input_is_one_line_and_status_2(case: str, tiny_f32: Path, tmp_path: Path) -> None:
    path, message = _bad_files(tmp_path, tiny_f32)[case]
    status, out, err = run_cli("info", str(path))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("refinfer: error: ") and message in err


def test_quantize_refuses_to_overwrite_its_input(tiny_f32: Path) -> None:
    status, _, err = run_cli("quantize", str(tiny_f32), str(tiny_f32), "--type", "q8_0")
    assert status == 2 and "overwrite the input" in err


def test_help_lists_the_commands() -> None:
    status, out, _ = run_cli("--help")
    assert status == 0
    for command in ("info", "quantize", "tokenize", "generate"):
        assert command in out


def test_generate_says_paris() -> None:
    status, out, err = run_cli("generate", "--prompt", "The capital of France is", "-n", "8")
    assert status == 0 and out.startswith("The capital of France is Paris")
    assert (
        "5 prompt tokens, 8 generated" in err and "decode" in err and "time to first token" in err
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["-n", "9000"], "exceed the model's context of 8192"),
        (["-n", "0"], "max_new_tokens must be at least 1"),
        (["--threads", "999"], "--threads must be between 1 and"),
    ],
)
def test_generate_bad_input_is_one_line(args: list[str], message: str) -> None:
    status, out, err = run_cli("generate", "--prompt", "Hi", *args)
    assert status == 2, err
    assert err.count("\n") == 1 and message in err


def test_generate_with_prompt_lookup_reports_the_speculation() -> None:
    prompt = "one two three four five one two three four five one two"
    plain = run_cli("generate", "--prompt", prompt, "-n", "12")
    status, out, err = run_cli("generate", "--prompt", prompt, "-n", "12",
                               "--decoding", "prompt-lookup")  # fmt: skip
    assert status == 0 and out == plain[1]  # greedy: the same text
    assert "prompt-lookup:" in err and "forward calls" in err and "tokens per forward call" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--decoding", "speculative"], "needs a draft model"),
        (["--decoding", "lookahead", "--window", "0"], "window W must be"),
        (["--decoding", "prompt-lookup", "--ngram", "0"], "prompt lookup needs"),
        (["--decoding", "plain", "--draft-k", "0"], "draft_k must be at least 1"),
    ],
)
def test_generate_bad_decoding_options_are_one_line(args: list[str], message: str) -> None:
    status, _, err = run_cli("generate", "--prompt", "Hi", *args)
    assert status == 2, err
    assert err.count("\n") == 1 and message in err


def test_self_speculative_without_calibration_says_how(tiny_speaking_smollm2: Path) -> None:
    status, _, err = run_cli("generate", "--model", str(tiny_speaking_smollm2), "--prompt", "Hi",
                             "--decoding", "self-speculative")  # fmt: skip
    assert status == 2 and "refinfer calibrate" in err and err.count("\n") == 1


def test_calibrate_writes_layers_that_generate_uses(tiny_speaking_smollm2: Path) -> None:
    model, text = tiny_speaking_smollm2, tiny_speaking_smollm2.with_name("text.txt")
    text.write_text(Path(__file__).read_text())  # some Python and English
    status, _, err = run_cli("calibrate", str(model), "--text", str(text), "--tokens", "96")
    assert status == 0, err
    calibration = json.loads(model.with_suffix(".self-speculative.json").read_text())
    layers = calibration["layers"]
    assert 0 < len(layers) < 4 and layers == sorted(set(layers)) and layers[-1] < 4
    assert 0 <= calibration["acceptance_rate"] <= 1 and calibration["text_tokens"] == 96
    prompt = "The capital of France is"
    plain = run_cli("generate", "--model", str(model), "--prompt", prompt, "-n", "8")
    fast = run_cli("generate", "--model", str(model), "--prompt", prompt, "-n", "8",
                   "--decoding", "self-speculative")  # fmt: skip
    assert fast[0] == 0 and fast[1] == plain[1] and "self-speculative:" in fast[2]


# -- --numerics: every command that runs a model loads it with the numerics asked for --------


def _numerics_inputs(tmp: Path, model: Path) -> dict[str, list[str]]:
    """The arguments of each model-running command, with whatever it reads before loading."""
    text = tmp / "text.txt"
    text.write_text("The capital of France is Paris. " * 4)
    requests = tmp / "in.jsonl"
    requests.write_text('{"prompt": "Hi"}\n')
    base = tmp / "base.kld"  # a valid llama.cpp KLD base file: 1 chunk of 8 tokens, V = 4
    with KLDBaseWriter(base, 8, 4, np.arange(8, dtype=np.int32) % 4) as w:
        w.write_chunk(np.zeros((3, 4), np.float32))
    m, out, kld = str(model), str(tmp / "out.npz"), [str(base), "--kl-divergence"]
    return {
        "generate": ["generate", "--model", m, "--prompt", "Hi"],
        "chat": ["chat", "--model", m],
        "calibrate": ["calibrate", m, "--text", str(text)],
        "batch": ["batch", "--model", m, "--input", str(requests), "--output", str(tmp / "o")],
        "serve": ["serve", "--model", m],
        "logits": ["logits", m, "--ids", "1,2", "-o", out],
        "trace": ["trace", m, "--ids", "1,2", "-o", out],
        "perplexity": ["perplexity", m, "-f", str(text), "-c", "8"],
        "perplexity --kl-divergence": ["perplexity", m, "--kl-divergence-base", *kld],
    }


@pytest.mark.parametrize("numerics", [None, "exact", "ggml"])
@pytest.mark.parametrize(
    "command",
    ["generate", "chat", "calibrate", "batch", "serve", "logits", "trace", "perplexity",
     "perplexity --kl-divergence"],
)  # fmt: skip
def test_every_model_command_loads_with_its_numerics(
    command: str, numerics: str | None, tiny_f32: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    calls = []

    def load(path=None, numerics="exact"):  # refinfer.model.load, stopped once it is called
        calls.append(numerics)
        raise RefinferError("stopped at load")

    monkeypatch.setattr("refinfer.model.load", load)
    args = _numerics_inputs(tmp_path, tiny_f32)[command]
    assert main([*args, *(["--numerics", numerics] if numerics else [])]) == 2
    assert "stopped at load" in capsys.readouterr().err  # not stopped by anything else
    assert calls == [numerics or "exact"]


@pytest.mark.parametrize("command", ["generate", "logits", "perplexity", "serve"])
def test_bogus_numerics_is_status_2_naming_the_choices(command: str) -> None:
    status, out, err = run_cli(command, "--numerics", "bogus")
    assert status == 2 and out == "" and "Traceback" not in err
    assert "argument --numerics: invalid choice: 'bogus' (choose from" in err.splitlines()[-1]
    assert "exact" in err.splitlines()[-1] and "ggml" in err.splitlines()[-1]


def test_numerics_help_says_what_ggml_is_for() -> None:
    status, out, _ = run_cli("generate", "--help")
    assert status == 0 and "--numerics {exact,ggml}" in out
    assert "8-bit activations" in " ".join(out.split()) and "llama.cpp" in out
