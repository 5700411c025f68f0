# kernel-bridge: `make run` starts the server on its embedded defaults, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
SDK_VENV := .venv-sdk
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8002
PYTEST_ARGS ?=

.PHONY: run test venv sdk-venv sandbox-tools toolchains kernelspecs bench lint typecheck clean \
	console browser-tools doctor

$(BIN)/kernel-bridge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	@touch $@

venv: $(BIN)/kernel-bridge

# The Backend.AI SDK pins python-dotenv below what pydantic-settings needs, so it lives in a venv
# of its own; the tests drive it as a real client process.
$(SDK_VENV)/bin/python:
	$(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/pip install -q 'backend.ai-client==23.9.10' 'yarl==1.9.4'

sdk-venv: $(SDK_VENV)/bin/python

# bubblewrap confines every kernel; install it where we can (root on Debian).
sandbox-tools:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) \
	  || echo "bubblewrap missing: install it, or run with KB_SANDBOX=off (unsafe)"; }

# Compilers and interpreters the language kernels use; what a Debian machine lacks.
toolchains: sandbox-tools
	@missing=""; command -v go >/dev/null || missing="$$missing golang-go"; \
	command -v ruby >/dev/null || missing="$$missing ruby"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v javac >/dev/null || missing="$$missing default-jdk-headless"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# The web console's editor (CodeMirror 6 from npm), bundled by esbuild into a static asset the
# server serves; built here, not at run time, and not committed (api/console/editor.js).
CONSOLE_DIR := api/console
$(CONSOLE_DIR)/editor.js: $(CONSOLE_DIR)/package.json $(CONSOLE_DIR)/package-lock.json \
		$(CONSOLE_DIR)/editor-entry.mjs
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	cd $(CONSOLE_DIR) && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build

console: $(CONSOLE_DIR)/editor.js

# A real browser for the console's (and JupyterLab's) tests: Debian's chromium and its driver.
browser-tools:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	  || echo "chromium and chromedriver missing: install them (Debian: chromium chromium-driver)"

kernelspecs: venv
	$(BIN)/kernel-bridge kernelspecs install --sys-prefix

run: venv sandbox-tools kernelspecs console
	$(BIN)/kernel-bridge serve --host $(HOST) --port $(PORT)

test: venv sdk-venv sandbox-tools console browser-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Can this machine serve safely? One line per check, with the fix for each failure.
doctor: venv
	$(BIN)/kernel-bridge doctor

bench: venv sandbox-tools
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/oneshot.py
	$(BIN)/python bench/languages.py
	$(BIN)/python bench/testcases.py

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy
	$(BIN)/mypy --strict kernelspecs

clean:
	rm -rf $(VENV) $(SDK_VENV) *.egg-info .pytest_cache .mypy_cache $(CONSOLE_DIR)/node_modules \
	  $(CONSOLE_DIR)/editor.js

# -- Jupyter: a data-science environment for kernels ----------------------------------------------

# A venv with ipykernel and the usual data-science packages; tests/test_jupyterlab.py and
# tests/test_python_env.py run kernels in it. Serve with it:
#   KB_PYTHON_ENV=$(CURDIR)/.venv-datascience make run
DS_VENV := .venv-datascience

$(DS_VENV)/.done:
	$(PYTHON) -m venv $(DS_VENV)
	$(DS_VENV)/bin/pip install -q ipykernel numpy pandas matplotlib
	@touch $@

datascience-env: $(DS_VENV)/.done

.PHONY: datascience-env
test: datascience-env
