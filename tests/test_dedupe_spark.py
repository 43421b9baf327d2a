"""dedupe on real sample texts: planted exact copies and edited near-duplicates, survivors, a
no-op rerun, and an incremental run that must equal a batch run over the same documents.

The reference for "which documents are near-duplicates" is the exact Jaccard of the shingle
sets, computed here without MinHash: LSH must find the pairs (candidate probability 0.99996 at
J = 0.85) and the exact verification must keep exactly those at or above the threshold.
"""

from __future__ import annotations

import random
from itertools import combinations
from typing import Any

import pytest

from jzlake import catalogue
from spark_jobs import dedupe
from spark_jobs.session import current_version, read_table
from spark_jobs.transforms.minhash import jaccard, shingle_hashes
from tests.conftest import copy_lake, make_settings
from tests.curation_fixtures import sample_texts, silver_row, substitute_words, write_silver

pytestmark = pytest.mark.spark

WRITTEN = ("silver.minhash_signatures", "silver.duplicate_edges", "silver.duplicate_clusters", "silver.dedup")
HELD_OUT = 12  # sample docs kept back for the incremental run


def exact_pairs(docs: dict[str, str], k: int, floor: float) -> dict[tuple[str, str], float]:
    """Exact shingle-set Jaccard ≥ ``floor`` for all pairs (size-ratio pruning keeps it fast)."""
    sets = {d: frozenset(shingle_hashes(t, k).tolist()) for d, t in docs.items()}
    ordered = sorted(sets, key=lambda d: len(sets[d]))
    found = {}
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if len(sets[a]) < floor * len(sets[b]):
                break
            j = jaccard(sets[a], sets[b])
            if j >= floor:
                found[tuple(sorted((a, b)))] = j
    return found


def table_rows(spark: Any, settings: Any, name: str) -> list[dict[str, Any]]:
    return [r.asDict() for r in read_table(spark, catalogue.table(name), settings).collect()]


def versions(spark: Any, settings: Any) -> dict[str, int | None]:
    return {n: current_version(spark, catalogue.table(n), settings) for n in WRITTEN}


def clusters_by_doc(spark: Any, settings: Any) -> dict[str, dict[str, Any]]:
    return {r["doc_id"]: r for r in table_rows(spark, settings, "silver.duplicate_clusters")}


@pytest.fixture(scope="module")
def first_run(spark, tmp_path_factory) -> dict[str, Any]:
    """First run over the sample (minus held-out docs) plus planted duplicates (never written to
    again: tests get a copy, ``lake``)."""
    settings = make_settings(tmp_path_factory.mktemp("dedupe"))
    rng = random.Random(2024)
    sample = sample_texts()
    base, held_out = sample[:-HELD_OUT], sample[-HELD_OUT:]
    texts = dict(base)
    related = exact_pairs(texts, settings.dedup.shingle_words, 0.5)
    paired = {d for pair in related for d in pair}
    # Planting targets: long enough that 1 % edits stay well above J = 0.8, and unrelated to
    # anything else in the sample so the expected clusters are exactly the planted ones.
    lonely = [d for d, t in base if d not in paired and 250 <= len(t.split()) <= 1500]
    a, b, c, d, e, f = rng.sample(lonely, 6)
    near_e = substitute_words(texts[e], 0.01, rng)
    planted = {
        "plant:copy-better-a": (texts[a], 0.99),  # exact copy, higher quality → it survives
        "plant:copy-tie-b": (texts[b], None),  # exact copy, same quality → smaller doc id survives
        "plant:near-worse-c": (substitute_words(texts[c], 0.01, rng), 0.01),
        "plant:near-better-d": (substitute_words(texts[d], 0.01, rng), 0.99),
        "plant:far-f": (substitute_words(texts[f], 0.35, rng), None),  # J ≈ 0.1: must stay apart
        "plant:chain-e1": (near_e, 0.2),
        "plant:chain-e2": (substitute_words(near_e, 0.01, rng), 0.2),
    }
    rows = [silver_row(doc_id, text) for doc_id, text in base]
    quality = {r["doc_id"]: r["quality_score"] for r in rows}
    for doc_id, (text, q) in planted.items():
        rows.append(silver_row(doc_id, text, quality[b] if doc_id.endswith("-b") else q))
    write_silver(spark, settings, rows)
    summary = dedupe.run(spark, settings, "dedupe-test-1")
    return {
        "settings": settings, "summary": summary, "rows": rows, "held_out": held_out,
        "targets": {"a": a, "b": b, "c": c, "d": d, "e": e, "f": f},
        "texts": {r["doc_id"]: r["text"] for r in rows}, "versions": versions(spark, settings),
        "dedup_ids": {r["doc_id"] for r in table_rows(spark, settings, "silver.dedup")},
    }


