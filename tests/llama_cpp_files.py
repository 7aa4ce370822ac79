"""SmolLM2 files in the K-quant and i-quant formats, made by llama.cpp's own quantiser.

Where these files sit in the data flow: they are inputs, made outside refinfer, so
that gguf.py -> quant.py -> kernels read blocks that llama.cpp, not refinfer's own
quantiser, laid out and chose the types of. The default model (SmolLM2 Q4_1) is
first written as F32 by refinfer (`write_quantized`, as `make models` does), then
`llama_cpp.llama_model_quantize` (llama-cpp-python, `make peers`) makes one file per
preset. Presets are llama.cpp's per-tensor recipes, and SmolLM2's rows of 576
weights are no multiple of the K-quants' 256, so only the ffn_down matrices (rows of
1536) get K-quants; llama.cpp gives the others its fallback types (Q4_0, Q5_0,
Q5_1, Q8_0, IQ4_NL). One file thus mixes several formats.

The files are cached in the repository's git-ignored models/ folder, under the
llama-cpp-python version that made them, and made again only when absent (1-15 s
each). llama.cpp logs to stderr while it works.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

from gguf import GGUFReader

from refinfer.gguf import read_gguf, write_quantized
from refinfer.models import default_model_path

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
F32_FILE = "smollm2-135m-f32.gguf"  # the name `make models` gives the same file

# preset -> (llama.cpp's llama_ftype constant, pure). `pure` gives every matrix the
# preset's type instead of the recipe's mix (rows of 576 still fall back): Q2_K's
# recipe gives SmolLM2 no Q2_K tensor at all (its ffn_down get Q3_K), q2_k_pure does.
PRESETS = {
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", False),
    "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", False),
    "q6_k": ("LLAMA_FTYPE_MOSTLY_Q6_K", False),
    "q3_k_m": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", False),
    "q2_k": ("LLAMA_FTYPE_MOSTLY_Q2_K", False),
    "q2_k_pure": ("LLAMA_FTYPE_MOSTLY_Q2_K", True),
    "iq4_xs": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", False),
}


def preset_path(preset: str, version: str, models_dir: Path = MODELS_DIR) -> Path:
    """Where llama-cpp-python `version`'s file of `preset` is cached (it may not exist yet)."""
    return models_dir / f"smollm2-135m-{preset}.llama-cpp-{version}.gguf"


def f32_source(models_dir: Path = MODELS_DIR) -> Path:
    """SmolLM2 in F32 (the Q4_1 weights, exactly), written by refinfer unless present."""
    dst = models_dir / F32_FILE
    if not dst.exists():
        _write_atomically(
            dst, lambda tmp: write_quantized(read_gguf(default_model_path()), tmp, "f32")
        )
    return dst


def make_preset(preset: str, models_dir: Path = MODELS_DIR) -> Path:
    """The SmolLM2 file of `preset` quantised by llama.cpp from F32; made unless cached.

    Needs llama-cpp-python (ImportError without it); RuntimeError if llama.cpp fails.
    """
    import llama_cpp  # imported here: a module that only lists presets must not need it

    dst = preset_path(preset, llama_cpp.__version__, models_dir)
    if dst.exists():
        return dst

    src = f32_source(models_dir)
    params = llama_cpp.llama_model_quantize_default_params()
    ftype, pure = PRESETS[preset]
    params.ftype = getattr(llama_cpp, ftype)
    params.pure = pure

    def quantize(tmp: Path) -> None:
        rc = llama_cpp.llama_model_quantize(
            os.fsencode(src), os.fsencode(tmp), ctypes.byref(params)
        )
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src.name} -> {preset}) returned {rc}")

    llama_cpp.llama_backend_init()
    _write_atomically(dst, quantize)
    return dst


def _write_atomically(dst: Path, write) -> None:
    """Call write(tmp) and rename tmp to dst, so that an interrupted run leaves no half file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    try:
        write(tmp)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def tensor_type_counts(path: Path) -> dict[str, int]:
    """{'q4_k': 30, ...}: how many tensors of each GGML type, read by gguf-py, not refinfer."""
    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        name = t.tensor_type.name.lower()
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main() -> None:
    """Make every preset, timing each, and print its tensor types (tests/llama_cpp_files.py)."""
    t0 = time.perf_counter()
    f32_source()
    print(f"f32 source: {time.perf_counter() - t0:.1f} s")
    for preset in PRESETS:
        t0 = time.perf_counter()
        path = make_preset(preset)
        seconds = time.perf_counter() - t0
        counts = tensor_type_counts(path)
        size = path.stat().st_size / 2**20
        print(f"{preset:9s} {seconds:5.1f} s  {size:6.1f} MiB  {counts}")


if __name__ == "__main__":
    main()
