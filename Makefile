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

setup: $(VENV)/.installed jars sandbox-tool

# The code sandbox's OS boundary (models/sandbox.py) is bubblewrap: installed here when root (CI,
# containers), else say how to get it. Without it tool code fails closed (sandbox.allow_weak_isolation).
.PHONY: sandbox-tool
sandbox-tool:
	@command -v bwrap >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "sandbox-tool: installing bubblewrap (apt-get)"; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; \
	  command -v bwrap >/dev/null || { echo "sandbox-tool: apt-get did not install bwrap" >&2; exit 1; }; \
	else \
	  echo "The code sandbox needs bubblewrap (bwrap): sudo apt-get install bubblewrap (Debian/Ubuntu)," \
	    "sudo dnf install bubblewrap (Fedora), then rerun make setup." >&2; exit 1; \
	fi

# The interpreter the virtualenv is made from: python3.11 when installed, else python3 if it is 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)

$(VENV)/.installed: requirements/lock.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 is required (python3.11 or python3 on PATH)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
	  echo "Python 3.11 is required; $(PYTHON) is $$($(PYTHON) -V 2>&1). Set PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.8
	@# Bytecode is compiled at install time: with PYTHONDONTWRITEBYTECODE set, every process
	@# would otherwise recompile torch/transformers from source (~1 min per import on 2 cores).
	$(UV) pip install --python $(PY) -q --compile-bytecode -r requirements/lock.txt
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

# The Spark test files in random order (pytest-randomly, off in the normal suite), once per seed:
# a test that leans on another's lake fails here. Rerun one order: RANDOM_ORDER_SEEDS=<seed>.
.PHONY: test-random-order
RANDOM_ORDER_SEEDS ?= 1 2
test-random-order: setup
	@files=$$(grep -l "pytest.mark.spark\|pytestmark.*spark" tests/test_*.py); \
	for seed in $(RANDOM_ORDER_SEEDS); do echo "test-random-order: --randomly-seed=$$seed"; \
	  $(VENV)/bin/pytest -q -p randomly --randomly-seed=$$seed $$files $(PYTEST_ARGS) || exit 1; \
	done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: bench-curation bench-decontam bench-synthesis bench-influence

bench-curation: setup
	$(PY) -m benchmarks.bench_curation

.PHONY: bench-decontam
bench-decontam: setup  ## decontamination recall/false positives on planted benchmark items, docs/s vs the old rule
	$(PY) -m benchmarks.bench_decontam --gate $(BENCH_ARGS)

.PHONY: bench-influence tiny-model
bench-influence: setup  ## LESS features/s: batched vs per-example loop on the tiny model (CPU; BENCH_ARGS=--device cuda)
	$(PY) -m benchmarks.bench_influence $(BENCH_ARGS)

.PHONY: bench-train
bench-train: setup  ## training tokens/s packed vs padded on the tiny model (CPU; BENCH_ARGS=--device cuda)
	$(PY) -m benchmarks.bench_train $(BENCH_ARGS)

tiny-model: setup  ## build the tiny local tokenizer + Llama into var/models/tiny-llama (done on first use anyway)
	$(PY) -m models.tiny

# Generation: a local OpenAI-compatible server (transformers serve, tiny model) on port 18300.
.PHONY: llm-up llm-down bench-synthesis
llm-up: setup
	$(PY) -m models.generation.local_server up --port 18300

llm-down:
	$(PY) -m models.generation.local_server down --port 18300

bench-synthesis: setup
	$(PY) -m benchmarks.bench_synthesis

.PHONY: bench-eval
bench-eval: setup  ## eval items/s through the local server at concurrency 1 vs 8; grader answers/s
	$(PY) -m benchmarks.bench_eval $(BENCH_ARGS)

# Local Airflow (scheduler + dag-processor + api-server, LocalExecutor/SQLite) on var/airflow.
.PHONY: airflow-up airflow-down airflow-trigger
airflow-up: setup
	$(PY) -m plugins.airflow_local up

airflow-down:
	$(PY) -m plugins.airflow_local down

airflow-trigger: setup
	$(PY) -m plugins.airflow_local trigger corpus_curation --wait

clean-lake:
	rm -rf var/lake
