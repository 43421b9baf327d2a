"""maintain: daily upkeep of every catalogued Delta table (DAG ``lake_maintenance``, ``jzlake maintain``).

For each table that exists:

* **OPTIMIZE** (bin-packing compaction) — MERGE-heavy jobs leave many small files; reads and the
  next MERGE list and open every one. Skipped for the generation ledgers, which are compacted
  by their owner instead: ``Ledger.close(compact_above_files=...)`` (``models/generation/ledger.py``)
  compacts only above a file count, with delta-rs, the library that writes them.
* **VACUUM** with ``maintenance.vacuum_retention_hours``, never less than 7 days: removed files
  stay readable that long, so a consumer pinned to an older version (an asset event's version,
  ``plugins/assets.py``) or a writer that started before the compaction still finds its files.

Nothing here changes a row: compaction rewrites the same rows into fewer files (a new version,
``dataChange = false``) and VACUUM deletes only files no version within the retention needs. A
second run finds nothing to compact and nothing to delete. Missing tables are reported, not created.

    spark-submit --jars ... spark_jobs/maintenance.py --config my.yaml
    jzlake maintain
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.settings import MIN_VACUUM_RETENTION_HOURS
from spark_jobs.runner import job_main
from spark_jobs.session import current_version, table_exists

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from jzlake.settings import Settings


def checked_retention(hours: float) -> float:
    """``hours`` if VACUUM may use it; below 7 days a ``ValueError`` that says why and the fix.

    The settings validate this too; checked again here because a job must never rely on its
    caller having validated (``Settings.model_construct`` skips validation)."""
    if hours < MIN_VACUUM_RETENTION_HOURS:
        raise ValueError(f"VACUUM retention {hours} h is below the {MIN_VACUUM_RETENTION_HOURS} h (7 days) minimum: "
                         "files that pinned readers and running writers need would be deleted. Set "
                         f"maintenance.vacuum_retention_hours >= {MIN_VACUUM_RETENTION_HOURS}.")
    return hours


def is_ledger(table: catalogue.Table) -> bool:
    """Generation request ledgers (one schema, ``catalogue.LEDGER_COLUMNS``) are compacted by ``Ledger``."""
    return table.columns == catalogue.LEDGER_COLUMNS


def optimize_table(spark: SparkSession, uri: str) -> dict[str, int]:
    """OPTIMIZE (compaction); files removed/added (0/0 when the table is already compact)."""
    from delta.tables import DeltaTable

    rows = DeltaTable.forPath(spark, uri).optimize().executeCompaction().select("metrics").collect()
    metrics = rows[0]["metrics"] if rows else None
    return {"files_removed": int(metrics["numFilesRemoved"]) if metrics else 0,
            "files_added": int(metrics["numFilesAdded"]) if metrics else 0}


# VACUUM lists a table's files with this many tasks (Spark's default: 10,000, sized for huge
# tables; on a small or local lake the task overhead is the whole cost). The shuffle partition
# count is what the deployment already sized for its data.
LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


@contextmanager
def listing_parallelism(spark: SparkSession) -> Iterator[None]:
    """VACUUM's file listing with ``spark.sql.shuffle.partitions`` tasks; the session's value is restored."""
    previous = spark.conf.get(LISTING_PARALLELISM, None)
    spark.conf.set(LISTING_PARALLELISM, spark.conf.get("spark.sql.shuffle.partitions"))
    try:
        yield
    finally:
        if previous is None:
            spark.conf.unset(LISTING_PARALLELISM)
        else:
            spark.conf.set(LISTING_PARALLELISM, previous)


def vacuum_table(spark: SparkSession, uri: str, retention_hours: float) -> int:
    """VACUUM with ``retention_hours`` (checked); returns how many files it deleted."""
    hours = checked_retention(retention_hours)
    with listing_parallelism(spark):
        # DRY RUN lists what VACUUM will delete (the real run returns no count); same snapshot rules.
        doomed = spark.sql(f"VACUUM delta.`{uri}` RETAIN {hours} HOURS DRY RUN").count()
        if doomed:
            spark.sql(f"VACUUM delta.`{uri}` RETAIN {hours} HOURS").collect()
    return doomed


def compact_ledger(settings: Settings, full_name: str) -> dict[str, int]:
    """Compact a generation ledger through its owner's public API (above the configured file count)."""
    from deltalake import DeltaTable

    from models.generation.ledger import Ledger

    ledger = Ledger.open(settings, full_name, run_id="maintenance")
    before = len(DeltaTable(ledger.uri).file_uris())
    ledger.close(compact_above_files=settings.maintenance.ledger_compact_above_files)
    return {"files_before": before, "files_after": len(DeltaTable(ledger.uri).file_uris())}


def maintain_table(spark: SparkSession, settings: Settings, table: catalogue.Table) -> dict[str, Any]:
    """One table's OPTIMIZE (or ledger compaction) and VACUUM, with versions before and after."""
    config = settings.maintenance
    uri = table.uri(settings)
    result: dict[str, Any] = {"version_before": current_version(spark, table, settings)}
    if is_ledger(table):
        result["ledger_compaction"] = compact_ledger(settings, table.full_name)
    elif config.optimize:
        result["optimize"] = optimize_table(spark, uri)
    result["vacuum_deleted_files"] = vacuum_table(spark, uri, config.vacuum_retention_hours)
    result["version_after"] = current_version(spark, table, settings)
    return result


def run(spark: SparkSession, settings: Settings, run_id: str) -> dict[str, Any]:
    """Maintain every catalogued table that exists; the summary lists each table's work."""
    retention = checked_retention(settings.maintenance.vacuum_retention_hours)
    started = time.perf_counter()
    tables: dict[str, Any] = {}
    missing: list[str] = []
    for table in catalogue.all_tables():
        if not table_exists(spark, table, settings):
            missing.append(table.full_name)
            continue
        table_started = time.perf_counter()
        tables[table.full_name] = {**maintain_table(spark, settings, table),
                                   "seconds": round(time.perf_counter() - table_started, 2)}
    return {
        "run_id": run_id, "retention_hours": retention, "tables": tables, "missing": missing,
        "files_compacted": sum(t.get("optimize", {}).get("files_removed", 0) for t in tables.values()),
        "files_vacuumed": sum(t["vacuum_deleted_files"] for t in tables.values()),
        "seconds": round(time.perf_counter() - started, 2),
    }


if __name__ == "__main__":
    sys.exit(job_main(run, "maintenance"))
