# One task runner: the README's commands and CI call these targets verbatim.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The last released contract, as a buf image: `buf breaking` compares proto/ with it.
RELEASED_CONTRACT := proto/released/contract.binpb

.PHONY: run test check lint typecheck pytest claude-code codex proto proto-lint proto-release bench bench-peer reliability lock clean

## run: install the gateway and serve it: gRPC on 127.0.0.1:50051, HTTP on 127.0.0.1:8080 (offline provider, no keys)
run: $(STAMP)
	$(BIN)/python -m server --no-auth $(ARGS)

## test: install everything, then lint, type-check and run the whole test suite
test: $(STAMP) lint typecheck proto-lint pytest

pytest: $(STAMP) test-servers claude-code codex
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## test-servers: servers the test suite starts by itself: redis-server and PostgreSQL (Debian's packages)
test-servers:
	@command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || { \
		echo "installing redis-server (Debian package) for tests/test_redis.py"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
			redis-server >/dev/null; \
	}
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
		echo "installing postgresql (Debian package) for tests/test_ledger_postgres.py"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
			postgresql >/dev/null; \
	}

## claude-code: Claude Code, the version pinned in tests/node/claude-code (npm), for tests/test_claude_code.py
CLAUDE_CODE_DIR := tests/node/claude-code
claude-code:
	@ls $(CLAUDE_CODE_DIR)/node_modules/@anthropic-ai/claude-code-*/claude >/dev/null 2>&1 || { \
		if command -v npm >/dev/null 2>&1; then \
			echo "installing Claude Code (npm ci in $(CLAUDE_CODE_DIR)) for tests/test_claude_code.py"; \
			npm ci --prefix $(CLAUDE_CODE_DIR) --no-audit --no-fund --loglevel=error >/dev/null || \
				echo "npm ci failed: tests/test_claude_code.py will skip (and fail under CI)"; \
		else \
			echo "npm not found: tests/test_claude_code.py will skip (and fail under CI); install Node.js and npm"; \
		fi; \
	}

## codex: Codex CLI, the version pinned in tests/node/codex (npm), for tests/test_codex_cli.py
CODEX_DIR := tests/node/codex
codex:
	@ls $(CODEX_DIR)/node_modules/@openai/codex-*/vendor/*/bin/codex >/dev/null 2>&1 || { \
		if command -v npm >/dev/null 2>&1; then \
			echo "installing Codex CLI (npm ci in $(CODEX_DIR)) for tests/test_codex_cli.py"; \
			npm ci --prefix $(CODEX_DIR) --no-audit --no-fund --loglevel=error >/dev/null || \
				echo "npm ci failed: tests/test_codex_cli.py will skip (and fail under CI)"; \
		else \
			echo "npm not found: tests/test_codex_cli.py will skip (and fail under CI); install Node.js and npm"; \
		fi; \
	}

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## proto: regenerate llmgateway/ from proto/
proto: $(STAMP)
	$(BIN)/python proto/generate.py

## proto-lint: buf lint; buf breaking against the released contract, and against main when available
proto-lint: $(STAMP)
	$(BIN)/buf lint
	@echo "buf breaking against the released contract ($(RELEASED_CONTRACT))"
	$(BIN)/buf breaking --against $(RELEASED_CONTRACT)
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

## proto-release: record the committed contract (HEAD's proto/) as the released one; commit the file
proto-release: $(STAMP)
	$(BIN)/buf build '.git#ref=HEAD' --exclude-source-info -o $(RELEASED_CONTRACT)

## bench: build the Go load generator and run every benchmark scenario, gRPC and HTTP (about 8 minutes; BENCH_ARGS=--repeat 3, about 14)
bench: $(STAMP) $(VENV)/.bench-installed bench/.bin/loadgen
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## bench-peer: the SDK and HTTP (Messages, Chat Completions, Responses) scenarios through LiteLLM's proxy (own venv), side by side (about 6 minutes; BENCH_ARGS=--repeat 3, about 17)
bench-peer: $(STAMP) $(VENV)/.bench-installed bench/.bin/loadgen
	$(BIN)/python -m bench.peer $(BENCH_ARGS)

## reliability: the long robustness checks, not in `make test`: the long contract fuzz, a 5-minute mixed soak (RSS, fds, ledger rows), the stall and unread-stream probes, kill -9 ledger counts; one table, exit 1 on a missed target (about 13 minutes; RELIABILITY_ARGS=--soak-seconds 60)
reliability: $(STAMP)
	$(BIN)/python -m bench.reliability $(RELIABILITY_ARGS)

bench/.bin/loadgen: $(wildcard bench/loadgen/*.go) bench/build-loadgen.sh
	bench/build-loadgen.sh

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev,bench]'
	touch $@

# The runtime dependencies at requirements.lock's pins (what the image ships),
# so that a new release of one cannot fail a fresh clone's checks unannounced;
# the development tools are pinned in pyproject.toml. pip takes the pins
# without their hashes (hashes would demand them of the editable install too).
CONSTRAINTS := $(VENV)/constraints.txt
$(CONSTRAINTS): requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	grep -E '^[A-Za-z0-9_.-]+==' requirements.lock | sed 's/ *\\$$//' > $@

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev,pii]'
	touch $(STAMP)

## lock: regenerate requirements.lock, the runtime dependencies pinned with their hashes (the Docker image installs them, and `make test` tests them), with uv in a throwaway venv; existing pins are kept where pyproject.toml allows them, `make lock LOCK_ARGS=--upgrade` moves each to its newest release
LOCK_TOOL := uv==0.13.9
lock:
	@LOCK_VENV=$$(mktemp -d) && trap 'rm -rf "$$LOCK_VENV"' EXIT && \
		$(PYTHON) -m venv "$$LOCK_VENV" && \
		"$$LOCK_VENV/bin/pip" install --quiet $(LOCK_TOOL) && \
		"$$LOCK_VENV/bin/uv" pip compile pyproject.toml --universal --python-version 3.11 \
			--generate-hashes --custom-compile-command "make lock" --quiet $(LOCK_ARGS) \
			-o requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
