# The commands a new user runs: `make setup`, `make demo`, `make test`.
# TORCH_SPEC picks the PyTorch build; override it for CUDA, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# llama-cpp-python (requirements-test.txt) compiles llama.cpp when pip has no wheel for it: target any x86-64 CPU
# (not just this one's instruction set), so the wheel pip caches also works on another machine.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: setup test test-fast demo demo-tools serve bench-trl clean

# Idempotent: one stamp per requirements file, so re-running only installs what changed.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -r requirements.txt
	touch $@

# What only the tests and benchmarks import, on top of setup's packages.
$(VENV)/.installed-test: requirements-test.txt | $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -r requirements-test.txt
	touch $@

# trl, for `python -m bench grpo` only (5-grpo.py side by side with TRL's GRPOTrainer, docs/rl.md): neither setup nor
# test installs it.
$(VENV)/.installed-bench: requirements-bench.txt | $(VENV)/.installed
	$(PY) -m pip install -r requirements-bench.txt
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) demo.py

# The demo plus tool calling: an SFT stage on the calculator conversations, scored with the tool loop (docs/tools.md)
demo-tools: setup
	$(PY) demo.py --tools

# After `make demo` (its DPO model and prompts are the defaults); override e.g. BENCH_TRL_ARGS="--grpo_steps 10".
BENCH_TRL_ARGS ?=
bench-trl: $(VENV)/.installed-bench
	$(PY) -m bench grpo $(BENCH_TRL_ARGS)

# OpenAI-compatible API + chat page on the newest checkpoint; override e.g. SERVE_ARGS="--port 9000".
SERVE_ARGS ?=
serve: setup
	$(PY) serve_openai_api.py $(SERVE_ARGS)

clean:
	rm -rf out dataset/demo
