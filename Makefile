# peftreg developer entry points. Everything runs in a virtual environment at .venv,
# installed from requirements/lock.txt: exact versions with hashes, for Python 3.11
# and the CPU build of torch. `make lock` refreshes the lock from pyproject.toml.
#
# torch comes from the lock (CPU build). For another build, name it, e.g.
# `make install TORCH_SPEC="torch==2.13.0+cu128"`: it replaces the locked torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
TORCH_SPEC ?=
PEFTREG_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/postgres
export PEFTREG_TEST_POSTGRES_URL
PYTEST_ARGS ?=

.PHONY: install lock test-latest serve test lint typecheck unit bench bench-api bench-merge bench-swap clean

$(VENV)/.installed: $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet --no-deps "$(TORCH_SPEC)")
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed


## Install and start the registry on the embedded default (SQLite + files under PEFTREG_HOME).
serve: install
	$(VENV)/bin/peftreg serve

lint: install
	$(VENV)/bin/ruff check registry client migrations tests
	$(VENV)/bin/ruff format --check registry client migrations tests

typecheck: install
	$(VENV)/bin/mypy

## Install the test dependencies, lint, type-check and run the whole suite.
test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

## 1 GiB push/pull (CLI and raw protocol) against cp + fsync, sha256sum, CNCF distribution
## (Debian docker-registry) by curl, and the S3 backend; BENCH_SIZE_MB sets the size.
bench: install
	$(PY) benchmarks/bench_transfer.py
	$(PY) benchmarks/bench_pull.py

## Manifest GET, version detail and listing under wrk (Debian wrk), 1,000 and 10,000 versions,
## SQLite and PostgreSQL, against MLflow's model registry (installed in its own venv).
bench-api: install
	$(PY) benchmarks/bench_api.py

## Streaming merge against peft merge_and_unload + save_pretrained on a ~1 GB fp16 model.
bench-merge: install
	$(PY) benchmarks/bench_merge.py
	$(PY) benchmarks/bench_merge.py --workdir /dev/shm --no-int4

## Hot-swap latency of a rank-16 LoRA on a ~0.5B Llama against peft's hotswap_adapter.
bench-swap: install
	$(PY) benchmarks/bench_swap.py

## Re-resolve the lock from pyproject.toml (newest releases the ranges allow).
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip-tools
	.venv-lock/bin/pip-compile --quiet --extra test --generate-hashes --allow-unsafe \
		--strip-extras --no-emit-find-links --no-emit-index-url --upgrade \
		-o $(LOCK) pyproject.toml requirements/torch.in
	.venv-lock/bin/python requirements/strip_self.py $(LOCK)

## The suite against the newest releases, in .venv-latest, to see drift before users do.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet -r requirements/torch.in
	.venv-latest/bin/pip install --quiet --upgrade -e ".[test]"
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/freeze.txt
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-lock .venv-latest build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
