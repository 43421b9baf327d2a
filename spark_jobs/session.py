"""Spark session factory with Delta Lake configured, plus the Delta read/write helpers jobs share.

``local[*]`` by default; ``settings.spark.master`` (``SPARK_MASTER``) points at a cluster. The
Delta jars come from the ignored cache filled by ``infra/fetch-delta-jars.sh`` (``make jars``);
``spark.jars`` ships them to executors, so nothing is resolved at run time.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from jzlake.catalogue import Table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from jzlake.settings import Settings

DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}

# Settings spark-submit decides for a submitted application; the session must not override them.
SUBMIT_OWNED = frozenset({"spark.master", "spark.jars", "spark.driver.memory", "spark.submit.deployMode"})
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PACKAGES = ("jzlake", "spark_jobs")
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# What executor_python_conf decides (and nothing else sets).
EXECUTOR_CODE_KEYS = frozenset({"spark.pyspark.python", "spark.executorEnv.PYTHONPATH", "spark.submit.pyFiles"})


def delta_jars(settings: Settings) -> list[str]:
    jars_dir = settings.path(settings.spark.jars_dir)
    jars = sorted(glob.glob(os.path.join(jars_dir, "*.jar")))
    if not any(os.path.basename(j).startswith("delta-spark_") for j in jars):
        raise RuntimeError(
            f"Delta Lake jars not found in {jars_dir}. Run `make jars` (needs Maven) to fetch them "
            "once from Maven Central, or set spark.jars_dir to a folder that holds them."
        )
    return jars


def spark_conf(settings: Settings) -> dict[str, str]:
    """Every Spark setting a job needs, for SparkSession.builder and for spark-submit alike."""
    conf = {
        **DELTA_CONF,
        "spark.jars": ",".join(delta_jars(settings)),
        "spark.sql.shuffle.partitions": str(settings.spark.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.ansi.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.ui.enabled": "false",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        "spark.pyspark.driver.python": sys.executable,
        "spark.driver.memory": settings.spark.driver_memory,
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        **executor_python_conf(settings),
    }
    conf.update(settings.spark.conf)
    return conf


def master_on_this_host(master: str) -> bool:
    """``local[*]``, ``local-cluster[…]`` and a standalone master on loopback share this host's files."""
    if master.startswith("local"):
        return True
    first = urlsplit(master.split(",")[0])  # spark://h1:7077,h2:7077 (standby masters)
    return first.scheme == "spark" and first.hostname in LOOPBACK


def executor_python_conf(settings: Settings) -> dict[str, str]:
    """How executors find Python and the project's code.

    On this host: the driver's interpreter (the project's virtualenv) and the project folder on
    ``PYTHONPATH``. On a cluster the driver's paths mean nothing: the executors' own Python (or
    ``spark.executor_python``) and the code shipped as a zip, unless ``ship_code`` is false (an
    image that has the project installed, as ``infra/docker/Dockerfile`` builds).
    """
    local = master_on_this_host(settings.spark.master)
    conf = {}
    python = settings.spark.executor_python or (sys.executable if local else None)
    if python:
        conf["spark.pyspark.python"] = python
    ship = settings.spark.ship_code if settings.spark.ship_code is not None else not local
    if ship:
        conf["spark.submit.pyFiles"] = str(shipped_code(settings))
    elif local:
        conf["spark.executorEnv.PYTHONPATH"] = str(PROJECT_ROOT)
    return conf


def shipped_code(settings: Settings) -> Path:
    """The executors' code zip for ``settings`` (under ``var/dist``), built if missing."""
    return code_archive(settings.path("var/dist"))


def code_archive(folder: str | Path) -> Path:
    """A zip of the ``jzlake`` and ``spark_jobs`` packages, named by its content hash (reproducible:
    sorted entries, fixed timestamps), so concurrent jobs never overwrite each other's archive."""
    files = sorted(
        path for package in SHIPPED_PACKAGES for path in (PROJECT_ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".pyc", ".pyo"}
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    target = Path(folder) / f"jzlake-code-{digest.hexdigest()[:16]}.zip"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(f".{os.getpid()}.tmp")
    with zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(PROJECT_ROOT).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    staging.replace(target)
    return target


def get_spark(settings: Settings, app_name: str | None = None) -> SparkSession:
    """Create (or reuse) the session for ``settings``; Java is checked with a clear error."""
    from pyspark.sql import SparkSession

    if not os.environ.get("JAVA_HOME") and not _which("java"):
        raise RuntimeError("Java not found: Spark needs a JDK 17+ (apt-get install openjdk-17-jdk-headless)")
    builder = SparkSession.builder.appName(app_name or settings.spark.app_name)
    conf = spark_conf(settings)
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        # Launched by spark-submit: its --master/--jars/--driver-memory are already in force.
        conf = {k: v for k, v in conf.items() if k not in SUBMIT_OWNED}
    else:
        builder = builder.master(settings.spark.master)
    for key, value in conf.items():
        builder = builder.config(key, value)
    if "spark.pyspark.python" in conf:
        # PySpark takes the Python workers' interpreter from this process's PYSPARK_PYTHON (spark-submit
        # sets it from the conf; a session built here must do it itself), else plain `python3`.
        os.environ.setdefault("PYSPARK_PYTHON", conf["spark.pyspark.python"])
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _which(cmd: str) -> str | None:
    from shutil import which

    return which(cmd)


# ---- Delta helpers -------------------------------------------------------------------------


def table_exists(spark: SparkSession, table: Table, settings: Settings) -> bool:
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, table.uri(settings))


