"""numerics="ggml": llama.cpp's CPU arithmetic, stated in NumPy.

refinfer's default numerics ("exact") multiply by the dequantised weights in float32.
llama.cpp does not: before each product by a quantised matrix it quantises the
activations to 8 bits (the weight type's `vec_dot_type`), multiplies integers, and
scales the integer block sums; it keeps K and V in float16, rounds the query and the
attention probabilities to float16 for their products with them, sums norms in double
and computes exp with its own vectorised polynomial. `refinfer.load(path,
numerics="ggml")` runs all of that, so that an engine descended from ggml can use
refinfer as its oracle.

This package is the NumPy twin of that mode (as reference.py is of the exact mode); the
Numba kernels in refinfer/kernels/ compute the same bits, and the tests hold them to it:
- quantize.py   activations -> Q8_0 / Q8_1 / Q8_K blocks (ggml's quantize_row_q8_*)
- dot.py        the integer dot products of every weight format with its activation type
- ops.py        expf, SiLU, RMSNorm, RoPE angles, softmax and f16 rounding as ggml does them
- attention.py  llama.cpp's attention without flash attention (llama-cpp-python's default)

Where ggml's CPU code has several SIMD variants, the twin states the one llama-cpp-python
builds on this machine (-march=native): AVX2 + FMA or AVX-512, as data (ops.Simd), and
follows the kernel llama.cpp picks per weight type (dot.kernel_of). With all that, SmolLM2's
logits equal llama.cpp's bit for bit (tests/oracle/test_ggml_fidelity.py).
"""
