"""The dedupe job on a real Spark standalone cluster (master + worker on loopback, started from
the pyspark distribution), submitted the way a scheduler would: ``python -m spark_jobs.dedupe``
in its own process with ``spark.master = spark://127.0.0.1:17077`` from a config file.

The lake is prepared and read back with the ``deltalake`` package, so this test starts no local
SparkContext of its own. Ports: 17077 (master), 18080–18088 (UIs, worker, driver, block managers).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jzlake import catalogue
from tests.conftest import REPO, make_settings
from tests.curation_fixtures import sample_texts, silver_row, substitute_words

pytestmark = [pytest.mark.spark, pytest.mark.slow]

MASTER_PORT, MASTER_UI, WORKER_UI, WORKER_PORT = 17077, 18080, 18081, 18082
MASTER_URL = f"spark://127.0.0.1:{MASTER_PORT}"


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def master_state() -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{MASTER_UI}/json/", timeout=5) as response:
        return json.load(response)


def wait_for(check: Any, what: str, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[1:3]} exited with {proc.returncode} while waiting for {what}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"standalone cluster: {what} not ready after {timeout:.0f}s")


def daemon(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start a Spark daemon in its own process group, output to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop one daemon we started (its own process group: spark-class execs the JVM)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    busy = [p for p in (MASTER_PORT, MASTER_UI, WORKER_UI, WORKER_PORT) if port_open(p)]
    if busy:
        pytest.skip(f"ports {busy} already in use: another standalone cluster is running")
    home = spark_home()
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_DAEMON_MEMORY": "512m",
           "SPARK_LOG_DIR": str(tmp_path / "logs"), "PYSPARK_PYTHON": sys.executable}
    spark_class = str(home / "bin" / "spark-class")
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        procs.append(daemon([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                             "--port", str(MASTER_PORT), "--webui-port", str(MASTER_UI)], env, logs / "master.log"))
        wait_for(lambda: port_open(MASTER_PORT) and port_open(MASTER_UI), "master", 120, procs)
        procs.append(daemon([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                             "--port", str(WORKER_PORT), "--webui-port", str(WORKER_UI), "--cores", "2",
                             "--memory", "1500m", "--work-dir", str(tmp_path / "work"), MASTER_URL],
                            env, logs / "worker.log"))
        wait_for(lambda: master_state().get("aliveworkers", 0) >= 1, "worker registration", 120, procs)
        yield {"logs": logs}
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_dedupe_job_runs_on_standalone_cluster(cluster, tmp_path: Path) -> None:
    from deltalake import DeltaTable, write_deltalake

    settings = make_settings(tmp_path)
    rng = random.Random(17)
    docs = sample_texts(min_words=150, max_words=800)[:40]
    rows = [silver_row(d, t) for d, t in docs]
    rows.append(silver_row("plant:copy", docs[3][1], 0.99))
    rows.append(silver_row("plant:near", substitute_words(docs[5][1], 0.01, rng), 0.01))
    documents = catalogue.table("silver.documents")
    import pyarrow as pa

    write_deltalake(documents.uri(settings), pa.Table.from_pylist(rows, schema=documents.arrow_schema()))

    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "lake": {"root": settings.lake_root, "runs_dir": str(tmp_path / "runs")},
        "spark": {
            "master": MASTER_URL, "driver_memory": "1g", "shuffle_partitions": 4,
            "conf": {"spark.executor.memory": "1g", "spark.cores.max": "2", "spark.driver.host": "127.0.0.1",
                     "spark.driver.bindAddress": "127.0.0.1", "spark.driver.port": "18083",
                     "spark.blockManager.port": "18085", "spark.port.maxRetries": "3"},
        },
    }))
    env = {**os.environ, "JZLAKE_HOME": str(REPO), "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("SPARK_MASTER", None)
    job = subprocess.run([sys.executable, "-m", "spark_jobs.dedupe", "--config", str(config), "--run-id", "cluster-1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, f"dedupe failed on the cluster:\n{job.stderr[-4000:]}"
    summary = json.loads(job.stdout.strip().splitlines()[-1])
    assert summary["input"] == len(rows)
    assert summary["exact_duplicates"] >= 1 and summary["near_duplicates"] >= 1
    assert summary["input"] == summary["survivors"] + summary["exact_duplicates"] + summary["near_duplicates"]

    # It ran on the cluster: the master lists the finished application with our name.
    apps = master_state().get("completedapps", [])
    assert any(app.get("name") == "jzlake-dedupe" for app in apps), apps

    def table(name: str) -> list[dict[str, Any]]:
        return DeltaTable(catalogue.table(name).uri(settings)).to_pyarrow_table().to_pylist()

    clusters = {r["doc_id"]: r for r in table("silver.duplicate_clusters")}
    assert clusters[docs[3][0]]["survivor_doc_id"] == "plant:copy"
    assert clusters["plant:near"]["survivor_doc_id"] == docs[5][0] and clusters["plant:near"]["kind"] == "near"
    dedup_ids = {r["doc_id"] for r in table("silver.dedup")}
    assert "plant:copy" in dedup_ids and docs[3][0] not in dedup_ids and "plant:near" not in dedup_ids
    assert len(dedup_ids) == summary["survivors"]
    assert len(table("silver.minhash_signatures")) == len(rows)
