# kernel-bridge: `make run` starts the server on its embedded defaults, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
SDK_VENV := .venv-sdk
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8002
PYTEST_ARGS ?=

.PHONY: run test venv sdk-venv sandbox-tools toolchains kernelspecs bench lint typecheck clean

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

kernelspecs: venv
	$(BIN)/kernel-bridge kernelspecs install --sys-prefix

run: venv sandbox-tools kernelspecs
	$(BIN)/kernel-bridge serve --host $(HOST) --port $(PORT)

test: venv sdk-venv sandbox-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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
	rm -rf $(VENV) $(SDK_VENV) *.egg-info .pytest_cache .mypy_cache
