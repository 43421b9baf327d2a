"""The Settings → SparkSubmitOperator wiring: kwargs builder, operator, and the spark-submit
command the provider's hook builds from them (no JVM is started here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.airflow_env import isolate_airflow_home
from tests.conftest import REPO, make_settings

isolate_airflow_home()

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator  # noqa: E402

from plugins.assets import table_asset  # noqa: E402
from plugins.spark_submit import (  # noqa: E402
    NOT_AS_CONF,
    RUN_ID_TEMPLATE,
    lake_spark_task,
    spark_submit_kwargs,
)

pytestmark = pytest.mark.spark  # no JVM, but every submit command lists the Delta jars (var/jars)

JOBS = ("ingest", "clean", "dedupe", "decontaminate", "report")
LOCAL_CONN = '{"conn_type": "spark", "host": "local[2]"}'


@pytest.mark.parametrize("job", JOBS)
def test_application_is_the_job_module_file(job: str, settings) -> None:
    kwargs = spark_submit_kwargs(job, settings)
    assert Path(kwargs["application"]) == REPO / "spark_jobs" / f"{job}.py"
    assert "job_main(" in Path(kwargs["application"]).read_text(), "job must be runnable as a script"
    assert kwargs["name"] == f"jzlake-{job}"


def test_conf_has_delta_and_nothing_spark_submit_sets_itself(settings) -> None:
    conf = spark_submit_kwargs("report", settings)["conf"]
    assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert conf["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    assert conf["spark.sql.shuffle.partitions"] == str(settings.spark.shuffle_partitions)
    assert conf["spark.pyspark.python"] == sys.executable
    assert not set(conf) & set(NOT_AS_CONF), "jars, driver memory and master travel by flag/connection"
    assert all(isinstance(v, str) for v in conf.values())


def test_user_spark_conf_reaches_submit_but_master_does_not(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, spark={"conf": {"spark.sql.adaptive.enabled": "false",
                                                       "spark.master": "local[7]"}})
    conf = spark_submit_kwargs("report", settings)["conf"]
    assert conf["spark.sql.adaptive.enabled"] == "false"
    assert "spark.master" not in conf


def test_jars_exist_and_include_delta(settings) -> None:
    jars = spark_submit_kwargs("report", settings)["jars"].split(",")
    assert jars and all(Path(j).is_file() for j in jars), jars
    assert any(Path(j).name.startswith("delta-spark_") for j in jars)
    assert any(Path(j).name.startswith("delta-storage-") for j in jars)


def test_application_args_and_templated_run_id(settings, tmp_path: Path) -> None:
    args = spark_submit_kwargs("clean", settings)["application_args"]
    assert args == ["--lake-root", settings.lake_root, "--run-id", RUN_ID_TEMPLATE]
    config = tmp_path / "lake.yaml"
    config.write_text("clean: {min_words: 10}\n")
    args = spark_submit_kwargs("clean", settings, config=str(config))["application_args"]
    assert args[:2] == ["--config", str(config)]


def test_binary_env_and_connection(settings) -> None:
    kwargs = spark_submit_kwargs("report", settings)
    binary = Path(kwargs["spark_binary"])
    assert binary.name == "spark-submit" and os.access(binary, os.X_OK)
    assert Path(kwargs["env_vars"]["SPARK_HOME"]) == binary.parent.parent
    assert kwargs["env_vars"]["PYSPARK_PYTHON"] == sys.executable
    assert kwargs["conn_id"] == settings.airflow.spark_conn_id == "spark_default"
    assert kwargs["driver_memory"] == settings.spark.driver_memory


def test_unknown_job_names_the_known_ones(settings) -> None:
    with pytest.raises(FileNotFoundError, match=r"no Spark job 'nope'.*known jobs: .*report"):
        spark_submit_kwargs("nope", settings)


def test_factory_returns_the_provider_operator_with_outlets(settings) -> None:
    outlets = [table_asset("silver.documents", settings), table_asset("silver.dropped", settings)]
    op = lake_spark_task("clean", "clean", settings, outlets=outlets)
    assert isinstance(op, SparkSubmitOperator)
    assert op.task_id == "clean" and op.job == "clean"
    assert [a.name for a in op.outlets] == ["lake.silver.documents", "lake.silver.dropped"]
    assert op.outlets[0].uri == f"file://{settings.lake_root}/silver/documents"
    rendered = op.render_template(op.application_args, {"run_id": "manual__2026-01-05T00:00:00+00:00"})
    assert rendered[-2:] == ["--run-id", "manual__2026-01-05T00:00:00+00:00"]


@pytest.mark.parametrize(("connection", "master"), [
    (LOCAL_CONN, "local[2]"),
    ("spark://spark-master.example:7077", "spark://spark-master.example:7077"),
])
def test_master_comes_from_the_connection(connection: str, master: str, settings,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", connection)
    op = lake_spark_task("dedupe", "dedupe", settings)
    cmd = op._get_hook()._build_spark_submit_command(op.application)
    assert cmd[0] == op._spark_binary
    assert cmd[cmd.index("--master") + 1] == master
    assert "--jars" in cmd and "--driver-memory" in cmd
    assert f"spark.sql.extensions={op.conf['spark.sql.extensions']}" in cmd
    assert cmd[cmd.index(op.application) + 1:] == op.application_args


def test_missing_connection_fails_with_the_fix(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_SPARK_DEFAULT", raising=False)
    op = lake_spark_task("report", "report", settings)
    with pytest.raises(RuntimeError, match="AIRFLOW_CONN_SPARK_DEFAULT"):
        op._require_connection()


def test_executor_code_follows_the_connection_master_and_is_built_on_the_worker(tmp_path: Path) -> None:
    """The DAG was parsed with a local master (and maybe on another machine); the connection says
    cluster: executors get their own Python and a zip that exists where spark-submit runs."""
    op = lake_spark_task("dedupe", "dedupe", make_settings(tmp_path))
    assert op.conf["spark.pyspark.python"] == sys.executable and "spark.submit.pyFiles" not in op.conf
    op._executor_conf("spark://spark-master.lake.svc:7077")
    shipped = Path(op.conf["spark.submit.pyFiles"])
    assert shipped.is_file() and shipped.name.startswith("jzlake-code-")
    assert "spark.pyspark.python" not in op.conf and "spark.executorEnv.PYTHONPATH" not in op.conf
    op._executor_conf("local[2]")
    assert op.conf["spark.pyspark.python"] == sys.executable and "spark.submit.pyFiles" not in op.conf
    assert op.conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"  # the rest kept
