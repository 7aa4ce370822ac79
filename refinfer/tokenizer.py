"""Tokenizers built from the vocabulary a GGUF carries: text <-> token ids.

This is the text end of the data flow (text --tokenizer--> ids --model--> logits
--sampling--> ids --tokenizer--> text). `Tokenizer.from_gguf` reads only the
`tokenizer.*` metadata, so it works on a full model and on a vocabulary-only file,
and picks the algorithm by `tokenizer.ggml.model`:

- 'llama' (SentencePiece BPE: Llama 1/2, Mistral, Phi-3, Gemma 3) and 't5' (SentencePiece
  unigram, as llama.cpp's converter labels unigram vocabularies): the GGUF's pieces,
  scores and types are serialised back into a SentencePiece ModelProto and the
  `sentencepiece` library itself encodes.
- 'gpt2' (byte-level BPE: SmolLM2, Llama 3, Qwen2/Qwen3, DeepSeek, Falcon): a regex
  pre-tokeniser chosen by `tokenizer.ggml.pre` (the regexes of llama.cpp's llama-vocab.cpp,
  as rows of SPLITS_BY_GROUP), then merges by rank over the GPT-2 byte-to-unicode
  alphabet, cached per pre-token.
- 'gemma4': the same merges over UTF-8 characters as SentencePiece spells them ('▁' for
  the space, '<0xNN>' byte fallback), on whole lines.

SentencePiece's USER_DEFINED pieces (Gemma 3's runs of spaces, tabs and newlines) are cut
out of the text before the library sees it, as llama.cpp and HF do: sentencepiece itself
would match them only after turning spaces into '▁'.

Decoding is ours for all: every id maps to bytes once, at load, and text is the UTF-8
decoding of their concatenation. `stream_decoder()` does the same incrementally, so what
it emits is always a prefix of the full decode and never a broken UTF-8 sequence.
Special tokens (CONTROL, and UNKNOWN) become single ids only with `parse_special=True`;
USER_DEFINED tokens always do, as in llama.cpp, HF tokenizers and sentencepiece.

Every `tokenizer.*` value is checked for its type as it is read (the pieces a list of
strings, an id an integer inside the vocabulary, a byte token spelt '<0xNN>'), so a
damaged vocabulary is a TokenizerError naming the key, not a TypeError later.
"""

from __future__ import annotations

import codecs
import heapq
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import regex
import sentencepiece
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from refinfer.errors import TokenizerError
from refinfer.gguf import read_metadata

# Token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type); the numbers are
# SentencePiece's piece types, so they go into a ModelProto unchanged.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPM_SPACE = "\u2581"  # '▁': SentencePiece's visible space
SPM_UNK_SURFACE = " \u2047 "  # ' ⁇ ': how sentencepiece decodes the unknown piece

# Pre-tokeniser regexes, applied in order as in llama.cpp's unicode_regex_split: each
# regex splits every fragment of the previous one into its matches and the gaps between.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN35_SPLIT = (  # Qwen2's, with combining marks (\p{M}) kept inside words
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
    r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek's tokenizer.json spells out Unicode's cased letters and its CJK ranges.
DEEPSEEK_LETTERS = (
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽ"
    "ᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥ"
    "ῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎ"
    "ꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
)
DEEPSEEK_CJK = "[一-龥ࠀ-一가-퟿]+"
SPLITS_BY_GROUP = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt2": (GPT2_SPLIT,),
    "starcoder": (r"\p{N}", GPT2_SPLIT),  # digits one by one, then GPT-2's split
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, "[0-9][0-9][0-9]"),
    "llama3": (LLAMA3_SPLIT,),
    "qwen2": (QWEN2_SPLIT,),
    "qwen35": (QWEN35_SPLIT,),
    "deepseek-llm": (
        r"[\r\n]",
        rf"\s?[{DEEPSEEK_LETTERS}]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        DEEPSEEK_CJK,
        r"\p{N}+",
    ),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}"),
    "gemma4": (r"[^\n]+|[\n]+",),  # lines and newline runs: BPE runs over whole lines
}
# tokenizer.ggml.pre as convert_hf_to_gguf.py writes it -> llama.cpp's group for it.
PRE_GROUPS = {
    "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "smollm": "starcoder", "starcoder": "starcoder", "refact": "starcoder",
    "command-r": "starcoder", "codeshell": "starcoder",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "falcon3": "llama3",
    "qwen2": "qwen2", "stablelm2": "qwen2", "deepseek-r1-qwen": "qwen2", "megrez": "qwen2",
    "default": "default", "falcon": "falcon", "qwen35": "qwen35",
    "deepseek-llm": "deepseek-llm", "deepseek-coder": "deepseek-coder",
}  # fmt: skip
# End-of-turn markers that stop generation when the chat template uses them, or always when
# the GGUF has no template (llama.cpp's list).
END_OF_TURN_TEXTS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<turn|>",
    "<|endoftext|>",
)
BPE_CACHE_LIMIT = 200_000  # pre-token words remembered by a byte-level BPE tokenizer
BYTE_PIECE = regex.compile(r"<0x([0-9A-F]{2})>")  # a BYTE token, as sentencepiece spells it
DAMAGED = "the GGUF's vocabulary is damaged; re-convert the model"

