# `make run` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test lint typecheck pytest system-deps bench-decode bench-fanout bench-snapshot bench-big-transaction bench-floor psql token clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/replicator serve

# Debian packages the tests drive: Chromium for the browser tests, the PostgreSQL 15 server
# (the second version under test) and its wal2json plugin, promtool (Debian's prometheus),
# tsc (node-typescript) for the client's type declarations.
system-deps:
	@scripts/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check replicator tests benchmarks
	$(BIN)/ruff format --check replicator tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# The compose file's check validates it against the Compose specification's JSON schema,
# as the docker-compose 1.29.2 wheel ships it (downloaded by pip, never installed).
COMPOSE_WHEEL := $(VENV)/test-assets/docker_compose-1.29.2-py2.py3-none-any.whl
$(COMPOSE_WHEEL): | $(STAMP)
	$(BIN)/pip download --quiet --no-deps docker-compose==1.29.2 -d $(VENV)/test-assets

pytest: $(STAMP) system-deps $(COMPOSE_WHEEL)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# BASELINE: the commit the decode benchmark compares with, installed in its own virtualenv
BASELINE ?= HEAD~1
bench-decode: $(STAMP)
	$(BIN)/python benchmarks/decode.py --baseline $(BASELINE)

# fan-out and start-up compare with where this branch left main, or with BASELINE when given
COMPARE = $(if $(filter command line,$(origin BASELINE)),--baseline $(BASELINE))
bench-fanout: $(STAMP)
	$(BIN)/python benchmarks/fanout.py $(COMPARE)

bench-snapshot: $(STAMP)
	$(BIN)/python benchmarks/snapshot.py $(COMPARE)

bench-floor: $(STAMP)
	$(BIN)/python benchmarks/floor.py

bench-big-transaction: $(STAMP)
	$(BIN)/python benchmarks/big_transaction.py

psql:
	@psql "$$(cat .replicator/dsn 2>/dev/null || echo 'postgresql://postgres@127.0.0.1:5432/postgres')"

token: $(STAMP)
	@$(BIN)/replicator token $(or $(USER_ID),11111111-1111-1111-1111-111111111111)

# The embedded cluster lives under /var/lib/replicator when its server user cannot reach
# .replicator (a clone under /root); PostgresCluster.remove stops it and deletes it there too.
clean:
	-test ! -d .replicator/pgdata -a ! -f .replicator/pgdata.location || $(BIN)/python -c \
	  'from pathlib import Path; from replicator.runtime.cluster import PostgresCluster, embedded_bindir; PostgresCluster(embedded_bindir(), Path(".replicator/pgdata")).remove()'
	rm -rf $(VENV) .replicator .pytest_cache .mypy_cache .ruff_cache
