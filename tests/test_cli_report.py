"""CLI wiring and the report's record accounting (pure, no Spark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jzlake.runs import read_stage_summary, safe_run_id, write_stage_summary
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
    result = reconcile(_stages())
    assert result["balanced"] and result["carried_from_earlier_runs"] == 0
    assert result["dropped"] == 20 and result["kept"] == 58


def test_reconcile_catches_a_lost_record() -> None:
    assert not reconcile(_stages(decontaminate={"kept": 57}))["balanced"]


def test_reconcile_counts_documents_rechecked_from_earlier_runs() -> None:
    # A changed benchmark set re-checks 40 earlier gold documents: still balanced, and said so.
    result = reconcile(_stages(decontaminate={"input": 100, "contaminated": 3, "kept": 97}))
    assert result["balanced"] and result["carried_from_earlier_runs"] == 40


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
