"""decontaminate: silver.dedup → gold.corpus minus documents that overlap a benchmark item.

Rule (``settings.decontam``), per (document, benchmark item):

* **ngram** — the document shares any ``ngram``-gram (13, the GPT-3 / Llama convention) with the
  item; or
* **whole_item** — an item shorter than 13 tokens (at least ``min_item_tokens``) occurs as a
  whole; or
* **containment** — at least ``min_containment`` of the item's distinct ``short_ngram``-grams
  occur in the document. This is the rule that catches a planted question with a few words
  changed: each changed word breaks at most 8 of the 8-grams around it, and a GSM8K question
  (15–100 tokens, median 44) keeps most of its 8-grams after two or three edits, while no 13-gram
  may survive.

Only grams that can be evidence count: at least ``min_word_fraction`` (½) of a gram's tokens must
be words (formula soup such as ``frac x 2 a 2 frac y 2 b 2 1`` — the standard hyperbola equation —
matched textbook LaTeX), and a gram shared by more than ``max_items_per_gram`` (1) items of one
benchmark is template language ("let a b and c be real numbers such that") and is dropped.

Measured on ``../shared/data`` (1,585 raw-corpus documents; GSM8K test, MATH test 5,000, SVAMP),
300 GSM8K test questions planted into random corpus documents with k non-number words replaced:

=========================  ===========================================  ==============
setting                    planted and flagged, k = 0 / 1 / 2 / 3 / 4   clean docs hit
=========================  ===========================================  ==============
13-grams only              1.00 / 1.00 / 0.94 / 0.86 / 0.78             1 (a formula)
8-gram containment ≥ 0.25  1.00 / 1.00 / 0.99 / 0.91 / 0.85             4 (formulas)
+ word/template filters    1.00 / 1.00 / 0.99 / 0.91 / 0.85             1
containment ≥ 0.15 (used)  1.00 / 1.00 / 0.99 / 0.97 / 0.92             1
7-gram containment ≥ 0.2   1.00 / 1.00 / 1.00 / 0.97 / 0.93             4
=========================  ===========================================  ==============

The one clean document still hit (an OpenLogic LaTeX file, not in ``data/sample``) shares "let f
be the function defined by" with a MATH item; 5 of 7,473 GSM8K *train* questions are flagged
against the test set, all genuine template twins ("A train/plane travels … miles in 3 hours. At
the same rate, how many additional hours …").

Spark shape: benchmark grams are built on the driver (``transforms.ngrams.build_gram_index``,
a few hundred thousand hashes) and broadcast; each document's grams are hashed in a
``mapInArrow`` worker that emits only hashes present in the benchmark set; a broadcast join then
attributes hits to items and one aggregation applies the rule. No driver loop over documents.

Incremental: only documents of silver.dedup not yet decided (in neither gold.corpus nor
gold.contamination) are checked, unless the benchmark files or rules changed — a fingerprint
stored as a table property of gold.contamination — in which case everything is rechecked.
gold.corpus is maintained as silver.dedup minus contaminated documents (new clean documents
inserted, documents that left silver.dedup or became contaminated deleted).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.benchmarks import benchmark_path, file_sha256, load_benchmarks
from jzlake.lineage import stable_hash
from spark_jobs.runner import job_main
from spark_jobs.session import (
    current_version,
    delete_keys,
    ensure_table,
    merge_insert_new,
    merge_upsert,
    read_table,
)
from spark_jobs.transforms.ngrams import LONG, SHORT, WHOLE, GramIndex, GramRules, build_gram_index, match_batches

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from jzlake.settings import Settings

DEDUP = catalogue.table("silver.dedup")
CONTAMINATION = catalogue.table("gold.contamination")
CORPUS = catalogue.table("gold.corpus")
FINGERPRINT_PROPERTY = "jzlake.decontam.fingerprint"
RULES = {LONG: "ngram", WHOLE: "whole_item", SHORT: "containment"}


def fingerprint(settings: Settings) -> str:
    """Hash of the rules and of every configured benchmark's config and file content."""
    benchmarks = sorted(
        (name, cfg.model_dump(), file_sha256(benchmark_path(settings, name)))
        for name, cfg in settings.benchmarks.items()
    )
    return stable_hash(settings.decontam.model_dump(), benchmarks, length=24)


def gram_index(settings: Settings) -> GramIndex:
    """Grams of every configured benchmark item (driver side, pure Python)."""
    items = (
        (item.benchmark, item.item_id, item.text)
        for items in load_benchmarks(settings).values()
        for item in items
    )
    return build_gram_index(items, GramRules.from_settings(settings.decontam))


