# GPT4People: `make run` starts everything, `make test` tests everything.
# Both begin with `make install`, which is idempotent and fast once done.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml kernel/catalogue.py scripts/install-llama scripts/llama-cmake-args scripts/install-system-deps
	scripts/install-system-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	scripts/install-llama $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/gpt4people models --install
	@touch $(STAMP)

run: install
	$(BIN)/gpt4people up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q -ra

test: lint typecheck pytest

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
