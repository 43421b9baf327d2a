"""Where executors find Python and the project's code: this host vs a cluster."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from plugins.spark_submit import spark_submit_kwargs
from spark_jobs.session import PROJECT_ROOT, code_archive, master_on_this_host, spark_conf
from tests.conftest import make_settings


@pytest.mark.parametrize(("master", "local"), [
    ("local[*]", True), ("local-cluster[2,1,1024]", True), ("spark://127.0.0.1:7077", True),
    ("spark://localhost:7077,localhost:7078", True), ("spark://spark-master.lake.svc:7077", False),
    ("k8s://https://kubernetes.default.svc", False), ("yarn", False),
])
def test_master_on_this_host(master: str, local: bool) -> None:
    assert master_on_this_host(master) is local


@pytest.mark.spark  # spark_conf lists the Delta jars (var/jars)
def test_on_this_host_executors_use_this_interpreter_and_the_project_folder(tmp_path: Path) -> None:
    conf = spark_conf(make_settings(tmp_path))
    assert conf["spark.pyspark.python"] == sys.executable
    assert conf["spark.executorEnv.PYTHONPATH"] == str(PROJECT_ROOT)
    assert "spark.submit.pyFiles" not in conf


@pytest.mark.spark  # spark_conf lists the Delta jars (var/jars)
def test_on_a_cluster_no_driver_path_travels_and_the_code_is_shipped(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, spark={"master": "spark://spark-master.lake.svc:7077"})
    for conf in (spark_conf(settings), spark_submit_kwargs("dedupe", settings)["conf"]):
        assert "spark.pyspark.python" not in conf, "the executors' own Python, not the driver's virtualenv"
        assert "spark.executorEnv.PYTHONPATH" not in conf
        archive = Path(conf["spark.submit.pyFiles"])
        names = set(zipfile.ZipFile(archive).namelist())
        assert {"jzlake/settings.py", "jzlake/defaults.yaml", "spark_jobs/dedupe.py",
                "spark_jobs/transforms/minhash.py"} <= names
        assert not any("__pycache__" in n for n in names)
    # Without site-packages (-S), the shipped zip alone provides the package.
    out = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import jzlake; "
                          "print(jzlake.__file__)", str(archive)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(archive))


@pytest.mark.spark  # spark_conf lists the Delta jars (var/jars)
def test_code_archive_is_reproducible_and_configurable(tmp_path: Path) -> None:
    first, second = code_archive(tmp_path / "a"), code_archive(tmp_path / "b")
    assert first.name == second.name and first.read_bytes() == second.read_bytes()
    settings = make_settings(tmp_path, spark={"master": "yarn", "ship_code": False,
                                              "executor_python": "/opt/py/bin/python"})
    conf = spark_conf(settings)
    assert conf["spark.pyspark.python"] == "/opt/py/bin/python"
    assert "spark.submit.pyFiles" not in conf and "spark.executorEnv.PYTHONPATH" not in conf


@pytest.mark.spark
def test_python_workers_run_this_virtualenv(spark) -> None:
    """Not a `python3` from PATH that only imports our packages through a borrowed PYTHONPATH."""
    seen = spark.sparkContext.parallelize(range(2), 2).map(lambda _: (sys.prefix, sys.executable)).collect()
    assert {prefix for prefix, _ in seen} == {sys.prefix}, seen
