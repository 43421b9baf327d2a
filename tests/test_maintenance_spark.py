"""Lake maintenance (``spark_jobs/maintenance.py``) on a small tmp lake: compaction without changing a
row, VACUUM honouring the retention (old orphan files go, recent ones and pinned versions stay),
ledger compaction through ``Ledger.close``, a second run doing nothing, and the 7-day guard."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from jzlake import catalogue
from jzlake.settings import load_settings
from spark_jobs import maintenance
from tests.conftest import make_settings

CORPUS = catalogue.table("gold.corpus")
LEDGER = "gold.kd_requests"
DAY = 24 * 3600


def corpus_rows(start: int, n: int) -> list[dict[str, Any]]:
    return [{"doc_id": f"d{i:04d}", "source": "s", "text": f"text {i}", "quality_score": 0.5,
             "math_density": 0.1, "n_words": 2, "run_id": f"r{start}"} for i in range(start, start + n)]


def delta_files(uri: str) -> int:
    from deltalake import DeltaTable

    return len(DeltaTable(uri).file_uris())


def ledger_rows(settings: Any) -> list[tuple]:
    from models import lake_io

    table, _ = lake_io.read_table_at(settings, LEDGER, columns=["key", "status"])
    return sorted(zip(*table.to_pydict().values(), strict=True))


def orphan(folder: Path, name: str, age_s: float) -> Path:
    """A data file no Delta version references, last modified ``age_s`` ago (a crashed writer's leftover)."""
    path = folder / name
    path.write_bytes(b"PAR1 not referenced by any version")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


@pytest.fixture
def small_lake(tmp_path: Path) -> dict[str, Any]:
    """Tables written the way jobs write them (MERGE commits; here with delta-rs: no Spark needed)."""
    from models import lake_io

    settings = make_settings(tmp_path, maintenance={"ledger_compact_above_files": 2})
    for batch in range(4):  # four MERGE commits: at least four small data files
        lake_io.merge_rows(settings, CORPUS.full_name, corpus_rows(batch * 10, 10))
    for batch in range(4):  # four ledger commits into one key_bucket partition
        lake_io.merge_rows(settings, LEDGER, [{"key": f"aa{batch:02d}", "status": "succeeded", "key_bucket": "aa"}])
    folder = Path(CORPUS.uri(settings))
    return {"settings": settings, "old_orphan": orphan(folder, "part-00000-old-orphan.snappy.parquet", 10 * DAY),
            "new_orphan": orphan(folder, "part-00000-new-orphan.snappy.parquet", 3600)}


def corpus_snapshot(spark: Any, settings: Any, version: int | None = None) -> list[tuple]:
    from spark_jobs.session import read_table

    return sorted(tuple(r) for r in read_table(spark, CORPUS, settings, version).collect())


@pytest.mark.spark
@pytest.mark.slow
def test_maintenance_compacts_vacuums_changes_no_row_and_is_idempotent(spark: Any,
                                                                       small_lake: dict[str, Any]) -> None:
    from spark_jobs.session import current_version

    settings = small_lake["settings"]
    uri = CORPUS.uri(settings)
    rows_before, ledger_before = corpus_snapshot(spark, settings), ledger_rows(settings)
    files_before, version_before = delta_files(uri), current_version(spark, CORPUS, settings)
    assert files_before >= 4 and len(rows_before) == 40

    summary = maintenance.run(spark, settings, "maintain-1")

    corpus = summary["tables"]["gold.corpus"]
    assert corpus["optimize"]["files_removed"] == files_before and corpus["optimize"]["files_added"] >= 1
    assert delta_files(uri) == corpus["optimize"]["files_added"] < files_before
    assert corpus_snapshot(spark, settings) == rows_before
    # VACUUM: the 10-day-old orphan is gone, the 1-hour-old one (inside 7 days) stays ...
    assert not small_lake["old_orphan"].exists() and small_lake["new_orphan"].exists()
    assert corpus["vacuum_deleted_files"] == 1
    # ... and so do the files the compaction replaced: a reader pinned before it still reads.
    assert corpus_snapshot(spark, settings, version_before) == rows_before

    ledger = summary["tables"][LEDGER]
    assert "optimize" not in ledger  # compacted by its owner, not by Spark
    assert ledger["ledger_compaction"]["files_before"] >= 4 > ledger["ledger_compaction"]["files_after"]
    assert ledger_rows(settings) == ledger_before
    assert summary["retention_hours"] == 168
    assert "gold.kd_dataset" in summary["missing"] and "gold.kd_dataset" not in summary["tables"]

    again = maintenance.run(spark, settings, "maintain-2")  # nothing left to do

    assert again["files_compacted"] == 0 and again["files_vacuumed"] == 0
    corpus = again["tables"]["gold.corpus"]
    assert corpus["version_after"] == corpus["version_before"], "an OPTIMIZE with nothing to do committed"
    compaction = again["tables"][LEDGER]["ledger_compaction"]
    assert compaction["files_after"] == compaction["files_before"]
    assert corpus_snapshot(spark, settings) == rows_before and ledger_rows(settings) == ledger_before


def test_retention_below_seven_days_is_refused() -> None:
    with pytest.raises(ValueError, match=r"below the 168 h \(7 days\) minimum.*vacuum_retention_hours >= 168"):
        maintenance.checked_retention(167.9)
    assert maintenance.checked_retention(168) == 168
    # the job refuses before any Spark work: no session is needed to see the refusal
    with pytest.raises(ValueError, match="168"):
        maintenance.vacuum_table(None, "/nowhere", 24)  # type: ignore[arg-type]


def test_settings_refuse_a_short_retention() -> None:
    with pytest.raises(ValueError, match=r"vacuum_retention_hours = 24.0 is below 168"):
        load_settings(overrides={"maintenance": {"vacuum_retention_hours": 24}}, environ={})


def test_ledgers_are_recognised_from_the_catalogue() -> None:
    ledgers = {t.full_name for t in catalogue.all_tables() if maintenance.is_ledger(t)}
    assert ledgers == {"gold.kd_requests", "gold.synthetic_requests"}
