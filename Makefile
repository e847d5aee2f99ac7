# The two commands: `make demo` and `make test`; both set themselves up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean install docs smoke test-torch

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,hf,sweep,ot,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/modeconn demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir build/site
	@echo "docs: build/site/index.html (or: $(BIN)/mkdocs serve)"

# The wheel without extras in a fresh venv, and the CLI a new user runs first (CI runs this).
smoke: $(STAMP)
	.ci/smoke $(BIN)/python

# The test suite on the oldest and newest torch pyproject.toml claims, each in its own venv
# (heavy: the old torch comes from PyPI with its CUDA wheels, ~3 GB). TORCH_OLD/TORCH_NEW override.
TORCH_OLD ?= 2.2.2
TORCH_NEW ?= 2.14.1
test-torch:
	.ci/test-torch $(TORCH_OLD) $(TORCH_NEW)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .venv-torch-* report build dist site *.egg-info src/*.egg-info
