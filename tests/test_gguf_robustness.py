"""Robustness of the reader: a damaged GGUF ends in a RefinferError, never in a traceback.

The property: whatever is done to a valid file, opening it (read_gguf, refinfer.load),
running one token through the model and encoding and decoding a short text either all
succeed or stop with a `RefinferError` whose message is one line. Never another
exception, never a crash, never gigabytes allocated or a hang on a huge count.

The valid files are tiny synthetic Llamas from gguf_factory with a real vocabulary: a
SentencePiece one ('llama', with the 256 byte tokens <0x00>..<0xFF>) in F32 and a
byte-level BPE one ('gpt2', with merges) in Q8_0. Two kinds of damage:
- bytes: bytes overwritten in the header, the metadata (key/value) region, the tensor-info
  table or the tensor data; a cut at any offset; a count (n_tensors, n_kv, an array
  length), a string length, a value or tensor type, a tensor offset, n_dims or a dimension
  set to another (usually huge) value; a byte of a key, a string value, a token piece or a
  tensor name made invalid UTF-8. Every position comes from parsing the valid file with
  gguf's own reader.
- values (the file is rewritten, so it parses): a metadata value of the wrong type or an
  absurd one (a string where an int belongs, a context length of -1 or 2^40, a NaN
  epsilon), a byte token spelt wrong ('<0xZZ>').
The last tests are the mutants that failed before the reader was fixed, each with the
error it must give now.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refinfer
from gguf_factory import write_tiny_model
from refinfer.errors import ModelFileError, RefinferError, TokenizerError, UnsupportedModelError
from refinfer.gguf import read_gguf
from refinfer.tokenizer import BYTE, CONTROL, LATIN1_TO_GPT2, NORMAL, UNKNOWN

pytestmark = pytest.mark.usefixtures("one_thread")

T = gguf.GGUFValueType
TEXT = "hi ab, a\n"  # what each loaded tokenizer encodes and decodes
SIZES = {"n_layers": 1, "dim": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 32}
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


# -- the valid files ---------------------------------------------------------------------


def spm_vocabulary() -> dict[str, Any]:
    """A 'llama' (SentencePiece) vocabulary: <unk>, <s>, </s>, 256 byte tokens, a few pieces."""
    pieces = ["\u2581", "a", "b", "h", "i", "\u2581a", "\u2581h", "ab", "hi", "\u2581hi"]
    tokens = ["<unk>", "<s>", "</s>", *BYTE_PIECES, *pieces]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.scores": (scores, T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32),
        "tokenizer.ggml.eos_token_id": (2, T.UINT32),
        "tokenizer.ggml.add_bos_token": (True, T.BOOL),
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }


def bpe_vocabulary() -> dict[str, Any]:
    """A 'gpt2' (byte-level BPE) vocabulary: the 256 byte symbols, three merges, one control."""
    merges = ["h i", "a b", "\u0120 a"]
    tokens = [*LATIN1_TO_GPT2.values(), "hi", "ab", "\u0120a", "<|endoftext|>"]
    types = [NORMAL] * 259 + [CONTROL]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING),
        "tokenizer.ggml.bos_token_id": (259, T.UINT32),
        "tokenizer.ggml.eos_token_id": (259, T.UINT32),
    }


VOCABULARIES = {"spm-f32": (spm_vocabulary, "f32"), "bpe-q8_0": (bpe_vocabulary, "q8_0")}


def write_model(path: Path, base: str, edits: dict[str, Any] | None = None) -> Path:
    """A tiny model with vocabulary `base`, its metadata overwritten by `edits`."""
    vocabulary, fmt = VOCABULARIES[base]
    md = vocabulary()
    n_tokens = len(md["tokenizer.ggml.tokens"][0])
    md |= edits or {}
    return write_tiny_model(path, fmt=fmt, metadata=md, vocab_size=n_tokens, **SIZES)


Slot = tuple[int, int]  # (offset in the file, width in bytes)


@dataclass(frozen=True, repr=False)
class Layout:
    """Where things are in a valid file, found by parsing it with gguf's own reader."""

    data: bytes
    regions: dict[str, Slot]  # header, metadata, tensor_info, tensor_data: (start, end)
    numbers: dict[str, list[Slot]]  # count, length, type, ...: every such field
    strings: list[Slot]  # the bytes of every key, string value, token piece, tensor name
    parts: dict[tuple[str, int], Slot]  # (key or tensor name, index into its parts)

    @classmethod
    def of(cls, path: Path) -> Layout:
        """Parse `path` and note the place of every count, length, type and string."""
        reader = gguf.GGUFReader(path)
        base = reader.data.ctypes.data
        fields = {**reader.fields, **{t.name: t.field for t in reader.tensors}}
        parts = {
            (name, i): (p.ctypes.data - base, p.nbytes)
            for name, field in fields.items()
            for i, p in enumerate(field.parts)
        }
        numbers, strings = _slots(reader, parts)
        info = reader.tensors[0].field.offset
        regions = {
            "header": (0, 24),
            "metadata": (24, info),
            "tensor_info": (info, reader.data_offset),
            "tensor_data": (reader.data_offset, path.stat().st_size),
        }
        return cls(path.read_bytes(), regions, numbers, strings, parts)

    def __repr__(self) -> str:
        return f"Layout({len(self.data)} bytes, regions={self.regions})"

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis shows a failing example
        printer.text(repr(self))


