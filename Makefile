# The two commands: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PORT ?= 7071

.PHONY: run test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	@touch $(STAMP)

run: $(STAMP)
	PORT=$(PORT) $(PY) -m shared.localhost

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy shared

test: $(STAMP) lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .local .pytest_cache .mypy_cache .ruff_cache
