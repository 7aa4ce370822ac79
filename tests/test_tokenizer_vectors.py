"""llama.cpp's own tokenizer test vectors, and the chat templates its vocabularies carry.

llama.cpp's models/ holds vocabulary-only GGUFs, ggml-vocab-<name>.gguf, each with a .inp
file (texts separated by a marker line) and a .out file (llama.cpp's ids, one text per
line). `make test` unpacks them from the llama-cpp-python source distribution into
models/llama.cpp-vocab/. tests/test-tokenizer-0.cpp encodes each text with
add_special=false and parse_special=false, so refinfer encodes with add_bos=False,
add_eos=False and parse_special=False, and must give exactly the ids of the .out file.

The chat templates are rendered by HF transformers' own renderer as the oracle.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from refinfer.gguf import read_metadata
from refinfer.tokenizer import Tokenizer

VOCAB_DIR = Path(__file__).resolve().parents[1] / "models" / "llama.cpp-vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"  # between two texts of a .inp file
# tokenizer.ggml.model values refinfer deliberately does not read, and why.
NOT_READ = {
    "bert": "WordPiece ('bert') vocabularies belong to encoder-only models refinfer does not run",
    "rwkv": "RWKV's trie vocabulary belongs to a recurrent model refinfer does not run",
}
VOCABS = sorted(
    p.name.removeprefix("ggml-vocab-").removesuffix(".gguf.inp")
    for p in VOCAB_DIR.glob("ggml-vocab-*.gguf.inp")
) or ["(none unpacked)"]
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Name a river."},
    {"role": "assistant", "content": " The Loire. "},
    {"role": "user", "content": "And one in Asia?"},
]


def vocab_path(name: str) -> Path:
    """models/llama.cpp-vocab/ggml-vocab-<name>.gguf; fails with the fix if it is missing."""
    path = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.fail(f"{path} is missing: `make test` unpacks llama.cpp's test vectors")
    return path


def read_cases(path: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs of <path>.inp and <path>.out, split as test-tokenizer-0.cpp does."""
    texts = path.with_name(path.name + ".inp").read_bytes().decode().split(SEPARATOR)
    if texts[-1] == "":  # the file ends with a marker, which starts no further text
        texts.pop()
    lines = path.with_name(path.name + ".out").read_text().splitlines()
    assert len(texts) == len(lines), f"{path.name}: .inp and .out differ in length"
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


@pytest.fixture(scope="module")
def vocab(request) -> tuple[Path, Tokenizer]:
    """(path, refinfer's tokenizer) of the vocabulary named by the test's parameter, read
    once for all the tests that use it (pytest groups them; a large one takes seconds)."""
    path = vocab_path(request.param)
    metadata = read_metadata(path)
    model = metadata.get("tokenizer.ggml.model")
    if model in NOT_READ:
        pytest.skip(f"tokenizer.ggml.model {model!r}: {NOT_READ[model]}")
    return path, Tokenizer.from_metadata(metadata)


@pytest.mark.parametrize("vocab", VOCABS, indirect=True)
def test_ids_equal_llama_cpp(vocab):
    path, tok = vocab
    wrong = [
        (text, ids, expected)
        for text, expected in read_cases(path)
        if (ids := tok.encode(text, add_bos=False, add_eos=False)) != expected
    ]
    assert not wrong, (
        f"{len(wrong)} texts differ, the first (text, refinfer, llama.cpp): {wrong[0]}"
    )


@pytest.mark.parametrize(
    "vocab, end_of_turn",
    [
        ("phi-3", "<|end|>"),
        ("qwen2", "<|im_end|>"),
        ("qwen35", "<|im_end|>"),
        ("gemma-4", "<turn|>"),
    ],
    indirect=["vocab"],
)
def test_chat_template_renders_as_hf(vocab, end_of_turn):
    """The vocabulary's own template renders as HF's renderer renders it, and the marker
    that closes its turns ends a generation."""
    from transformers.utils.chat_template_utils import render_jinja_template

    _, tok = vocab
    for prompt in (True, False):
        rendered, _ = render_jinja_template(
            [CONVERSATION],
            chat_template=tok.chat_template,
            add_generation_prompt=prompt,
            bos_token=tok.id_to_piece(tok.bos_id),
            eos_token=tok.id_to_piece(tok.eos_id),
        )
        assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=prompt) == rendered[0]
    end_id = tok.encode(end_of_turn, add_bos=False, parse_special=True)
    assert len(end_id) == 1 and end_id[0] in tok.eos_ids