def _slots(reader: gguf.GGUFReader, parts: dict) -> tuple[dict[str, list[Slot]], list[Slot]]:
    """Every numeric field by kind, and every string, from the parts of each field."""
    numbers: dict[str, list[Slot]] = {"count": [(8, 8), (16, 8)]}  # n_tensors, n_kv
    strings = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        kinds = ["length", None, "type"]  # key length, key, value type
        if field.types[0] == T.ARRAY:
            kinds += ["type", "count"]  # item type, length
        for i in range(len(kinds)):
            if kinds[i]:
                numbers.setdefault(kinds[i], []).append(parts[name, i])
        strings.append(parts[name, 1])
        if field.types[-1] == T.STRING:
            numbers["length"] += [parts[name, i - 1] for i in field.data]
            strings += [parts[name, i] for i in field.data]
    for t in reader.tensors:  # name length, name, n_dims, dims, type, offset
        for i, kind in enumerate(["length", None, "n_dims", None, "type", "tensor offset"]):
            if kind:
                numbers.setdefault(kind, []).append(parts[t.name, i])
        strings.append(parts[t.name, 1])
        start, width = parts[t.name, 3]
        numbers.setdefault("dim", []).extend((start + k, 8) for k in range(0, width, 8))
    return numbers, [s for s in strings if s[1]]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Layout]:
    """The valid files, each loaded and run once (which also compiles the kernels)."""
    tmp = tmp_path_factory.mktemp("valid")
    layouts = {}
    for base in VOCABULARIES:
        path = write_model(tmp / f"{base}.gguf", base)
        load_and_run(path)
        layouts[base] = Layout.of(path)
    return layouts


_names = itertools.count()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """A fresh file name for each example (an earlier model may still map the last file)."""
    tmp = tmp_path_factory.mktemp("mutants")
    return lambda: tmp / f"mutant-{next(_names)}.gguf"


# -- what must hold ----------------------------------------------------------------------


def load_and_run(path: Path) -> None:
    """What a user does first: open the file, load the model, run a token, tokenise a text."""
    read_gguf(path)
    m = refinfer.load(path)
    assert m.logits([0]).shape == (1, m.config.vocab_size)
    ids = m.tokenizer.encode(TEXT)
    m.tokenizer.decode(ids)
    m.logits(ids or [0])  # the tokenizer's ids are ids the model can embed


def assert_refinfer_error_or_success(path: Path) -> None:
    """load_and_run(path) succeeds or raises a RefinferError with a one-line message."""
    try:
        load_and_run(path)
    except RefinferError as e:
        message = str(e)
        assert message.strip() and "\n" not in message, repr(message)


# -- damage to the bytes -----------------------------------------------------------------

