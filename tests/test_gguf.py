"""Reading GGUF files: QTensors as views of the map, ModelConfig, validation, bad files,
and the requantising writer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import gguf.quants as gq
import numpy as np
import pytest

from gguf_factory import tiny_tensors, write_tiny_model
from refinfer.errors import ModelFileError, UnsupportedFormatError, UnsupportedModelError
from refinfer.gguf import GGUFFile, load_weights, read_gguf, read_metadata, write_quantized
from refinfer.quant import F32, FORMATS, QUANTIZE_FORMATS, dequantize, quantize


def test_smollm2_config(smollm2: GGUFFile) -> None:
    config, tensors = smollm2.config, smollm2.tensors
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.ffn_dim, config.vocab_size) == (64, 1536, 49152)
    assert config.context_length == 8192 and config.rope_base == 100000.0
    assert config.tied_embeddings and config.sliding_window is None
    assert config.family == "llama"
    assert config.kv_bytes_per_token() == 2 * 30 * 3 * 64 * 4
    assert len(tensors) == 272


def test_smollm2_tensors_are_views_of_the_map(smollm2: GGUFFile) -> None:
    for t in smollm2.tensors.values():
        base = t.data
        while base.base is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap), t.name  # no copy was made at load time


def test_smollm2_every_tensor_dequantizes_as_gguf_quants(smollm2: GGUFFile) -> None:
    # smollm2.reader is gguf's own reader: its tensors are gguf's view of the same bytes
    ours = smollm2.tensors
    assert len(ours) == len(smollm2.reader.tensors)
    for t in smollm2.reader.tensors:
        q = ours[t.name]
        expected = gq.dequantize(t.data, t.tensor_type).reshape(q.shape)
        np.testing.assert_array_equal(q.dequantize(), expected, err_msg=t.name)


def test_synthetic_config_and_mistral_window(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", sliding_window=8, n_kv_heads=1)
    config = read_gguf(path).config
    assert config.sliding_window == 8 and config.family == "mistral"
    assert (config.n_heads, config.n_kv_heads, config.head_dim) == (4, 1, 16)
    assert not config.tied_embeddings


def test_rope_scaling_and_freq_factors(tmp_path: Path) -> None:
    tensors = tiny_tensors() | {"rope_freqs.weight": np.ones(8, np.float32)}
    md = {
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
    }
    config = read_gguf(write_tiny_model(tmp_path / "r.gguf", tensors=tensors, metadata=md)).config
    assert config.rope_scaling.type == "linear" and config.rope_scaling.factor == 4.0
    assert config.rope_scaling.freq_factors == "rope_freqs.weight"


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    tensors["blk.1.ffn_up.weight"] = tensors["blk.1.ffn_up.weight"][:64]
    path = write_tiny_model(tmp_path / "bad.gguf", tensors=tensors)
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.ffn_up\.weight has shape \(64, 64\)"):
        load_weights(path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    del tensors["blk.0.attn_v.weight"]
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_v\.weight is missing"):
        load_weights(write_tiny_model(tmp_path / "bad.gguf", tensors=tensors))


def test_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2' is not supported"):
        load_weights(write_tiny_model(tmp_path / "g.gguf", arch="gpt2"))


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("x", np.zeros((2, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedFormatError, match=r"tensor x has type IQ2_XXS.*Q4_K, Q5_K"):
        read_gguf(path)


def test_missing_and_non_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        read_gguf(tmp_path / "absent.gguf")
    (tmp_path / "text.gguf").write_text("hello world")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf(tmp_path / "text.gguf")


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.999])
def test_truncated_file(tiny_f32: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_f32.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(ModelFileError, match="truncated"):
        read_gguf(cut)


def test_vocabulary_only_metadata(tmp_path: Path) -> None:
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "anything")
    w.add_tokenizer_model("llama")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert read_metadata(path)["tokenizer.ggml.model"] == "llama"


@pytest.mark.parametrize("name", QUANTIZE_FORMATS)
def test_write_quantized(tiny_f32: Path, tmp_path: Path, name: str) -> None:
    src = read_gguf(tiny_f32)
    dst = write_quantized_and_check(src, tmp_path / f"tiny-{name}.gguf", name)
    fmt = FORMATS[name]
    for t in src.tensors.values():
        got = dst.tensors[t.name]
        want_fmt = F32 if len(t.shape) == 1 else fmt
        assert got.format is want_fmt, t.name
        np.testing.assert_array_equal(got.data, quantize(t.dequantize(), want_fmt))
    assert dst.config == src.config


def write_quantized_and_check(src: GGUFFile, dst: Path, name: str) -> GGUFFile:
    """Requantise, then check gguf's own reader accepts the file and every key survived."""
    seen = []
    write_quantized(src, dst, name, progress=seen.append)
    out = read_gguf(dst)  # through gguf.GGUFReader
    r_src, r_dst = src.reader, out.reader
    assert sum(seen) == sum(int(t.n_bytes) for t in r_src.tensors)
    for key, field in r_src.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        assert r_dst.fields[key].contents() == field.contents(), key
    return out


