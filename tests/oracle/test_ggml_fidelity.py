"""numerics="ggml" against llama.cpp itself: the same file, the same ids, the same logits.

llama-cpp-python (`make peers`; skipped without it) runs one prefill of a 376-token text
(tests/llama_cpp_peer.py) on SmolLM2 in Q8_0, Q4_0 (refinfer's quantiser) and Q4_K_M
(llama.cpp's: Q5_0, Q8_0, Q4_K, Q6_K tensors), and refinfer's ggml mode must give the
same logits bit for bit: every activation quantisation, integer dot product, float sum,
f16 rounding and exp in the same order as llama.cpp's build for this CPU (ggml/ops.Simd).
The issue's bounds (mean KLD <= 1e-5, top-1 >= 99.5%, max |dlogit| <= 0.05) follow, and
are checked too. 376 is a multiple of 4: llama.cpp's repacked Q4_K kernel takes the last
T % 4 tokens of a batch through a kernel that rounds differently (README, Numerics).
"""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp_peer import agreement, llama_cpp_logits, model_file

import refinfer

pytest.importorskip("llama_cpp")

N_TOKENS = 376


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_k_m"])
def test_ggml_logits_are_llama_cpps(name) -> None:
    path = model_file(name)
    ids, theirs = llama_cpp_logits(path)
    ids, theirs = ids[:N_TOKENS], theirs[:N_TOKENS]
    assert len(ids) == N_TOKENS  # the text is long enough
    ours = refinfer.load(path, numerics="ggml").logits(ids)
    figures = agreement(theirs, ours)
    assert figures["mean_kld"] <= 1e-5 and figures["top1"] >= 0.995
    assert figures["max_abs_diff"] <= 0.05
    np.testing.assert_array_equal(ours, theirs)  # and in fact: bit for bit


def test_exact_mode_is_not_llama_cpps() -> None:
    # the reason the mode exists: exact float32 math is another result (KLD ~4e-3)
    path = model_file("q8_0")
    ids, theirs = llama_cpp_logits(path)
    ours = refinfer.load(path, numerics="exact").logits(ids)
    assert agreement(theirs, ours)["mean_kld"] > 1e-4
