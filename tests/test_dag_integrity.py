"""DAG integrity (Astronomer-style): every file in dags/ imports cleanly through Airflow's DagBag,
every DAG is tagged and retried, and DAG files keep business logic (Spark, torch, ...) out of
parse time. Plus the shape of the curation DAG."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from tests.airflow_env import isolate_airflow_home
from tests.conftest import REPO

isolate_airflow_home()

from airflow.dag_processing.dagbag import DagBag  # noqa: E402

DAGS_DIR = REPO / "dags"
DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))
# Importing any of these while parsing means business logic leaked into a DAG file: parsing
# runs every ~30 s in the dag-processor and must stay cheap and side-effect free.
HEAVY_MODULES = ("pyspark", "delta", "torch", "transformers", "peft", "mlflow", "pandas", "vllm", "openai")


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=str(DAGS_DIR), safe_mode=False)


def test_dags_folder_has_dag_files() -> None:
    assert DAG_FILES, f"no DAG files in {DAGS_DIR}"


def test_no_import_errors(dagbag: DagBag) -> None:
    assert not dagbag.import_errors, "DAG import errors:\n" + "\n".join(
        f"{path}:\n{err}" for path, err in dagbag.import_errors.items())


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_every_file_defines_a_dag(path: Path, dagbag: DagBag) -> None:
    assert any(Path(dag.fileloc).resolve() == path.resolve() for dag in dagbag.dags.values()), \
        f"{path.name} defines no DAG: helpers belong in plugins/, not dags/"


def test_every_dag_is_tagged_documented_and_retried(dagbag: DagBag) -> None:
    assert dagbag.dags
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id}: add tags"
        assert dag.doc_md, f"{dag_id}: add doc_md"
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag_id}.{task.task_id}: retries={task.retries}, want >= 1"
            assert task.retry_delay >= timedelta(seconds=1), f"{dag_id}.{task.task_id}: retry_delay"


def test_dag_files_import_no_business_logic() -> None:
    """Import every DAG file in a fresh interpreter and list heavy modules it pulled in."""
    code = (
        "import json, runpy, sys\n"
        "for f in sys.argv[2:]: runpy.run_path(f)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1].split(',')))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, ",".join(HEAVY_MODULES), *map(str, DAG_FILES)],
                          capture_output=True, text=True, timeout=300, check=False, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    leaked = json.loads(proc.stdout.strip().splitlines()[-1])
    assert leaked == [], f"DAG files import {leaked} at parse time: move that code into plugins/ or the job"


def test_corpus_curation_shape(dagbag: DagBag) -> None:
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    from spark_jobs.curate import CURATION_TABLES

    dag = dagbag.dags["corpus_curation"]
    order = ["ingest", "clean", "dedupe", "decontaminate", "report"]
    assert sorted(dag.task_ids) == sorted(order)
    for upstream, downstream in pairwise(order):
        assert dag.task_dict[downstream].upstream_task_ids == {upstream}
    assert all(isinstance(t, SparkSubmitOperator) for t in dag.tasks)
    produced = {a.name for t in dag.tasks for a in t.outlets}
    assert produced == {f"lake.{name}" for name in CURATION_TABLES}
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.timetable.expression == "0 0 * * 0"  # @weekly


def test_corpus_curation_gates_decontaminate_on_data_quality(dagbag: DagBag) -> None:
    """The decontaminate task checks its bounds (plugins/quality.py) before it emits asset events."""
    from plugins.dag_settings import dag_settings

    dag = dagbag.dags["corpus_curation"]
    assert dag.task_dict["decontaminate"].check_quality is True
    assert "decontaminate" in dag_settings().quality.stages


def test_lake_maintenance_shape(dagbag: DagBag) -> None:
    from plugins.spark_submit import LakeSparkSubmitOperator

    dag = dagbag.dags["lake_maintenance"]
    assert dag.task_ids == ["maintain"]
    task = dag.task_dict["maintain"]
    assert isinstance(task, LakeSparkSubmitOperator) and task.job == "maintenance"
    assert Path(task.application) == REPO / "spark_jobs" / "maintenance.py"
    # maintenance is not new data: an outlet here would trigger every downstream DAG daily
    assert not task.outlets
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.timetable.expression == "0 0 * * *"  # @daily


def test_influence_selection_reads_the_version_in_its_triggering_event(dagbag: DagBag) -> None:
    dag = dagbag.dags["influence_selection"]
    assert [asset.name for asset in dag.schedule] == ["lake.gold.corpus"]
    prepare = dag.task_dict["prepare"]
    spec = prepare.spec if isinstance(prepare.spec, dict) else prepare.gpu_spec.model_dump()
    assert spec["pins"] == {"--input-version": "gold.corpus"}
    assert "--phase" in spec["args"] and "prepare" in spec["args"]
