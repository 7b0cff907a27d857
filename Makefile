# The commands a new user runs: `make setup`, `make demo`, `make test`.
# TORCH_SPEC picks the PyTorch build; override it for CUDA, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# llama-cpp-python (a test dependency) compiles llama.cpp when pip has no wheel for it: target any x86-64 CPU
# (not just this one's instruction set), so the wheel pip caches also works on another machine.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: setup test test-fast demo serve clean

# Idempotent: re-running only installs what is missing.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_SPEC)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -r requirements.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) demo.py

# OpenAI-compatible API + chat page on the newest checkpoint; override e.g. SERVE_ARGS="--port 9000".
SERVE_ARGS ?=
serve: setup
	$(PY) serve_openai_api.py $(SERVE_ARGS)

clean:
	rm -rf out dataset/demo