def find_contamination(spark: SparkSession, docs: DataFrame, index: GramIndex, min_containment: float) -> DataFrame:
    """``gold.contamination`` rows (without run_id) for the documents of ``docs`` that match."""
    from pyspark.sql import functions as F

    if not index.grams:
        return spark.createDataFrame([], "doc_id string, benchmark string, item_id string, rule string, "
                                         "matched_ngram string, containment double")
    import pandas as pd

    # pandas → Arrow → JVM in one transfer (a list of Row tuples would be pickled row by row).
    grams = spark.createDataFrame(
        pd.DataFrame([g.__dict__ for g in index.grams]),
        "gram_hash long, length int, benchmark string, item_id string, kind string, position int, text string",
    )
    counts = spark.createDataFrame(
        pd.DataFrame([(b, i, n) for (b, i), n in index.short_counts.items()],
                     columns=["benchmark", "item_id", "short_grams"]),
        "benchmark string, item_id string, short_grams int",
    )
    wanted = spark.sparkContext.broadcast(index.hashes_by_length())
    hits = docs.select("doc_id", "text").mapInArrow(match_batches(wanted), "doc_id string, length int, gram_hash long")
    # Long and whole-item hits outrank short ones when choosing the n-gram to show.
    priority = F.when(F.col("kind") == LONG, 0).when(F.col("kind") == WHOLE, 1).otherwise(2)
    per_item = (
        hits.join(F.broadcast(grams), ["length", "gram_hash"])
        .groupBy("doc_id", "benchmark", "item_id")
        .agg(
            F.min(priority).alias("best"),
            F.count_distinct(F.when(F.col("kind") == SHORT, F.col("gram_hash"))).alias("short_hits"),
            F.min_by("text", F.struct(priority, F.col("position"))).alias("matched_ngram"),
        )
        .join(F.broadcast(counts), ["benchmark", "item_id"])
        .withColumn("containment", F.when(F.col("short_grams") > 0, F.col("short_hits") / F.col("short_grams"))
                    .otherwise(F.lit(0.0)))
    )
    rule = (F.when(F.col("best") == 0, RULES[LONG]).when(F.col("best") == 1, RULES[WHOLE])
            .otherwise(RULES[SHORT]))
    return per_item.where((F.col("best") < 2) | (F.col("containment") >= F.lit(min_containment))).select(
        "doc_id", "benchmark", "item_id", rule.alias("rule"), "matched_ngram",
        F.col("containment").cast("double").alias("containment"),
    )