@pytest.fixture
def lake(first_run, tmp_path) -> dict[str, Any]:
    """This test's own copy of the first run's lake: tests that write to it stay order-independent."""
    return {**first_run, "settings": copy_lake(first_run["settings"], tmp_path / "first-run")}


def test_planted_duplicates_found_with_deterministic_survivors(spark, lake) -> None:
    t = lake["targets"]
    members = clusters_by_doc(spark, lake["settings"])

    def cluster_of(doc_id: str) -> set[str]:
        cid = members[doc_id]["cluster_id"]
        return {d for d, r in members.items() if r["cluster_id"] == cid}

    assert cluster_of(t["a"]) == {t["a"], "plant:copy-better-a"}
    assert members[t["a"]]["survivor_doc_id"] == "plant:copy-better-a"
    assert members[t["a"]]["kind"] == "exact" and not members[t["a"]]["is_survivor"]
    assert members[t["b"]]["survivor_doc_id"] == min(t["b"], "plant:copy-tie-b")
    assert cluster_of(t["c"]) == {t["c"], "plant:near-worse-c"}
    assert members["plant:near-worse-c"]["survivor_doc_id"] == t["c"]
    assert members["plant:near-worse-c"]["kind"] == "near"
    assert members[t["d"]]["survivor_doc_id"] == "plant:near-better-d"
    assert members[t["d"]]["kind"] == "near"
    assert cluster_of(t["e"]) == {t["e"], "plant:chain-e1", "plant:chain-e2"}
    assert members[t["e"]]["cluster_size"] == 3
    assert members[t["e"]]["cluster_id"] == min(cluster_of(t["e"]))
    assert t["f"] not in members and "plant:far-f" not in members


def test_clusters_agree_with_exact_jaccard(spark, lake) -> None:
    settings, texts = lake["settings"], lake["texts"]
    members = clusters_by_doc(spark, settings)
    reference = exact_pairs(texts, settings.dedup.shingle_words, 0.5)
    same = {pair for pair in combinations(sorted(members), 2)
            if members[pair[0]]["cluster_id"] == members[pair[1]]["cluster_id"]}
    # LSH makes a pair at J = 0.85 a candidate with probability 0.99996 (20 bands × 6 rows).
    must_join = {p for p, j in reference.items() if j >= 0.85}
    assert must_join <= same, f"pairs with exact Jaccard ≥ 0.85 left apart: {sorted(must_join - same)[:5]}"
    edges = table_rows(spark, settings, "silver.duplicate_edges")
    assert all(e["doc_a"] < e["doc_b"] for e in edges)
    for e in edges:
        pair = (e["doc_a"], e["doc_b"])
        if e["kind"] == "near":  # verified on the exact Jaccard (dedup.verify = exact)
            assert reference.get(pair, 0.0) >= settings.dedup.jaccard_threshold, (pair, reference.get(pair))
            assert e["similarity"] == pytest.approx(reference[pair])
        else:
            assert " ".join(texts[pair[0]].lower().split()) == " ".join(texts[pair[1]].lower().split())