HUGE = st.one_of(
    st.sampled_from([0, 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
BAD_UTF8 = st.sampled_from([0x80, 0xBF, 0xC0, 0xC1, 0xE0, 0xED, 0xF0, 0xF5, 0xFF])
Edit = tuple[str, int, bytes]  # ('write', offset, new bytes) or ('cut', offset, b'')


@st.composite
def overwrite(draw, layout: Layout) -> Edit:
    """Random bytes over a few bytes of one region."""
    start, end = layout.regions[draw(st.sampled_from(sorted(layout.regions)))]
    return "write", draw(st.integers(start, end - 1)), draw(st.binary(min_size=1, max_size=8))


@st.composite
def new_number(draw, layout: Layout) -> Edit:
    """A count, length, type, tensor offset or dimension set to another (often huge) value."""
    kind = draw(st.sampled_from(sorted(layout.numbers)))
    at, width = draw(st.sampled_from(layout.numbers[kind]))
    value = draw(st.integers(0, 40) if kind == "type" else HUGE) % (1 << 8 * width)
    return "write", at, value.to_bytes(width, "little")


@st.composite
def bad_utf8(draw, layout: Layout) -> Edit:
    """One byte of a key, string value, token piece or tensor name made invalid UTF-8."""
    at, length = draw(st.sampled_from(layout.strings))
    return "write", at + draw(st.integers(0, length - 1)), bytes([draw(BAD_UTF8)])


@st.composite
def cut(draw, layout: Layout) -> Edit:
    """The file truncated at any offset."""
    return "cut", draw(st.integers(0, len(layout.data) - 1)), b""


def byte_edits(layout: Layout) -> st.SearchStrategy[list[Edit]]:
    """One to three byte-level edits of a valid file."""
    edit = st.one_of(overwrite(layout), new_number(layout), bad_utf8(layout), cut(layout))
    return st.lists(edit, min_size=1, max_size=3)


def mutate(data: bytes, edits: list[Edit]) -> bytes:
    """`data` with each edit applied in turn (a write past a cut is dropped)."""
    out = bytearray(data)
    for op, at, new in edits:
        if op == "cut":
            del out[at:]
        else:
            out[at : at + len(new)] = new[: max(0, len(out) - at)]
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_damaged_bytes_end_in_a_refinfer_error(files, scratch, data) -> None:
    base = data.draw(st.sampled_from(sorted(files)), label="base")
    edits = data.draw(byte_edits(files[base]), label="edits")
    path = scratch()
    path.write_bytes(mutate(files[base].data, edits))
    assert_refinfer_error_or_success(path)


# -- damage to the values (the file still parses) ----------------------------------------

INTS = st.one_of(
    st.sampled_from([0, 1, 2, 3, -1, -(2**31), 2**31 - 1, 2**24 + 1, 2**40, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
INT32S = st.integers(-(2**31), 2**31 - 1)
VALUES = st.one_of(
    st.text(max_size=12).map(lambda s: (s, T.STRING)),
    INTS.map(lambda n: (n, T.INT64)),
    st.integers(0, 2**64 - 1).map(lambda n: (n, T.UINT64)),
    INT32S.map(lambda n: (n, T.INT32)),
    st.floats(width=32).map(lambda x: (x, T.FLOAT32)),
    st.booleans().map(lambda b: (b, T.BOOL)),
    st.lists(st.text(max_size=4), min_size=1, max_size=4).map(lambda v: (v, T.ARRAY, T.STRING)),
    st.lists(INT32S, min_size=1, max_size=4).map(lambda v: (v, T.ARRAY, T.INT32)),
    st.lists(st.floats(width=32), min_size=1, max_size=4).map(lambda v: (v, T.ARRAY, T.FLOAT32)),
)
LLAMA_KEYS = (
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.layer_norm_rms_epsilon", "attention.sliding_window", "vocab_size",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length",
)  # fmt: skip
TOKENIZER_KEYS = (
    "model", "pre", "tokens", "token_type", "scores", "merges", "bos_token_id", "eos_token_id",
    "eot_token_id", "add_bos_token", "add_eos_token", "add_space_prefix",
    "remove_extra_whitespaces", "precompiled_charsmap",
)  # fmt: skip
KEYS = [
    "general.architecture",
    "general.alignment",
    "tokenizer.chat_template",
    *(f"llama.{k}" for k in LLAMA_KEYS),
    *(f"tokenizer.ggml.{k}" for k in TOKENIZER_KEYS),
]
BAD_BYTE_PIECES = st.one_of(
    st.sampled_from(["<0xZZ>", "<0x>", "<0x100>", "<0x-1>", "<0x 1>", "<0x4>", "<0x0a>", ""]),
    st.text(max_size=8),
)


@st.composite
def bad_byte_token(draw, base: str) -> dict[str, Any]:
    """Edits that make one token a BYTE token with a (usually) malformed piece."""
    md = VOCABULARIES[base][0]()
    tokens, types = md["tokenizer.ggml.tokens"][0], md["tokenizer.ggml.token_type"][0]
    i = draw(st.integers(0, len(tokens) - 1))
    tokens[i], types[i] = draw(BAD_BYTE_PIECES), BYTE
    return {
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
    }


@st.composite
def damaged_values(draw) -> tuple[str, dict[str, Any]]:
    """A base vocabulary and metadata edits: wrong-typed or absurd values, bad byte pieces."""
    base = draw(st.sampled_from(sorted(VOCABULARIES)))
    edits = {key: draw(VALUES) for key in draw(st.lists(st.sampled_from(KEYS), max_size=2))}
    if draw(st.booleans()):
        edits |= draw(bad_byte_token(base))
    return base, edits


@settings(max_examples=150, deadline=None)
@given(case=damaged_values())
def test_damaged_values_end_in_a_refinfer_error(scratch, case) -> None:
    base, edits = case
    assert_refinfer_error_or_success(write_model(scratch(), base, edits))


# -- the mutants that failed before, and what they must give now -------------------------


def put(layout: Layout, name: str, part: int, value: int | bytes, at: int = 0) -> bytes:
    """The file with part `part` of key or tensor `name` overwritten (ints little-endian)."""
    start, width = layout.parts[name, part]
    new = value if isinstance(value, bytes) else value.to_bytes(width, "little")
    return mutate(layout.data, [("write", start + at, new)])


TOKENS = "tokenizer.ggml.tokens"
BYTE_MUTANTS = {  # name: (base, the damaged bytes, error, a regex its message must match)
    "invalid UTF-8 in a token piece": (
        "spm-f32", lambda f: put(f, TOKENS, 6 + 2 * 260, b"\xff"),
        ModelFileError, r"'tokenizer\.ggml\.tokens'\[260\] is not UTF-8",
    ),  # UnicodeDecodeError
    "invalid UTF-8 in a string value": (
        "bpe-q8_0", lambda f: put(f, "general.name", 4, b"\xc3"),
        ModelFileError, r"'general\.name' is not UTF-8",
    ),  # UnicodeDecodeError
    "a string value read as an array (a scalar array past the end)": (
        "spm-f32", lambda f: put(f, "general.architecture", 2, int(T.ARRAY)),
        ModelFileError, r"claims \d+ items",
    ),  # looped for ever, a numpy view per missing item
    "a huge string length in an array": (
        "spm-f32", lambda f: put(f, TOKENS, 5 + 2 * 260, 2**40),
        ModelFileError, r"string 260 of the array at byte \d+ runs past the end of the file",
    ),  # refinfer reads an array of strings in one loop of its own, checking each string
    "a huge array length": (
        "bpe-q8_0", lambda f: put(f, "tokenizer.ggml.token_type", 4, 2**62),
        ModelFileError, r"the array at byte \d+ claims 4611686018427387904 items",
    ),  # a numpy message ('When changing to a larger dtype...'); an array of bytes looped
    "a huge tensor count": (
        "spm-f32", lambda f: mutate(f.data, [("write", 8, (2**40).to_bytes(8, "little"))]),
        ModelFileError, r"claims 1099511627776 tensors",
    ),  # a numpy message ('index 0 is out of bounds for axis 0 with size 0')
    "a tensor offset past the end": (
        "bpe-q8_0", lambda f: put(f, "blk.0.ffn_up.weight", 5, 2**40),
        ModelFileError, r"tensor 'blk\.0\.ffn_up\.weight': its \d+ bytes at byte \d+ run past",
    ),  # a numpy message naming no tensor ('cannot reshape array of size 0 into shape (32,34)')
    "a tensor of a smaller type than its bytes (F32 -> F16)": (
        "spm-f32", lambda f: put(f, "blk.0.attn_q.weight", 4, int(gguf.GGMLQuantizationType.F16)),
        ModelFileError, r"tensor 'blk\.0\.attn_k\.weight' starts at .* 'blk\.0\.attn_q\.weight'",
    ),  # loaded, attn_q read as F16 from the first half of its F32 bytes
}  # fmt: skip


@pytest.mark.parametrize("name", list(BYTE_MUTANTS))
def test_byte_mutant(files, scratch, name: str) -> None:
    base, damage, error, message = BYTE_MUTANTS[name]
    path = scratch()
    path.write_bytes(damage(files[base]))
    started = time.perf_counter()
    with pytest.raises(error, match=message) as e:
        load_and_run(path)
    assert time.perf_counter() - started < 5, "a damaged file must fail fast"
    assert "\n" not in str(e.value)


def with_piece(i: int, piece: str) -> dict[str, Any]:
    """Edits giving token i of the SentencePiece vocabulary the text `piece`."""
    tokens = spm_vocabulary()[TOKENS][0]
    tokens[i] = piece
    return {TOKENS: (tokens, T.ARRAY, T.STRING)}


VALUE_MUTANTS = {  # name: (base, metadata edits, error, a regex its message must match)
    "a malformed byte piece '<0xZZ>'": (
        "spm-f32", with_piece(3, "<0xZZ>"),
        TokenizerError, r"token 3 is a byte token but reads '<0xZZ>'",
    ),  # ValueError: invalid literal for int() with base 16
    "a byte piece past 0xFF": (
        "spm-f32", with_piece(3, "<0x100>"),
        TokenizerError, r"token 3 is a byte token but reads '<0x100>'",
    ),  # ValueError: bytes must be in range(0, 256)
    "a string context length": (
        "bpe-q8_0", {"llama.context_length": "4096"},
        UnsupportedModelError, r"llama\.context_length is '4096', not an integer",
    ),  # int() took '4096'; 'abc' was a ValueError, a list a TypeError
    "an absurd context length": (
        "bpe-q8_0", {"llama.context_length": (2**40, T.UINT64)},
        UnsupportedModelError, r"llama\.context_length is 1099511627776; it must be from 1 to",
    ),  # rope tables of 2^40 positions: MemoryError, or the OOM killer
    "a negative context length": (
        "spm-f32", {"llama.context_length": (-1, T.INT32)},
        UnsupportedModelError, r"llama\.context_length is -1",
    ),  # loaded; then '1 tokens exceed the model's context of -1 tokens'
    "a head count of 0": (
        "spm-f32", {"llama.attention.head_count": (0, T.UINT32)},
        UnsupportedModelError, r"llama\.attention\.head_count is 0",
    ),  # ZeroDivisionError
    "a NaN epsilon": (
        "spm-f32", {"llama.attention.layer_norm_rms_epsilon": (float("nan"), T.FLOAT32)},
        UnsupportedModelError, r"layer_norm_rms_epsilon is nan",
    ),  # loaded, and every logit NaN
    "a huge block count": (
        "bpe-q8_0", {"llama.block_count": (2**40, T.UINT64)},
        UnsupportedModelError, r"tensor blk\.1\.attn_norm\.weight is missing",
    ),  # expected_shapes built 9 * 2^40 entries until memory ran out
    "the tokenizer model as a list": (
        "bpe-q8_0", {"tokenizer.ggml.model": (["gpt2"], T.ARRAY, T.STRING)},
        TokenizerError, r"tokenizer\.ggml\.model is \['gpt2'\], not a string",
    ),  # TypeError: unhashable type: 'list'
    "a string BOS id": (
        "spm-f32", {"tokenizer.ggml.bos_token_id": "1"},
        TokenizerError, r"tokenizer\.ggml\.bos_token_id is '1', not an integer",
    ),  # TypeError: '<=' not supported between 'int' and 'str'
    "token types as one int": (
        "spm-f32", {"tokenizer.ggml.token_type": (6, T.INT32)},
        TokenizerError, r"tokenizer\.ggml\.token_type is 6, not a list of integers",
    ),  # TypeError: 'int' object is not iterable
    "merges as a float": (
        "bpe-q8_0", {"tokenizer.ggml.merges": (0.5, T.FLOAT32)},
        TokenizerError, r"tokenizer\.ggml\.merges is 0\.5, not a list of strings",
    ),  # TypeError: 'float' object is not iterable
    "an int chat template": (
        "bpe-q8_0", {"tokenizer.chat_template": (7, T.INT32)},
        TokenizerError, r"tokenizer\.chat_template is 7, not a string",
    ),  # TypeError: argument of type 'int' is not iterable
}  # fmt: skip


@pytest.mark.parametrize("name", list(VALUE_MUTANTS))
def test_value_mutant(scratch, name: str) -> None:
    base, edits, error, message = VALUE_MUTANTS[name]
    with pytest.raises(error, match=message) as e:
        load_and_run(write_model(scratch(), base, edits))
    assert "\n" not in str(e.value)


def test_more_tokens_than_the_model_embeds(scratch) -> None:
    """A vocabulary longer than token_embd: its last ids would index past the embedding."""
    md = bpe_vocabulary()  # 260 tokens
    path = write_tiny_model(scratch(), fmt="q8_0", metadata=md, vocab_size=256, **SIZES)
    with pytest.raises(UnsupportedModelError, match=r"has 260 tokens but the model only 256"):
        load_and_run(path)  # IndexError in Model.embed for the ids of 'hi' and 'ab'


def test_a_tensor_with_no_dimensions(scratch) -> None:
    """GGUF allows n_dims = 0 on paper; refinfer's tensors have 1 to 4 (as ggml's)."""
    path = scratch()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor_info("scalar", (), np.dtype(np.float32), 4, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_ti_data_to_file()
    writer.write_tensor_data(np.ones(1, np.float32)), writer.close()
    with pytest.raises(ModelFileError, match=r"tensor 'scalar' has 0 dimensions"):
        read_gguf(path)  # IndexError in _qtensor (shape[-1] of ())
