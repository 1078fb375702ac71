# Every target creates the virtual environment when it is missing and installs the package into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench bench-smoke soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/gateway.py

test: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-smoke: $(STAMP)
	$(BIN)/python -m bench.run --smoke

soak: $(STAMP)
	TLM_SOAK_REQUESTS=100000 $(BIN)/python -m pytest -q -s tests/test_soak.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build dist
