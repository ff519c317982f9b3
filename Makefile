# The two commands: `make run` and `make test`. Both create .venv and install on first use.
# The app runs on Python 3.13 in Azure, and azure-functions 2.x needs it: find a python3.13 on
# PATH or in pyenv's versions (a pyenv shim whose version is not selected fails the check).
PYTHON ?= $(shell for p in python3.13 $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13); do \
  $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Test-only tools from npm (Azurite, Microsoft's Kusto.Language), pinned by package-lock.json.
NODE_STAMP := node_modules/.installed-stamp
PORT ?= 7071
# Operations CLI shortcuts: make send URL=... [TYPE=state|verify|error] [TOKEN=...],
# make stats, make dlq, make dlq-show ID=..., make dlq-replay IDS="3 4" (or IDS=--all),
# make dlq-purge IDS=..., make vehicles, make vehicles-show ID=...; JSON=1 for machine-readable
# output. Recipes are not echoed, so a URL with ?code= (the function key) or a TOKEN never
# appears in the output.
URL ?= http://127.0.0.1:$(PORT)/api/webhooks/smartcar
TYPE ?= state
CLI := $(PY) -m shared.cli $(if $(JSON),--json)

.PHONY: run test test-browser lint bench mutate clean send stats dlq dlq-show dlq-replay dlq-purge \
	vehicles vehicles-show

$(STAMP): requirements.txt requirements-dev.txt
	@if [ -z "$(PYTHON)" ]; then \
	  echo "Python 3.13 is required (the version the app runs on in Azure) and was not found." >&2; \
	  echo "Install it (python.org, 'pyenv install 3.13', 'uv python install 3.13' or your package manager)," >&2; \
	  echo "or point to it: make $(firstword $(MAKECMDGOALS) run) PYTHON=/path/to/python3.13" >&2; \
	  exit 1; fi
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null || \
	  { test ! -e $(VENV) || echo "Recreating $(VENV) with Python 3.13"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	@touch $(STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

run: $(STAMP)
	@PORT=$(PORT) $(PY) -m shared.local

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy shared

test: $(STAMP) $(NODE_STAMP) lint
	$(PY) -m pytest

# The inspector page in a headless Chromium (needs Debian's chromium and chromium-driver; it
# says so and skips without them, except in CI). Screenshots land in test-artifacts/inspector/.
test-browser: $(STAMP)
	$(PY) -m pytest -rs tests/test_inspector_browser.py

bench: $(STAMP)
	$(PY) -m benchmarks

send: $(STAMP)
	@$(CLI) send --url '$(URL)' --type $(TYPE) $(if $(TOKEN),--token '$(TOKEN)')

stats: $(STAMP)
	@$(CLI) stats

dlq: $(STAMP)
	@$(CLI) dlq list

dlq-show: $(STAMP)
	@$(CLI) dlq show $(ID)

dlq-replay: $(STAMP)
	@$(CLI) dlq replay $(IDS)

dlq-purge: $(STAMP)
	@$(CLI) dlq purge $(IDS)

vehicles: $(STAMP)
	@$(CLI) vehicles list

vehicles-show: $(STAMP)
	@$(CLI) vehicles show '$(ID)'

clean:
	rm -rf $(VENV) node_modules .local .pytest_cache .mypy_cache .ruff_cache test-artifacts mutants

# Mutation testing (issue 15; not part of `make test`): JSON lines on stdout, see README.
MUTATE_JOBS ?= 3
mutate: $(STAMP)
	$(PY) -m mutation --jobs $(MUTATE_JOBS)
