# One venv, one install path, used by people and CI alike.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0+cpu
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages slipped into $(VENV)"; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not multiprocess and not engine" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/lmdistill demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
