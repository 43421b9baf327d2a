"""Airflow test helpers: an isolated ``AIRFLOW_HOME`` for in-process imports, a migrated metadata
DB (migrated once per session, copied per test: ``airflow db migrate`` takes ~20 s), free ports.

Usage in a test module::

    from tests.airflow_env import isolate_airflow_home, airflow_template  # noqa: F401 (fixture)
    isolate_airflow_home()  # before anything imports airflow

    def test_x(tmp_path, airflow_template):
        env = airflow_test_env(airflow_template, tmp_path, port=free_port())

Fixtures here: ``airflow_template`` (session: a migrated home to copy) and
``curated_by_dag_test`` (session: corpus_curation run once with dag.test() into a temp lake).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from jzlake.settings import load_settings

# Ports assigned to Airflow services in tests (make airflow-up uses settings.airflow.api_port).
TEST_PORTS = range(18110, 18150)


def isolate_airflow_home() -> str:
    """Point ``AIRFLOW_HOME`` at a private temp dir unless set (call before importing airflow)
    so in-process DagBag parsing never writes to ``~/airflow``."""
    if "AIRFLOW_HOME" not in os.environ:
        home = tempfile.mkdtemp(prefix="jzlake-airflow-")
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        os.environ["AIRFLOW_HOME"] = home
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    return os.environ["AIRFLOW_HOME"]


def free_port(candidates: range = TEST_PORTS) -> int:
    """The first port of ``candidates`` nothing listens on (loopback)."""
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {candidates.start}-{candidates.stop - 1}")


def lake_env(tmp_path: Path) -> dict[str, str]:
    """``JZLAKE__*`` overrides for a private lake and run folder, with fast test retries."""
    return {
        "JZLAKE__LAKE__ROOT": str(tmp_path / "lake"),
        "JZLAKE__LAKE__RUNS_DIR": str(tmp_path / "runs"),
        "JZLAKE__AIRFLOW__RETRIES": "1",  # one retry absorbs a JVM hiccup on a loaded machine
        "JZLAKE__AIRFLOW__RETRY_DELAY_S": "5",
    }


def airflow_test_env(template: Path, tmp_path: Path, port: int, lake_dir: Path | None = None,
                     **overrides: str) -> dict[str, str]:
    """Copy the migrated template home to ``tmp_path/airflow`` and return its full environment;
    the lake and run folders live under ``lake_dir`` (default ``tmp_path``)."""
    from plugins.airflow_local import airflow_env

    home = tmp_path / "airflow"
    shutil.copytree(template, home)
    lake = lake_env(lake_dir or tmp_path)
    settings = load_settings(environ={**os.environ, **lake})
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}  # no outer Airflow config
    return airflow_env(home, port, settings, base={**base, **lake}, **overrides)


# Test modules import the fixtures below, which makes pytest register one copy per module:
# the expensive results are memoised here so a session really computes each once.
_ONCE: dict[str, Any] = {}


@pytest.fixture(scope="session")
def airflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated AIRFLOW_HOME (SQLite), made once per session; copy it, never use it directly."""
    from plugins.airflow_local import airflow_env, migrate

    if "template" not in _ONCE:
        home = tmp_path_factory.mktemp("airflow-template")
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        migrate(airflow_env(home, TEST_PORTS.start, load_settings(), base=base))
        _ONCE["template"] = home
    return _ONCE["template"]


@pytest.fixture(scope="session")
def curated_by_dag_test(tmp_path_factory: pytest.TempPathFactory, airflow_template: Path) -> dict[str, Any]:
    """corpus_curation run once per session with ``dag.test()`` on the sample into a fresh lake.

    Shared: test_airflow_curation checks what it produced; test_airflow_services re-runs the DAG
    on that lake through the real services (the incremental, nothing-new path).
    """
    from plugins.airflow_local import dag_test_subprocess

    if "curated" in _ONCE:
        return _ONCE["curated"]
    if "curated_error" in _ONCE:  # failed for an earlier module: do not run it again
        pytest.fail(_ONCE["curated_error"])
    tmp = tmp_path_factory.mktemp("dag-test")
    env = airflow_test_env(airflow_template, tmp, port=TEST_PORTS.stop - 1)  # no server: port unused
    log = tmp / "dag_test.log"
    started = time.monotonic()
    try:
        result = dag_test_subprocess(env, "corpus_curation", tmp / "result.json", timeout_s=1500, log_file=log)
    except Exception as exc:
        result = {"state": "error", "error": str(exc)}
    if result["state"] != "success":
        _ONCE["curated_error"] = f"dag.test() of corpus_curation: {result}\n--- output (tail) ---\n{tail(log, 150)}"
        pytest.fail(_ONCE["curated_error"])
    _ONCE["curated"] = {"dir": tmp, "env": env, "result": result, "log": log,
                        "elapsed_s": time.monotonic() - started}
    return _ONCE["curated"]


def asset_events(home: Path) -> list[dict[str, Any]]:
    """Every asset event in the home's SQLite metadata DB: asset name, source task/run, extra."""
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute(
            "SELECT a.name, e.source_task_id, e.source_run_id, e.extra FROM asset_event e "
            "JOIN asset a ON a.id = e.asset_id ORDER BY e.id"
        ).fetchall()
    return [{"asset": name, "task_id": task, "run_id": run, "extra": json.loads(extra or "{}")}
            for name, task, run, extra in rows]


def tail(path: Path, lines: int = 80) -> str:
    """The last lines of a log file, for assertion messages."""
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
