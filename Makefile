# The entry points a newcomer looks for. `make run` and `make test` work on a fresh machine with
# Python 3.11+: they create .venv and install what they need (pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Runtime dependencies only (what the Dockerfile installs).
$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e '.[redis]'
	touch $@

# Runtime plus test and lint tools.
$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $@

run: $(VENV)/.runtime
	$(BIN)/python -m gateway dev-setup
	$(BIN)/python -m gateway serve

test: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	node --test tests/js/
	$(BIN)/python -m pytest

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Figures, never assertions: the gateway beside two peer servers (docs/performance.md).
# BENCH_REPEATS=3, BENCH_STORM=10000 and the other BENCH_* variables of bench/run.py apply.
bench: $(VENV)/.test
	@command -v node >/dev/null 2>&1 || { echo "make bench: the load generator needs Node.js 18+ and npm (apt-get install nodejs npm)" >&2; exit 1; }
	@test -d bench/node_modules || { command -v npm >/dev/null 2>&1 || { echo "make bench: npm is missing (apt-get install npm)" >&2; exit 1; }; npm ci --prefix bench --no-audit --no-fund; }
	@ulimit -n "$$(ulimit -Hn)" 2>/dev/null || true; $(BIN)/python bench/run.py

format: $(VENV)/.test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
