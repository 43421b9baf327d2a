"""``dag.test()`` runs corpus_curation on the embedded sample into a temporary lake: five real
spark-submit jobs through the Spark provider's operator. Checked here: every task succeeded, the
Delta tables exist and hold rows, the tasks shared the run id (one run folder with every stage
summary and the report), and every produced table got an Asset event stamped with its Delta
version and row count.

The run itself is the session fixture ``curated_by_dag_test`` (tests/airflow_env.py): dag.test()
runs in a fresh interpreter because Airflow and the DAG's settings read their configuration
once per process.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from jzlake import catalogue
from jzlake.runs import read_stage_summary, run_dir
from jzlake.settings import load_settings
from jzlake.tables import describe_table
from spark_jobs.curate import CURATION_TABLES
from tests.airflow_env import airflow_template, asset_events, curated_by_dag_test  # noqa: F401

pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.slow]

TASKS = ("ingest", "clean", "dedupe", "decontaminate", "report")
# Tables the sample must fill (quarantine and contamination may legitimately stay empty).
NON_EMPTY = ("bronze.documents", "bronze.ingested_files", "silver.documents", "silver.minhash_signatures",
             "silver.dedup", "gold.corpus")


def test_every_task_succeeded(curated_by_dag_test: dict[str, Any]) -> None:  # noqa: F811
    result = curated_by_dag_test["result"]
    assert result["tasks"] == dict.fromkeys(TASKS, "success"), result
    print(f"dag.test() of corpus_curation took {curated_by_dag_test['elapsed_s']:.0f}s")


def test_tables_exist_and_hold_the_sample(curated_by_dag_test: dict[str, Any]) -> None:  # noqa: F811
    settings = load_settings(environ=curated_by_dag_test["env"])
    assert settings.lake_root == str(curated_by_dag_test["dir"] / "lake")
    tables = {name: describe_table(catalogue.table(name), settings) for name in CURATION_TABLES}
    missing = [name for name, info in tables.items() if info["version"] is None]
    assert not missing, f"tables the DAG declares as outlets were not created: {missing}"
    empty = [name for name in NON_EMPTY if not tables[name]["rows"]]
    assert not empty, f"tables without rows: {empty}; {tables}"
    rows = {name: info["rows"] for name, info in tables.items()}
    # Each stage only removes documents.
    assert rows["bronze.documents"] >= rows["silver.documents"] >= rows["silver.dedup"] >= rows["gold.corpus"]


def test_tasks_share_the_run_and_the_report_reconciles(curated_by_dag_test: dict[str, Any]) -> None:  # noqa: F811
    settings = load_settings(environ=curated_by_dag_test["env"])
    run_id = curated_by_dag_test["result"]["run_id"]
    folder = Path(run_dir(settings, run_id))
    for stage in TASKS[:-1]:
        assert read_stage_summary(settings, run_id, stage), f"no {stage} summary in {folder}"
    assert (folder / "report.html").stat().st_size > 0
    report = _xcom(curated_by_dag_test, "report")
    assert report["balanced"] is True, report
    ingest = _xcom(curated_by_dag_test, "ingest")
    assert ingest["ingested"] > 0, ingest


def test_every_produced_table_has_an_asset_event_with_its_state(curated_by_dag_test: dict[str, Any]) -> None:  # noqa: F811
    settings = load_settings(environ=curated_by_dag_test["env"])
    run_id = curated_by_dag_test["result"]["run_id"]
    events = {e["asset"]: e for e in asset_events(Path(curated_by_dag_test["env"]["AIRFLOW_HOME"]))
              if e["run_id"] == run_id}
    assert set(events) == {f"lake.{name}" for name in CURATION_TABLES}
    for name in CURATION_TABLES:
        info = describe_table(catalogue.table(name), settings)
        extra = events[f"lake.{name}"]["extra"]
        assert extra["table"] == name and extra["run_id"] == run_id
        assert (extra.get("rows"), extra.get("version")) == (info["rows"], info["version"]), (name, extra, info)


def _xcom(curated: dict[str, Any], task_id: str) -> Any:
    """A task's return value from the run's metadata DB (JSON-serialised by Airflow)."""
    import json

    db = Path(curated["env"]["AIRFLOW_HOME"]) / "airflow.db"
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT value FROM xcom WHERE task_id = ? AND run_id = ? AND key = 'return_value'",
                           (task_id, curated["result"]["run_id"])).fetchone()
    assert row is not None, f"{task_id} returned nothing"
    value = json.loads(row[0])
    return json.loads(value) if isinstance(value, str) else value
