# Two commands for a new machine:  `make quickstart` (set up + run the main job), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact versions the tests passed with (`make lock` rewrites it); plain `pip install -e .` ignores it.
CONSTRAINTS ?= constraints.txt
DTL_CACHE_DIR ?= $(HOME)/.cache/dtl/prefix

.PHONY: setup quickstart test test-all lint lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python  ## create .venv and install the project with every extra and the dev tools, at the locked versions
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	$(BIN)/python -m pipeline.plots_page  # `dvc plots show` pages that render offline

quickstart: setup  ## set up, then run the DVC pipeline on the embedded default (docs/pipeline.md)
	DTL_PYTHON="$(abspath $(BIN))/python" $(BIN)/dvc repro
	$(BIN)/dvc metrics show

test:  ## the fast test suite (CPU, no network)
	$(BIN)/python -m pytest -q

test-all:  ## every test, slow ones included (the GPU tests run with `pytest -m gpu`)
	$(BIN)/python -m pytest -q -m ""

lint:  ## ruff: pyflakes, bugbear, import order (the rules and why: pyproject.toml)
	$(BIN)/ruff check .

lock:  ## pin what a fresh, unconstrained install resolves today (then run `make test` before committing it)
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -e ".[dev]"
	.venv-lock/bin/pip freeze --exclude-editable | grep -v "^-e " > $(CONSTRAINTS)
	rm -rf .venv-lock

clean:  ## remove outputs, generated data and the prefix cache (never the shipped weights, the git-tracked
         ## metrics/ and plots/, the MLflow records or sweep results)
	rm -rf outputs dvc_plots data/synthetic data/few_shot data/domain_shift
	rm -rf "$(DTL_CACHE_DIR)"
