# peftreg developer entry points. Everything runs in a virtual environment at .venv.
#
# torch is installed explicitly, pinned by TORCH_SPEC, before the package: an
# unpinned torch would pull gigabytes of CUDA wheels. Override it for your
# machine, e.g. `make serve TORCH_SPEC="torch==2.13.0+cu128"`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PEFTREG_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/postgres
export PEFTREG_TEST_POSTGRES_URL
PYTEST_ARGS ?=

.PHONY: install install-test serve test lint typecheck unit bench bench-merge bench-swap clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Install and start the registry on the embedded default (SQLite + files under PEFTREG_HOME).
serve: install
	$(VENV)/bin/peftreg serve

lint: install-test
	$(VENV)/bin/ruff check registry client migrations tests
	$(VENV)/bin/ruff format --check registry client migrations tests

typecheck: install-test
	$(VENV)/bin/mypy

## Install the test dependencies, lint, type-check and run the whole suite.
test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install-test
	$(PY) benchmarks/bench_transfer.py
	$(PY) benchmarks/bench_pull.py

## Streaming merge against peft merge_and_unload + save_pretrained on a ~1 GB fp16 model.
bench-merge: install-test
	$(PY) benchmarks/bench_merge.py
	$(PY) benchmarks/bench_merge.py --workdir /dev/shm --no-int4

## Hot-swap latency of a rank-16 LoRA on a ~0.5B Llama against peft's hotswap_adapter.
bench-swap: install-test
	$(PY) benchmarks/bench_swap.py

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
