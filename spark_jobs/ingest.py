"""Ingest: every configured source's files → ``bronze.documents``, ``bronze.quarantine`` and the
``bronze.ingested_files`` manifest.

Work is distributed by *file*: the driver lists files (sizes and mtimes only), Spark parallelises
that list and each task streams its file through ``transforms.records.read_file`` — pure Python
that opens local paths and object-store URIs alike through ``pyarrow.fs``. Nothing but counts
comes back to the driver.

Idempotent and incremental:

* a file whose (size, mtime) is in the manifest is skipped; unchanged input writes nothing;
* ``doc_id`` is stable (``source:native_id`` or ``source:sha256:<content>``) and documents are
  MERGEd insert-only, so re-reading a changed file adds only its new records;
* a record whose doc_id is already known (in the lake, or earlier in this batch by file/line
  order) with the same content is counted ``already_present``; with different content it is
  quarantined as ``conflicting_doc_id``.

Accounting, asserted below: ``ingested == new_documents + already_present + quarantined``, where
``ingested`` counts every record read (each non-blank line or Parquet row, plus one per
``unreadable_file`` event standing for the unread rest of a broken file).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.lineage import utc_now
from jzlake.settings import FieldMapping, Settings
from spark_jobs.runner import job_main
from spark_jobs.transforms.records import Document, FileTask, expand_glob, read_file

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

DOCUMENTS = catalogue.table("bronze.documents")
QUARANTINE = catalogue.table("bronze.quarantine")
MANIFEST = catalogue.table("bronze.ingested_files")

# One row shape for both outcomes of reading a record (``kind`` tells which), so a single
# flatMap pass over the files produces everything.
RECORD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("kind", "string"), ("doc_id", "string"), ("source", "string"), ("native_id", "string"),
    ("text", "string"), ("markup", "string"), ("metadata", "map<string,string>"),
    ("content_sha256", "string"), ("byte_size", "long"), ("file", "string"), ("line", "long"),
    ("reason", "string"), ("detail", "string"), ("raw_sample", "string"),
)


def record_schema() -> StructType:
    from pyspark.sql import types as T

    string = T.StringType()
    types = {"string": string, "long": T.LongType(), "map<string,string>": T.MapType(string, string)}
    return T.StructType([T.StructField(name, types[kind], True) for name, kind in RECORD_COLUMNS])


def discover_files(settings: Settings) -> list[FileTask]:
    """Every file of every configured source (sorted by source, then path)."""
    tasks: list[FileTask] = []
    for name in sorted(settings.sources):
        pattern = settings.path(settings.sources[name].glob)
        found = expand_glob(pattern, name)
        if not found:
            log.warning("source %r: no file matches %s (check sources.%s.glob)", name, pattern, name)
        tasks.extend(found)
    return tasks


def file_rows(task: FileTask, mapping: FieldMapping, fmt: str, max_doc_bytes: int,
              raw_sample_chars: int) -> Iterator[tuple[Any, ...]]:
    """``read_file`` as flat tuples in ``RECORD_COLUMNS`` order (what the Spark tasks emit)."""
    for rec in read_file(task, mapping, fmt, max_doc_bytes, raw_sample_chars):
        if isinstance(rec, Document):
            yield ("document", rec.doc_id, rec.source, rec.native_id, rec.text, rec.markup, rec.metadata,
                   rec.content_sha256, rec.byte_size, rec.file, rec.line, None, None, None)
        else:
            yield ("quarantine", None, rec.source, None, None, None, None, None, rec.byte_size, rec.file,
                   rec.line, rec.reason, rec.detail, rec.raw_sample)


def read_manifest(spark: SparkSession, settings: Settings) -> dict[str, tuple[int, float]]:
    """``{file: (size, mtime)}`` of files already ingested (one row per file: small)."""
    from spark_jobs.session import read_table

    rows = read_table(spark, MANIFEST, settings).select("file", "size", "mtime").collect()
    return {r["file"]: (int(r["size"]), float(r["mtime"])) for r in rows}


def read_records(spark: SparkSession, tasks: list[FileTask], settings: Settings) -> DataFrame:
    """One Spark task per file (up to 10 000 slices), each streaming its file's records."""
    specs = {name: (src.mapping, src.format) for name, src in settings.sources.items()}
    max_bytes, chars = settings.ingest.max_doc_bytes, settings.ingest.raw_sample_chars

    def rows(task: FileTask) -> Iterator[tuple[Any, ...]]:
        mapping, fmt = specs[task.source]
        return file_rows(task, mapping, fmt, max_bytes, chars)

    rdd = spark.sparkContext.parallelize(tasks, numSlices=min(len(tasks), 10_000)).flatMap(rows)
    return spark.createDataFrame(rdd, record_schema())


