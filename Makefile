# The two commands: `make run` (the whole stack) and `make test` (the suite).
# Each creates .venv and installs the project on first use; nothing else is needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-scale chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fluxpipe up $(ARGS)

# Debian's Chromium for the page tests (Playwright drives /usr/bin/chromium; no browser download).
BROWSER := /usr/bin/chromium
$(BROWSER):
	./scripts/install-browser.sh

test: $(STAMP) $(BROWSER)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check schemas services tests migrations bench
	$(BIN)/ruff format --check schemas services tests migrations bench
	$(BIN)/mypy schemas services

# Faults during two runs of 1,050 tasks (docs/RELIABILITY.md): our processes, NATS and
# PostgreSQL dying; fal and COS failing. CI runs the same tests with 42 tasks each.
chaos: $(STAMP)
	FLUXPIPE_CHAOS_PER_ROUND=150 FLUXPIPE_CHAOS_HANG=submit,status \
		$(BIN)/python -m pytest tests/test_chaos.py tests/test_chaos_provider.py -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

bench: $(STAMP)
	$(BIN)/python bench/bench_pipeline.py $(ARGS)
	$(BIN)/python bench/bench_e2e.py

# Issue 10's figures (docs/BENCHMARKS.md): about 25 minutes on 2 cores.
bench-scale: $(STAMP)
	$(BIN)/python -m bench.bench_scale --tasks 1000 --tasks 10000
	$(BIN)/python -m bench.bench_scale --memory
	$(BIN)/python -m bench.bench_submit
	$(BIN)/python -m bench.bench_replay --events 1000000
