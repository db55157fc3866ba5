# omis-edge: the two commands of the Quick start, plus helpers.
#   make demo   install into .venv/ and run the main job on simulated hardware
#   make test   install with test tools, then lint, type-check and run the suite
#   make test-fast   the suite without the tests marked slow (the inner loop)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The stamp names the extras and the hash of pyproject.toml: any change reinstalls, nothing else does.
HASH := $(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: demo test test-fast install install-test lint typecheck pytest bench system-deps clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.stamp-train-$(HASH): | $(VENV)/bin/python
	$(PIP) install --upgrade "pip>=24" setuptools wheel
	$(PIP) install -e ".[train]"
	rm -f $(VENV)/.stamp-train-*
	touch $@

$(VENV)/.stamp-test-$(HASH): $(VENV)/.stamp-train-$(HASH)
	$(PIP) install -e ".[train,test]"
	rm -f $(VENV)/.stamp-test-*
	touch $@

install: $(VENV)/.stamp-train-$(HASH)
install-test: $(VENV)/.stamp-test-$(HASH)
	@bash scripts/system-deps.sh --test
	@bash scripts/dashboard-deps.sh
	@bash scripts/test-tools.sh

# Binaries the demo talks to for real: the mosquitto broker; and the dashboard's front-end
# packages, so the history page the demo prints is served.
system-deps:
	@bash scripts/system-deps.sh
	@bash scripts/dashboard-deps.sh

demo: install system-deps
	$(VENV)/bin/omis demo

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install-test
	$(VENV)/bin/mypy

pytest: install-test
	$(VENV)/bin/pytest

test: lint typecheck pytest

# The inner loop: everything but the tests marked slow (real trainings, demos, bursts, fleets),
# stopping at the first failure; `make test` still runs them all.
test-fast: install-test
	$(VENV)/bin/pytest -m "not slow" -x -q

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
