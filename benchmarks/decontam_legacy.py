"""The decontamination rule before issue 11 (13-gram / whole item / 8-gram containment), frozen
as the throughput baseline of ``benchmarks.bench_decontam`` (same process, same documents).

Not used by the pipeline: ``spark_jobs.decontaminate`` is the rule in force.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from spark_jobs.transforms.ngrams import _WORD, ngram_hashes, token_ids, word_tokens

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pyspark.sql import DataFrame, SparkSession

LONG, SHORT, WHOLE = "long", "short", "whole"


@dataclass(frozen=True)
class GramRules:
    """Which benchmark grams count (``settings.decontam``; see ``spark_jobs.decontaminate``)."""

    ngram: int = 13
    short_ngram: int = 8
    min_item_tokens: int = 6
    min_word_fraction: float = 0.5
    max_items_per_gram: int = 1

    @classmethod
    def from_settings(cls, decontam: object) -> GramRules:
        return cls(**{f: getattr(decontam, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class BenchmarkGram:
    """One hashed gram of one benchmark item; ``kind`` is long (13), short (8) or whole (item)."""

    gram_hash: int  # signed 64-bit (Spark long)
    length: int
    benchmark: str
    item_id: str
    kind: str
    position: int
    text: str


@dataclass
class GramIndex:
    """Every counted gram of every item, plus what the document side needs to find them."""

    grams: list[BenchmarkGram]
    short_counts: dict[tuple[str, str], int]  # distinct short grams per (benchmark, item)
    items: int = 0
    items_without_grams: dict[str, int] = field(default_factory=dict)

    def hashes_by_length(self) -> dict[int, np.ndarray]:
        """Sorted uint64 hash arrays per gram length (the document-side prefilter)."""
        by_length: dict[int, set[int]] = {}
        for g in self.grams:
            by_length.setdefault(g.length, set()).add(g.gram_hash)
        return {n: np.sort(np.array(sorted(h), dtype=np.int64).view(np.uint64)) for n, h in by_length.items()}


def build_gram_index(items: Iterable[tuple[str, str, str]], rules: GramRules) -> GramIndex:
    """Hashed grams of benchmark items ``(benchmark, item_id, text)``.

    Long grams (``rules.ngram``) and short grams (``rules.short_ngram``) of every item; an item
    shorter than ``ngram`` tokens but at least ``min_item_tokens`` long is also one whole gram.
    A gram is kept only if it is prose enough (``min_word_fraction``) and, within its benchmark,
    not shared by more than ``max_items_per_gram`` distinct item texts (template language).
    """
    per_item: list[tuple[str, str, list[tuple[int, str, int, int, str]]]] = []
    frequency: dict[tuple[str, int, int], set[tuple[str, ...]]] = {}
    n_items = 0
    for benchmark, item_id, text in items:
        n_items += 1
        tokens = word_tokens(text)
        ids = token_ids(tokens)
        candidates: list[tuple[int, str, int, int, str]] = []  # (length, kind, position, hash, text)
        specs = [(rules.ngram, LONG), (rules.short_ngram, SHORT)]
        if rules.min_item_tokens <= len(tokens) < rules.ngram:
            specs.append((len(tokens), WHOLE))
        is_word = np.array([1 if _WORD.fullmatch(t) else 0 for t in tokens], dtype=np.int64)
        words_before = np.concatenate([[0], np.cumsum(is_word)])
        for n, kind in specs:
            hashes = ngram_hashes(ids, n)
            words_in_window = words_before[n:] - words_before[:-n] if len(hashes) else np.empty(0)
            for position in np.flatnonzero(words_in_window >= rules.min_word_fraction * n).tolist():
                candidates.append((n, kind, position, int(hashes[position]), " ".join(tokens[position:position + n])))
        key = tuple(tokens)
        for n, _, _, value, _ in candidates:
            frequency.setdefault((benchmark, n, value), set()).add(key)
        per_item.append((benchmark, item_id, candidates))

    grams: list[BenchmarkGram] = []
    short_counts: dict[tuple[str, str], int] = {}
    without: dict[str, int] = {}
    for benchmark, item_id, candidates in per_item:
        kept = [c for c in candidates if len(frequency[(benchmark, c[0], c[3])]) <= rules.max_items_per_gram]
        seen: set[tuple[int, int]] = set()
        for n, kind, position, value, text in kept:
            if (n, value) in seen:  # a gram repeated inside one item counts once
                continue
            seen.add((n, value))
            signed = int(np.array([value], dtype=np.uint64).view(np.int64)[0])
            grams.append(BenchmarkGram(signed, n, benchmark, item_id, kind, position, text))
        short_counts[(benchmark, item_id)] = len({c[3] for c in kept if c[1] == SHORT})
        if not kept:
            without[benchmark] = without.get(benchmark, 0) + 1
    return GramIndex(grams, short_counts, n_items, without)


def matching_grams(text: str, hashes_by_length: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """Distinct ``(length, signed hash)`` of the document's grams that occur in the index."""
    ids = token_ids(word_tokens(text))
    found: list[tuple[int, int]] = []
    for n, wanted in hashes_by_length.items():
        hashes = ngram_hashes(ids, n)
        if len(hashes) == 0 or len(wanted) == 0:
            continue
        # ``wanted`` is sorted: a binary search per gram (np.isin would re-sort it every call).
        slots = np.minimum(np.searchsorted(wanted, hashes), len(wanted) - 1)
        hits = np.unique(hashes[wanted[slots] == hashes])
        found.extend((n, h) for h in hits.view(np.int64).tolist())
    return found


def match_batches(hashes_by_length: object):  # -> mapInArrow function
    """A ``mapInArrow`` function: ``(doc_id, text)`` → ``(doc_id, length, gram_hash)`` hits only.

    ``hashes_by_length`` is the dict of ``GramIndex.hashes_by_length`` or a Spark broadcast of it
    (anything with ``.value``), so the arrays ship once per executor, not once per task.
    """

    def compute(batches):  # type: ignore[no-untyped-def]
        import pyarrow as pa

        wanted = getattr(hashes_by_length, "value", hashes_by_length)
        for batch in batches:
            doc_ids, lengths, hashes = [], [], []
            for doc_id, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist(),
                                    strict=True):
                for n, h in matching_grams(text or "", wanted):
                    doc_ids.append(doc_id)
                    lengths.append(n)
                    hashes.append(h)
            yield pa.RecordBatch.from_arrays(
                [pa.array(doc_ids, pa.string()), pa.array(lengths, pa.int32()), pa.array(hashes, pa.int64())],
                names=["doc_id", "length", "gram_hash"],
            )

    return compute


RULES = {LONG: "ngram", WHOLE: "whole_item", SHORT: "containment"}


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


def legacy_index(items: Iterable[tuple[str, str, str]]) -> GramIndex:
    """The old gram index with the old default rules."""
    return build_gram_index(items, GramRules())
