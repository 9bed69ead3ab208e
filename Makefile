# The two commands: `make run` and `make test`. Both build .venv when it is missing or
# older than the lock file, so a fresh clone needs nothing but Python 3.11+. Every version
# comes from requirements/dev.lock (`make lock` upgrades it and requirements/prod.lock).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Temporal's sandbox re-imports the workflow modules for every new workflow instance; where
# the environment turns bytecode caching off (PYTHONDONTWRITEBYTECODE=1, as some images do),
# each of those imports compiles the source again. An empty value turns caching back on.
export PYTHONDONTWRITEBYTECODE :=

LOCK := requirements/dev.lock

.PHONY: run test bench chaos lint typecheck check clean-data browser-deps lock venv

$(STAMP): pyproject.toml $(LOCK)
	$(MAKE) --no-print-directory venv
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# A .venv is kept only when its python imports pip and is 3.11 or newer: one a failed first
# try left (no ensurepip: Debian's python3-venv missing) or another interpreter made is made
# again with $(PYTHON), not reused for ever.
venv:
	@$(BIN)/python -c 'import pip, sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11) and \
		"Python 3.11 or newer is needed: run make with PYTHON=python3.11 (or newer)")'

# Re-resolves every dependency to the newest release pyproject.toml allows: the image's
# lock (no extras) and the one of development, CI and `make run` (dev and embedded).
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --upgrade --strip-extras --no-emit-find-links --no-emit-index-url \
		--output-file requirements/prod.lock pyproject.toml
	$(BIN)/pip-compile --quiet --upgrade --strip-extras --no-emit-find-links --no-emit-index-url \
		--extra dev --extra embedded --output-file $(LOCK) pyproject.toml

run: $(STAMP)
	$(BIN)/refunds dev

# The tests mostly wait on servers and timers, so three pytest-xdist workers (each with its
# own session Temporal dev server and PostgreSQL; a test file stays on one worker, so its
# module fixtures start once) and mypy beside them share the two cores: a fresh clone's
# `make test` took 19.5 to 21.4 minutes in one process on this machine, 8 to 13.5 with two
# when the suite was smaller; with today's suite two took 17 to 19.5, three 14.5 (a fresh
# clone; its speed varies by the day). Either failing fails the target.
test: $(STAMP) browser-deps
	$(BIN)/ruff check .
	$(BIN)/mypy . > $(VENV)/mypy.out 2>&1 & typing=$$!; \
	$(BIN)/python -m pytest -q -n 3 --dist loadscope; tests=$$?; \
	wait $$typing; typed=$$?; echo "mypy:"; cat $(VENV)/mypy.out; \
	test $$tests -eq 0 && test $$typed -eq 0

# Not part of `make test` (smoke versions are): each prints its parameters and per-round figures,
# writes bench/results/, and exits non-zero when its own check fails (e.g. breaks found != planted).
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
