"""decontaminate on real sample texts with GSM8K / SVAMP / MATH-500 test items planted in them."""

from __future__ import annotations

import random
from typing import Any

import pytest

from jzlake import catalogue
from jzlake.benchmarks import load_benchmarks
from spark_jobs import decontaminate
from spark_jobs.session import current_version, delete_keys, merge_insert_new, read_table
from tests.conftest import copy_lake, make_settings
from tests.curation_fixtures import quality_for, sample_texts, substitute_words

pytestmark = pytest.mark.spark

DEDUP = catalogue.table("silver.dedup")
WRITTEN = ("gold.contamination", "gold.corpus")


def dedup_row(doc_id: str, text: str) -> dict[str, Any]:
    return {"doc_id": doc_id, "source": doc_id.split(":")[0], "text": text, "quality_score": quality_for(doc_id),
            "math_density": 0.1, "n_words": len(text.split()), "run_id": "test-dedupe"}


def write_dedup(spark: Any, settings: Any, rows: list[dict[str, Any]]) -> None:
    merge_insert_new(spark, spark.createDataFrame(rows, DEDUP.spark_schema()), DEDUP, settings)


def plant(host: str, question: str, rng: random.Random, planted_at: dict[str, Any] | None = None,
          doc_id: str = "") -> str:
    """The question inserted between two paragraphs of a real document (its offset recorded)."""
    paragraphs = host.split("\n\n")
    cut = rng.randrange(len(paragraphs) + 1)
    before = "\n\n".join(paragraphs[:cut]) + ("\n\n" if cut else "")
    if planted_at is not None:
        planted_at[doc_id] = (len(before), question)
    return "\n\n".join([*paragraphs[:cut], question, *paragraphs[cut:]])


def rows_of(spark: Any, settings: Any, name: str) -> list[dict[str, Any]]:
    return [r.asDict() for r in read_table(spark, catalogue.table(name), settings).collect()]


def versions(spark: Any, settings: Any) -> dict[str, int | None]:
    return {n: current_version(spark, catalogue.table(n), settings) for n in WRITTEN}


@pytest.fixture(scope="module")
def first_run(spark, tmp_path_factory) -> dict[str, Any]:
    settings = make_settings(tmp_path_factory.mktemp("decontam"))
    rng = random.Random(13)
    bench = load_benchmarks(settings)
    clean = sample_texts(min_words=1, max_words=10**7)  # every sample document, short or long
    hosts = [t for _, t in clean if 100 <= len(t.split()) <= 2000]
    expected: dict[str, tuple[str, str]] = {}
    at: dict[str, tuple[int, str]] = {}
    rows = [dedup_row(d, t) for d, t in clean]
    for i, item in enumerate(rng.sample(bench["gsm8k"], 8)):
        expected[f"plant:gsm8k-verbatim-{i}"] = ("gsm8k", item.item_id)
        doc_id = f"plant:gsm8k-verbatim-{i}"
        rows.append(dedup_row(doc_id, plant(rng.choice(hosts), item.text, rng, at, doc_id)))
    # Three replaced words can break every 8-gram of a 20-token question (a paraphrase beyond
    # n-gram reach; 97 % of 3-edit plants are caught overall): plant those in ≥ 30-token ones.
    long_questions = [it for it in bench["gsm8k"] if len(it.text.split()) >= 30]
    for edits, pool in ((2, bench["gsm8k"]), (3, long_questions)):
        for i, item in enumerate(rng.sample(pool, 8)):
            doc_id = f"plant:gsm8k-{edits}-edits-{i}"
            edited = substitute_words(item.text, 0.0, rng, keep_numbers=True, count=edits)
            expected[doc_id] = ("gsm8k", item.item_id)
            rows.append(dedup_row(doc_id, plant(rng.choice(hosts), edited, rng, at, doc_id)))
    for name in ("svamp", "math500"):
        item = rng.choice([it for it in bench[name] if len(it.text.split()) >= 12])
        expected[f"plant:{name}-verbatim"] = (name, item.item_id)
        doc_id = f"plant:{name}-verbatim"
        rows.append(dedup_row(doc_id, plant(rng.choice(hosts), item.text, rng, at, doc_id)))
    write_dedup(spark, settings, rows)
    summary = decontaminate.run(spark, settings, "decontam-test-1")
    return {"settings": settings, "summary": summary, "expected": expected, "rows": rows, "clean": clean,
            "versions": versions(spark, settings), "planted_at": at}


@pytest.fixture
def lake(first_run, tmp_path) -> dict[str, Any]:
    """This test's own copy of the first run's lake: tests that write to it stay order-independent."""
    return {**first_run, "settings": copy_lake(first_run["settings"], tmp_path / "first-run")}


