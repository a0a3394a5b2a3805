# Two commands on a fresh machine (only Python >= 3.11 needed):
#   make demo   - set up, then run the demo on the embedded Valkey
#   make test   - set up, then run the whole test suite (real Valkey servers)
#
# The blocking code of the lock, the node, the map, the driver and the cluster redirects is made from
# the asyncio code: python scripts/unasync.py rewrites it; `make test` fails when it is stale.
#
# The development and CI environment is exactly what requirements-dev.txt pins (every
# package, pip and the build backend included); pyproject.toml keeps the library's own ranges.
#   make lock         - re-resolve the newest releases pyproject allows and rewrite the lock
#   make test-latest  - the suite on those newest releases, in .venv-latest (lock untouched)
#   make test-server SERVER=/path/to/redis-server - the suite against another server binary
#                    (PYTEST_ARGS="..." passes a selection or options on to pytest)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := requirements-dev.txt
LATEST := .venv-latest

.PHONY: demo test checks lint lint-only bench setup clean lock test-latest test-server

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $$(grep -E '^(pip|setuptools|wheel)==' $(LOCK))
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/syncmap demo

checks: lint-only
	$(B)/pytest -q

# the generated code, ruff (lint and format) and mypy, without the tests
lint-only:
	$(B)/python scripts/unasync.py --check
	$(B)/ruff check src tests benchmarks scripts
	$(B)/ruff format --check src tests benchmarks scripts
	$(B)/mypy

lint: setup
	$(MAKE) --no-print-directory lint-only B=$(BIN)

test: setup
	$(MAKE) --no-print-directory checks B=$(BIN)

test-server: setup
	@test -n "$(SERVER)" || { echo "usage: make test-server SERVER=/path/to/redis-server"; exit 2; }
	@test -x "$(SERVER)" || { echo "test-server: $(SERVER) is not an executable"; exit 2; }
	$(SERVER) --version
	SYNCMAP_SERVER=$(SERVER) $(BIN)/pytest -q $(PYTEST_ARGS)

# The newest releases that pyproject allows: a peer's or a dependency's new release is noticed
# here, on purpose, not by a red CI.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LATEST)/bin/python -m pip install -q --upgrade -e '.[dev]'
	$(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/^/  /'
	$(MAKE) --no-print-directory checks B=$(LATEST)/bin

lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -q -e '.[dev]'
	{ echo "# The dev and CI environment, exactly (make setup installs it). Refresh: make lock"; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK)
	rm -rf .venv-lock

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock build *.egg-info src/*.egg-info
