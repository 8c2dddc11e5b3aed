# Two set-up commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs. CPU torch is pinned (torch==2.13.*) so pip takes the local
# CPU build instead of downloading GBs of CUDA wheels.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.*"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/medtune demo

# Default suite: everything not marked slow, plus the real-data smoke tests (they skip without ../shared/data).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow or ci" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

.PHONY: venv demo test test-all
