# cleanroom: `make run` starts a broker, the controller and one local agent (audit mode); `make test` runs
# lint, types and the whole test suite against real Mosquitto, Xvfb and processes.
SHELL := /bin/bash
UV ?= .tools/bin/uv

.PHONY: run test lint typecheck pytest sync sync-run bench clean

$(UV):
	python3 scripts/bootstrap_uv.py

sync: $(UV)
	$(UV) sync --frozen 2>/dev/null || $(UV) sync

# `make run` needs no compiler: the dev group (test tools, and libvirt-python, which builds from source) is
# left out; what is installed already stays (--inexact).
sync-run: $(UV)
	$(UV) sync --frozen --no-dev --inexact 2>/dev/null || $(UV) sync --no-dev --inexact

run: sync-run
	$(UV) run --no-dev python scripts/run_local.py

lint: sync
	$(UV) run ruff check .
	$(UV) run ruff format --check .

typecheck: sync
	$(UV) run mypy

pytest: sync
	$(UV) run pytest

test: lint typecheck pytest

bench: sync
	$(UV) run python bench/ingest.py
	$(UV) run python bench/enforce.py
	$(UV) run python bench/actions.py

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
