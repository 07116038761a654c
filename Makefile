# Switchboard: `make up` brings the suite up on embedded defaults, `make test`
# runs every test from nothing. Both make their own virtualenv and stubs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos/switchboard -name '*.proto')

.PHONY: up test gen lint typecheck polyglot clean bench bench-soak

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# Generated stubs live in gen/, importable as their proto packages.
	echo "$(CURDIR)/gen" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/switchboard-gen.pth"
	touch $@

gen/.stamp: $(INSTALLED) $(PROTOS) scripts/gen_protos.py
	$(PY) scripts/gen_protos.py
	touch $@

gen: gen/.stamp

up: gen
	$(PY) -m services.launcher

lint: gen
	cd protos && ../$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: gen
	$(VENV)/bin/mypy

# The Node.js client of tests/polyglot: installed when npm is here (skipped with a message otherwise).
polyglot:
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/polyglot --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node.js polyglot test will be skipped"; fi

test: lint typecheck polyglot
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Benchmarks: the bench extras (Celery, matplotlib, psutil, py-spy) on top of dev, then
# every benchmark beside its baselines (under 10 minutes; PostgreSQL and Redis required).
BENCH_INSTALLED := $(VENV)/.installed-bench

$(BENCH_INSTALLED): $(INSTALLED) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@

bench: gen $(BENCH_INSTALLED)
	$(PY) -m bench $(BENCH_ARGS)

# Memory under 10 minutes of steady runs (not part of `make bench`).
bench-soak: gen $(BENCH_INSTALLED)
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) gen protos/.deps .pytest_cache .mypy_cache .ruff_cache