def test_requantize_real_model_to_q8_0(smollm2: GGUFFile, tmp_path: Path) -> None:
    out = write_quantized_and_check(smollm2, tmp_path / "s-q8_0.gguf", "q8_0")
    src, dst = smollm2.tensors, out.tensors
    w = dst["blk.3.ffn_down.weight"]
    assert w.format.name == "q8_0"
    exact = src["blk.3.ffn_down.weight"].dequantize()
    np.testing.assert_array_equal(w.data, quantize(exact, w.format))
    assert np.abs(w.dequantize() - exact).max() <= np.abs(exact).max() / 127
    np.testing.assert_array_equal(dequantize(dst["output_norm.weight"].data, F32),
                                  src["output_norm.weight"].dequantize())  # fmt: skip


# -- big arrays: refinfer's reader reads a whole array at once (gguf's reads item by item) --

N_BIG = 20_000  # the fast paths do not depend on the count; the stock reader parses ~10k items/s


@pytest.fixture(scope="module")
def big_arrays(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, gguf.GGUFReader]:
    """A tiny model whose metadata holds arrays of every item type, two of 300k items (strings,
    float32), and the file as gguf's own reader reads it (about 20 s, so once)."""
    T = gguf.GGUFValueType
    rng = np.random.default_rng(0)
    pieces = ["", "\u2581the", "é", "中文", "<0x0A>", "a b", "x" * 300]
    strings = [pieces[i % 7] + str(i) * (i % 3) for i in range(N_BIG)]  # "" and "é" among them
    md: dict = {
        "big.strings": (strings, T.ARRAY, T.STRING),
        "big.float32": (rng.standard_normal(N_BIG).astype(np.float32).tolist(), T.ARRAY, T.FLOAT32),
        "one.string": (["only"], T.ARRAY, T.STRING),
        "one.uint64": ([2**64 - 1], T.ARRAY, T.UINT64),
    }  # fmt: skip
    for t, dtype in gguf.GGUFReader.gguf_scalar_to_np.items():  # every scalar type, 1000 items
        values = rng.integers(0, 256, 1000).astype(dtype).tolist()
        md[f"small.{t.name.lower()}"] = (values, T.ARRAY, t)
    path = write_tiny_model(tmp_path_factory.mktemp("big") / "big.gguf", metadata=md)
    return path, gguf.GGUFReader(path)


def python_types(value: object) -> object:
    return [type(v) for v in value] if isinstance(value, list) else type(value)


def test_big_arrays_read_as_gguf_reads_them(big_arrays: tuple[Path, gguf.GGUFReader]) -> None:
    path, stock = big_arrays
    ours = read_metadata(path)
    assert list(ours) == list(stock.fields)
    for key, field in stock.fields.items():  # the same values, of the same Python types
        want = field.contents()
        assert ours[key] == want and python_types(ours[key]) == python_types(want), key
    assert len(ours["big.strings"]) == N_BIG and ours["big.strings"][5] == "a b55"
    fields = read_gguf(path).reader.fields
    assert all(fields[key].types == field.types for key, field in stock.fields.items())


def test_big_arrays_survive_requantising(
    big_arrays: tuple[Path, gguf.GGUFReader], tmp_path: Path
) -> None:
    path, stock = big_arrays
    src = read_gguf(path)
    write_quantized_and_check(src, tmp_path / "ours.gguf", "q8_0")
    # the same file as when the writer copies from gguf's own reader, byte for byte
    write_quantized(dataclasses.replace(src, reader=stock), tmp_path / "stock.gguf", "q8_0")
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "stock.gguf").read_bytes()
