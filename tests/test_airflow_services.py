"""The real thing: ``airflow scheduler``, ``dag-processor`` and ``api-server`` (LocalExecutor,
SQLite, simple auth manager; workers reach the Task Execution API over HTTP) in a temporary
AIRFLOW_HOME. Over the REST API v2 the test waits for corpus_curation to be parsed, unpauses and
triggers it, polls the run to success, then checks task states, the report task's XCom and the
Asset events of the run. Services are stopped (process groups killed) whatever happens.

The lake is the one ``dag.test()`` filled (session fixture ``curated_by_dag_test``), so this run
takes the incremental path with nothing new: it must succeed and leave every table's rows as
they were — idempotency checked through the real orchestrator, and half the Spark work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jzlake import catalogue
from jzlake.settings import load_settings
from jzlake.tables import describe_table
from plugins.airflow_local import USERNAME, AirflowApi, Services, wait_for_run, wait_until
from spark_jobs.curate import CURATION_TABLES
from tests.airflow_env import airflow_template, airflow_test_env, curated_by_dag_test, free_port  # noqa: F401

pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.slow]

DAG_ID = "corpus_curation"
TASKS = ("ingest", "clean", "dedupe", "decontaminate", "report")


@pytest.fixture
def airflow(tmp_path: Path, airflow_template: Path,  # noqa: F811
            curated_by_dag_test: dict[str, Any]) -> Iterator[dict[str, Any]]:  # noqa: F811
    port = free_port()
    # Only the run the test triggers: no scheduled runs, whatever today's date.
    env = airflow_test_env(airflow_template, tmp_path, port, lake_dir=curated_by_dag_test["dir"],
                           AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False")
    home = Path(env["AIRFLOW_HOME"])
    services = Services(env, home / "service-logs").start()
    password = json.loads((home / "local_secrets.json").read_text())["password"]
    api = AirflowApi(f"http://127.0.0.1:{port}", USERNAME, password)
    try:
        yield {"env": env, "api": api, "services": services}
    finally:
        services.stop()


def test_services_run_corpus_curation(airflow: dict[str, Any]) -> None:
    api: AirflowApi = airflow["api"]
    services: Services = airflow["services"]
    settings = load_settings(environ=airflow["env"])
    before = {name: describe_table(catalogue.table(name), settings)["rows"] for name in CURATION_TABLES}
    started = time.monotonic()

    def diagnostics() -> str:
        return f"dead services: {services.dead()}\n{services.logs_tail(60)}"

    def up() -> bool:
        if services.dead():
            pytest.fail(f"an Airflow service exited early\n{diagnostics()}")
        return api.healthy()

    wait_until(up, 300, "the api-server to answer /api/v2/monitor/health", on_timeout=diagnostics)
    wait_until(lambda: api.dag(DAG_ID), 420, f"the dag-processor to parse {DAG_ID}",
               on_timeout=lambda: f"import errors: {api.get('/api/v2/importErrors')}\n{diagnostics()}")
    ready = time.monotonic()

    api.set_paused(DAG_ID, False)
    run_id = api.trigger(DAG_ID)
    state = wait_for_run(api, DAG_ID, run_id, 1500,
                         on_timeout=lambda: f"tasks: {api.task_states(DAG_ID, run_id)}\n{diagnostics()}")
    tasks = api.task_states(DAG_ID, run_id)
    if state != "success":
        pytest.fail(f"run {run_id} ended {state}: {tasks}\n{api.failed_task_logs(DAG_ID, run_id)}\n{diagnostics()}")
    assert tasks == dict.fromkeys(TASKS, "success")

    report = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{_q(run_id)}/taskInstances/report/xcomEntries/return_value")
    assert report["value"]["balanced"] is True, report

    # Nothing new came in: every table keeps its rows, and says so in its Asset event.
    after = {name: describe_table(catalogue.table(name), settings)["rows"] for name in CURATION_TABLES}
    assert after == before
    events = {e["name"]: e for e in api.asset_events(DAG_ID, run_id)}
    assert set(events) == {f"lake.{name}" for name in CURATION_TABLES}, sorted(events)
    for name, rows in after.items():
        event = events[f"lake.{name}"]
        assert event["source_task_id"] in TASKS[:-1] and event["source_run_id"] == run_id
        assert event["extra"].get("rows") == rows, (name, event["extra"], rows)
    print(f"services ready in {ready - started:.0f}s; run {run_id} took {time.monotonic() - ready:.0f}s")


def _q(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")
