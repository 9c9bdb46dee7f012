# One task runner: the README's commands and CI call these targets verbatim.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check lint typecheck pytest proto proto-lint bench clean

## run: install the gateway and serve it on 127.0.0.1:50051 (offline provider, no keys needed)
run: $(STAMP)
	$(BIN)/python -m server --no-auth $(ARGS)

## test: install everything, then lint, type-check and run the whole test suite
test: $(STAMP) lint typecheck proto-lint pytest

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## proto: regenerate llmgateway/ from proto/
proto: $(STAMP)
	$(BIN)/python proto/generate.py

## proto-lint: buf lint, and buf breaking against main when main is available
proto-lint: $(STAMP)
	$(BIN)/buf lint
	@if git rev-parse --verify --quiet origin/main >/dev/null; then \
		echo "buf breaking against origin/main"; \
		$(BIN)/buf breaking --against '.git#branch=origin/main'; \
	elif git rev-parse --verify --quiet main >/dev/null && [ "$$(git rev-parse --abbrev-ref HEAD)" != main ]; then \
		echo "buf breaking against main"; \
		$(BIN)/buf breaking --against '.git#branch=main'; \
	else \
		echo "buf breaking against HEAD"; \
		$(BIN)/buf breaking --against '.git#ref=HEAD'; \
	fi

## bench: build the Go load generator and run every benchmark scenario (about 9 minutes)
bench: $(STAMP) $(VENV)/.bench-installed bench/.bin/loadgen
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench/.bin/loadgen: bench/loadgen/main.go bench/build-loadgen.sh
	bench/build-loadgen.sh

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
