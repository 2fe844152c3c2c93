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

.PHONY: install lock test-latest serve test lint typecheck unit bench bench-merge bench-swap bench-quant llamacpp clean

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

## llama.cpp for the GGUF tests: node-llama-cpp's prebuilt CPU binaries from npm (no compiler,
## nothing built or downloaded at test time).
LLAMACPP := tests/llamacpp
$(LLAMACPP)/node_modules/.package-lock.json: $(LLAMACPP)/package-lock.json
	NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci --prefix $(LLAMACPP) --omit=optional --no-audit --no-fund

llamacpp: $(LLAMACPP)/node_modules/.package-lock.json

## Install the test dependencies, lint, type-check and run the whole suite.
test: lint typecheck llamacpp
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_transfer.py
	$(PY) benchmarks/bench_pull.py

## Streaming merge against peft merge_and_unload + save_pretrained on a ~1 GB fp16 model.
bench-merge: install
	$(PY) benchmarks/bench_merge.py
	$(PY) benchmarks/bench_merge.py --workdir /dev/shm --no-int4

## Hot-swap latency of a rank-16 LoRA on a ~0.5B Llama against peft's hotswap_adapter.
bench-swap: install
	$(PY) benchmarks/bench_swap.py

## Held-out perplexity of a small Llama trained on CPU: fp16, INT4 rtn/mse (g128, g32), GGUF
## q4_0/q4_k_m in llama.cpp (needs `npm ci --prefix tests/llamacpp --omit=optional`).
bench-quant: install llamacpp
	$(PY) benchmarks/bench_quant.py

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
