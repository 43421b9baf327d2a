"""CLI wiring, run folders on object-store URIs and the report's record accounting (pure, no Spark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jzlake.runs import read_stage_summary, safe_run_id, write_stage_summary
from jzlake.uris import arrow_filesystem, arrow_uri
from spark_jobs.report import reconcile
from tests.conftest import make_settings


def _stages(**over):
    stages = {
        "ingest": {"ingested": 100, "new_documents": 90, "already_present": 4, "quarantined": 6},
        "clean": {"input": 90, "kept": 70, "dropped": {"too_short": 15, "symbol_ratio": 5}},
        "dedupe": {"input": 70, "survivors": 60, "exact_duplicates": 6, "near_duplicates": 4},
        "decontaminate": {"input": 60, "contaminated": 2, "kept": 58},
    }
    for stage, values in over.items():
        stages[stage] = {**stages[stage], **values}
    return stages


def test_reconcile_balances_a_consistent_run() -> None:
    result = reconcile(_stages(), {"clean": 0, "dedupe": 0, "decontaminate": 0})
    assert result["balanced"] and result["carried_from_earlier_runs"] == 0 and result["problems"] == []
    assert result["dropped"] == 20 and result["kept"] == 58
    assert [b["gap"] for b in result["boundaries"]] == [0, 0, 0]


def test_reconcile_catches_a_lost_record() -> None:
    assert not reconcile(_stages(decontaminate={"kept": 57}))["balanced"]


def test_reconcile_catches_a_record_lost_between_ingest_and_clean() -> None:
    # Clean took 89 of ingest's 90 new documents and balanced its own books (69 + 20 = 89). The old
    # accounting called the -1 "carried from earlier runs" and balanced; no earlier run is involved.
    stages = _stages(clean={"input": 89, "kept": 69},
                     dedupe={"input": 69, "survivors": 59}, decontaminate={"input": 59, "kept": 57})
    result = reconcile(stages, {"clean": 0, "dedupe": 0, "decontaminate": 0})
    assert not result["balanced"]
    assert result["problems"] == ["ingest → clean: 1 document(s) lost (ingest passed on 90, 0 carried from "
                                  "earlier runs, clean took 89)",
                                  "ingested 100 + carried 0 != 99 accounted for"]
    assert result["boundaries"][0]["gap"] == -1


def test_reconcile_catches_a_record_lost_between_clean_and_dedupe() -> None:
    stages = _stages(dedupe={"input": 69, "survivors": 59}, decontaminate={"input": 59, "kept": 57})
    result = reconcile(stages, {"clean": 0, "dedupe": 0, "decontaminate": 0})
    assert not result["balanced"]
    assert any(p.startswith("clean → dedupe: 1 document(s) lost") for p in result["problems"])
    assert [b["gap"] for b in result["boundaries"]] == [0, -1, 0]


def test_reconcile_catches_a_record_lost_between_dedupe_and_decontaminate() -> None:
    result = reconcile(_stages(decontaminate={"input": 59, "kept": 57}), {})
    assert not result["balanced"] and [b["gap"] for b in result["boundaries"]] == [0, 0, -1]


def test_reconcile_needs_carried_documents_counted_not_inferred() -> None:
    # Clean took 5 documents an earlier run ingested (that run stopped after ingest): balanced only
    # when the tables say 5 such documents were carried, and never with a negative count.
    stages = _stages(clean={"input": 95, "kept": 75}, dedupe={"input": 75, "survivors": 65},
                     decontaminate={"input": 65, "kept": 63})
    assert not reconcile(stages, {"clean": 0})["balanced"]
    assert not reconcile(stages, {"clean": 4})["balanced"]
    counted = reconcile(stages, {"clean": 5})
    assert counted["balanced"] and counted["carried"] == {"clean": 5, "dedupe": 0, "decontaminate": 0}
    lost_and_padded = reconcile(_stages(clean={"input": 89, "kept": 69}), {"clean": -1, "dedupe": 0})
    assert not lost_and_padded["balanced"]
    assert any("negative" in p for p in lost_and_padded["problems"])


def test_reconcile_counts_documents_rechecked_from_earlier_runs() -> None:
    # A changed benchmark set re-checks 40 earlier gold documents: still balanced, and said so.
    stages = _stages(decontaminate={"input": 100, "contaminated": 3, "kept": 97})
    assert not reconcile(stages)["balanced"]  # uncounted, the 40 would be unexplained
    result = reconcile(stages, {"decontaminate": 40})
    assert result["balanced"] and result["carried_from_earlier_runs"] == 40


def test_reconcile_checks_each_stages_own_balance() -> None:
    result = reconcile(_stages(dedupe={"exact_duplicates": 7}, decontaminate={"input": 61, "kept": 59}),
                       {"decontaminate": 0})
    assert not result["balanced"]
    assert "dedupe: input 70 != survivors + exact_duplicates + near_duplicates = 71" in result["problems"]


def test_arrow_uri_maps_hadoop_s3_schemes_only() -> None:
    assert arrow_uri("s3a://bucket/lake/gold/corpus") == "s3://bucket/lake/gold/corpus"
    assert arrow_uri("S3N://bucket/x") == "s3://bucket/x"
    for unchanged in ("s3://b/k", "gs://b/k", "abfss://c@acct.dfs.core.windows.net/k", "hdfs://nn/k",
                      "file:///tmp/x", "/tmp/s3a://x", "relative/s3a"):
        assert arrow_uri(unchanged) == unchanged


def test_s3a_paths_open_with_pyarrows_s3_filesystem() -> None:
    from pyarrow import fs as pafs

    # Constructing the filesystem touches no network (region/credentials come from the AWS chain).
    filesystem, inner = arrow_filesystem("s3a://bucket/lake/_runs/r1/ingest.summary.json")
    assert isinstance(filesystem, pafs.S3FileSystem) and inner == "bucket/lake/_runs/r1/ingest.summary.json"
    local, path = arrow_filesystem("relative/dir")
    assert isinstance(local, pafs.LocalFileSystem) and path == str(Path("relative/dir").resolve())


def test_run_summary_under_an_s3a_lake_root_is_written_through_s3(tmp_path: Path, monkeypatch) -> None:
    from pyarrow import fs as pafs

    import jzlake.runs as runs

    settings = make_settings(tmp_path, lake={"root": "s3a://bucket/lake"})
    assert settings.runs_dir == "s3a://bucket/lake/_runs"
    opened: list[tuple[type, str]] = []
    bucket = tmp_path / "bucket-standin"
    bucket.mkdir()

    def spy(path: str):  # the real resolution, then a local folder stands in for the bucket
        filesystem, inner = arrow_filesystem(path)
        opened.append((type(filesystem), inner))
        return pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()), inner

    monkeypatch.setattr(runs, "arrow_filesystem", spy)
    path = write_stage_summary(settings, "manual__1", "ingest", {"ingested": 3})
    assert path == "s3a://bucket/lake/_runs/manual__1/ingest.summary.json"
    assert opened == [(pafs.S3FileSystem, "bucket/lake/_runs/manual__1/ingest.summary.json")]
    assert read_stage_summary(settings, "manual__1", "ingest") == {"ingested": 3}
    assert (bucket / "bucket/lake/_runs/manual__1/ingest.summary.json").exists()


def test_stage_summaries_round_trip(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    run_id = "manual__2026-11-25T10:00:00+00:00"
    path = write_stage_summary(settings, run_id, "clean", {"kept": 3})
    assert safe_run_id(run_id) in path and ":" not in Path(path).name
    assert read_stage_summary(settings, run_id, "clean") == {"kept": 3}
    assert read_stage_summary(settings, run_id, "dedupe") is None


def test_tables_command_prints_json_last(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "jzlake.cli", "tables", "--json", "--lake-root", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["lake_root"] == str(tmp_path)
    assert summary["tables"]["gold.corpus"] == {"version": None, "rows": None,
                                                "uri": f"{tmp_path}/gold/corpus"}
