# Two commands for a new machine:  `make quickstart` (set up + run the main job), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-all clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python  ## create .venv and install the project with its test extra
	$(BIN)/pip install --quiet -e ".[dev]"

quickstart: setup  ## set up, then run the DVC pipeline on the embedded default (docs/pipeline.md)
	DTL_PYTHON="$(abspath $(BIN))/python" $(BIN)/dvc repro
	$(BIN)/dvc metrics show

test:  ## the fast test suite (CPU, no network)
	$(BIN)/python -m pytest -q

test-all:  ## every test, slow ones included
	$(BIN)/python -m pytest -q -m ""
