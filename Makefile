# Two set-up commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs. CPU torch is pinned (torch==2.13.*) so pip takes the local
# CPU build instead of downloading GBs of CUDA wheels.
# `medtune app` lives in a second environment, .venv-app (`make app-venv`; `make test` creates it for the app's
# tests, which serve the app from it): Gradio pins pillow<13, and the preprocessing parity tests in .venv need
# Pillow 13's resize.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APP_VENV := .venv-app
APP_STAMP := $(APP_VENV)/.installed

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.*"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

$(APP_STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11)"; exit 1; }
	$(PY) -m venv $(APP_VENV)
	$(APP_VENV)/bin/pip install -q --upgrade pip
	$(APP_VENV)/bin/pip install -q "torch==2.13.*"
	$(APP_VENV)/bin/pip install -q -e ".[app]"
	touch $(APP_STAMP)

venv: $(STAMP)

app-venv: $(APP_STAMP)

demo: $(STAMP)
	$(BIN)/medtune demo

# A tiny segmenting VLM (LLM + SAM 2 decoder through [SEG]) learns the embedded vessels from a text prompt.
demo-segvlm: $(STAMP)
	$(BIN)/medtune demo segvlm

# A tiny SAM 2 video model learns vessels in synthetic angiography runs on clips through its memory; the same model
# trained image-only is the baseline (per-frame Dice and temporal stability, before / after).
demo-video: $(STAMP)
	$(BIN)/medtune demo video

# Headless Chromium renders the HTML report and drives the app in tests; installed here (Debian package) when
# missing and root.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium not installed: the browser tests (report, app) will skip"

# Default suite: everything not marked slow, plus the slow tests marked ci (2-process run, RL recipe, browser).
# Real-data tests skip with a reason when ../shared/data is absent; the app's served tests when .venv-app is.
test: $(STAMP) $(APP_STAMP) chromium
	$(BIN)/python -m pytest -q -m "not slow or ci" tests

test-all: $(STAMP) $(APP_STAMP) chromium
	$(BIN)/python -m pytest -q tests

.PHONY: venv app-venv demo demo-segvlm demo-video test test-all chromium