# What a tokenizer.* value must be, by the name the error message gives it.
KINDS = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a boolean": lambda v: isinstance(v, bool),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of integers": lambda v: isinstance(v, list) and all(isinstance(x, int) for x in v),
    "a list of numbers": lambda v: (
        isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
    ),
}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters ('Ġ' is the space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()
LATIN1_TO_GPT2 = str.maketrans({chr(b): c for b, c in BYTE_TO_UNICODE.items()})
GPT2_TO_LATIN1 = str.maketrans({c: chr(b) for b, c in BYTE_TO_UNICODE.items()})


class StreamDecoder:
    """Incremental detokeniser: text that is final as soon as it is, never half a character.

    The concatenation of every `push` and the final `flush` equals `Tokenizer.decode` of
    all the ids pushed, and after each push it is a prefix of decoding the ids so far.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._at_start = True  # only hidden control tokens so far (see _token_bytes)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly '', held back mid-character)."""
        data, self._at_start = self._tokenizer._token_bytes(token_id, self._special, self._at_start)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """A GGUF vocabulary: encode text to ids, decode ids to text, render chat prompts."""

    model = ""  # tokenizer.ggml.model this class implements
    strips_leading_space = False  # decode drops the space that encode's prefix added

    def __init__(self, md: dict[str, Any]) -> None:
        self.tokens: list[str] = _require(md, "tokenizer.ggml.tokens", "a list of strings")
        n = len(self.tokens)
        types = _typed(md, "tokenizer.ggml.token_type", "a list of integers")
        self.types: list[int] = list(types or [NORMAL] * n)
        if len(self.types) != n:
            raise TokenizerError(
                f"tokenizer.ggml.token_type has {len(self.types)} entries for {n} tokens: {DAMAGED}"
            )
        self.bos_id: int | None = self._token_id(md, "bos")
        self.eos_id: int | None = self._token_id(md, "eos")
        self.chat_template: str | None = _typed(md, "tokenizer.chat_template", "a string")
        self.eos_ids: set[int] = self._end_ids(md)
        self.add_bos_default = _flag(md, "tokenizer.ggml.add_bos_token", self._adds_bos(md))
        self.add_eos_default = _flag(md, "tokenizer.ggml.add_eos_token", self._adds_eos())
        self._special_ids = self._special_texts()  # what parse_special=True matches
        self._special_re = _alternation(list(self._special_ids))
        self._user_defined_re = _alternation(  # what is matched whole even without it
            [text for text, i in self._special_ids.items() if self.types[i] == USER_DEFINED]
        )
        self._bytes = [self._piece_bytes(i) for i in range(n)]  # id -> UTF-8 bytes of its text

    # -- construction ------------------------------------------------------------------

    @staticmethod
    def from_gguf(path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a GGUF file (a full model or a vocabulary-only file)."""
        return Tokenizer.from_metadata(read_metadata(path))

    @staticmethod
    def from_metadata(md: dict[str, Any]) -> Tokenizer:
        """The tokenizer described by GGUF metadata, chosen by tokenizer.ggml.model."""
        kind = _typed(md, "tokenizer.ggml.model", "a string")
        if kind is None:
            raise TokenizerError(
                "the GGUF has no tokenizer metadata (tokenizer.ggml.model): convert the model "
                "with its tokenizer (llama.cpp's convert_hf_to_gguf.py writes one)"
            )
        classes = {
            cls.model: cls
            for cls in (SentencePieceTokenizer, UnigramTokenizer, BPETokenizer, Gemma4Tokenizer)
        }
        if kind not in classes:
            raise TokenizerError(
                f"tokenizer.ggml.model is {kind!r}; refinfer reads {', '.join(sorted(classes))}: "
                "use a model with one of those vocabularies"
            )
        return classes[kind](md)

    def _token_id(self, md: dict[str, Any], name: str) -> int | None:
        """The id in tokenizer.ggml.<name>_token_id, checked against the vocabulary."""
        i = _typed(md, f"tokenizer.ggml.{name}_token_id", "an integer")
        if i is not None and not 0 <= i < len(self.tokens):
            raise TokenizerError(
                f"tokenizer.ggml.{name}_token_id is {i}, outside the {len(self.tokens)}-token "
                "vocabulary: the GGUF is damaged; re-convert the model"
            )
        return i

    def _end_ids(self, md: dict[str, Any]) -> set[int]:
        """Ids that end a generation: eos, eot, eom, and the end-of-turn tokens the chat
        template uses (all of them without a template, as llama.cpp: Gemma 3's GGUF has
        none, yet its turns end in '<end_of_turn>')."""
        ids = {self._token_id(md, name) for name in ("eos", "eot", "eom")} - {None}
        for i, (text, kind) in enumerate(zip(self.tokens, self.types, strict=True)):
            if kind == CONTROL and text in END_OF_TURN_TEXTS and self._template_uses(text):
                ids.add(i)
        return ids

    def _template_uses(self, text: str) -> bool:
        """Whether the chat template writes `text` (True when there is no template)."""
        return self.chat_template is None or text in self.chat_template

    def _special_texts(self) -> dict[str, int]:
        """Text -> id of every token that parse_special may match as a whole."""
        texts: dict[str, int] = {}
        for i, (text, kind) in enumerate(zip(self.tokens, self.types, strict=True)):
            if kind in (CONTROL, UNKNOWN, USER_DEFINED) and text:
                texts.setdefault(text, i)
        return texts

    def _adds_bos(self, md: dict[str, Any]) -> bool:
        """Whether encode adds BOS when the GGUF does not say (llama.cpp's default)."""
        return False

    def _adds_eos(self) -> bool:
        """Whether encode adds EOS when the GGUF does not say (llama.cpp's default)."""
        return False

    def _piece_bytes(self, i: int) -> bytes:
        """The bytes token i decodes to (control tokens: none)."""
        raise NotImplementedError

    def _encode_text(self, text: str) -> list[int]:
        """Ids of plain text (no special tokens in it)."""
        raise NotImplementedError

    # -- encode ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary (V)."""
        return len(self.tokens)

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        parse_special: bool = False,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Token ids of `text`.

        add_bos / add_eos: None follows the GGUF (tokenizer.ggml.add_bos_token, ...).
        parse_special: control tokens written in the text ('<|im_start|>') become their
        single ids; otherwise they are tokenised as ordinary text.
        """
        ids = [self._edge_id("bos")] if _default(add_bos, self.add_bos_default) else []
        for part in self._split_special(text, parse_special):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self._encode_text(part))
        if _default(add_eos, self.add_eos_default):
            ids.append(self._edge_id("eos"))
        return ids

    def _edge_id(self, name: str) -> int:
        """bos_id or eos_id, with an error if the vocabulary has none."""
        i = getattr(self, f"{name}_id")
        if i is None:
            raise TokenizerError(
                f"this vocabulary has no {name.upper()} token: encode with add_{name}=False"
            )
        return i

    def _split_special(self, text: str, parse_special: bool) -> Iterator[str | int]:
        """`text` cut into plain-text pieces and the ids of the special tokens found in it."""
        pattern = self._special_re if parse_special else self._user_defined_re
        pos = 0
        if pattern is not None:
            for m in pattern.finditer(text):
                if m.start() > pos:
                    yield text[pos : m.start()]
                yield self._special_ids[m.group()]
                pos = m.end()
        if pos < len(text):
            yield text[pos:]

    # -- decode ------------------------------------------------------------------------

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id i as stored ('Ġthe', '▁the', '<0x0A>', '<|im_end|>')."""
        self._check_id(i)
        return self.tokens[i]

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of `ids`; control tokens ('<s>', '<|im_end|>') are shown only if `special`."""
        chunks, at_start = [], True
        for i in ids:
            data, at_start = self._token_bytes(i, special, at_start)
            chunks.append(data)
        return b"".join(chunks).decode("utf-8", errors="replace")

    def stream_decoder(self, special: bool = False) -> StreamDecoder:
        """A fresh incremental decoder; see StreamDecoder."""
        return StreamDecoder(self, special)

    def _check_id(self, i: int) -> None:
        """TokenizerError unless 0 <= i < V."""
        if not 0 <= i < len(self.tokens):
            raise TokenizerError(
                f"token id {i} is outside the vocabulary (0..{len(self.tokens) - 1}): "
                "ids must come from this model's tokenizer"
            )

    def _token_bytes(self, i: int, special: bool, at_start: bool) -> tuple[bytes, bool]:
        """Bytes of token i in a decode, and whether the decode is still at its start.

        At the start (only hidden control tokens before), SentencePiece drops the space
        its encoder prefixed, from the first normal piece only, as sentencepiece does.
        """
        self._check_id(i)
        kind = self.types[i]
        if kind == CONTROL:
            return (self.tokens[i].encode() if special else b""), at_start and not special
        data = self._bytes[i]
        if at_start and self.strips_leading_space and kind not in (BYTE, UNKNOWN):
            data = data.removeprefix(b" ")
        return data, False

    # -- chat --------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages` ([{'role': ..., 'content': ...}]) per the GGUF's
        tokenizer.chat_template, rendered in jinja2's sandbox. Encode it with
        parse_special=True so its markers become their control tokens."""
        if not self.chat_template:
            raise TokenizerError(
                "this model has no chat template (tokenizer.chat_template): "
                "format the prompt yourself and call generate without --chat"
            )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._text_of(self.bos_id),
                eos_token=self._text_of(self.eos_id),
            )
        except TemplateError as e:
            raise TokenizerError(
                f"the model's chat template failed on these messages: {e}"
            ) from None

    def _text_of(self, i: int | None) -> str:
        """A token's stored text, '' for no token."""
        return "" if i is None else self.tokens[i]


class SentencePieceTokenizer(Tokenizer):
    """'llama' vocabularies: SentencePiece BPE, encoded by the sentencepiece library."""

    model = "llama"
    model_type = 2  # TrainerSpec.ModelType: UNIGRAM = 1, BPE = 2

    def __init__(self, md: dict[str, Any]) -> None:
        super().__init__(md)
        self.add_space_prefix = _flag(md, "tokenizer.ggml.add_space_prefix", True)
        self.remove_extra_whitespaces = _flag(md, "tokenizer.ggml.remove_extra_whitespaces", False)
        self.strips_leading_space = self.add_space_prefix or self.remove_extra_whitespaces
        scores = _typed(md, "tokenizer.ggml.scores", "a list of numbers") or [0.0] * self.vocab_size
        if len(scores) != self.vocab_size:
            raise TokenizerError(
                f"tokenizer.ggml.scores has {len(scores)} entries for {self.vocab_size} tokens: "
                "the GGUF's vocabulary is damaged; re-convert the model"
            )
        charsmap_key = "tokenizer.ggml.precompiled_charsmap"
        charsmap = bytes(b & 0xFF for b in _typed(md, charsmap_key, "a list of integers", []))
        self.unk_id = self._unk_id(md)
        proto = self._model_proto(scores, charsmap)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(
                f"sentencepiece rejects this vocabulary ({e}): re-convert the model"
            ) from None

    def _adds_bos(self, md: dict[str, Any]) -> bool:
        """SentencePiece vocabularies start with BOS unless the GGUF says not to."""
        return True

    def _unk_id(self, md: dict[str, Any]) -> int:
        """The piece sentencepiece emits for what it cannot spell: tokenizer.ggml.
        unknown_token_id (Gemma's '<unk>' is typed CONTROL), else the first UNKNOWN token."""
        unk_id = self._token_id(md, "unknown")
        if unk_id is None and UNKNOWN in self.types:
            unk_id = self.types.index(UNKNOWN)
        if unk_id is None:
            raise TokenizerError(
                "the SentencePiece vocabulary has no unknown token (no UNKNOWN type, no "
                "tokenizer.ggml.unknown_token_id), which sentencepiece needs: re-convert the model"
            )
        return unk_id

    def _proto_types(self) -> list[int]:
        """Piece types for the ModelProto: exactly one UNKNOWN (the unk id), as sentencepiece
        requires; other UNKNOWN-typed pieces (Phi-3's '[PAD32011]'...) become UNUSED, which
        encoding never produces either."""
        kinds = [UNUSED if kind == UNKNOWN else kind for kind in self.types]
        kinds[self.unk_id] = UNKNOWN
        return kinds

    def _model_proto(self, scores: list[float], charsmap: bytes) -> bytes:
        """A serialised sentencepiece ModelProto with this vocabulary, in id order."""
        pieces = b"".join(
            _pb_bytes(1, _pb_bytes(1, text.encode()) + _pb_float(2, score) + _pb_int(3, kind))
            for text, score, kind in zip(self.tokens, scores, self._proto_types(), strict=True)
        )
        trainer = (
            _pb_int(3, self.model_type)
            + _pb_int(4, self.vocab_size)
            + _pb_int(35, BYTE in self.types)  # byte_fallback: unknown bytes become <0xNN>
            + _pb_int(40, self.unk_id)
        )
        normalizer = (
            _pb_bytes(1, b"identity" if not charsmap else b"gguf")  # name
            + _pb_bytes(2, charsmap)  # precompiled_charsmap: empty = no normalisation
            + _pb_int(3, self.add_space_prefix)  # add_dummy_prefix
            + _pb_int(4, self.remove_extra_whitespaces)
            + _pb_int(5, True)  # escape_whitespaces: ' ' is stored as '▁'
        )
        return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)

    def _piece_bytes(self, i: int) -> bytes:
        """'▁' is a space, '<0x0A>' is the byte 0x0A, control tokens are empty."""
        return _sentencepiece_bytes(self.tokens[i], self.types[i], i)

    def _encode_text(self, text: str) -> list[int]:
        """sentencepiece's ids for plain text (it adds the '▁' prefix if the model does)."""
        return self._sp.encode(text)


class UnigramTokenizer(SentencePieceTokenizer):
    """'t5' vocabularies: SentencePiece unigram, with its precompiled normaliser if any."""

    model = "t5"
    model_type = 1

    def _adds_bos(self, md: dict[str, Any]) -> bool:
        """T5-style vocabularies do not start with BOS (llama.cpp's default)."""
        return False

    def _adds_eos(self) -> bool:
        """T5-style vocabularies end with EOS (llama.cpp's default)."""
        return True


class BPETokenizer(Tokenizer):
    """'gpt2' vocabularies: byte-level BPE after a regex pre-tokeniser chosen by `pre`."""

    model = "gpt2"

    def __init__(self, md: dict[str, Any]) -> None:
        super().__init__(md)
        group = self._pre_group(md)
        self._splits = [regex.compile(f"({expr})") for expr in SPLITS_BY_GROUP[group]]
        self._ignore_merges = group == "llama3"  # whole words in the vocabulary skip merging
        self._ids = {text: i for i, text in reversed(list(enumerate(self.tokens)))}
        self._ranks = _merge_ranks(_require(md, "tokenizer.ggml.merges", "a list of strings"))
        self._cache: dict[str, list[int]] = {}

    def _pre_group(self, md: dict[str, Any]) -> str:
        """The row of SPLITS_BY_GROUP that tokenizer.ggml.pre names."""
        self.pre = _typed(md, "tokenizer.ggml.pre", "a string", "default")
        if self.pre not in PRE_GROUPS:
            raise TokenizerError(
                f"tokenizer.ggml.pre is {self.pre!r}, a pre-tokeniser refinfer does not know "
                f"(it reads {', '.join(sorted(PRE_GROUPS))}): use a supported model"
            )
        return PRE_GROUPS[self.pre]

    def _adds_bos(self, md: dict[str, Any]) -> bool:
        """Llama-3-style vocabularies start with BOS; other byte-level ones do not."""
        return PRE_GROUPS.get(_typed(md, "tokenizer.ggml.pre", "a string", ""), "") == "llama3"

    def _piece_bytes(self, i: int) -> bytes:
        """Normal tokens map back through GPT-2's alphabet; added tokens are raw text."""
        text, kind = self.tokens[i], self.types[i]
        if kind == CONTROL:
            return b""
        if kind == USER_DEFINED:
            return text.encode()
        try:
            return text.translate(GPT2_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:  # a character outside GPT-2's alphabet stands for itself
            return text.encode()

    def _encode_text(self, text: str) -> list[int]:
        """Pre-tokenise, then BPE each word, with a cache per word."""
        ids: list[int] = []
        for word in self._pre_tokenize(text):
            cached = self._cache.get(word)
            if cached is None:
                if len(self._cache) >= BPE_CACHE_LIMIT:
                    self._cache.clear()
                cached = self._cache[word] = self._bpe(word)
            ids.extend(cached)
        return ids

    def _pre_tokenize(self, text: str) -> list[str]:
        """Words of `text`: each regex splits the previous fragments into matches and gaps."""
        words = [text]
        for split in self._splits:
            words = [w for fragment in words for w in split.split(fragment) if w]
        return words

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token: its symbols merged by rank (see _merge_by_rank)."""
        merged = _merge_by_rank(self._symbols(word), self._ranks)
        return [i for symbol in merged for i in self._symbol_ids(symbol)]

    def _symbols(self, word: str) -> list[str]:
        """The word in GPT-2's alphabet, one symbol per byte, before merging; whole if the
        group ignores merges and the vocabulary has it (llama3).

        A byte with no token of its own (SmolLM2 has none for 0x04 or 0xF1) is dropped
        before merging, as HF tokenizers' BPE without an unknown token does.
        """
        mapped = word.encode().decode("latin-1").translate(LATIN1_TO_GPT2)
        if self._ignore_merges and mapped in self._ids:
            return [mapped]
        return [c for c in mapped if c in self._ids]

    def _symbol_ids(self, symbol: str) -> list[int]:
        """Id of a merged symbol; a merge result missing from the vocabulary is an error."""
        i = self._ids.get(symbol)
        if i is None:
            raise TokenizerError(
                f"merge result {symbol!r} is not in the vocabulary: the GGUF's merges and "
                "tokens do not belong together; re-convert the model"
            )
        return [i]


class Gemma4Tokenizer(BPETokenizer):
    """'gemma4' vocabularies: BPE over UTF-8 characters as SentencePiece spells them ('▁' for
    the space, '<0xNN>' for a byte no merge reaches), on whole lines (llama.cpp's GEMMA4
    pre-tokeniser: byte_encode off, escape_whitespaces on)."""

    model = "gemma4"

    def _pre_group(self, md: dict[str, Any]) -> str:
        """Always 'gemma4', as llama.cpp sets it for this tokenizer model."""
        self.pre = "gemma4"
        return self.pre

    def _piece_bytes(self, i: int) -> bytes:
        """As SentencePiece's: '▁' is a space, '<0x0A>' the byte 0x0A."""
        return _sentencepiece_bytes(self.tokens[i], self.types[i], i)

    def _symbols(self, word: str) -> list[str]:
        """The word's characters with '▁' for the space; a newline run that is one token
        stays whole (llama.cpp's fix for Gemma 4)."""
        if word.strip("\n") == "" and word in self._ids:
            return [word]
        return list(word.replace(" ", SPM_SPACE))

    def _symbol_ids(self, symbol: str) -> list[int]:
        """The symbol's id, or else the '<0xNN>' ids of its UTF-8 bytes (byte fallback)."""
        if symbol in self._ids:
            return [self._ids[symbol]]
        pieces = (f"<0x{b:02X}>" for b in symbol.encode())
        return [self._ids[p] for p in pieces if p in self._ids]


def _sentencepiece_bytes(text: str, kind: int, i: int) -> bytes:
    """The bytes SentencePiece decodes piece i to: '▁' is a space, '<0x0A>' the byte 0x0A,
    a control piece nothing, the unknown piece ' ⁇ '."""
    if kind == CONTROL:
        return b""
    if kind == UNKNOWN:
        return SPM_UNK_SURFACE.encode()
    if kind == BYTE:
        return _byte_of(text, i)
    return text.replace(SPM_SPACE, " ").encode()


def _merge_by_rank(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """`symbols` after BPE: join the adjacent pair of lowest rank, leftmost first, until no
    adjacent pair has a rank.

    As llama.cpp's llm_tokenizer_bpe_session and HF tokenizers do it: a heap of candidate
    pairs (rank, left index, joined text) over a linked list of live symbols, a candidate
    dropped when popped if a neighbour changed since; O(n log n) in the n symbols of a word
    (a whole line for 'gemma4').
    """
    symbols: list[str | None] = list(symbols)
    n = len(symbols)
    right = [*range(1, n), -1]  # right[i]: the live symbol after i (-1: none)
    left = list(range(-1, n - 1))  # left[i]: the live symbol before i (-1: none)
    heap: list[tuple[int, int, str]] = []

    def push(i: int) -> None:
        j = right[i] if i >= 0 else -1
        if j >= 0 and (rank := ranks.get((symbols[i], symbols[j]))) is not None:
            heapq.heappush(heap, (rank, i, symbols[i] + symbols[j]))

    for i in range(n - 1):
        push(i)
    while heap:
        _, i, text = heapq.heappop(heap)
        j = right[i]
        if symbols[i] is None or j < 0 or symbols[i] + symbols[j] != text:
            continue  # outdated: one of the two was merged with another neighbour
        symbols[i], symbols[j] = text, None
        right[i] = right[j]
        if right[j] >= 0:
            left[right[j]] = i
        push(left[i])
        push(i)
    return [s for s in symbols if s is not None]


def _merge_ranks(merges: list[str]) -> dict[tuple[str, str], int]:
    """{(left, right): rank} from 'left right' lines (a left part may itself be ' ')."""
    ranks = {}
    for rank, line in enumerate(merges):
        cut = line.find(" ", 1)
        if cut < 0:
            raise TokenizerError(
                f"merge {rank} ({line!r}) is not 'left right': the GGUF is damaged; "
                "re-convert the model"
            )
        ranks.setdefault((line[:cut], line[cut + 1 :]), rank)
    return ranks


def _alternation(texts: list[str]) -> regex.Pattern | None:
    """A regex matching any of `texts`, the longest where several start at one place."""
    if not texts:
        return None
    return regex.compile("|".join(regex.escape(t) for t in sorted(texts, key=len, reverse=True)))


def _byte_of(piece: str, i: int) -> bytes:
    """The byte a BYTE token '<0xNN>' stands for; TokenizerError if it is spelt otherwise."""
    m = BYTE_PIECE.fullmatch(piece)
    if m is None:
        raise TokenizerError(
            f"token {i} is a byte token but reads {_show(piece)}, not '<0xNN>': {DAMAGED}"
        )
    return bytes([int(m.group(1), 16)])


def _typed(md: dict[str, Any], key: str, kind: str, default: Any = None) -> Any:
    """md[key] if it is `kind` (a name in KINDS), `default` if absent, else TokenizerError."""
    if key not in md:
        return default
    value = md[key]
    if not KINDS[kind](value):
        raise TokenizerError(f"{key} is {_show(value)}, not {kind}: {DAMAGED}")
    return value


def _flag(md: dict[str, Any], key: str, default: bool) -> bool:
    """A boolean tokenizer.* key, `default` when absent."""
    return _typed(md, key, "a boolean", default)


def _require(md: dict[str, Any], key: str, kind: str) -> Any:
    """md[key], checked to be `kind`, or a TokenizerError naming the missing key."""
    if key not in md:
        raise TokenizerError(
            f"the GGUF's vocabulary lacks {key}: re-convert the model with its tokenizer"
        )
    return _typed(md, key, kind)


def _show(value: Any, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters (a damaged value may be a long list)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default(flag: bool | None, default: bool) -> bool:
    """`flag`, or `default` when it is None."""
    return default if flag is None else flag


def _raise_template_error(message: str) -> None:
    """raise_exception() inside a chat template: the template refuses these messages."""
    raise TemplateError(message)


# -- protobuf wire format, the little a sentencepiece ModelProto needs ------------------


ONE_BYTE_VARINTS = [bytes((n,)) for n in range(0x80)]  # every tag and type: most varints


def _varint(n: int) -> bytes:
    """Base-128 varint; negative int32 values as their 64-bit two's complement."""
    if 0 <= n < 0x80:
        return ONE_BYTE_VARINTS[n]
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    """A varint field (int32, bool, enum)."""
    return _varint(field << 3) + _varint(int(value))


def _pb_float(field: int, value: float) -> bytes:
    """A float field (wire type 5, little-endian float32)."""
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _pb_bytes(field: int, data: bytes) -> bytes:
    """A length-delimited field (string, bytes, embedded message)."""
    return _varint(field << 3 | 2) + _varint(len(data)) + data
