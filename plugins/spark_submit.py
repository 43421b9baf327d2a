"""Submitting lake Spark jobs from Airflow: ``Settings`` → ``SparkSubmitOperator``.

Split as in Airflow providers: the provider's ``SparkSubmitHook`` does the I/O (builds and runs
the ``spark-submit`` command); ``LakeSparkSubmitOperator`` is the provider's operator plus a few
orchestration duties; ``spark_submit_kwargs`` is the small pure function that turns settings
into the operator's arguments; ``lake_spark_task`` puts them together for a DAG file.

Each task runs ``spark-submit [conf, jars] spark_jobs/<job>.py --config F --lake-root R
--run-id {{ run_id }}`` (see ``spark_jobs/runner.py``); every task of one DAG run shares the
Airflow run id, so stage summaries land in one run folder and the report reconciles the run.

Where Spark runs is the ``spark_default`` connection's business (``settings.airflow.spark_conn_id``),
never the DAG's::

    AIRFLOW_CONN_SPARK_DEFAULT='{"conn_type": "spark", "host": "local[*]"}'   # local (default tooling)
    AIRFLOW_CONN_SPARK_DEFAULT='spark://master-host:7077'                     # standalone cluster
    AIRFLOW_CONN_SPARK_DEFAULT='{"conn_type": "spark", "host": "yarn", "extra": {"deploy-mode": "client"}}'
    AIRFLOW_CONN_SPARK_DEFAULT='{"conn_type": "spark", "host": "k8s://https://api:6443",
                                 "extra": {"namespace": "spark"}}'

(or the same connection in the UI/secrets backend). The job receives the connection's master
through ``SPARK_MASTER`` too, so its own session builder agrees with spark-submit. Client deploy
mode is assumed: the driver runs on the worker with this virtualenv; for cluster deploy mode on a
standalone master the provider refuses ``env_vars`` — use client mode there.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from jzlake.settings import Settings
from plugins.assets import record_outlet_versions
from plugins.dag_settings import config_file
from plugins.quality import enforce_stage_quality
from spark_jobs.session import SUBMIT_OWNED, delta_jars, spark_conf

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context

# Every task of a DAG run stamps rows with the Airflow run id (jzlake.runs makes it path-safe).
RUN_ID_TEMPLATE = "{{ run_id }}"
# Set by dedicated spark-submit flags or by the connection, so never passed as --conf:
# spark.jars → --jars; spark.driver.memory → --driver-memory (must reach the JVM before it
# starts); the master and deploy mode come from the Airflow connection.
NOT_AS_CONF = SUBMIT_OWNED  # the same set get_spark leaves alone under spark-submit


def pyspark_home() -> Path:
    """The Spark distribution bundled with the ``pyspark`` package of this interpreter (not imported)."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"pyspark is not installed for {sys.executable}; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def spark_submit_binary() -> str:
    """``spark-submit`` of that distribution, so the submitting JVM matches the job's pyspark."""
    binary = pyspark_home() / "bin" / "spark-submit"
    if not binary.is_file():
        raise RuntimeError(f"{binary} is missing: the pyspark installation is incomplete; reinstall it")
    return str(binary)


def project_root() -> Path:
    """The folder that holds the ``jzlake`` and ``spark_jobs`` packages."""
    import spark_jobs  # light; __path__ because an editable install may map it as a namespace package

    for entry in spark_jobs.__path__:
        if Path(entry, "session.py").is_file():
            return Path(entry).resolve().parent
    raise RuntimeError(f"spark_jobs/session.py not found on {list(spark_jobs.__path__)}; reinstall the project")


def job_application(job: str) -> str:
    """Path of ``spark_jobs/<job>.py``; an unknown job names the ones that exist."""
    jobs_dir = project_root() / "spark_jobs"
    path = jobs_dir / f"{job}.py"
    if not path.is_file():
        known = sorted(p.stem for p in jobs_dir.glob("*.py") if p.stem not in {"__init__", "runner", "session"})
        raise FileNotFoundError(f"no Spark job {job!r}: {path} does not exist; known jobs: {', '.join(known)}")
    return str(path)


def submit_conf(settings: Settings) -> dict[str, str]:
    """``spark_conf(settings)`` minus what spark-submit takes by flag or from the connection."""
    # Executors' Python and code follow spark.master (session.executor_python_conf): on this host the
    # project folder, on a cluster a shipped zip; the parsing process's sys.path never travels.
    return {k: v for k, v in spark_conf(settings).items() if k not in NOT_AS_CONF}


def submit_env(settings: Settings) -> dict[str, str]:
    """Environment of the spark-submit process: this interpreter for driver and Python workers."""
    return {
        "SPARK_HOME": str(pyspark_home()),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": str(project_root()),
    }


def spark_submit_kwargs(job: str, settings: Settings, *, config: str | None = None,
                        run_id: str = RUN_ID_TEMPLATE) -> dict[str, Any]:
    """Everything ``SparkSubmitOperator`` needs to run ``spark_jobs/<job>.py`` for ``settings``.

    ``config`` is the YAML file the settings came from (passed on so the job loads the same);
    ``run_id`` may be a Jinja template (rendered by Airflow before execution).
    """
    args = ["--config", config] if config else []
    args += ["--lake-root", settings.lake_root, "--run-id", run_id]
    return {
        "application": job_application(job),
        "conf": submit_conf(settings),
        "jars": ",".join(delta_jars(settings)),
        "driver_memory": settings.spark.driver_memory,
        "application_args": args,
        "conn_id": settings.airflow.spark_conn_id,
        "spark_binary": spark_submit_binary(),
        "env_vars": submit_env(settings),
        "name": f"jzlake-{job}",
    }


