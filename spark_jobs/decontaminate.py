"""decontaminate: silver.dedup → gold.corpus minus documents that reproduce a benchmark item.

Rule (``settings.decontam``, ``transforms.ngrams.DecontamRules``), decided per (document, item)
and scaled to the item's length. Text is read as a *template* (``transforms.ngrams``): lower-cased
words, LaTeX commands and numbers, every run of numbers one placeholder, presentation LaTeX
dropped — so an item with its numbers changed, or re-spaced, reads as the original.

* **span** — every item's 4-grams locate, in the document, the window (at most 1.5 × the item's
  length) where most of the item occurs; the item is then aligned against that window
  (``difflib`` matching blocks of ≥ 2 tokens) and its *coverage* — the share of the item the span
  reproduces in order — must reach ``min_coverage`` (0.65). One contiguous span: a document that
  shares a stock phrase with an item at one place and a formula at another is no match.
* **evidence** — coverage counts only with evidence in the span: ≥ ``min_evidence_tokens`` (5)
  item tokens under *evidence grams* — prose 4-grams (half of their tokens words of ≥ 2 letters)
  that are not stop grams — or, for an item of ≥ 25 tokens, one of its 13-grams (``ngram``, the
  common decontaminators' rule). Stop grams carry no evidence on their own: a 4-gram in more than
  ``max_items_per_gram`` (4) benchmark item texts ("let f be the function defined by", "how many
  … are there"), or in more than ``max_doc_share`` (0.2 %, at least ``min_doc_count`` = 20) of the
  documents checked (counted in Spark from the documents' own grams). They still count towards
  coverage once a span has evidence.
* **template** — an item made of stop grams only is matched by a near-whole copy: coverage
  ≥ ``template_coverage`` (0.8), ≥ 10 tokens, prose in it.

Formula-only items ("Compute $\\dbinom{8}{4}$.") and items under ``min_item_tokens`` (10) are
never matched: with numbers as wildcards their tokens are formula soup that real LaTeX
reproduces by chance; the summary's ``items_unmatchable`` counts them per benchmark.

``gold.contamination`` keeps the evidence per finding: ``rule`` (ngram | span | template),
``coverage``, ``span_start``/``span_end`` (character offsets of the span in the document),
``matched_ngram`` (the span's text) and ``containment`` (share of the item's tokens covered by
its 4-grams anywhere in the document).

Measured by ``make bench-decontam`` (``benchmarks/bench_decontam.py``; ``../shared/data``:
GSM8K test + MATH-500 items planted in real SE/textbook documents; index GSM8K test, MATH-500,
MATH test, SVAMP; 300 items per benchmark and kind). Defaults, and one change at a time:

(recall: planted item flagged, 600 per kind; false positives: of 2,583 negatives — 600 stock
phrase + formula, 450 first sentence, 1,533 real documents)

================================================  =====================================  =====
setting                                           recall verbatim / edited / numbers /   false
                                                  spacing                                pos.
================================================  =====================================  =====
defaults                                          1.00 / 0.997 / 1.00 / 1.00             0
min_evidence_tokens 4                             1.00 / 0.997 / 1.00 / 1.00             8
min_evidence_tokens 6                             1.00 / 0.988 / 1.00 / 1.00             0
min_coverage 0.6                                  1.00 / 0.997 / 1.00 / 1.00             6
min_coverage 0.7                                  1.00 / 0.995 / 1.00 / 1.00             0
short_ngram 5                                     1.00 / 0.992 / 1.00 / 1.00             6
max_items_per_gram 1                              1.00 / 0.995 / 1.00 / 1.00             0
template_coverage 0.9                             1.00 / 0.997 / 1.00 / 1.00             0
the old rule (13-gram / 8-gram containment 0.15)  1.00 / 0.942 / 0.908 / 0.985             224
================================================  =====================================  =====

Counting LaTeX commands as evidence words (``\\binom``, ``\\lceil``) let formula soup through (48
false positives in an earlier sweep). The false positives of the looser settings are real LaTeX
documents whose formulas, with numbers as wildcards, align with short MATH items, or template
twins ("What is the difference between $4$ and $8$" vs the item "What is the positive difference
between $2^5$ and $5^2$?"); the two edited items still missed lost 3 of ~12 words to the edits.
Throughput on the same 4,983 documents, same session, alternating runs: 138 docs/s against the
old rule's 152 (ratio 0.91; 2 shared cores).

Spark shape: the index (numpy arrays, a few MB) is built on the driver and broadcast; one
``mapInArrow`` pass tokenises each document once and emits its candidate findings (with the
evidence grams behind them) plus its distinct evidence grams; the grams' document frequency is
one aggregation, whose frequent hashes (a few) are broadcast back, and a second ``mapInArrow``
over the candidates only re-judges them without those grams. No driver loop over documents.

Incremental: only documents of silver.dedup not yet decided (in neither gold.corpus nor
gold.contamination) are checked, unless the benchmark files or rules changed — a fingerprint
stored as a table property of gold.contamination — in which case everything is rechecked.
gold.corpus is maintained as silver.dedup minus contaminated documents (new clean documents
inserted, documents that left silver.dedup or became contaminated deleted).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

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
from spark_jobs.transforms.ngrams import (
    FINDING_SCHEMA,
    SCAN_SCHEMA,
    DecontamIndex,
    DecontamRules,
    build_decontam_index,
    judge_batches,
    scan_batches,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from jzlake.settings import Settings

DEDUP = catalogue.table("silver.dedup")
CONTAMINATION = catalogue.table("gold.contamination")
CORPUS = catalogue.table("gold.corpus")
FINGERPRINT_PROPERTY = "jzlake.decontam.fingerprint"


def fingerprint(settings: Settings) -> str:
    """Hash of the rules and of every configured benchmark's config and file content."""
    benchmarks = sorted(
        (name, cfg.model_dump(), file_sha256(benchmark_path(settings, name)))
        for name, cfg in settings.benchmarks.items()
    )
    return stable_hash(settings.decontam.model_dump(), benchmarks, length=24)


