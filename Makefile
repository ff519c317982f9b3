# The two commands: `make run` and `make test`. Both create .venv on first use; `make run`
# installs what running needs, `make test` the development tools too.
# The app runs on Python 3.13 in Azure, and azure-functions 2.x needs it: find a python3.13 on
# PATH or in pyenv's versions (a pyenv shim whose version is not selected fails the check).
PYTHON ?= $(shell for p in python3.13 $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13); do \
  $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
# Two installs: what running needs (`make run` and the operations CLI: requirements-local.txt),
# and the development tools on top (`make test`, lint, bench: requirements-dev.txt).
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
# Test-only tools from npm (Azurite, Microsoft's Kusto.Language), pinned by package-lock.json.
NODE_STAMP := node_modules/.installed-stamp
PORT ?= 7071
# Operations CLI shortcuts: make send URL=... [TYPE=state|verify|error] [TOKEN=...],
# make stats, make dlq, make dlq-show ID=..., make dlq-replay IDS="3 4" (or IDS=--all),
# make dlq-purge IDS=..., make check-endpoint [TEST_EVENT=1], make vehicles [ID=...]; JSON=1:
# machine-readable output. Recipes are not echoed: a URL with ?code= or a TOKEN never appears.
URL ?= http://127.0.0.1:$(PORT)/api/webhooks/smartcar
TYPE ?= state
CLI := $(PY) -m shared.cli $(if $(JSON),--json)

.PHONY: run test test-browser lint bench measure-memory mutate clean send stats dlq dlq-show dlq-replay dlq-purge vehicles vehicles-show

# $(call install,FILE,STAMP): a .venv on Python 3.13 (made or remade), then FILE installed.
define install
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null || { if [ -n "$(PYTHON)" ]; \
	  then echo "PYTHON=$(PYTHON) is not Python 3.13 ($$($(PYTHON) -V 2>&1)); the app needs 3.13." >&2; \
	  else echo "Python 3.13 is required (the version the app runs on in Azure) and was not found." >&2; fi; \
	  echo "Install it (python.org, 'pyenv install 3.13', 'uv python install 3.13' or your package manager)," >&2; \
	  echo "or point to it: make $(firstword $(MAKECMDGOALS) run) PYTHON=/path/to/python3.13" >&2; exit 1; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null || \
	  { test ! -e $(VENV) || echo "Recreating $(VENV) with Python 3.13"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	@if [ -e $(2) ]; then echo "$(1) changed: updating $(VENV)"; \
	  else echo "first run: installing dependencies into $(VENV) ($(1)); this takes a minute"; fi
	@$(PY) -m pip install --disable-pip-version-check -q -r $(1)
endef

$(RUN_STAMP): requirements.txt requirements-local.txt
	$(call install,requirements-local.txt,$(RUN_STAMP))
	@touch $(RUN_STAMP)

# The development install includes the running one, so it satisfies both.
$(DEV_STAMP): requirements.txt requirements-local.txt requirements-dev.txt
	$(call install,requirements-dev.txt,$(DEV_STAMP))
	@touch $(DEV_STAMP) $(RUN_STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

run: $(RUN_STAMP)
	@PORT=$(PORT) $(PY) -m shared.local

lint: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy shared tests benchmarks function_app.py

test: $(DEV_STAMP) $(NODE_STAMP) lint
	$(PY) -m pytest

# The inspector page in a headless Chromium (needs Debian's chromium and chromium-driver; it
# says so and skips without them, except in CI). Screenshots land in test-artifacts/inspector/.
test-browser: $(DEV_STAMP)
	$(PY) -m pytest -rs tests/test_inspector_browser.py

bench: $(DEV_STAMP)
	$(PY) -m benchmarks

# What a user types (an eventId, a URL, a token) reaches the CLI through the environment, as
# one argument whatever characters it holds: spliced into the recipe, a quote in it would end
# the shell's quoting and the rest would run as commands.
send check-endpoint: export URL := $(URL)
send check-endpoint: export TOKEN := $(TOKEN)
dlq-show vehicles-show: export ID := $(ID)

send: $(RUN_STAMP)
	@$(CLI) send --url "$$URL" --type $(TYPE) $(if $(TOKEN),--token "$$TOKEN")

stats: $(RUN_STAMP)
	@$(CLI) stats

dlq: $(RUN_STAMP)
	@$(CLI) dlq list

dlq-show: $(RUN_STAMP)
	@$(CLI) dlq show "$$ID"

dlq-replay: $(RUN_STAMP)
	@$(CLI) dlq replay $(IDS)

dlq-purge: $(RUN_STAMP)
	@$(CLI) dlq purge $(IDS)

.PHONY: check-endpoint
check-endpoint: $(RUN_STAMP)
	@$(CLI) check-endpoint "$$URL" $(if $(TEST_EVENT),--send-test-event) $(if $(TOKEN),--token "$$TOKEN")

vehicles: $(RUN_STAMP)
	@$(CLI) vehicles list

vehicles-show: $(RUN_STAMP)
	@$(CLI) vehicles show "$$ID"

clean:
	rm -rf $(VENV) node_modules .local .pytest_cache .mypy_cache .ruff_cache test-artifacts mutants

# Mutation testing (not part of `make test`): JSON lines on stdout, see docs/testing.md.
# MUTATE_MODULES="shared.retry shared.shapes" limits a run to those modules of only_mutate.
MUTATE_JOBS ?= 3
MUTATE_MODULES ?=
mutate: $(DEV_STAMP)
	$(PY) -m mutation --jobs $(MUTATE_JOBS) $(foreach m,$(MUTATE_MODULES),--module $(m))

# The worker's resident memory, CPU and telemetry bytes per event under load, as deployed
# (docs/cost.md is built on it): one JSON document.
measure-memory: $(DEV_STAMP)
	@$(PY) -m benchmarks.memory
