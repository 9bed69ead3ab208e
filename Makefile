# The two commands: `make run` and `make test`. Both build .venv when it is missing or
# older than pyproject.toml, so a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Temporal's sandbox re-imports the workflow modules for every new workflow instance; where
# the environment turns bytecode caching off (PYTHONDONTWRITEBYTECODE=1, as some images do),
# each of those imports compiles the source again. An empty value turns caching back on.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: run test bench chaos lint typecheck check clean-data browser-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/refunds dev

test: $(STAMP) browser-deps
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/python -m pytest -q

# Not part of `make test` (smoke versions are): each prints a table, writes bench/results/.
bench: $(STAMP)
	$(BIN)/python -m bench.refund_throughput
	$(BIN)/python -m bench.webhook_ingest
	$(BIN)/python -m bench.open_cases
	$(BIN)/python -m bench.reconciliation

# SEED=<n> replays the randomised fault schedule a violation named.
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos $(if $(SEED),--scenario fault_schedule --seed $(SEED))

# Chromium (apt) and playwright-core (npm) for the console's browser tests; without them
# those tests skip with the reason, except in CI (CI=true), where this step fails.
browser-deps:
	tests/browser/install.sh

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy .

clean-data:
	rm -rf .data