def run(spark: SparkSession, settings: Settings, run_id: str) -> dict[str, Any]:
    """Check undecided silver.dedup documents against every benchmark; maintain gold.corpus."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    version = current_version(spark, DEDUP, settings)
    if version is None:
        raise RuntimeError(f"{DEDUP.full_name} does not exist at {DEDUP.uri(settings)}: run the dedupe stage "
                           "first (jzlake curate runs ingest → clean → dedupe → decontaminate)")
    wanted = fingerprint(settings)
    ensure_table(spark, CONTAMINATION, settings)
    ensure_table(spark, CORPUS, settings)
    recheck = _table_property(spark, CONTAMINATION.uri(settings), FINGERPRINT_PROPERTY) != wanted

    dedup = read_table(spark, DEDUP, settings, version)
    corpus_ids = read_table(spark, CORPUS, settings).select("doc_id")
    existing = read_table(spark, CONTAMINATION, settings)
    candidates = dedup if recheck else (
        dedup.join(corpus_ids, "doc_id", "left_anti").join(existing.select("doc_id"), "doc_id", "left_anti"))
    candidates = candidates.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n_input = candidates.count()
        summary: dict[str, Any] = {
            "input": n_input, "contaminated": 0, "kept": 0, "removed_from_gold": 0,
            "by_benchmark": dict.fromkeys(sorted(settings.benchmarks), 0), "rechecked_all": recheck,
            "silver_dedup_version": version,
        }
        if n_input:
            index = gram_index(settings)
            findings = find_contamination(spark, candidates, index, settings.decontam.min_containment)
            findings = findings.withColumn("run_id", F.lit(run_id)).persist(StorageLevel.MEMORY_AND_DISK)
            # One pass for every count: per candidate, the benchmarks it was flagged for (if any).
            per_doc = candidates.select("doc_id").join(
                findings.groupBy("doc_id").agg(F.collect_set("benchmark").alias("benchmarks")), "doc_id", "left")
            counts = per_doc.select(
                F.count(F.lit(1)).alias("input"),
                F.count("benchmarks").alias("contaminated"),
                F.sum(F.when(F.col("benchmarks").isNull(), 1).otherwise(0)).alias("kept"),
                F.collect_list("benchmarks").alias("flags"),
            ).first()
            flagged_by = [b for flags in counts["flags"] for b in flags]
            summary.update(contaminated=int(counts["contaminated"]), kept=int(counts["kept"] or 0),
                           benchmark_items=index.items, items_without_grams=index.items_without_grams)
            summary["by_benchmark"].update({b: flagged_by.count(b) for b in set(flagged_by)})
            if summary["input"] != summary["contaminated"] + summary["kept"] or counts["input"] != n_input:
                raise AssertionError(f"decontaminate counts do not reconcile: {summary} (rows seen {counts['input']})")
        else:  # nothing undecided: only documents that left silver.dedup can need a write
            findings = spark.createDataFrame([], CONTAMINATION.spark_schema())
        _write_contamination(spark, settings, findings, dedup, recheck)
        summary["removed_from_gold"] = _write_corpus(spark, settings, dedup, run_id)
        if recheck:
            spark.sql(f"ALTER TABLE delta.`{CONTAMINATION.uri(settings)}` SET TBLPROPERTIES "
                      f"('{FINGERPRINT_PROPERTY}' = '{wanted}')")
        findings.unpersist()
        return summary
    finally:
        candidates.unpersist()


def _write_contamination(spark: SparkSession, settings: Settings, findings: DataFrame, dedup: DataFrame,
                         recheck: bool) -> None:
    """Insert new findings; on a recheck also update changed rows and drop findings no longer made.
    Rows of documents that left silver.dedup are dropped either way."""
    from pyspark.sql import functions as F

    current = read_table(spark, CONTAMINATION, settings)
    keys = list(CONTAMINATION.merge_keys)
    if recheck:
        compare = [c for c in CONTAMINATION.column_names if c not in keys and c != "run_id"]
        same = F.lit(True)
        for column in compare:
            same = same & F.col(f"n.{column}").eqNullSafe(F.col(f"o.{column}"))
        changed = (findings.alias("n").join(current.alias("o"), keys, "left")
                   .where(F.col("o.rule").isNull() | ~same)
                   .select(*keys, *[f"n.{c}" for c in CONTAMINATION.column_names if c not in keys]))
        if not changed.isEmpty():  # an upsert with nothing changed would still commit a version
            merge_upsert(spark, changed, CONTAMINATION, settings)
        stale = current.join(findings, keys, "left_anti").select(*keys)
    else:
        if not findings.isEmpty():  # cheaper than an empty MERGE (which would commit nothing anyway)
            merge_insert_new(spark, findings, CONTAMINATION, settings)
        stale = current.join(dedup.select("doc_id"), "doc_id", "left_anti").select(*keys)
    if not stale.isEmpty():
        delete_keys(spark, stale, CONTAMINATION, settings)


def _write_corpus(spark: SparkSession, settings: Settings, dedup: DataFrame, run_id: str) -> int:
    """gold.corpus := silver.dedup minus contaminated documents; returns rows deleted."""
    from pyspark.sql import functions as F

    contaminated = read_table(spark, CONTAMINATION, settings).select("doc_id").distinct()
    wanted = dedup.join(contaminated, "doc_id", "left_anti")
    current = read_table(spark, CORPUS, settings).select("doc_id")
    inserts = wanted.join(current, "doc_id", "left_anti").select(
        "doc_id", "source", "text", "quality_score", "math_density", "n_words", F.lit(run_id).alias("run_id"))
    deletes = current.join(wanted.select("doc_id"), "doc_id", "left_anti").persist()
    removed = deletes.count()
    if removed:
        delete_keys(spark, deletes, CORPUS, settings)
    deletes.unpersist()
    if not inserts.isEmpty():
        merge_insert_new(spark, inserts, CORPUS, settings)
    return removed


def _table_property(spark: SparkSession, uri: str, key: str) -> str | None:
    rows = spark.sql(f"SHOW TBLPROPERTIES delta.`{uri}`").collect()
    return next((row["value"] for row in rows if row["key"] == key), None)


if __name__ == "__main__":
    sys.exit(job_main(run, "decontaminate"))
