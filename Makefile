# Everything a fresh clone needs: `make demo` and `make test` set it up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: all venv kafka lint unit test demo clean check deploy-tools promtool lock

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# Apache Kafka's jars from Maven Central, cached outside the work tree.
kafka: venv
	$(BIN)/python -m daemon.devtools.localkafka fetch

# Style, types, and the architecture's import contracts (pyproject.toml [tool.importlinter]).
lint: venv
	$(BIN)/ruff check daemon tests
	$(BIN)/ruff format --check daemon tests
	$(BIN)/mypy
	$(BIN)/lint-imports

# The fast loop: lint and every test that needs no broker, no Java and no command-line
# process of its own (marker slow: each imports TensorFlow anew); about 2 minutes.
# `make test` runs them all.
unit: lint
	$(BIN)/python -m pytest -q -m "not kafka and not slow"

test: venv kafka lint check
	$(BIN)/python -m pytest -q --durations=30

# Container and Kubernetes files: kustomize overlays validated (strict), yamllint,
# hadolint, promtool rules and alert unit tests, dashboard queries, and
# tests/pod/test_deploy.py (manifests vs daemon; a live scrape linted by promtool).
check: venv kafka deploy-tools promtool
	$(BIN)/python deploy/check.py
	$(BIN)/python -m pytest -q tests/pod/test_deploy.py

DEPLOY_STAMP := $(VENV)/.deploy-tools-$(shell cksum pyproject.toml | cut -d' ' -f1)

$(DEPLOY_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[deploy]'
	rm -f $(VENV)/.deploy-tools-* && touch $@

deploy-tools: $(DEPLOY_STAMP)

# promtool, from Debian's `prometheus` package: only the binary is extracted into the
# venv (installing the package would also start a Prometheus server on systemd hosts).
# Root for `apt-get update` only when the package lists lack it: sudo unless root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

promtool: venv
	@if [ -x $(BIN)/promtool ] || command -v promtool >/dev/null; then exit 0; fi; \
	set -e; rm -rf build/promtool; mkdir -p build/promtool; cd build/promtool; \
	echo "fetching promtool from Debian's prometheus package"; \
	apt-get download prometheus >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && apt-get download prometheus >/dev/null; }; \
	dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > promtool; \
	chmod +x promtool && ./promtool --version >/dev/null && mv promtool $(CURDIR)/$(BIN)/promtool; \
	cd $(CURDIR) && rm -rf build/promtool

# requirements.lock (the image's dependencies, linux x86_64, CPython 3.11, hashed)
# from pyproject.toml's runtime dependencies and the librdkafka extra. Keeps current pins unless UPGRADE=1.
UV_VERSION := 0.13.9

lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --quiet uv==$(UV_VERSION)
	build/lock-venv/bin/uv pip compile pyproject.toml --extra librdkafka --quiet --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --generate-hashes $(if $(UPGRADE),--upgrade) \
	  --custom-compile-command "make lock" -o requirements.lock
	rm -rf build/lock-venv

demo: venv kafka
	$(BIN)/lstmd demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
