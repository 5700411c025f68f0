# kernel-bridge: every install step lives here; `.ci/run` only calls make targets.
#
#   make run        install what serving needs (no test or dev tools) and every language's
#                   toolchain, then serve on 127.0.0.1:8002 (blocks; Ctrl-C stops it)
#   make test       everything CI does on a fresh Debian machine: the above, plus the test and dev
#                   extras, the Backend.AI SDK venv, then pytest
#   make test-unit  the unit layer only (tests/unit: no server, no kernel), in seconds
#   make lint typecheck
#   make deploy-check  the Dockerfile (hadolint) and deploy/k8s (Kubernetes' schemas), offline
#
# Installs are stamp files, so a second `make run` starts at once. To add a step, write a target
# that makes a stamp (or checks for a command) and list it in SERVE_DEPS or TEST_DEPS.
PYTHON ?= python3
VENV := .venv
SDK_VENV := .venv-sdk
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8002
PYTEST_ARGS ?=
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
# swagger-ui-dist from the npm registry, copied into the package (the network is closed at run time)
SWAGGER_UI_VERSION := 5.35.0
DOCS_DIR := api/docs_assets

# What `make run` needs before it serves, and what `make test` adds on top.
SERVE_DEPS := $(BIN)/.serve toolchains docs-assets console kernelspecs
TEST_DEPS := $(SERVE_DEPS) $(BIN)/.test sdk-venv browser-tools datascience-env postgres $(BIN)/.deploy

.PHONY: run test test-unit venv serve-venv sdk-venv sandbox-tools toolchains kernelspecs docs-assets bench \
        lint typecheck settings-doc clean console browser-tools doctor postgres deploy-check

# -- Python environments --------------------------------------------------------------------------

# Serving: the package and its runtime dependencies only.
$(BIN)/.serve: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	@touch $@

# Tests and checks: the same venv plus the test and dev extras.
$(BIN)/.test: $(BIN)/.serve
	$(BIN)/pip install -q -e '.[test,dev]'
	@touch $@

# A developer's venv: serving plus the test and dev tools (what HELPERS and CI expect).
venv: $(BIN)/.test
serve-venv: $(BIN)/.serve

# The Backend.AI SDK pins python-dotenv below what pydantic-settings needs, so it lives in a venv
# of its own; the tests drive it as a real client process.
$(SDK_VENV)/bin/python:
	$(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/pip install -q 'backend.ai-client==23.9.10' 'yarl==1.9.4'

sdk-venv: $(SDK_VENV)/bin/python

# -- system packages --------------------------------------------------------------------------------

# apt-get install what is missing, as root on Debian; elsewhere say what to install.
# $(call apt,COMMAND:PACKAGE ...)
define apt
	@missing=""; for pair in $(1); do \
	  command -v "$${pair%%:*}" >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && $(APT_GET) $$missing; \
	  else echo "missing:$$missing (install them, or some languages stay unavailable)"; fi; fi
endef

# bubblewrap confines every kernel, libseccomp2 builds its seccomp filter (through pyseccomp),
# mkfs.ext4 (e2fsprogs) makes each session's quota'd filesystem (bridge/disk.py).
sandbox-tools:
	$(call apt,bwrap:bubblewrap mkfs.ext4:e2fsprogs)
	@ldconfig -p | grep -q libseccomp.so.2 || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null && apt-get update -qq && $(APT_GET) libseccomp2; } || \
	  echo "libseccomp2 missing: install it, or run with KB_SANDBOX=off (unsafe)"

# Compilers and interpreters of the languages in bridge/languages.py (rustc and cargo: Debian's
# rustc when no rustup toolchain is on PATH).
toolchains: sandbox-tools
	$(call apt,go:golang-go ruby:ruby node:nodejs javac:default-jdk-headless \
	  g++:g++ gcc:gcc make:make rustc:rustc)

kernelspecs: $(BIN)/.serve
	$(BIN)/kernel-bridge kernelspecs install --sys-prefix >/dev/null

