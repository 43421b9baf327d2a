"""synthetic_filter: gold.synthetic_raw → filter → exact/near dedup → decontaminate → gold.synthetic_problems.

Every raw row ends in exactly one of the two outputs (``raw = kept + dropped``, checked):

1. **Parse rejects** — rows whose ``reason`` is set by ``jzlake synthesize`` (unparsable,
   truncated, no_final_answer, copies_excerpt, code_failed, …) are dropped with that reason.
2. **Length filters** — problem shorter than ``synthesis.min_problem_words`` (``too_short_problem``)
   or longer than ``max_problem_words`` (``too_long_problem``); solution longer than
   ``max_solution_words`` (``too_long_solution``).
3. **Exact and near duplicates** of the *problem* text, within one kind (a CoT and a code
   solution of the same problem are different training samples). Reuses the curation dedup:
   ``quality.text_hash`` for exact keys, ``minhash.signature_batches`` for signatures, and
   ``dedupe.exact_edges`` / ``near_edges`` / ``cluster_members`` (``dedup.*`` settings) for
   edges and clusters; the survivor is the smallest ``request_key`` of each cluster, the
   others are dropped as ``exact_duplicate`` / ``near_duplicate`` with ``duplicate_of``.
4. **Decontamination** of the survivors' problems against every configured benchmark, with the
   curation rule and code (``decontaminate.decontam_index`` / ``find_contamination``: the
   per-item span rule): a hit drops the row as ``contaminated``
   with the benchmark, item, rule and matched n-gram.

Lineage: every output row (kept or dropped) carries the raw row's sample lineage — source
``doc_id``/``source``, excerpt offsets, template id + hash, stage/kind, model name/version/URI,
sampling params, seed, sample index, input table/version — plus ``synthesis_run_id`` (the
``jzlake synthesize`` run that wrote the raw row; ``run_id`` is this filter run).

Idempotent: ``gold.synthetic_raw`` is read at its current version (stored on every output
row as ``raw_version``); only rows that differ from the tables are upserted and keys that moved
between the outputs are deleted, so a rerun on the same version writes nothing.

Run: ``python -m spark_jobs.synthetic_filter [--config FILE] [--lake-root URI]``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from spark_jobs.runner import job_main
from spark_jobs.session import current_version, delete_keys, ensure_table, merge_upsert, read_table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from jzlake.settings import Settings

RAW = catalogue.table("gold.synthetic_raw")
PROBLEMS = catalogue.table("gold.synthetic_problems")
DROPPED = catalogue.table("gold.synthetic_dropped")
LINEAGE = [name for name, _ in catalogue.SAMPLE_LINEAGE]
SIGNATURE_SCHEMA = "doc_id string, text_hash string, signature array<long>, band_hashes array<long>"


def run(spark: SparkSession, settings: Settings, run_id: str) -> dict[str, Any]:
    """Filter, deduplicate and decontaminate the current ``gold.synthetic_raw`` (module doc)."""
    from pyspark.sql import functions as F

    version = current_version(spark, RAW, settings)
    if version is None:
        raise RuntimeError(f"{RAW.full_name} does not exist at {RAW.uri(settings)}: run `jzlake synthesize` first")
    # Each stage is checkpointed once: later steps (counts, anti-joins, both outputs) reuse it
    # instead of recomputing signatures, LSH joins and components from the raw table.
    raw = read_table(spark, RAW, settings, version).localCheckpoint(eager=True)
    n_raw = raw.count()
    rejected = raw.where(F.col("reason").isNotNull()).select(
        "request_key", "reason", "detail", F.lit(None).cast("string").alias("duplicate_of"),
        F.lit(None).cast("string").alias("benchmark"))
    # what every output row carries from its raw row (joined back onto the dropped rows)
    lineage = raw.select("request_key", *LINEAGE, F.col("run_id").alias("synthesis_run_id"))
    filtered, too_long_or_short = length_filter(raw.where(F.col("reason").isNull()), settings)
    candidates = with_problem_hash(filtered).localCheckpoint(eager=True)
    duplicates, clusters = duplicate_rows(spark, candidates, settings)
    survivors = candidates.join(duplicates.select("request_key"), "request_key", "left_anti")
    contaminated = contaminated_rows(spark, survivors, settings).localCheckpoint(eager=True)
    kept = (
        survivors.join(contaminated.select("request_key"), "request_key", "left_anti")
        .join(clusters, "request_key", "left")
        .select("request_key", "text", "problem", "solution", "answer", "problem_hash",
                "near_dup_cluster", *LINEAGE, F.col("run_id").alias("synthesis_run_id"),
                F.lit(version).cast("long").alias("raw_version"), F.lit(run_id).alias("run_id"))
    ).localCheckpoint(eager=True)
    dropped = (
        rejected.unionByName(too_long_or_short).unionByName(duplicates).unionByName(contaminated)
        .join(lineage, "request_key")  # inner join on the raw key: every dropped row has one
        .withColumn("raw_version", F.lit(version).cast("long")).withColumn("run_id", F.lit(run_id))
    ).localCheckpoint(eager=True)

    n_kept = kept.count()
    by_reason = {r["reason"]: int(r["count"]) for r in dropped.groupBy("reason").count().collect()}
    n_dropped = sum(by_reason.values())
    if n_kept + n_dropped != n_raw:
        raise AssertionError(f"synthetic_filter counts do not reconcile: {n_raw} raw != {n_kept} kept + "
                             f"{n_dropped} dropped ({by_reason}); a row fell through a join — report this")
    written = {
        PROBLEMS.full_name: write_changed(spark, settings, kept, PROBLEMS),
        DROPPED.full_name: write_changed(spark, settings, dropped, DROPPED),
    }
    return {"raw_version": version, "raw": n_raw, "kept": n_kept, "dropped": n_dropped,
            "dropped_by_reason": dict(sorted(by_reason.items())), "written": written}


def word_count(column: str) -> Any:
    from pyspark.sql import functions as F

    trimmed = F.trim(F.coalesce(F.col(column), F.lit("")))
    return F.when(trimmed == "", 0).otherwise(F.size(F.split(trimmed, r"\s+")))


def length_filter(accepted: DataFrame, settings: Settings) -> tuple[DataFrame, DataFrame]:
    """(rows that pass, dropped rows with reason ``too_short_problem`` | ``too_long_problem`` |
    ``too_long_solution``)."""
    from pyspark.sql import functions as F

    config = settings.synthesis
    reason = (
        F.when(word_count("problem") < config.min_problem_words, "too_short_problem")
        .when(word_count("problem") > config.max_problem_words, "too_long_problem")
        .when(word_count("solution") > config.max_solution_words, "too_long_solution")
    )
    marked = accepted.withColumn("_reason", reason)
    dropped = marked.where(F.col("_reason").isNotNull()).select(
        "request_key", F.col("_reason").alias("reason"),
        F.concat(F.lit("problem words: "), word_count("problem").cast("string"), F.lit(", solution words: "),
                 word_count("solution").cast("string")).alias("detail"),
        F.lit(None).cast("string").alias("duplicate_of"), F.lit(None).cast("string").alias("benchmark"))
    return marked.where(F.col("_reason").isNull()).drop("_reason"), dropped


def with_problem_hash(rows: DataFrame) -> DataFrame:
    """Add ``problem_hash`` (the curation dedup normal form of the problem text)."""
    from pyspark.sql import functions as F

    from spark_jobs.transforms.quality import text_hash

    problem_hash = F.udf(lambda text: text_hash(text or ""), "string", useArrow=True)
    return rows.withColumn("problem_hash", problem_hash(F.col("problem")))


def duplicate_rows(spark: SparkSession, candidates: DataFrame, settings: Settings) -> tuple[DataFrame, DataFrame]:
    """(dropped duplicates, ``request_key → near_dup_cluster`` for every clustered row).

    Exact keys and LSH participants are per kind: ``text_hash`` = hash(kind, problem hash), and
    near edges between different kinds are discarded.
    """
    from pyspark.sql import functions as F

    from spark_jobs.dedupe import cluster_members, exact_edges, near_edges
    from spark_jobs.transforms.minhash import MinHashParams, signature_batches

    params = MinHashParams.from_settings(settings.dedup)
    keyed = candidates.select(
        F.col("request_key").alias("doc_id"), F.sha2(F.concat_ws(":", "kind", "problem_hash"), 256).alias("text_hash"),
        F.col("problem").alias("text"), F.lit(None).cast("double").alias("quality_score"), "kind")
    doc_keys = keyed.select("doc_id", "text_hash", "quality_score")
    sigs = keyed.select("doc_id", "text_hash", "text").mapInArrow(
        signature_batches(params), SIGNATURE_SCHEMA).localCheckpoint(eager=True)
    stored = spark.createDataFrame([], SIGNATURE_SCHEMA)  # one batch: every row is "new"
    kinds = keyed.select("doc_id", "kind")
    near = (
        near_edges(doc_keys, stored, sigs, params.num_perm, settings.dedup.jaccard_threshold)
        .join(kinds.withColumnRenamed("doc_id", "doc_a").withColumnRenamed("kind", "kind_a"), "doc_a")
        .join(kinds.withColumnRenamed("doc_id", "doc_b").withColumnRenamed("kind", "kind_b"), "doc_b")
        .where(F.col("kind_a") == F.col("kind_b"))
        .select("doc_a", "doc_b", "kind", "similarity")
    )
    edges = exact_edges(doc_keys, sigs).unionByName(near)
    members = cluster_members(edges, doc_keys).localCheckpoint(eager=True)
    dropped = members.where(~F.col("is_survivor")).select(
        F.col("doc_id").alias("request_key"),
        F.when(F.col("kind") == "exact", "exact_duplicate").otherwise("near_duplicate").alias("reason"),
        F.concat(F.lit("cluster of "), F.col("cluster_size").cast("string")).alias("detail"),
        F.col("survivor_doc_id").alias("duplicate_of"), F.lit(None).cast("string").alias("benchmark"))
    clusters = members.select(F.col("doc_id").alias("request_key"), F.col("cluster_id").alias("near_dup_cluster"))
    return dropped, clusters


def contaminated_rows(spark: SparkSession, survivors: DataFrame, settings: Settings) -> DataFrame:
    """Survivors whose problem overlaps a benchmark item, by the curation rule and code
    (``decontaminate.decontam_index`` + ``find_contamination``: the per-item span rule)."""
    from pyspark.sql import functions as F

    from spark_jobs.decontaminate import decontam_index, find_contamination

    problems = survivors.select(F.col("request_key").alias("doc_id"), F.col("problem").alias("text"))
    matches = find_contamination(spark, problems, decontam_index(settings))
    first = matches.groupBy("doc_id").agg(
        F.min(F.struct("benchmark", "item_id", "rule", "coverage", "matched_ngram")).alias("hit"))
    return first.select(
        F.col("doc_id").alias("request_key"), F.lit("contaminated").alias("reason"),
        F.concat_ws("", F.col("hit.benchmark"), F.lit(":"), F.col("hit.item_id"), F.lit(" ("), F.col("hit.rule"),
                    F.lit(", coverage "), F.format_number(F.col("hit.coverage"), 2), F.lit(": "),
                    F.col("hit.matched_ngram"), F.lit(")")).alias("detail"),
        F.lit(None).cast("string").alias("duplicate_of"), F.col("hit.benchmark").alias("benchmark"))


def write_changed(spark: SparkSession, settings: Settings, rows: DataFrame, table: catalogue.Table) -> dict[str, int]:
    """Upsert rows that differ from the table (``run_id`` aside) and delete keys no longer
    present; nothing is written when nothing changed."""
    from pyspark.sql import functions as F

    from spark_jobs.session import conform

    ensure_table(spark, table, settings)
    current = read_table(spark, table, settings)
    rows = conform(rows, table)
    key = table.merge_keys[0]
    compare = [c for c in table.column_names if c not in table.merge_keys and c != "run_id"]
    same = F.lit(True)
    for column in compare:
        same = same & F.col(f"n.{column}").eqNullSafe(F.col(f"o.{column}"))
    action = (F.when(F.col(f"n.{key}").isNull(), "gone")
              .when(F.col(f"o.{key}").isNull() | ~same, "changed").otherwise("same"))
    diff = (rows.alias("n").join(current.alias("o"), F.col(f"n.{key}") == F.col(f"o.{key}"), "full_outer")
            .select(action.alias("_action"), F.coalesce(F.col(f"n.{key}"), F.col(f"o.{key}")).alias("_key"),
                    *[F.col(f"n.{c}").alias(c) for c in table.column_names])
            .where(F.col("_action") != "same")).localCheckpoint(eager=True)
    counts = {r["_action"]: int(r["count"]) for r in diff.groupBy("_action").count().collect()}
    if counts.get("changed"):
        merge_upsert(spark, diff.where(F.col("_action") == "changed").select(*table.column_names), table, settings)
    if counts.get("gone"):
        delete_keys(spark, diff.where(F.col("_action") == "gone").select(F.col("_key").alias(key)), table, settings)
    return {"upserted": counts.get("changed", 0), "deleted": counts.get("gone", 0)}


if __name__ == "__main__":
    sys.exit(job_main(run, "synthetic_filter"))
