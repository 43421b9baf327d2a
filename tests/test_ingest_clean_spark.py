"""Ingest and clean on Spark + Delta: the embedded sample plus a folder of damaged inputs."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from jzlake import catalogue
from spark_jobs import clean, ingest
from spark_jobs.session import current_version, read_table
from tests.conftest import SAMPLE, copy_lake, make_settings
from tests.test_records import write_broken_source

pytestmark = pytest.mark.spark

BRONZE = ("bronze.documents", "bronze.quarantine", "bronze.ingested_files")
SILVER = ("silver.documents", "silver.dropped")


def _versions(spark, settings, names) -> dict[str, int | None]:
    return {name: current_version(spark, catalogue.table(name), settings) for name in names}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _expected_sample_counts() -> dict[str, dict[str, int]]:
    """Records and repeats per source, computed from the raw JSON without the ingest code."""
    raw = SAMPLE / "raw_corpus"
    out = {}
    for source, key in (("se_threads", lambda r: r["thread_id"]),
                        ("stackmathqa", lambda r: (r["Q"], r["A"])),
                        ("mathlm_stackexchange", lambda r: r["meta"]["post_id"]),
                        ("latex_books", lambda r: r["id"])):
        rows = [r for f in sorted((raw / source).glob("*.jsonl")) for r in _rows(f)]
        keys = Counter(key(r) for r in rows)
        out[source] = {"ingested": len(rows), "already_present": sum(n - 1 for n in keys.values())}
    return out


@pytest.fixture(scope="module")
def first_run(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest_clean")
    expected_quarantine = write_broken_source(tmp / "broken")
    settings = make_settings(tmp, sources={"broken": {"glob": str(tmp / "broken" / "*")}})
    ingested = ingest.run(spark, settings, "ingest-test-1")
    after_ingest = _versions(spark, settings, BRONZE)
    cleaned = clean.run(spark, settings, "clean-test-1")
    return SimpleNamespace(settings=settings, tmp=tmp, ingested=ingested, cleaned=cleaned,
                           after_ingest=after_ingest, expected_quarantine=expected_quarantine)


@pytest.fixture
def lake(first_run, tmp_path):
    """This test's own copy of the first run's lake (the inputs stay shared: the ingest manifest
    names them by path, so a test that touches one puts it back)."""
    return SimpleNamespace(**{**vars(first_run), "settings": copy_lake(first_run.settings, tmp_path / "first-run")})


def test_every_sample_source_ingests_with_the_default_mapping(spark, lake):
    summary = lake.ingested
    for source, want in _expected_sample_counts().items():
        got = summary["by_source"][source]
        assert got["ingested"] == want["ingested"], source
        assert got["already_present"] == want["already_present"], source
        assert got["quarantined"] == 0, source
    # humanfiltered duplicates 40votes and StackMathQA repeats Q/A pairs: repeats exist
    assert summary["by_source"]["mathlm_stackexchange"]["already_present"] > 0
    assert summary["ingested"] == summary["new_documents"] + summary["already_present"] + summary["quarantined"]
    docs = read_table(spark, catalogue.table("bronze.documents"), lake.settings)
    assert docs.count() == summary["new_documents"]
    assert docs.where("run_id = 'ingest-test-1' AND ingested_at IS NOT NULL").count() == docs.count()
    assert docs.select("doc_id").distinct().count() == docs.count()
    assert summary["files_read"] == 12 and summary["files_skipped"] == 0
    assert summary["bronze_version"] == lake.after_ingest["bronze.documents"]


def test_damaged_inputs_land_in_quarantine_and_the_rest_loads(spark, lake):
    quarantine = read_table(spark, catalogue.table("bronze.quarantine"), lake.settings).collect()
    got = {(Path(r["file"]).name, r["line"]): r["reason"] for r in quarantine}
    truncated = {k: v for k, v in got.items() if k[0] == "trunc.jsonl.gz"}
    assert list(truncated.values()) == ["unreadable_file"]
    assert {k: v for k, v in got.items() if k[0] != "trunc.jsonl.gz"} == lake.expected_quarantine
    assert lake.ingested["quarantine_reasons"] == dict(sorted(Counter(got.values()).items()))
    for row in quarantine:
        assert row["source"] == "broken" and row["run_id"] == "ingest-test-1"
        assert row["detail"].startswith(row["reason"]) and "Fix:" in row["detail"]
        assert len(row["raw_sample"]) <= lake.settings.ingest.raw_sample_chars
    huge = next(r for r in quarantine if r["reason"] == "too_large")
    assert huge["byte_size"] > 50_000_000
    conflict = next(r for r in quarantine if r["reason"] == "conflicting_doc_id")
    assert "broken:dup" in conflict["detail"] and "mixed.jsonl:9" in conflict["detail"]

    docs = read_table(spark, catalogue.table("bronze.documents"), lake.settings).where("source = 'broken'")
    ids = {r["doc_id"] for r in docs.select("doc_id").collect()}
    gz_loaded = truncated.popitem()[0][1] - 1
    assert gz_loaded > 0
    expected = {"broken:good-1", "broken:good-2", "broken:dup", "broken:before-huge", "broken:after-huge",
                "broken:pq-1", *(f"broken:gz-{i:03d}" for i in range(gz_loaded))}
    assert expected <= ids and len(ids - expected) == 1  # plus the content-hash keyed record
    assert lake.ingested["by_source"]["broken"]["already_present"] == 1  # the repeated "dup" line


def test_reingesting_unchanged_files_adds_nothing_and_writes_nothing(spark, lake):
    summary = ingest.run(spark, lake.settings, "ingest-test-2")
    assert summary["ingested"] == summary["new_documents"] == summary["quarantined"] == 0
    assert summary["files_read"] == 0 and summary["files_skipped"] == 12
    assert _versions(spark, lake.settings, BRONZE) == lake.after_ingest


def test_a_touched_file_is_reread_without_duplicating_anything(spark, lake):
    mixed = lake.tmp / "broken" / "mixed.jsonl"
    times = (mixed.stat().st_atime_ns, mixed.stat().st_mtime_ns)
    os.utime(mixed, ns=(times[0], times[1] + 60 * 10**9))
    try:
        summary = ingest.run(spark, lake.settings, "ingest-test-3")
    finally:
        os.utime(mixed, ns=times)  # the other tests' lake copies recorded the original mtime
    assert summary["files_read"] == 1 and summary["new_documents"] == 0
    assert summary["already_present"] == 5 and summary["quarantined"] == 7
    after = _versions(spark, lake.settings, BRONZE)
    assert after["bronze.documents"] == lake.after_ingest["bronze.documents"]
    assert after["bronze.quarantine"] == lake.after_ingest["bronze.quarantine"]
    assert after["bronze.ingested_files"] == lake.after_ingest["bronze.ingested_files"] + 1


def test_clean_reconciles_and_keeps_math_while_dropping_junk(spark, lake):
    summary = lake.cleaned
    bronze = read_table(spark, catalogue.table("bronze.documents"), lake.settings)
    kept = read_table(spark, catalogue.table("silver.documents"), lake.settings)
    dropped = read_table(spark, catalogue.table("silver.dropped"), lake.settings)
    assert summary["input"] == bronze.count() == lake.ingested["new_documents"]
    assert summary["input"] == summary["kept"] + sum(summary["dropped"].values())
    assert kept.count() == summary["kept"] and dropped.count() == sum(summary["dropped"].values())
    assert kept.join(dropped, "doc_id").count() == 0
    version = lake.after_ingest["bronze.documents"]
    assert summary["bronze_version"] == version
    assert kept.where(f"bronze_version = {version} AND run_id = 'clean-test-1'").count() == kept.count()

    reasons = {r["doc_id"]: (r["primary_reason"], r["reasons"]) for r in dropped.collect()}
    assert all(primary == rs[0] for primary, rs in reasons.values())
    assert dict(Counter(p for p, _ in reasons.values())) == summary["dropped"]
    for name in ("opt-ebook.tex", "opt-cover.tex", "hott-a4.tex", "hott-online.tex", "cover-lulu-hardcover.tex"):
        assert reasons[f"latex_books:HoTT/book:{name}"][0] == "too_few_words", name

    kept_ids = {r["doc_id"] for r in kept.select("doc_id").collect()}
    for chapter in ("logic.tex", "homotopy.tex", "setmath.tex", "reals.tex"):
        assert f"latex_books:HoTT/book:{chapter}" in kept_ids
    assert "latex_books:OpenLogicProject/OpenLogic:content/computability/computability-theory/s-m-n.tex" in kept_ids
    se = summary["by_source"]["se_threads"]
    assert se["kept"] / (se["kept"] + se["dropped"]) > 0.95

    thread = kept.where("doc_id = 'se_threads:math.stackexchange.com:633512'").first()
    assert thread is not None and "$\\Gamma=(V,E,s,t)$" in thread["text"]
    assert "<p>" not in thread["text"] and "&amp;" not in thread["text"]
    assert len(thread["text_hash"]) == 64 and 0 < thread["quality_score"] <= 1
    assert thread["metrics"]["math_spans"] > 10 and thread["math_density"] == thread["metrics"]["math_density"]


def test_recleaning_processes_nothing_and_writes_nothing(spark, lake):
    before = _versions(spark, lake.settings, SILVER)
    summary = clean.run(spark, lake.settings, "clean-test-2")
    assert summary["input"] == summary["kept"] == 0 and summary["dropped"] == {}
    assert _versions(spark, lake.settings, SILVER) == before
