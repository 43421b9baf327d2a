"""End to end: ``run_curation`` on the embedded sample, twice, then with new input."""

from __future__ import annotations

import json
import shutil
from itertools import pairwise
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jzlake import catalogue
from jzlake.settings import Settings
from spark_jobs.curate import CURATION_TABLES, run_curation, with_cli_inputs
from spark_jobs.session import current_version, read_table
from tests.conftest import SAMPLE, copy_lake, make_settings

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
def first_run_lake(spark, tmp_path_factory):
    """One curation run over the sample (never written to again: tests get a copy)."""
    settings = make_settings(tmp_path_factory.mktemp("curate"))
    return settings, run_curation(spark, settings, "curate-test-1")


@pytest.fixture
def first_run(first_run_lake, tmp_path):
    """(settings of this test's own copy of the first run's lake, the run's summary, a scratch folder)."""
    settings, summary = first_run_lake
    return copy_lake(settings, tmp_path / "first-run"), summary, tmp_path


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


# ---- the command line, on a small lake ------------------------------------------------------------

ISSUE_KEYS = {"ingested", "quarantined", "kept", "dropped", "exact_duplicates", "near_duplicates",
              "contaminated", "tables"}
# What the summary adds to the issue's object, each deliberate: the run, how to find its report,
# and the terms that make ``ingested`` add up on an incremental run.
EXTRA_KEYS = {"run_id", "already_present", "carried_from_earlier_runs", "displaced_survivors",
              "removed_from_gold", "balanced", "report"}
QUIZ_QUESTION = ("A baker fills 14 trays with 36 muffins each and sells all but 27 of them at the weekend "
                 "market. How many muffins did the baker sell?")


def _small_inputs(root: Path) -> list[str]:
    """A few sample documents plus a planted benchmark question and an exact twin; returns the
    curate flags, with paths relative to ``root`` (the test runs from there)."""
    (root / "data" / "mathlm").mkdir(parents=True)
    (root / "data" / "mine").mkdir()
    mathlm = SAMPLE / "raw_corpus" / "mathlm_stackexchange"
    shutil.copy(mathlm / "math_overflow_humanfiltered.jsonl", root / "data" / "mathlm")
    answers = [json.loads(line)["output"] for line in
               (mathlm / "math_overflow_40votes.head120.jsonl").read_text().splitlines()]
    long_answers = [a for a in answers if 150 < len(a.split()) < 600][:2]
    rows = [
        {"id": "twin-a", "text": long_answers[0]},
        {"id": "twin-b", "text": long_answers[0]},
        {"id": "plant", "text": long_answers[1] + "\n\nA worksheet question for practice: " + QUIZ_QUESTION},
        {"id": "broken", "text": 7},
    ]
    (root / "data" / "mine" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "quiz.json").write_text(json.dumps([{"question": QUIZ_QUESTION, "answer": "477"}]))
    return ["--lake-root", "lake", "--source", "mathlm_stackexchange=data/mathlm/*.jsonl",
            "--source", "mine=data/mine/*.jsonl", "--benchmark", "quiz=quiz.json"]


def _cli_curate(capsys, argv: list[str]) -> dict:
    from jzlake.cli import main

    capsys.readouterr()
    assert main(["curate", *argv]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _accounted(summary: dict) -> int:
    return (summary["already_present"] + summary["quarantined"] + sum(summary["dropped"].values())
            + summary["exact_duplicates"] + summary["near_duplicates"] + summary["contaminated"] + summary["kept"])


def test_cli_curate_prints_the_issue_summary_and_counts_carried_documents(spark, tmp_path, monkeypatch, capsys):
    from spark_jobs import ingest

    flags = _small_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative flags resolve from here, not from the repository
    summary = _cli_curate(capsys, flags)

    assert set(summary) >= ISSUE_KEYS and set(summary) - ISSUE_KEYS == EXTRA_KEYS
    counts = ISSUE_KEYS - {"dropped", "tables"}
    assert all(isinstance(summary[k], int) and summary[k] >= 0 for k in counts), summary
    assert all(isinstance(n, int) for n in summary["dropped"].values())
    assert set(summary["tables"]) == set(CURATION_TABLES)
    assert all(set(info) == {"version", "rows"} and info["version"] is not None
               for info in summary["tables"].values())
    assert summary["ingested"] == _accounted(summary) and summary["carried_from_earlier_runs"] == 0
    assert summary["ingested"] == 44 + 4 and summary["quarantined"] == 1  # the non-string text
    assert summary["exact_duplicates"] >= 1 and summary["contaminated"] == 1
    assert summary["report"].startswith(str(tmp_path / "lake" / "_runs"))

    report = json.loads(Path(summary["report"]).with_suffix(".json").read_text())
    this_run = report["figures"]["this_run"]
    dups = this_run["duplicates_by_source_kind"]
    assert sum(r["count"] for r in dups) == summary["exact_duplicates"] + summary["near_duplicates"]
    assert {"source": "mine", "kind": "exact", "count": 1} in dups
    assert this_run["contaminated_by_source_benchmark"] == [{"source": "mine", "benchmark": "quiz", "count": 1}]
    # Histograms are this run's rows (and, apart, the whole lake's), binned as a plain loop would.
    kept_words = [r["n_words"] for r in read_table(spark, catalogue.table("silver.documents"), settings_at(flags))
                  .where(F.col("run_id") == summary["run_id"]).collect()]
    bins = report["figures"]["histograms"]["length_bins"]
    assert report["figures"]["histograms"]["this_run"]["kept_words"] == [
        sum(1 for n in kept_words if lo <= n < hi) for lo, hi in pairwise(bins)]
    html = Path(summary["report"]).read_text()
    assert "(this run)" in html and "Document length in words (whole lake)" in html

    # A run that stopped after ingest leaves bronze documents for the next run's clean to carry.
    (tmp_path / "data" / "mine" / "b.jsonl").write_text(json.dumps({"id": "late", "text": long_text()}) + "\n")
    half = ingest.run(spark, settings_at(flags), "stopped-after-ingest")
    assert half["new_documents"] == 1
    again = _cli_curate(capsys, flags)
    assert again["balanced"] and again["ingested"] == 0
    assert again["carried_from_earlier_runs"] == 1 and _accounted(again) == 1
    report = json.loads(Path(again["report"]).with_suffix(".json").read_text())
    assert report["reconciliation"]["carried"] == {"clean": 1, "dedupe": 0, "decontaminate": 0}


def settings_at(flags: list[str]) -> Settings:
    """The settings ``jzlake curate FLAGS`` runs with (from the current directory)."""
    from jzlake.cli import build_parser, settings_from_args
    from spark_jobs.curate import settings_for

    args = build_parser("curate").parse_args(["curate", *flags])
    return settings_for(args, settings_from_args(args))


def long_text() -> str:
    chapter = max((json.loads(line) for line in
                   (SAMPLE / "raw_corpus/latex_books/hott_book.jsonl").read_text().splitlines()),
                  key=lambda d: len(d["text"]))["text"]
    return chapter[len(chapter) // 2:]
