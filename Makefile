# otpgate — the two commands are `make run` and `make test`; everything they need is installed here.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := .cache/stamps
BUF := node_modules/.bin/buf
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help install run test lint proto lock bench devdb console clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP):
	@mkdir -p $(STAMP)

$(STAMP)/python: requirements.lock pyproject.toml | $(STAMP)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $@

$(STAMP)/node: package.json package-lock.json | $(STAMP)
	@# `npm ci` trips over buf's per-platform optional packages; install honours the lock file.
	npm install --silent --no-audit --no-fund
	@touch $@

# The web console (console/src -> console/dist), served by the edge at /console.
$(STAMP)/console: $(STAMP)/node console/build.mjs $(wildcard console/src/*)
	node console/build.mjs
	@touch $@

console: $(STAMP)/console ## build the web console into console/dist

devdb: ## build the dev database (FerretDB on SQLite) into .cache/bin
	@$(BIN)/python -c "from services.core.devdb import ensure_binary; print(ensure_binary())"

install: $(STAMP)/python $(STAMP)/node $(STAMP)/console devdb ## install Python deps, buf, the console and the dev database

run: install ## start the dev database and all five services (sandbox mode)
	$(BIN)/otpgate dev

proto: $(STAMP)/python $(STAMP)/node ## lint the protos and regenerate gen/
	$(BUF) lint
	$(BIN)/python tools/protogen.py
	$(BIN)/python tools/openapi.py

lint: install ## ruff, mypy, buf lint, codegen and OpenAPI drift
	$(BIN)/ruff check services tests tools bench
	$(BIN)/ruff format --check services tests tools bench
	$(BIN)/mypy
	$(BUF) lint
	$(BIN)/python tools/protogen.py --check
	$(BIN)/python tools/openapi.py --check

test: lint ## lint, then unit, integration and e2e tests
	$(BIN)/pytest -q

bench: install ## benchmarks (see bench/README.md)
	$(BIN)/python -m bench

lock: ## re-resolve requirements.lock from pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^otpgate' > requirements.lock

include compose/compose.mk

clean: ## remove caches and builds (keeps the venv)
	rm -rf .cache .pytest_cache .mypy_cache .ruff_cache