def test_planted_items_are_flagged_and_clean_sample_is_not(spark, lake) -> None:
    found = rows_of(spark, lake["settings"], "gold.contamination")
    by_doc: dict[str, set[tuple[str, str]]] = {}
    for row in found:
        by_doc.setdefault(row["doc_id"], set()).add((row["benchmark"], row["item_id"]))
    missed = {d: item for d, item in lake["expected"].items() if item not in by_doc.get(d, set())}
    assert not missed, f"planted benchmark items not flagged: {missed}"
    assert set(by_doc) == set(lake["expected"]), f"clean docs flagged: {set(by_doc) - set(lake['expected'])}"
    texts = {r["doc_id"]: r["text"] for r in lake["rows"]}
    rules = lake["settings"].decontam
    for row in found:
        assert row["rule"] in {"ngram", "span", "template"} and row["matched_ngram"]
        assert 0.0 <= row["containment"] <= 1.0 and rules.min_coverage <= row["coverage"] <= 1.0
        # the evidence is where the item was planted: offsets, and the span text they hold
        text, (at, planted) = texts[row["doc_id"]], lake["planted_at"][row["doc_id"]]
        assert at - 40 <= row["span_start"] < row["span_end"] <= at + len(planted) + 1
        assert text[row["span_start"]:row["span_end"]].startswith(row["matched_ngram"])
        assert row["span_end"] - row["span_start"] >= 0.5 * len(planted)
    assert any(r["rule"] == "span" for r in found)  # some edited questions lost every 13-gram


def test_report_shows_flagged_documents_per_benchmark_with_span(spark, lake) -> None:
    from spark_jobs.report import flagged_examples

    settings = lake["settings"]
    sources = read_table(spark, DEDUP, settings).select("doc_id", "source")
    findings = read_table(spark, catalogue.table("gold.contamination"), settings).join(sources, "doc_id", "left")
    examples = flagged_examples(findings, settings, per_benchmark=5)
    assert set(examples) == {"gsm8k", "math500", "svamp"} and len(examples["gsm8k"]) == 5
    texts = {r["doc_id"]: r["text"] for r in lake["rows"]}
    coverages = [e["coverage"] for e in examples["gsm8k"]]
    assert coverages == sorted(coverages)  # the doubtful ones first
    for benchmark, rows in examples.items():
        for e in rows:
            # the planted item's benchmark (SVAMP's variants of one body are flagged together)
            assert lake["expected"][e["doc_id"]][0] == benchmark and e["source"] == "plant"
            assert texts[e["doc_id"]][e["span_start"]:e["span_end"]].startswith(e["matched_span"])
            assert e["item_text"] and e["rule"] in {"ngram", "span", "template"}


def test_counts_reconcile_and_gold_is_dedup_minus_contaminated(spark, lake) -> None:
    summary = lake["summary"]
    assert summary["input"] == len(lake["rows"]) == summary["contaminated"] + summary["kept"]
    assert summary["contaminated"] == len(lake["expected"])
    assert summary["by_benchmark"] == {"gsm8k": 24, "math500": 1, "svamp": 1}
    assert summary["removed_from_gold"] == 0
    corpus = {r["doc_id"] for r in rows_of(spark, lake["settings"], "gold.corpus")}
    assert corpus == {r["doc_id"] for r in lake["rows"]} - set(lake["expected"])


def test_rerun_writes_nothing(spark, lake) -> None:
    summary = decontaminate.run(spark, lake["settings"], "decontam-test-2")
    assert summary["input"] == 0 and not summary["rechecked_all"]
    assert versions(spark, lake["settings"]) == lake["versions"]


def test_incremental_run_and_config_change(spark, lake) -> None:
    settings = lake["settings"]
    rng = random.Random(5)
    item = load_benchmarks(settings)["gsm8k"][7]
    host = lake["clean"][3][1]
    write_dedup(spark, settings, [dedup_row("new:clean", lake["clean"][4][1] + "\n\nA new closing remark."),
                                  dedup_row("new:leak", plant(host, item.text, rng))])
    gone = lake["clean"][0][0]  # a document that left silver.dedup (e.g. displaced by a duplicate)
    delete_keys(spark, spark.createDataFrame([(gone,)], "doc_id string"), DEDUP, settings)

    summary = decontaminate.run(spark, settings, "decontam-test-3")
    assert (summary["input"], summary["contaminated"], summary["kept"]) == (2, 1, 1)
    assert summary["removed_from_gold"] == 1 and not summary["rechecked_all"]
    corpus = {r["doc_id"] for r in rows_of(spark, settings, "gold.corpus")}
    assert "new:clean" in corpus and "new:leak" not in corpus and gone not in corpus

    # Dropping a benchmark changes the fingerprint: everything is rechecked, its findings go and
    # the documents it flagged return to gold.
    narrowed = settings.model_copy(update={"benchmarks": {"gsm8k": settings.benchmarks["gsm8k"]}})
    summary = decontaminate.run(spark, narrowed, "decontam-test-4")
    assert summary["rechecked_all"] and summary["by_benchmark"] == {"gsm8k": 25}
    found = rows_of(spark, settings, "gold.contamination")
    assert {r["benchmark"] for r in found} == {"gsm8k"}
    corpus = {r["doc_id"] for r in rows_of(spark, settings, "gold.corpus")}
    assert {"plant:svamp-verbatim", "plant:math500-verbatim"} <= corpus