def _arg_value(args: Sequence[Any], flag: str) -> str | None:
    items = [str(a) for a in args]
    return items[items.index(flag) + 1] if flag in items[:-1] else None


class LakeSparkSubmitOperator(SparkSubmitOperator):
    """The provider's ``SparkSubmitOperator`` for one lake job, plus:

    * a missing Spark connection fails with how to define it (the provider would silently
      fall back to ``yarn``);
    * the connection's master is handed to the job as ``SPARK_MASTER``;
    * after the job, its JSON summary (written by ``job_main`` to the run folder) is the task's
      return value (XCom), and every outlet table Asset's event carries the table's Delta
      version and row count — so consumers see what changed without opening the lake, and read
      exactly that version (``plugins/assets.py``);
    * before those events, the stage's data-quality bounds (``settings.quality``,
      ``plugins/quality.py``) are checked: a broken bound fails the task without retry and
      without events (``check_quality=False`` skips it).
    """

    ui_color = "#fdebd0"

    def __init__(self, *, job: str, check_quality: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.check_quality = check_quality

    def execute(self, context: Context) -> dict[str, Any] | None:
        self._require_connection()
        master = self._get_hook()._connection["master"]
        self.env_vars = {**(self.env_vars or {}), "SPARK_MASTER": master}
        self._executor_conf(master)
        self._hook = self._get_hook()  # built after env_vars is final: the hook copies it
        super().execute(context)
        summary = self._read_summary()
        run_id = _arg_value(self.application_args or [], "--run-id")
        if self.check_quality and run_id is not None:
            # before the outlet events: a failed check emits none, so no downstream DAG starts
            checked = enforce_stage_quality(self._job_settings(), run_id, self.job, summary)
            if checked is not None:
                self.log.info("data-quality check of %s passed: %s", self.job, checked["metrics"])
        record_outlet_versions(context, self.outlets, summary, warn=self.log.warning, job=self.job, run_id=run_id)
        return summary

    def _executor_conf(self, master: str) -> None:
        """Executors' Python and code for the connection's master, decided here on the worker that
        runs spark-submit: the DAG was parsed elsewhere, possibly for another master, and a shipped
        zip must exist on this machine (``session.executor_python_conf``)."""
        from spark_jobs.session import EXECUTOR_CODE_KEYS, executor_python_conf

        settings = self._job_settings()
        settings = settings.model_copy(update={"spark": settings.spark.model_copy(update={"master": master})})
        conf = {k: v for k, v in (self.conf or {}).items() if k not in EXECUTOR_CODE_KEYS}
        # Explicit spark.conf entries still win, as in spark_conf().
        self.conf = {**conf, **executor_python_conf(settings), **settings.spark.conf}

    def _require_connection(self) -> None:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            BaseHook.get_connection(self._conn_id)
        except AirflowNotFoundException:
            raise RuntimeError(
                f"task {self.task_id}: Airflow connection {self._conn_id!r} is not defined, so spark-submit "
                "has no master. Define it, e.g. AIRFLOW_CONN_SPARK_DEFAULT='{\"conn_type\": \"spark\", "
                "\"host\": \"local[*]\"}' for local runs or 'spark://host:7077' for a cluster."
            ) from None

    def _job_settings(self) -> Settings:
        from jzlake.settings import load_settings

        args = self.application_args or []
        lake_root = _arg_value(args, "--lake-root")
        return load_settings(_arg_value(args, "--config"),
                             overrides={"lake": {"root": lake_root}} if lake_root else None)

    def _read_summary(self) -> dict[str, Any] | None:
        from jzlake.runs import read_stage_summary

        run_id = _arg_value(self.application_args or [], "--run-id")
        if run_id is None:
            return None
        try:
            summary = read_stage_summary(self._job_settings(), run_id, self.job)
        except (OSError, ValueError) as exc:  # metadata only: the job itself succeeded
            self.log.warning("could not read the %s summary of run %s: %s", self.job, run_id, exc)
            return None
        if summary is None:
            self.log.warning("job %s wrote no summary for run %s", self.job, run_id)
        return summary


def lake_spark_task(task_id: str, job: str, settings: Settings, *, config: str | None = None,
                    outlets: Sequence[Asset] = (), **operator_kwargs: Any) -> LakeSparkSubmitOperator:
    """The configured operator for ``spark_jobs/<job>.py``; extra kwargs go to the operator.

    ``config`` defaults to the ``JZLAKE_CONFIG`` file the DAG's settings were loaded from.
    Retries come from the DAG's ``default_args`` (``dag_default_args``).
    """
    config = config if config is not None else config_file()
    kwargs = {**spark_submit_kwargs(job, settings, config=config), **operator_kwargs}
    return LakeSparkSubmitOperator(task_id=task_id, job=job, outlets=list(outlets), **kwargs)


def dag_default_args(settings: Settings) -> dict[str, Any]:
    """Retry policy for lake DAGs: jobs are idempotent MERGEs, so a retry is always safe."""
    return {
        "owner": "jzlake",
        "retries": settings.airflow.retries,
        "retry_delay": timedelta(seconds=settings.airflow.retry_delay_s),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=max(settings.airflow.retry_delay_s, 1) * 4),
    }