# The /api/docs page: swagger-ui-dist's files, copied into the package once.
docs-assets: $(DOCS_DIR)/swagger-ui-bundle.js

$(DOCS_DIR)/swagger-ui-bundle.js:
	$(call apt,npm:npm)
	rm -rf $(DOCS_DIR).tmp && mkdir -p $(DOCS_DIR).tmp
	cd $(DOCS_DIR).tmp && npm pack -q swagger-ui-dist@$(SWAGGER_UI_VERSION) >/dev/null \
	  && tar xzf swagger-ui-dist-$(SWAGGER_UI_VERSION).tgz
	mkdir -p $(DOCS_DIR)
	cp $(DOCS_DIR).tmp/package/swagger-ui-bundle.js $(DOCS_DIR).tmp/package/swagger-ui.css \
	   $(DOCS_DIR).tmp/package/LICENSE $(DOCS_DIR)/
	rm -rf $(DOCS_DIR).tmp

# The web console's editor (CodeMirror 6 from npm), bundled by esbuild into a static asset the
# server serves; built here, not at run time, and not committed (api/console/editor.js).
CONSOLE_DIR := api/console
$(CONSOLE_DIR)/editor.js: $(CONSOLE_DIR)/package.json $(CONSOLE_DIR)/package-lock.json \
		$(CONSOLE_DIR)/editor-entry.mjs
	$(call apt,node:nodejs npm:npm)
	cd $(CONSOLE_DIR) && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build

console: $(CONSOLE_DIR)/editor.js

# A real browser for the console's (and JupyterLab's) tests: Debian's chromium and its driver.
browser-tools:
	$(call apt,chromium:chromium chromedriver:chromium-driver)

# hadolint and Kubernetes' schemas, for checking the deployment files offline (no Docker engine
# or cluster is needed; tests/unit/test_deploy.py runs them).
$(BIN)/.deploy: $(BIN)/.serve
	$(BIN)/pip install -q -e '.[deploy]'
	@touch $@

deploy-check: $(BIN)/.deploy
	$(BIN)/python -m pytest tests/unit/test_deploy.py -q

# PostgreSQL's server binaries for the tests with KB_DATABASE_URL: tests/pg.py makes a throw-away
# cluster with initdb in a temp dir, run as nobody (Debian keeps initdb off PATH, under
# /usr/lib/postgresql/VERSION/bin). The package's own "main" cluster, if its install makes one,
# is not used.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && $(APT_GET) postgresql; \
	  else echo "postgresql missing: install it (the PostgreSQL tests need initdb)"; fi; }

# -- what people run --------------------------------------------------------------------------------

run: $(SERVE_DEPS)
	$(BIN)/kernel-bridge serve --host $(HOST) --port $(PORT)

test: $(TEST_DEPS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit layer alone: scripted message streams and pure policy, no server, in seconds.
test-unit: $(BIN)/.test $(BIN)/.deploy sandbox-tools
	$(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)

# Can this machine serve safely? One line per check, with the fix for each failure.
doctor: $(BIN)/.serve
	$(BIN)/kernel-bridge doctor

lint: $(BIN)/.test
	$(BIN)/ruff check .

typecheck: $(BIN)/.test
	$(BIN)/mypy
	$(BIN)/mypy --strict kernelspecs

# The README's settings table, generated from bridge/settings.py (tests/test_settings_doc.py
# fails when the README drifts from the model).
settings-doc: $(BIN)/.serve
	$(BIN)/python -m api.settings_doc --write README.md

bench: $(SERVE_DEPS)
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/kernel_start.py
	$(BIN)/python bench/kernel_child.py
	$(BIN)/python bench/oneshot.py
	$(BIN)/python bench/languages.py
	$(BIN)/python bench/testcases.py

clean:
	rm -rf $(VENV) $(SDK_VENV) .venv-datascience $(DOCS_DIR) *.egg-info .pytest_cache .mypy_cache \
	  $(CONSOLE_DIR)/node_modules $(CONSOLE_DIR)/editor.js

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