def test_counts_reconcile_and_dedup_is_documents_minus_losers(spark, lake) -> None:
    summary, members = lake["summary"], clusters_by_doc(spark, lake["settings"])
    losers = {d for d, r in members.items() if not r["is_survivor"]}
    assert summary["input"] == len(lake["rows"])
    assert summary["input"] == summary["survivors"] + summary["exact_duplicates"] + summary["near_duplicates"]
    assert summary["exact_duplicates"] == sum(1 for d in losers if members[d]["kind"] == "exact")
    assert summary["near_duplicates"] == sum(1 for d in losers if members[d]["kind"] == "near")
    assert summary["clusters"] == len({r["cluster_id"] for r in members.values()})
    assert summary["displaced_survivors"] == 0
    assert lake["dedup_ids"] == {r["doc_id"] for r in lake["rows"]} - losers
    survivors = {r["survivor_doc_id"] for r in members.values()}
    assert survivors <= lake["dedup_ids"]
    assert all(len({r["survivor_doc_id"] for r in members.values() if r["cluster_id"] == cid}) == 1
               for cid in {r["cluster_id"] for r in members.values()})


def test_second_run_writes_nothing(spark, lake) -> None:
    summary = dedupe.run(spark, lake["settings"], "dedupe-test-2")
    assert summary["input"] == 0
    assert versions(spark, lake["settings"]) == lake["versions"]


def test_incremental_run_dedupes_against_the_lake_like_a_batch_run(spark, lake, tmp_path) -> None:
    settings, t = lake["settings"], lake["targets"]
    rng = random.Random(7)
    before = clusters_by_doc(spark, settings)
    singletons = [d for d, _ in sorted(lake["texts"].items()) if d not in before and d in lake["dedup_ids"]
                  and not d.startswith("plant:") and 250 <= len(lake["texts"][d].split()) <= 1500
                  and d not in t.values()]
    g, h, k = singletons[:3]
    new_rows = [silver_row(d, text) for d, text in lake["held_out"]] + [
        silver_row("plant2:copy-best-g", lake["texts"][g], 0.999),  # displaces survivor g
        silver_row("plant2:near-worse-h", substitute_words(lake["texts"][h], 0.01, rng), 0.0),
        silver_row("plant2:copy-worse-k", lake["texts"][k], 0.0),
    ]
    write_silver(spark, settings, new_rows)
    summary = dedupe.run(spark, settings, "dedupe-test-3")
    after = clusters_by_doc(spark, settings)
    dedup_ids = {r["doc_id"] for r in table_rows(spark, settings, "silver.dedup")}

    assert summary["input"] == len(new_rows)
    assert summary["input"] == summary["survivors"] + summary["exact_duplicates"] + summary["near_duplicates"]
    assert after[g]["survivor_doc_id"] == "plant2:copy-best-g" and not after[g]["is_survivor"]
    assert g not in dedup_ids and "plant2:copy-best-g" in dedup_ids
    assert after["plant2:near-worse-h"]["survivor_doc_id"] == h and h in dedup_ids
    assert after["plant2:copy-worse-k"]["survivor_doc_id"] == k and "plant2:copy-worse-k" not in dedup_ids
    assert summary["displaced_survivors"] == len(lake["dedup_ids"] - dedup_ids) >= 1
    assert summary["exact_duplicates"] >= 1 and summary["near_duplicates"] >= 1

    # Same documents in one batch, in a fresh lake: identical clusters and corpus.
    batch = make_settings(tmp_path)
    write_silver(spark, batch, lake["rows"] + new_rows)
    dedupe.run(spark, batch, "dedupe-test-batch")

    def content(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {d: {k: v for k, v in r.items() if k != "run_id"} for d, r in rows.items()}

    assert content(after) == content(clusters_by_doc(spark, batch))
    assert {r["doc_id"] for r in table_rows(spark, batch, "silver.dedup")} == dedup_ids
