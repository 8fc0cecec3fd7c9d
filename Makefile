# The two commands a new user needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# `sct-agent serve` (Triton through PyTriton) runs in its own environment: PyTriton's model stub loads the
# system's libpython, so this one is made from the system's Python 3.11 (docs/scale-out.md).
SERVE_PYTHON ?= /usr/bin/python3.11
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed-stamp
DEMO_OUT ?= demo-output

.PHONY: demo test lint pytest clean serve-env

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: with it installed, the `torch>=` requirement below needs no download.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(SERVE_STAMP): pyproject.toml
	$(SERVE_PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(SERVE_VENV)/bin/python -m pip install --quiet -e '.[serve]'
	touch $(SERVE_STAMP)

serve-env: $(SERVE_STAMP)

demo: $(STAMP)
	$(BIN)/sct-agent demo --out $(DEMO_OUT)

test: $(STAMP) lint pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

pytest: $(STAMP) $(SERVE_STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(SERVE_VENV) $(DEMO_OUT) .mypy_cache .ruff_cache .pytest_cache
