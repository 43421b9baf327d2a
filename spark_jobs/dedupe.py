"""dedupe: silver.documents → exact + near-duplicate clusters → silver.dedup (one survivor each).

Incremental and idempotent:

1. Pin ``silver.documents`` at its current version; the *new* documents are those without a row
   in ``silver.minhash_signatures``. None → nothing is written at all.
2. MinHash signatures + LSH band hashes for the new documents (``transforms.minhash``, vectorised
   per Arrow batch).
3. Edges, each involving at least one new document: *exact* — same ``text_hash`` (a star from the
   group's smallest doc id); *near* — an LSH band collision between a new document and any stored
   one, kept if its Jaccard ≥ ``dedup.jaccard_threshold``: by default the exact Jaccard of the
   two shingle sets, computed only for candidates whose MinHash estimate is within 4σ of the
   threshold (``dedup.verify: estimate`` trusts the estimate alone). Only one document per
   ``text_hash`` enters LSH (its copies are already joined by exact edges), so a text repeated
   1,000 times costs one bucket entry, not a million candidate pairs. MERGEd into
   ``silver.duplicate_edges`` (``doc_a < doc_b``).
4. Connected components over *all* edges (``transforms.components``; edges ≪ documents, so the
   recompute is cheap and the clusters equal a batch run's whatever order documents arrived in).
   Survivor per cluster: highest ``quality_score``, then smallest ``doc_id``.
5. ``silver.duplicate_clusters`` gets exactly the rows that changed; ``silver.dedup`` (documents
   minus non-survivors) gets new survivors inserted and displaced survivors deleted.
6. Signatures are written last: a run that dies earlier leaves its documents "new", and the rerun
   recomputes the same edges and rows (every write above is keyed MERGE), so nothing is lost.

Run: ``python -m spark_jobs.dedupe [--config FILE] [--lake-root URI]`` or through ``jzlake curate``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.lineage import stable_hash
from spark_jobs.runner import job_main
from spark_jobs.session import (
    current_version,
    delete_keys,
    ensure_table,
    ensure_tables,
    merge_insert_new,
    merge_upsert,
    read_table,
    table_exists,
)
from spark_jobs.transforms.components import connected_components
from spark_jobs.transforms.minhash import (
    MinHashParams,
    estimate_margin,
    exact_jaccard_batches,
    signature_batches,
)

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from jzlake.settings import Settings

DOCUMENTS = catalogue.table("silver.documents")
SIGNATURES = catalogue.table("silver.minhash_signatures")
EDGES = catalogue.table("silver.duplicate_edges")
CLUSTERS = catalogue.table("silver.duplicate_clusters")
DEDUP = catalogue.table("silver.dedup")

# Stored on silver.minhash_signatures: signatures made with other parameters are not comparable.
PARAMS_PROPERTY = "jzlake.dedup.params"
SIGNATURE_SCHEMA = "doc_id string, text_hash string, signature array<long>, band_hashes array<long>"


def params_fingerprint(settings: Settings) -> str:
    """Everything that changes which edges exist: signature parameters and the threshold."""
    return stable_hash(settings.dedup.model_dump(), length=16)


def run(spark: SparkSession, settings: Settings, run_id: str) -> dict[str, Any]:
    """Deduplicate the documents of ``silver.documents`` not seen before (see module docstring)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    version = current_version(spark, DOCUMENTS, settings)
    if version is None:
        raise RuntimeError(f"{DOCUMENTS.full_name} does not exist at {DOCUMENTS.uri(settings)}: run the clean "
                           "stage first (jzlake curate runs ingest → clean → dedupe)")
    ensure_tables(spark, settings, SIGNATURES, EDGES, CLUSTERS, DEDUP)
    params = MinHashParams.from_settings(settings.dedup)
    _check_params(spark, settings)
    # A missing text hash (should not happen after clean) falls back to the raw text's hash, so
    # such documents still meet their exact copies and never pool into one "null" group.
    docs = read_table(spark, DOCUMENTS, settings, version).withColumn(
        "text_hash", F.coalesce(F.col("text_hash"), F.sha2(F.col("text"), 256)))
    doc_keys = docs.select("doc_id", "text_hash", "quality_score").persist(StorageLevel.MEMORY_AND_DISK)
    stored = read_table(spark, SIGNATURES, settings)
    new_docs = docs.join(stored.select("doc_id"), "doc_id", "left_anti")
    new_sigs = (
        new_docs.select("doc_id", "text_hash", "text")
        .mapInArrow(signature_batches(params), SIGNATURE_SCHEMA)
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    n_new = new_sigs.count()
    summary: dict[str, Any] = {
        "input": n_new, "exact_duplicates": 0, "near_duplicates": 0, "survivors": 0, "clusters": 0,
        "displaced_survivors": 0, "silver_version": version,
    }
    try:
        if n_new == 0:
            summary["clusters"] = _count_clusters(spark, settings)
            return summary
        new_ids = new_sigs.select("doc_id")
        # Insert-only MERGEs and deletes with nothing to do commit no version; no need to check first.
        edges = exact_edges(doc_keys, new_sigs).unionByName(
            near_edges(doc_keys, stored, new_sigs, params.num_perm, settings.dedup.jaccard_threshold,
                       texts=docs if settings.dedup.verify == "exact" else None, shingle_words=params.shingle_words)
        )
        merge_insert_new(spark, edges.withColumn("run_id", F.lit(run_id)), EDGES, settings)

        clusters = cluster_members(read_table(spark, EDGES, settings), doc_keys).withColumn(
            "run_id", F.lit(run_id)).persist(StorageLevel.MEMORY_AND_DISK)
        _write_clusters(spark, settings, clusters)
        displaced = _write_dedup(spark, settings, docs, clusters, new_ids, run_id)

        counts = _input_counts(new_ids, clusters)
        summary.update(counts, displaced_survivors=displaced,
                       clusters=clusters.select("cluster_id").distinct().count())
        clusters.unpersist()
        if summary["input"] != summary["survivors"] + summary["exact_duplicates"] + summary["near_duplicates"]:
            raise AssertionError(f"dedupe counts do not reconcile: {summary}")

        merge_insert_new(spark, new_sigs.withColumn("run_id", F.lit(run_id)), SIGNATURES, settings)
        _store_params(spark, settings)
        return summary
    finally:
        new_sigs.unpersist()
        doc_keys.unpersist()


def exact_edges(doc_keys: DataFrame, new_sigs: DataFrame) -> DataFrame:
    """Star edges (smallest doc id → every other copy) for each text hash a new document has."""
    from pyspark.sql import functions as F

    touched = new_sigs.select("text_hash").distinct()
    members = doc_keys.join(touched, "text_hash").select("text_hash", "doc_id")
    centres = members.groupBy("text_hash").agg(F.min("doc_id").alias("doc_a"))
    return (
        members.join(centres, "text_hash")
        .where(F.col("doc_id") != F.col("doc_a"))
        .select("doc_a", F.col("doc_id").alias("doc_b"), F.lit("exact").alias("kind"),
                F.lit(1.0).alias("similarity"))
    )


def near_edges(doc_keys: DataFrame, stored: DataFrame, new_sigs: DataFrame, num_perm: int, threshold: float,
               texts: DataFrame | None = None, shingle_words: int = 5) -> DataFrame:
    """Verified LSH candidates between a new document and any document (new or stored).

    One representative per text hash (its smallest doc id) takes part; pairs of equal text are
    exact edges already. Without ``texts``, a candidate is kept if its MinHash estimate reaches
    ``threshold``. With ``texts`` (``doc_id, text``; ``dedup.verify = exact``), candidates whose
    estimate is more than 4σ below the threshold are dropped and the rest are decided on the exact
    Jaccard of their ``shingle_words``-shingle sets (texts are joined only for those pairs).
    """
    from pyspark.sql import functions as F

    reps = doc_keys.groupBy("text_hash").agg(F.min("doc_id").alias("doc_id")).select("doc_id")
    every = stored.select("doc_id", "text_hash", "signature", "band_hashes").unionByName(new_sigs)
    participants = every.join(reps, "doc_id", "left_semi")
    new_participants = participants.join(new_sigs.select("doc_id"), "doc_id", "left_semi")

    def buckets(df: DataFrame) -> DataFrame:
        return df.select("doc_id", F.posexplode("band_hashes").alias("band", "bucket"))

    left, right = buckets(new_participants).alias("l"), buckets(participants).alias("r")
    candidates = (
        left.join(right, ["band", "bucket"])
        .where(F.col("l.doc_id") != F.col("r.doc_id"))
        .select(F.least("l.doc_id", "r.doc_id").alias("doc_a"), F.greatest("l.doc_id", "r.doc_id").alias("doc_b"))
        .distinct()
    )
    sig = participants.select("doc_id", "text_hash", "signature")
    scored = (
        candidates.join(sig.toDF("doc_a", "hash_a", "sig_a"), "doc_a")
        .join(sig.toDF("doc_b", "hash_b", "sig_b"), "doc_b")
        .where(F.col("hash_a") != F.col("hash_b"))
        .select("doc_a", "doc_b",
                (estimated_matches(F.col("sig_a"), F.col("sig_b")) / F.lit(float(num_perm))).alias("similarity"))
    )
    if texts is None:
        verified = scored.where(F.col("similarity") >= F.lit(threshold))
    else:
        floor = threshold - estimate_margin(threshold, num_perm)
        text = texts.select("doc_id", "text")
        verified = (
            scored.where(F.col("similarity") >= F.lit(floor)).select("doc_a", "doc_b")
            .join(text.toDF("doc_a", "text_a"), "doc_a").join(text.toDF("doc_b", "text_b"), "doc_b")
            .select("doc_a", "doc_b", "text_a", "text_b")
            .mapInArrow(exact_jaccard_batches(shingle_words), "doc_a string, doc_b string, similarity double")
            .where(F.col("similarity") >= F.lit(threshold))
        )
    return verified.select("doc_a", "doc_b", F.lit("near").alias("kind"), "similarity")


def estimated_matches(sig_a: Column, sig_b: Column) -> Column:
    """Number of equal positions of two signature arrays, as a SQL expression (no Python UDF)."""
    from pyspark.sql import functions as F

    equal = F.zip_with(sig_a, sig_b, lambda x, y: F.when(x == y, 1).otherwise(0))
    return F.aggregate(equal, F.lit(0), lambda acc, x: acc + x)


def cluster_members(all_edges: DataFrame, doc_keys: DataFrame) -> DataFrame:
    """Every member of every duplicate cluster with its deterministic survivor.

    ``cluster_id`` is the cluster's smallest doc id; the survivor has the highest
    ``quality_score`` (nulls last), then the smallest ``doc_id``; ``kind`` is ``exact`` when the
    member's text hash equals the survivor's (so the survivor's own row says ``exact``) else
    ``near``. Members missing from ``silver.documents`` are left out.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    components = connected_components(all_edges, "doc_a", "doc_b")
    members = components.join(doc_keys, components["node"] == doc_keys["doc_id"]).select(
        "doc_id", F.col("component").alias("cluster_id"), "text_hash", "quality_score"
    )
    rank = Window.partitionBy("cluster_id").orderBy(F.col("quality_score").desc_nulls_last(), F.col("doc_id"))
    ranked = members.withColumn("rank", F.row_number().over(rank)).withColumn(
        "cluster_size", F.count(F.lit(1)).over(Window.partitionBy("cluster_id")))
    survivors = ranked.where(F.col("rank") == 1).select(
        "cluster_id", F.col("doc_id").alias("survivor_doc_id"), F.col("text_hash").alias("survivor_hash"))
    return (
        ranked.where(F.col("cluster_size") > 1)
        .join(survivors, "cluster_id")
        .select(
            "doc_id", "cluster_id", "survivor_doc_id",
            (F.col("doc_id") == F.col("survivor_doc_id")).alias("is_survivor"),
            F.when(F.col("text_hash") == F.col("survivor_hash"), "exact").otherwise("near").alias("kind"),
            F.col("cluster_size").cast("long").alias("cluster_size"),
        )
    )


def _write_clusters(spark: SparkSession, settings: Settings, clusters: DataFrame) -> None:
    """Upsert only the rows that changed; delete members that left (no write when nothing did)."""
    from pyspark.sql import functions as F

    current = read_table(spark, CLUSTERS, settings)
    compare = [c for c in CLUSTERS.column_names if c not in CLUSTERS.merge_keys and c != "run_id"]
    joined = clusters.alias("n").join(current.alias("o"), "doc_id", "left")
    unchanged = F.lit(True)
    for column in compare:
        unchanged = unchanged & F.col(f"n.{column}").eqNullSafe(F.col(f"o.{column}"))
    changed = joined.where(F.col("o.cluster_id").isNull() | ~unchanged).select(
        "doc_id", *[f"n.{c}" for c in CLUSTERS.column_names[1:]]
    ).persist()
    # An upsert whose matched rows are all unchanged still commits a version: check first.
    if not changed.isEmpty():
        merge_upsert(spark, changed, CLUSTERS, settings)
    changed.unpersist()
    gone = current.join(clusters, "doc_id", "left_anti").select("doc_id")
    if not gone.isEmpty():  # members only leave a cluster if their document left silver.documents
        delete_keys(spark, gone, CLUSTERS, settings)


def _write_dedup(spark: SparkSession, settings: Settings, docs: DataFrame, clusters: DataFrame,
                 new_ids: DataFrame, run_id: str) -> int:
    """Insert survivors missing from silver.dedup, delete rows that are no longer survivors.

    Only new documents can be inserted: edges are only ever added, so an earlier document that
    lost to a duplicate never becomes a survivor again (clusters merge; they do not split).
    Returns the number of *earlier* documents deleted (survivors displaced by a new document).
    """
    from pyspark.sql import functions as F

    ensure_table(spark, DEDUP, settings)
    current = read_table(spark, DEDUP, settings).select("doc_id")
    losers = clusters.where(~F.col("is_survivor")).select("doc_id")
    inserts = (
        docs.join(new_ids, "doc_id", "left_semi")
        .join(losers, "doc_id", "left_anti").join(current, "doc_id", "left_anti")
        .select("doc_id", "source", "text", "quality_score", "math_density", "n_words", F.lit(run_id).alias("run_id"))
    )
    merge_insert_new(spark, inserts, DEDUP, settings)
    deletes = current.join(losers, "doc_id", "left_semi").unionByName(
        current.join(docs.select("doc_id"), "doc_id", "left_anti")).persist()
    displaced = deletes.join(new_ids, "doc_id", "left_anti").count()
    if displaced or not deletes.isEmpty():
        delete_keys(spark, deletes, DEDUP, settings)
    deletes.unpersist()
    return displaced


def _input_counts(new_ids: DataFrame, clusters: DataFrame) -> dict[str, int]:
    """How this run's documents ended: survivor, exact duplicate or near duplicate."""
    from pyspark.sql import functions as F

    outcome = (
        new_ids.join(clusters.select("doc_id", "is_survivor", "kind"), "doc_id", "left")
        .select(F.when(F.col("is_survivor").isNull() | F.col("is_survivor"), "survivors")
                .when(F.col("kind") == "exact", "exact_duplicates")
                .otherwise("near_duplicates").alias("outcome"))
        .groupBy("outcome").count().collect()
    )
    counts = {"survivors": 0, "exact_duplicates": 0, "near_duplicates": 0}
    counts.update({row["outcome"]: int(row["count"]) for row in outcome})
    return counts


def _count_clusters(spark: SparkSession, settings: Settings) -> int:
    return read_table(spark, CLUSTERS, settings).select("cluster_id").distinct().count()


def _check_params(spark: SparkSession, settings: Settings) -> None:
    if not table_exists(spark, SIGNATURES, settings):
        return
    stored = _table_property(spark, SIGNATURES.uri(settings), PARAMS_PROPERTY)
    wanted = params_fingerprint(settings)
    if stored is not None and stored != wanted:
        raise RuntimeError(
            f"{SIGNATURES.full_name} was built with other dedup settings (fingerprint {stored}, now "
            f"{wanted}: {settings.dedup.model_dump()}); stored signatures and edges are not comparable. "
            f"Restore the old settings, or delete {SIGNATURES.uri(settings)}, {EDGES.uri(settings)} and "
            f"{CLUSTERS.uri(settings)} to rebuild deduplication from scratch"
        )


def _store_params(spark: SparkSession, settings: Settings) -> None:
    wanted = params_fingerprint(settings)
    if _table_property(spark, SIGNATURES.uri(settings), PARAMS_PROPERTY) != wanted:
        spark.sql(f"ALTER TABLE delta.`{SIGNATURES.uri(settings)}` SET TBLPROPERTIES "
                  f"('{PARAMS_PROPERTY}' = '{wanted}')")


def _table_property(spark: SparkSession, uri: str, key: str) -> str | None:
    rows = spark.sql(f"SHOW TBLPROPERTIES delta.`{uri}`").collect()
    return next((row["value"] for row in rows if row["key"] == key), None)


if __name__ == "__main__":
    sys.exit(job_main(run, "dedupe"))
