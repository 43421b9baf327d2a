# JiuZhang Lake — every target installs what it needs (a fresh machine needs only python3.11, a JDK and Maven).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
PYTEST_ARGS ?=
export PYTHONUNBUFFERED := 1
export JZLAKE_HOME := $(CURDIR)

.PHONY: setup jars java-check demo test test-fast lint bench bench-curation clean-lake help

help:
	@echo "make demo   - set up if needed, then run the pipeline on the embedded sample"
	@echo "make test   - the test suite (Spark, Airflow and MLflow integration tests included)"
	@echo "make bench  - benchmarks (bench-curation, ...)"

setup: $(VENV)/.installed jars

$(VENV)/.installed: requirements/lock.txt pyproject.toml
	@command -v python3.11 >/dev/null || command -v python3 >/dev/null || { echo "python3.11 is required" >&2; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.8
	$(UV) pip install --python $(PY) -q -r requirements/lock.txt
	$(UV) pip install --python $(PY) -q --no-deps -e .
	touch $@

java-check:
	@command -v java >/dev/null || { echo "Java 17+ is required for Spark: apt-get install openjdk-17-jdk-headless" >&2; exit 1; }
	@java -version 2>&1 | head -1 | grep -qE '"(1[7-9]|2[0-9])' || { echo "Spark 4 needs Java 17 or newer; found: $$(java -version 2>&1 | head -1)" >&2; exit 1; }

jars: java-check $(VENV)/.installed
	@PYTHON=$(PY) infra/fetch-delta-jars.sh var/jars

demo: setup
	$(PY) -m jzlake.demo

# pytest exits 5 when it collected nothing: a suite that runs no test must not pass.
test: setup
	@$(VENV)/bin/pytest -q --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow and not airflow and not spark" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: bench-curation

bench-curation: setup
	$(PY) -m benchmarks.bench_curation

clean-lake:
	rm -rf var/lake var/runs
