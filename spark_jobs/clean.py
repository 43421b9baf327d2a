"""Clean: ``bronze.documents`` → ``silver.documents`` (kept) and ``silver.dropped`` (with reasons).

Per document: markup → text (``transforms.text_normalize``), then metrics, math density,
quality score and the filters (``transforms.quality``; rule order = primary-reason order).

The per-document work is one pure Python function applied with ``mapInArrow``: Arrow batches
stream through the Python workers without a pandas round trip, and the output types
(``map<string,double>``, ``array<string>``) are explicit Arrow types rather than pandas objects
that Spark would have to guess. Nothing is collected to the driver except counts.

Incremental and idempotent: ``bronze.documents`` is read at a pinned version (stored on every
row as ``bronze_version``), only documents in neither ``silver.documents`` nor ``silver.dropped``
are processed, and results are MERGEd insert-only on ``doc_id``. No new documents → no writes.
Accounting, asserted below: ``input == kept + sum(dropped.values())``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.settings import CleanSettings, Settings
from spark_jobs.runner import job_main
from spark_jobs.transforms.quality import assess, text_hash
from spark_jobs.transforms.text_normalize import normalize

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

BRONZE = catalogue.table("bronze.documents")
SILVER = catalogue.table("silver.documents")
DROPPED = catalogue.table("silver.dropped")

# What the per-document function returns (``primary_reason`` null = kept).
RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("doc_id", "string"), ("source", "string"), ("text", "string"), ("text_hash", "string"),
    ("n_words", "long"), ("n_chars", "long"), ("quality_score", "double"), ("math_density", "double"),
    ("metrics", "map<string,double>"), ("reasons", "array<string>"), ("primary_reason", "string"),
)
CLEAN_ERROR = "clean_error"  # the converter or the metrics raised on this document
RESULT_DDL = ", ".join(f"{name} {kind}" for name, kind in RESULT_COLUMNS)


def clean_document(doc_id: str, source: str, text: str, markup: str, thresholds: CleanSettings) -> dict[str, Any]:
    """One bronze document → one result row (see ``RESULT_COLUMNS``).

    A document the cleaner cannot process is dropped with reason ``clean_error`` (and logged)
    instead of failing the whole job; the summary's ``dropped`` counts make that visible."""
    try:
        cleaned = normalize(text or "", markup or "text")
        result = assess(cleaned, thresholds)
    except Exception as exc:  # one pathological document must not stop the corpus
        log.warning("clean: %s could not be cleaned (%s: %s); dropped as clean_error",
                    doc_id, type(exc).__name__, exc)
        return {"doc_id": doc_id, "source": source, "text": "", "text_hash": None, "n_words": 0,
                "n_chars": 0, "quality_score": 0.0, "math_density": 0.0, "metrics": [],
                "reasons": [CLEAN_ERROR], "primary_reason": CLEAN_ERROR}
    return {
        "doc_id": doc_id, "source": source, "text": cleaned, "text_hash": text_hash(cleaned),
        "n_words": result.n_words, "n_chars": result.n_chars, "quality_score": result.quality_score,
        "math_density": result.math_density, "metrics": list(result.metrics.items()),
        "reasons": result.reasons, "primary_reason": result.reasons[0] if result.reasons else None,
    }


def result_arrow_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        ("doc_id", pa.string()), ("source", pa.string()), ("text", pa.large_string()),
        ("text_hash", pa.string()), ("n_words", pa.int64()), ("n_chars", pa.int64()),
        ("quality_score", pa.float64()), ("math_density", pa.float64()),
        ("metrics", pa.map_(pa.string(), pa.float64())), ("reasons", pa.list_(pa.string())),
        ("primary_reason", pa.string()),
    ])


def clean_batches(batches: Iterator[pa.RecordBatch], thresholds: CleanSettings) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function: bronze rows (doc_id, source, text, markup) → result rows."""
    import pyarrow as pa

    schema = result_arrow_schema()
    for batch in batches:
        columns = batch.to_pydict()
        rows = [clean_document(d, s, t, m, thresholds) for d, s, t, m in
                zip(columns["doc_id"], columns["source"], columns["text"], columns["markup"], strict=True)]
        yield pa.RecordBatch.from_pylist(rows, schema=schema)


def run(spark: SparkSession, settings: Settings, run_id: str) -> dict[str, Any]:
    """Clean the bronze documents not cleaned yet; return the summary."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from spark_jobs.session import current_version, ensure_tables, merge_insert_new, read_table

    ensure_tables(spark, settings, SILVER, DROPPED)
    version = current_version(spark, BRONZE, settings)
    summary: dict[str, Any] = {"input": 0, "kept": 0, "dropped": {}, "bronze_version": version, "by_source": {}}
    if version is None:
        return summary
    done = (read_table(spark, SILVER, settings).select("doc_id")
            .unionByName(read_table(spark, DROPPED, settings).select("doc_id")))
    todo = (read_table(spark, BRONZE, settings, version=version)
            .select("doc_id", "source", "text", "markup")
            .join(done, "doc_id", "left_anti"))
    thresholds = settings.clean
    results = todo.mapInArrow(lambda batches: clean_batches(batches, thresholds), RESULT_DDL)
    results = (results.withColumn("bronze_version", F.lit(version).cast("long"))
               .withColumn("run_id", F.lit(run_id))
               .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        counts = results.groupBy("source", "primary_reason").count().collect()
        by_source: dict[str, dict[str, int]] = {}
        for row in counts:
            n = int(row["count"])
            src = by_source.setdefault(row["source"], {"kept": 0, "dropped": 0})
            if row["primary_reason"] is None:
                summary["kept"] += n
                src["kept"] += n
            else:
                summary["dropped"][row["primary_reason"]] = summary["dropped"].get(row["primary_reason"], 0) + n
                src["dropped"] += n
        summary["input"] = todo.count()  # counted on the input side, independently of the results
        summary["dropped"] = dict(sorted(summary["dropped"].items()))
        summary["by_source"] = dict(sorted(by_source.items()))
        if summary["input"] != summary["kept"] + sum(summary["dropped"].values()):
            raise AssertionError(f"clean {run_id}: counts do not reconcile: {summary}")
        if summary["kept"]:
            merge_insert_new(spark, results.where(F.col("primary_reason").isNull()), SILVER, settings)
        if summary["dropped"]:
            merge_insert_new(spark, results.where(F.col("primary_reason").isNotNull()), DROPPED, settings)
    finally:
        results.unpersist()
    log.info("clean %s: %s", run_id, summary)
    return summary


if __name__ == "__main__":
    sys.exit(job_main(run, "clean"))
