# peftreg developer entry points. Everything runs in a virtual environment at .venv,
# installed from requirements/lock.txt: exact versions with hashes, for Python 3.11
# and the CPU build of torch. `make lock` refreshes the lock from pyproject.toml.
#
# Installs skip byte-compiling (`--no-compile`): compiling every file of torch and the
# rest took most of an install's time. The suite's processes compile what they import,
# once: `make test` lets Python write its bytecode caches even where the environment says
# PYTHONDONTWRITEBYTECODE (without them, each of the suite's hundreds of processes
# compiled every module it imported, torch's included, from source).
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
# The suite runs in two processes (pytest-xdist), a test file per process at a time,
# handed out in collection order: the longest files first (tests/conftest.py).
PYTEST_WORKERS ?= 2

.PHONY: install lock test-latest test-tools llamacpp adapters-env serve test lint typecheck unit bench \
	bench-api bench-merge bench-swap bench-ui bench-multi bench-quant screenshots clean

$(VENV)/.installed: $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps --no-compile -r $(LOCK)
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet --no-deps "$(TORCH_SPEC)")
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

## Bytecode for every installed module and the sources, for the benchmarks: a command's
## start-up is then timed as a user's installed package runs it (pip compiles on install;
## a source that does not compile, as pip's own step, is passed over).
$(VENV)/.compiled: $(VENV)/.installed
	-$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" client registry
	touch $@


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

## AdapterHub's `adapters` library for the AdapterHub import/export tests, in its own
## environment: it pins transformers ~=4.57.6, the project is on transformers 5. Installed
## from requirements/adapters-lock.txt (hashed; the same CPU build of torch as the main lock).
ADAPTERS_VENV := .venv-adapters
ADAPTERS_LOCK := requirements/adapters-lock.txt
$(ADAPTERS_VENV)/.installed: $(ADAPTERS_LOCK)
	rm -rf $(ADAPTERS_VENV)
	$(PYTHON) -m venv $(ADAPTERS_VENV)
	$(ADAPTERS_VENV)/bin/pip install --quiet --require-hashes --no-deps --no-compile -r $(ADAPTERS_LOCK)
	$(ADAPTERS_VENV)/bin/pip check
	touch $@

adapters-env: $(ADAPTERS_VENV)/.installed

## Outside programs the tests drive as real clients: from Debian, skopeo (OCI copy,
## delete, token auth) and chromium (browser tests), installed when missing (as root);
## from npm, axe-core for the accessibility checks (tests/browser/package-lock.json)
## and llama.cpp's runtime (above); AdapterHub's library in .venv-adapters (above).
DEBIAN_TEST_TOOLS := skopeo chromium
test-tools: llamacpp adapters-env
	@missing=""; for tool in $(DEBIAN_TEST_TOOLS); do \
		command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "make test needs the Debian packages:$$missing (apt-get install$$missing)" >&2; \
			exit 1; fi; fi
	npm ci --prefix tests/browser --no-audit --no-fund --silent

## Install the test dependencies, lint, type-check and run the whole suite. The steps
## before the suite run side by side (the installs wait on the network and the disk,
## mypy on one core); each step's output is printed whole when it ends.
test:
	$(MAKE) --jobs=3 --output-sync=target lint typecheck test-tools
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

## 1 GiB push/pull (CLI and raw protocol) against cp + fsync, sha256sum, CNCF distribution
## (Debian docker-registry) by curl, and the S3 backend; BENCH_SIZE_MB sets the size.
bench: $(VENV)/.compiled
	$(PY) benchmarks/bench_transfer.py
	$(PY) benchmarks/bench_pull.py

## Manifest GET, version detail and listing under wrk (Debian wrk), 1,000 and 10,000 versions,
## SQLite and PostgreSQL, against MLflow's model registry (installed in its own venv).
bench-api: $(VENV)/.compiled
	$(PY) benchmarks/bench_api.py

## Streaming merge against peft merge_and_unload + save_pretrained on a ~1 GB fp16 model.
bench-merge: $(VENV)/.compiled
	$(PY) benchmarks/bench_merge.py
	$(PY) benchmarks/bench_merge.py --workdir /dev/shm --no-int4

## Mixed-adapter batches (1, 8, 32, 64 adapters) on a ~0.5B Llama: MultiAdapterHost against
## peft's adapter_names= batches and one-at-a-time AdapterHost swaps (BENCH_ARGS="--device cuda").
.PHONY: bench-multi
bench-multi: $(VENV)/.compiled
	$(PY) benchmarks/bench_multi.py $(BENCH_ARGS)

## Hot-swap latency of a rank-16 LoRA on a ~0.5B Llama against peft's hotswap_adapter.
bench-swap: $(VENV)/.compiled
	$(PY) benchmarks/bench_swap.py

## Server time per web UI page at 10,000 versions in one repository.
bench-ui: $(VENV)/.compiled
	$(PY) benchmarks/bench_ui.py

## PNGs of the web UI's main pages into docs/screenshots/ (a real server, real data).
screenshots: install test-tools
	$(PY) -m tests.browser.screenshots docs/screenshots

## Held-out perplexity of a small Llama trained on CPU: fp16, INT4 rtn/mse (g128, g32), GGUF
## q4_0/q4_k_m in llama.cpp.
bench-quant: $(VENV)/.compiled llamacpp
	$(PY) benchmarks/bench_quant.py

## Re-resolve the locks from pyproject.toml, keeping today's pins where the ranges allow;
## `make lock LOCK_FLAGS=--upgrade` moves every package to its newest allowed release.
LOCK_FLAGS ?=
COMPILE := .venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-find-links --no-emit-index-url $(LOCK_FLAGS)
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip-tools
	$(COMPILE) --extra test -o $(LOCK) pyproject.toml requirements/torch.in
	$(COMPILE) --extra server --extra worker -o requirements/server.txt pyproject.toml \
		requirements/torch.in
	.venv-lock/bin/python requirements/strip_self.py $(LOCK)
	.venv-lock/bin/python requirements/strip_self.py requirements/server.txt --drop torch
	$(COMPILE) -o $(ADAPTERS_LOCK) requirements/adapters.in requirements/torch.in
	$(COMPILE) -o benchmarks/mlflow-lock.txt benchmarks/mlflow.in

## The suite against the newest releases, in .venv-latest, to see drift before users do.
test-latest: test-tools
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet -r requirements/torch.in
	.venv-latest/bin/pip install --quiet --upgrade -e ".[test]"
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/freeze.txt
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-lock .venv-latest $(ADAPTERS_VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
