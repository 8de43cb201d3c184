# Everything a fresh clone needs: `make demo` and `make test` set it up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: all venv kafka lint test demo clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# Apache Kafka's jars from Maven Central, cached outside the work tree.
kafka: venv
	$(BIN)/python -m daemon.localkafka fetch

lint: venv
	$(BIN)/ruff check daemon tests
	$(BIN)/mypy

test: venv kafka lint
	$(BIN)/python -m pytest -q

demo: venv kafka
	$(BIN)/lstmd demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
