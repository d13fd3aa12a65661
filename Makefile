# `make demo` runs the main job, `make test` the test suite; both set up .venv first.
PY := .venv/bin/python

.PHONY: demo test lint setup

.venv/.installed: pyproject.toml scripts/bootstrap.sh
	sh scripts/bootstrap.sh
	touch $@

setup: .venv/.installed

demo: .venv/.installed
	$(PY) -m recserve.cli.main demo

test: .venv/.installed
	PY=$(PY) sh scripts/test.sh

lint: .venv/.installed
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