def decontam_index(settings: Settings) -> DecontamIndex:
    """The index of every configured benchmark item (driver side, pure Python)."""
    items = (
        (item.benchmark, item.item_id, item.text)
        for items in load_benchmarks(settings).values()
        for item in items
    )
    return build_decontam_index(items, DecontamRules.from_settings(settings.decontam))


def corpus_stop_threshold(rules: DecontamRules, n_docs: int) -> int:
    """Documents a gram must occur in to be a corpus stop gram (``max_doc_share``, at least
    ``min_doc_count``: in a small batch every gram is rare or a coincidence)."""
    return max(rules.min_doc_count, int(np.ceil(rules.max_doc_share * n_docs)))


def find_contamination(spark: SparkSession, docs: DataFrame, index: DecontamIndex,
                       n_docs: int | None = None) -> DataFrame:
    """``gold.contamination`` rows (without run_id) for the documents (``doc_id``, ``text``) of
    ``docs`` that match an item; ``n_docs``: their number when the caller knows it."""
    from pyspark.sql import functions as F

    if not len(index):
        return spark.createDataFrame([], FINDING_SCHEMA)
    n_docs = docs.count() if n_docs is None else n_docs
    threshold = corpus_stop_threshold(index.rules, n_docs)
    with_df = n_docs >= threshold  # else no gram can be frequent enough: one pass, nothing stored
    shared = spark.sparkContext.broadcast(index)
    scanned = docs.select("doc_id", "text").mapInArrow(scan_batches(shared, with_df), SCAN_SCHEMA)
    stop = np.empty(0, dtype=np.uint64)
    if with_df:
        scanned = scanned.localCheckpoint(eager=True)  # one tokenisation pass feeds both uses
        frequent = (scanned.where(F.col("item").isNull()).groupBy("gram_hash").agg(F.sum("gram_docs").alias("docs"))
                    .where(F.col("docs") >= threshold).select("gram_hash").collect())
        stop = np.sort(np.array([r["gram_hash"] for r in frequent], dtype=np.int64).view(np.uint64))
    candidates = scanned.where(F.col("item").isNotNull())
    return candidates.mapInArrow(judge_batches(shared, spark.sparkContext.broadcast(stop)), FINDING_SCHEMA)


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
            index = decontam_index(settings)
            findings = find_contamination(spark, candidates, index, n_input)
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
                           benchmark_items=len(index), items_unmatchable=index.items_unmatchable)
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
