# Two commands on a fresh machine: `make up` runs spear, `make test` runs the tests.
# Both create .venv and install into it when pyproject.toml is newer than the last install.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=
# Test processes (pytest-xdist): the suite mostly waits on real servers; `JOBS=0` runs it in one.
JOBS ?= 2

.PHONY: up test chromium lint format typecheck check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/spear up $(ARGS)

# The browser tests need Debian's chromium: installed here when we may (root with apt-get);
# otherwise they are skipped and pytest's summary (-rs) says why.
test: $(STAMP) chromium
	$(VENV)/bin/python -m pytest -q -rs -n $(JOBS) $(ARGS)

chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get update -q && apt-get install -y -q chromium >/dev/null; } ; } || \
	  echo "*** WARNING: no chromium (apt-get install -y chromium): the browser tests will be SKIPPED ***"

# ruff's formatter and linter, and mypy --strict: CI fails on any finding.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .spear .pytest_cache .mypy_cache .ruff_cache