def classify_documents(records: DataFrame, lake: DataFrame) -> DataFrame:
    """Documents with ``status``: new | already_present | conflicting (see module docstring).

    Within a batch the first record of a doc_id (by file, line) is the reference; a doc_id
    already in the lake is checked against the lake's content hash instead."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    first = Window.partitionBy("doc_id").orderBy("file", "line")
    docs = (
        records.where(F.col("kind") == "document")
        .withColumn("rn", F.row_number().over(first))
        .withColumn("first_sha256", F.first("content_sha256").over(first))
        .withColumn("first_at", F.first(F.concat_ws(":", "file", F.col("line").cast("string"))).over(first))
        .join(lake.select("doc_id", F.col("content_sha256").alias("lake_sha256")), "doc_id", "left")
    )
    reference = F.coalesce(F.col("lake_sha256"), F.col("first_sha256"))
    status = (F.when(F.col("content_sha256") != reference, F.lit("conflicting"))
              .when(F.col("lake_sha256").isNull() & (F.col("rn") == 1), F.lit("new"))
              .otherwise(F.lit("already_present")))
    return docs.withColumn("status", status).withColumn("reference_sha256", reference)


def conflict_rows(docs: DataFrame, chars: int) -> DataFrame:
    """Quarantine rows for ``conflicting`` documents, with a detail naming both versions."""
    from pyspark.sql import functions as F

    where = F.when(F.col("lake_sha256").isNotNull(), F.lit("the lake")).otherwise(F.col("first_at"))
    detail = F.format_string(
        "conflicting_doc_id: doc_id %s already holds content sha256 %s (from %s); this record's content "
        "is sha256 %s. Fix: map a field that is unique per record as sources.%s.mapping.id, or set it "
        "to null to key documents by content hash",
        F.col("doc_id"), F.substring("reference_sha256", 1, 16), where, F.substring("content_sha256", 1, 16),
        F.col("source"))
    return docs.where(F.col("status") == "conflicting").select(
        "file", "line", "source", F.lit("conflicting_doc_id").alias("reason"), detail.alias("detail"),
        F.substring("text", 1, chars).alias("raw_sample"), "byte_size")


def summarize_outcomes(summary: dict[str, Any], outcomes: list[tuple[str, str, str, int]]) -> None:
    """Fill the summary's counts from ``(source, file, outcome, n)``; outcome is ``new``,
    ``already_present`` or ``q:<reason>``. Raises if the totals do not reconcile."""
    by_source: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    for source, _file, outcome, n in outcomes:
        src = by_source.setdefault(source, {"ingested": 0, "new_documents": 0, "already_present": 0,
                                            "quarantined": 0})
        src["ingested"] += n
        if outcome == "new":
            src["new_documents"] += n
        elif outcome == "already_present":
            src["already_present"] += n
        elif outcome.startswith("q:"):
            src["quarantined"] += n
            reasons[outcome[2:]] = reasons.get(outcome[2:], 0) + n
        else:
            raise ValueError(f"unknown ingest outcome {outcome!r}")
    for key in ("ingested", "new_documents", "already_present", "quarantined"):
        summary[key] = sum(src[key] for src in by_source.values())
    summary["quarantine_reasons"] = dict(sorted(reasons.items()))
    summary["by_source"] = dict(sorted(by_source.items()))
    if summary["ingested"] != summary["new_documents"] + summary["already_present"] + summary["quarantined"]:
        raise AssertionError(f"ingest counts do not reconcile: {summary}")


def run(spark: SparkSession, settings: Settings, run_id: str) -> dict[str, Any]:
    """Ingest new or changed files; return the summary (see module docstring)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from spark_jobs.session import current_version, ensure_tables, merge_insert_new, merge_upsert, read_table

    ensure_tables(spark, settings, DOCUMENTS, QUARANTINE, MANIFEST)
    started = utc_now()
    tasks = discover_files(settings)
    manifest = read_manifest(spark, settings)
    to_read = [t for t in tasks if manifest.get(t.path) != (t.size, t.mtime)]
    summary: dict[str, Any] = {
        "ingested": 0, "new_documents": 0, "already_present": 0, "quarantined": 0,
        "quarantine_reasons": {}, "files_read": len(to_read), "files_skipped": len(tasks) - len(to_read),
        "by_source": {},
    }
    if not to_read:
        summary["bronze_version"] = current_version(spark, DOCUMENTS, settings)
        return summary

    records = read_records(spark, to_read, settings).persist(StorageLevel.MEMORY_AND_DISK)
    # Pinned: the classification must not re-resolve to the version this run's MERGE creates.
    existing = read_table(spark, DOCUMENTS, settings, current_version(spark, DOCUMENTS, settings))
    docs = classify_documents(records, existing)
    docs = docs.persist(StorageLevel.MEMORY_AND_DISK)
    quarantine = (
        records.where(F.col("kind") == "quarantine")
        .select("file", "line", "source", "reason", "detail", "raw_sample", "byte_size")
        .unionByName(conflict_rows(docs, settings.ingest.raw_sample_chars))
        .withColumn("run_id", F.lit(run_id))
        .withColumn("quarantined_at", F.lit(started).cast("timestamp"))
    )
    try:
        # Every record's outcome, counted in one job: (source, file, outcome) → n.
        outcomes = (
            docs.where(F.col("status") != "conflicting").select("source", "file", F.col("status").alias("outcome"))
            .unionByName(quarantine.select("source", "file", F.concat(F.lit("q:"), "reason").alias("outcome")))
            .groupBy("source", "file", "outcome").count().collect()
        )
        summarize_outcomes(summary, [(r["source"], r["file"], r["outcome"], int(r["count"])) for r in outcomes])
        per_file: dict[str, int] = {}
        for row in outcomes:
            per_file[row["file"]] = per_file.get(row["file"], 0) + int(row["count"])
        total_records = records.count()  # counted on the input side, independently of the outcomes
        if total_records != summary["ingested"]:
            raise AssertionError(f"ingest {run_id}: {total_records} records read but {summary['ingested']} "
                                 f"accounted for: {summary}")

        if summary["new_documents"]:
            new_docs = (docs.where(F.col("status") == "new")
                        .withColumn("run_id", F.lit(run_id))
                        .withColumn("ingested_at", F.lit(started).cast("timestamp")))
            merge_insert_new(spark, new_docs, DOCUMENTS, settings)
        if summary["quarantined"]:
            fresh = quarantine
            if any(t.path in manifest for t in to_read):  # a re-read file's old rows are not new
                known = read_table(spark, QUARANTINE, settings).select("file", "line")
                fresh = quarantine.join(known, ["file", "line"], "left_anti")
            if fresh is quarantine or fresh.limit(1).count():
                merge_insert_new(spark, fresh, QUARANTINE, settings)
        manifest_rows = [(t.path, t.source, t.size, t.mtime, per_file.get(t.path, 0), run_id) for t in to_read]
        merge_upsert(spark, spark.createDataFrame(manifest_rows, MANIFEST.spark_schema()), MANIFEST, settings,
                     compare=["source", "size", "mtime", "records"])
    finally:
        docs.unpersist()
        records.unpersist()
    summary["bronze_version"] = current_version(spark, DOCUMENTS, settings)
    log.info("ingest %s: %s", run_id, summary)
    return summary


if __name__ == "__main__":
    sys.exit(job_main(run, "ingest"))
