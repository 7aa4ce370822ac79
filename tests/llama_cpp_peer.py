"""llama.cpp as a peer: its logits for a text, through llama-cpp-python (`make peers`).

Where this sits: tests/oracle/test_ggml_fidelity.py and bench/fidelity_llama.py compare
refinfer's logits with llama.cpp's on the same file and token ids; this module holds what
both need: the text, the SmolLM2 files, llama.cpp's logits and the agreement figures.
llama.cpp runs as llama-cpp-python builds and configures it by default (CPU, -march=native,
no flash attention, f16 K/V cache), in one batch of the whole text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llama_cpp_files import PRESETS, make_preset

from refinfer.gguf import read_gguf, write_quantized
from refinfer.models import default_model_path
from refinfer.oracle.stats import kld, log_softmax

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

# ~330 tokens of plain English prose (the opening of Jane Austen's "Pride and Prejudice",
# 1813, public domain): long enough for positions past 256 to attend to a full context
FIDELITY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
    "minds of the surrounding families, that he is considered the rightful property of some "
    'one or other of their daughters. "My dear Mr. Bennet," said his lady to him one day, '
    '"have you heard that Netherfield Park is let at last?" Mr. Bennet replied that he had '
    'not. "But it is," returned she; "for Mrs. Long has just been here, and she told me all '
    'about it." Mr. Bennet made no answer. "Do you not want to know who has taken it?" cried '
    'his wife impatiently. "You want to tell me, and I have no objection to hearing it." '
    'This was invitation enough. "Why, my dear, you must know, Mrs. Long says that '
    "Netherfield is taken by a young man of large fortune from the north of England; that he "
    "came down on Monday in a chaise and four to see the place, and was so much delighted "
    "with it, that he agreed with Mr. Morris immediately; that he is to take possession "
    "before Michaelmas, and some of his servants are to be in the house by the end of next "
    'week." "What is his name?" "Bingley." "Is he married or single?" "Oh! Single, my '
    "dear, to be sure! A single man of large fortune; four or five thousand a year. What a "
    'fine thing for our girls!" "How so? How can it affect them?" "My dear Mr. Bennet," '
    'replied his wife, "how can you be so tiresome! You must know that I am thinking of his '
    'marrying one of them."'
)


def model_file(name: str) -> Path:
    """SmolLM2 as `name`: q8_0 / q4_0 written by refinfer's quantiser from the shipped Q4_1
    (as `make models` does), q4_k_m and the other presets by llama.cpp's (llama_cpp_files)."""
    if name in PRESETS:
        return make_preset(name, MODELS_DIR)
    path = MODELS_DIR / f"smollm2-135m-{name}.gguf"
    if not path.exists():
        MODELS_DIR.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_quantized(read_gguf(default_model_path()), tmp, name)
        tmp.rename(path)
    return path


def llama_cpp_logits(path: Path, text: str = FIDELITY_TEXT, threads: int = 2):
    """(ids, float32 logits[len(ids), V]) of one llama.cpp prefill of `text` (BOS added)."""
    import llama_cpp  # imported here: the module must load without the peer

    llama = llama_cpp.Llama(
        str(path), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    ids = llama.tokenize(text.encode(), add_bos=True)
    llama.eval(ids)
    logits = np.array(llama.scores[: len(ids)], dtype=np.float32)
    llama.close()
    return ids, logits


def agreement(reference: np.ndarray, logits: np.ndarray) -> dict:
    """How closely logits[T, V] follow reference[T, V]: KL(reference || logits) per position
    (mean, max), top-1 agreement, and the largest |logit difference|."""
    d = kld(log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64)))
    return {
        "tokens": len(reference),
        "mean_kld": float(d.mean()),
        "max_kld": float(d.max()),
        "top1": float((reference.argmax(-1) == logits.argmax(-1)).mean()),
        "max_abs_diff": float(np.abs(reference - logits).max()),
    }
