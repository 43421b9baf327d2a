"""Data-quality gates (``plugins/quality.py``): the pure bound check, the numbers a stage summary
yields, and the gate over a real run folder and Delta table (no Spark, no scheduler)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jzlake.runs import write_stage_summary
from jzlake.settings import Bounds
from models import lake_io
from plugins.quality import (
    DataQualityError,
    check_bounds,
    check_stage,
    enforce_stage_quality,
    stage_metrics,
)
from tests.conftest import make_settings

DECONTAM = {"kept_fraction": Bounds(min=0.8), "rows.gold.corpus": Bounds(min=1, max=1000)}


def test_summary_numbers_and_kept_fraction() -> None:
    summary = {"input": 200, "kept": 150, "contaminated": 50, "rechecked_all": True, "by_benchmark": {"gsm8k": 50}}
    metrics = stage_metrics(summary, {"gold.corpus": 150, "gold.contamination": None})
    assert metrics == {"input": 200, "kept": 150, "contaminated": 50, "kept_fraction": 0.75,
                       "rows.gold.corpus": 150}  # booleans, dicts and unknown row counts are not metrics


def test_kept_fraction_is_unmeasured_when_nothing_came_in() -> None:
    metrics = stage_metrics({"input": 0, "kept": 0})
    result = check_bounds("decontaminate", metrics, {"kept_fraction": Bounds(min=0.8)})
    assert result.passed and result.unmeasured == ["kept_fraction"]


def test_in_bounds_passes() -> None:
    result = check_bounds("decontaminate", {"kept_fraction": 0.95, "rows.gold.corpus": 400.0}, DECONTAM)
    assert result.passed and result.metrics == {"kept_fraction": 0.95, "rows.gold.corpus": 400.0}


@pytest.mark.parametrize(("metrics", "expected"), [
    ({"input": 1000, "kept": 420, "kept_fraction": 0.42, "rows.gold.corpus": 420},
     ["kept_fraction = 0.42 (kept 420 of 1000) is below the minimum 0.8"]),
    ({"kept_fraction": 0.9, "rows.gold.corpus": 0}, ["rows.gold.corpus = 0 is below the minimum 1"]),
    ({"kept_fraction": 0.9, "rows.gold.corpus": 5000}, ["rows.gold.corpus = 5000 is above the maximum 1000"]),
])
def test_out_of_bounds_names_the_numbers(metrics: dict[str, float], expected: list[str]) -> None:
    result = check_bounds("decontaminate", metrics, DECONTAM)
    assert not result.passed and result.violations == expected


def test_bounds_are_inclusive() -> None:
    assert check_bounds("s", {"kept_fraction": 0.8}, {"kept_fraction": Bounds(min=0.8, max=0.8)}).passed


def corpus(settings, n: int) -> None:
    rows = [{"doc_id": f"d{i}", "source": "s", "text": "t", "n_words": 1, "run_id": "r"} for i in range(n)]
    lake_io.merge_rows(settings, "gold.corpus", rows)


def test_gate_reads_the_run_summary_and_the_table(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    corpus(settings, 3)
    write_stage_summary(settings, "run-1", "decontaminate", {"input": 10, "kept": 3, "contaminated": 7})

    result = check_stage(settings, "run-1", "decontaminate")

    assert result.metrics == {"kept_fraction": 0.3, "rows.gold.corpus": 3}
    with pytest.raises(DataQualityError, match=r"decontaminate failed for run run-1: kept_fraction = 0.3 "
                                               r"\(kept 3 of 10\) is below the minimum 0.8.*quality.stages"):
        enforce_stage_quality(settings, "run-1", "decontaminate", airflow=False)


def test_gate_fails_inside_airflow_without_retry(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    settings = make_settings(tmp_path)  # no gold.corpus table: rows unmeasured, kept fraction breaks
    write_stage_summary(settings, "run-1", "decontaminate", {"input": 10, "kept": 1})
    with pytest.raises(AirflowFailException, match=r"kept_fraction = 0\.1 "):
        enforce_stage_quality(settings, "run-1", "decontaminate")


def test_gate_without_a_summary_fails_closed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(DataQualityError, match="no decontaminate summary for run run-9"):
        enforce_stage_quality(settings, "run-9", "decontaminate", airflow=False)


def test_unconfigured_or_disabled_stages_are_not_checked(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert enforce_stage_quality(settings, "run-9", "clean", airflow=False) is None
    off = make_settings(tmp_path, quality={"enabled": False})
    assert enforce_stage_quality(off, "run-9", "decontaminate", airflow=False) is None


def test_passing_gate_returns_what_it_checked(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    corpus(settings, 9)
    write_stage_summary(settings, "run-2", "decontaminate", {"input": 10, "kept": 9, "contaminated": 1})
    checked = enforce_stage_quality(settings, "run-2", "decontaminate", airflow=False)
    assert checked == {"stage": "decontaminate", "passed": True, "metrics": {"kept_fraction": 0.9,
                                                                             "rows.gold.corpus": 9},
                       "violations": [], "unmeasured": []}