def ensure_table(spark: SparkSession, table: Table, settings: Settings) -> None:
    """Create the empty table with its catalogued schema if it does not exist yet."""
    from delta.tables import DeltaTable

    if table_exists(spark, table, settings):
        evolve_schema(spark, table, settings)
        return
    builder = DeltaTable.createIfNotExists(spark).location(table.uri(settings)).addColumns(table.spark_schema())
    if table.partition_by:
        builder = builder.partitionedBy(*table.partition_by)
    if table.cluster_by:
        builder = builder.clusterBy(*table.cluster_by)
    builder = builder.property("delta.enableChangeDataFeed", "true")
    for key, value in table.properties.items():
        builder = builder.property(key, value)
    builder.execute()


def evolve_schema(spark: SparkSession, table: Table, settings: Settings) -> list[str]:
    """Add the catalogued columns an existing table lacks (rows written before read null).

    Additive evolution only, so a lake written by an earlier release keeps working. A column whose
    type differs from the catalogue's is an error naming the fix; columns the catalogue dropped stay.
    """
    from delta.tables import DeltaTable

    uri = table.uri(settings)
    present = {f.name: f.dataType for f in DeltaTable.forPath(spark, uri).toDF().schema.fields}
    wanted = table.spark_schema().fields
    changed = [f"{f.name} ({present[f.name].simpleString()} in the lake, {f.dataType.simpleString()} catalogued)"
               for f in wanted if f.name in present and present[f.name] != f.dataType]
    if changed:
        raise RuntimeError(f"{table.full_name} at {uri} has columns of another type: {', '.join(changed)}. "
                           "Rebuild the table (drop its folder and rerun the stage that writes it).")
    missing = [f for f in wanted if f.name not in present]
    if missing:
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        spark.sql(f"ALTER TABLE delta.`{uri}` ADD COLUMNS ({columns})")
    return [f.name for f in missing]


def ensure_tables(spark: SparkSession, settings: Settings, *tables: Table) -> None:
    """Create a job's output tables up front, so every catalogued table reads (empty) and
    downstream Assets resolve even when a run produced no rows for one of them."""
    for table in tables:
        ensure_table(spark, table, settings)


def read_table(spark: SparkSession, table: Table, settings: Settings, version: int | None = None) -> DataFrame:
    """Read a table (at a pinned version when given); a missing table reads as empty."""
    if not table_exists(spark, table, settings):
        return spark.createDataFrame([], table.spark_schema())
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(table.uri(settings))


def current_version(spark: SparkSession, table: Table, settings: Settings) -> int | None:
    from delta.tables import DeltaTable

    if not table_exists(spark, table, settings):
        return None
    row = DeltaTable.forPath(spark, table.uri(settings)).history(1).select("version").first()
    return int(row["version"]) if row else None


def conform(df: DataFrame, table: Table) -> DataFrame:
    """Select and cast ``df``'s columns to the table's schema, in order; missing columns fail."""
    from pyspark.sql import functions as F

    missing = [c for c in table.column_names if c not in df.columns]
    if missing:
        raise ValueError(f"{table.full_name}: DataFrame lacks columns {missing}")
    schema = table.spark_schema()
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields])


def merge_insert_new(spark: SparkSession, df: DataFrame, table: Table, settings: Settings) -> None:
    """Insert rows whose merge keys are not in the table yet (re-running adds nothing)."""
    from delta.tables import DeltaTable

    ensure_table(spark, table, settings)
    (
        DeltaTable.forPath(spark, table.uri(settings)).alias("t")
        .merge(conform(df, table).alias("s"), table.merge_condition())
        .whenNotMatchedInsertAll()
        .execute()
    )


def merge_upsert(spark: SparkSession, df: DataFrame, table: Table, settings: Settings,
                 compare: list[str] | None = None) -> None:
    """Upsert on the merge keys; a matched row is rewritten only if a ``compare`` column changed,
    so re-running with the same content leaves files untouched."""
    from delta.tables import DeltaTable

    ensure_table(spark, table, settings)
    compare = compare or [c for c in table.column_names if c not in table.merge_keys and c != "run_id"]
    changed = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in compare) or "false"
    (
        DeltaTable.forPath(spark, table.uri(settings)).alias("t")
        .merge(conform(df, table).alias("s"), table.merge_condition())
        .whenMatchedUpdateAll(condition=changed)
        .whenNotMatchedInsertAll()
        .execute()
    )


def delete_keys(spark: SparkSession, keys: DataFrame, table: Table, settings: Settings) -> None:
    """Delete the rows whose merge keys appear in ``keys``."""
    from delta.tables import DeltaTable

    if not table_exists(spark, table, settings):
        return
    (
        DeltaTable.forPath(spark, table.uri(settings)).alias("t")
        .merge(keys.select(*table.merge_keys).distinct().alias("s"), table.merge_condition())
        .whenMatchedDelete()
        .execute()
    )
