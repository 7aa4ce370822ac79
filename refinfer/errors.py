"""The exceptions refinfer raises for bad input.

Every problem a user can cause (a missing file, an unsupported model, nonsense
parameters) is a `RefinferError` with a one-line message that says what is
wrong and what to do; the CLI prints that line and exits with status 2.
"""


class RefinferError(Exception):
    """Base class: bad input or an unsupported model, with a message for people."""


class ModelFileError(RefinferError):
    """The file is missing, unreadable, not a GGUF, or truncated."""


class UnsupportedModelError(RefinferError):
    """A valid GGUF whose architecture or hyper-parameters refinfer cannot run."""


class UnsupportedFormatError(RefinferError):
    """A tensor type (e.g. a K-quant) or shape that no kernel here reads."""


class TokenizerError(RefinferError):
    """A vocabulary the tokenizer cannot build or use (missing metadata, unknown type, bad id)."""


class KVPoolFullError(RefinferError):
    """The KV pool has too few free blocks for the tokens asked for; nothing was changed."""


class InvalidParameterError(RefinferError):
    """A parameter outside its range (a negative temperature, top_p of 2, ...)."""


class OracleFileError(RefinferError):
    """A logits, trace or llama.cpp KLD file that is missing, of another format, or truncated."""
