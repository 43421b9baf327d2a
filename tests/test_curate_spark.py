"""End to end: ``run_curation`` on the embedded sample, twice, then with new input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jzlake import catalogue
from jzlake.settings import Settings
from spark_jobs.curate import CURATION_TABLES, run_curation, with_cli_inputs
from spark_jobs.session import current_version, read_table
from tests.conftest import SAMPLE, make_settings

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def _versions(spark, settings: Settings) -> dict[str, int | None]:
    return {name: current_version(spark, catalogue.table(name), settings) for name in CURATION_TABLES}


def _contents(spark, settings: Settings) -> dict[str, list[tuple]]:
    out = {}
    for name in CURATION_TABLES:
        df = read_table(spark, catalogue.table(name), settings).drop("ingested_at", "quarantined_at")
        out[name] = sorted(tuple(str(v) for v in row) for row in df.collect())
    return out


@pytest.fixture(scope="module")
def first_run(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curate")
    settings = make_settings(tmp)
    summary = run_curation(spark, settings, "curate-test-1")
    return settings, summary, tmp


def test_first_run_reconciles_and_writes_every_table(spark, first_run):
    settings, summary, _ = first_run
    assert summary["balanced"]
    dropped = sum(summary["dropped"].values())
    assert summary["ingested"] == (summary["already_present"] + summary["quarantined"] + dropped
                                   + summary["exact_duplicates"] + summary["near_duplicates"]
                                   + summary["contaminated"] + summary["kept"])
    assert summary["kept"] > 300
    assert summary["exact_duplicates"] + summary["near_duplicates"] > 0  # StackMathQA repeats questions
    assert dropped > 0  # the HoTT build-wrapper files are junk
    for name in CURATION_TABLES:
        path = catalogue.table(name).uri(settings)
        spark.read.format("delta").load(path).limit(1).collect()
        from delta.tables import DeltaTable

        assert DeltaTable.forPath(spark, path).history().count() >= 1, name
    gold = summary["tables"]["gold.corpus"]["rows"]
    assert gold == read_table(spark, catalogue.table("gold.corpus"), settings).count() > 0
    report = json.loads(Path(summary["report"]).with_suffix(".json").read_text())
    assert report["reconciliation"]["balanced"]
    assert "<img" in Path(summary["report"]).read_text()


def test_second_run_changes_nothing(spark, first_run):
    settings, _, _ = first_run
    versions, contents = _versions(spark, settings), _contents(spark, settings)
    summary = run_curation(spark, settings, "curate-test-2")
    assert summary["ingested"] == 0 and summary["kept"] == 0
    assert _versions(spark, settings) == versions
    assert _contents(spark, settings) == contents


def test_new_files_are_processed_incrementally(spark, first_run):
    settings, _, tmp = first_run
    extra = tmp / "extra"
    extra.mkdir()
    # One exact copy of a kept document, one GSM8K test question, one fresh document.
    gold = read_table(spark, catalogue.table("gold.corpus"), settings).orderBy("doc_id").first()
    gsm8k = json.loads((SAMPLE / "benchmarks/gsm8k/test.jsonl").read_text().splitlines()[7])
    fresh = (SAMPLE / "raw_corpus/latex_books/hott_book.jsonl").read_text().splitlines()
    long_chapter = max((json.loads(line) for line in fresh), key=lambda d: len(d["text"]))
    padding = (  # ordinary prose around the planted question, unlike anything in the sample
        "Work through the arithmetic slowly. First write down every quantity the story gives you, "
        "then decide which operation links them: adding totals, subtracting what was used, "
        "multiplying a rate by a time, or dividing a whole into equal groups. Check units at each "
        "step, because a mismatch between dollars and cents or hours and minutes is the most common "
        "slip. Finally, reread the question to make sure the number you report answers what was "
        "asked rather than an intermediate result that merely looks plausible."
    )
    rows = [
        {"id": "copy-1", "text": gold["text"]},
        {"id": "gsm8k-planted", "text": "Here is a practice question from a worksheet. " + gsm8k["question"]
         + "\n\n" + padding},
        {"id": "fresh-1", "text": long_chapter["text"][: len(long_chapter["text"]) // 2]},
    ]
    (extra / "new.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    shutil.copy(extra / "new.jsonl", extra / "new-again.jsonl")  # the same records again
    incremental = with_cli_inputs(settings, {"extra": str(extra / "*.jsonl")}, {})
    before = read_table(spark, catalogue.table("bronze.documents"), settings).count()
    summary = run_curation(spark, incremental, "curate-test-3")
    assert summary["balanced"]
    assert summary["ingested"] == 6 and summary["already_present"] == 3
    assert read_table(spark, catalogue.table("bronze.documents"), settings).count() == before + 3
    # The copy and its original form one cluster with one survivor. Equal quality → the smaller
    # doc_id survives, so the new copy may displace the original: then gold loses the original.
    assert summary["exact_duplicates"] + summary["near_duplicates"] + summary["displaced_survivors"] >= 1, summary
    clusters = read_table(spark, catalogue.table("silver.duplicate_clusters"), settings)
    pair = {r["doc_id"]: r for r in clusters.where(clusters.doc_id.isin("extra:copy-1", gold["doc_id"])).collect()}
    assert set(pair) == {"extra:copy-1", gold["doc_id"]}
    assert pair["extra:copy-1"]["cluster_id"] == pair[gold["doc_id"]]["cluster_id"]
    assert sum(r["is_survivor"] for r in pair.values()) == 1
    in_gold = read_table(spark, catalogue.table("gold.corpus"), settings).where(
        F.col("doc_id").isin("extra:copy-1", gold["doc_id"])).count()
    assert in_gold == 1
    assert summary["contaminated"] >= 1
    flagged = read_table(spark, catalogue.table("gold.contamination"), settings)
    assert flagged.where("doc_id = 'extra:gsm8k-planted' AND benchmark = 'gsm8k'").count() == 1
