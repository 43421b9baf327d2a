"""Asset events carry the Delta version written; a consumer run reads exactly that version.

Unit level with Airflow's own context objects (the Task SDK's ``OutletEventAccessors`` a producer
writes into, the ``TriggeringAssetEventsAccessor`` a consumer's context holds) over a real Delta
table written with ``models.lake_io`` — no scheduler, no Spark."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jzlake.settings import Settings
from models import lake_io
from plugins.assets import pinned_arguments, pinned_version, record_outlet_versions, table_asset
from tests.conftest import make_settings

CORPUS = "gold.corpus"


def corpus_rows(ids: range) -> list[dict[str, Any]]:
    return [{"doc_id": f"d{i}", "source": "s", "text": f"text {i}", "n_words": 2, "run_id": "r"} for i in ids]


def produce(settings: Settings, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a producing task does after its job: record the outlet's version in its asset event."""
    from airflow.sdk.execution_time.context import OutletEventAccessors

    asset = table_asset(CORPUS, settings)
    outlet_events = OutletEventAccessors()
    record_outlet_versions({"outlet_events": outlet_events}, [asset], summary, job="decontaminate", run_id="run-1")
    return dict(outlet_events[asset].extra)


def consumer_context(settings: Settings, *extras: dict[str, Any]) -> dict[str, Any]:
    """A consumer DAG run's context whose triggering events carry ``extras`` (oldest first)."""
    from airflow.sdk.api.datamodels._generated import AssetReferenceAssetEventDagRun
    from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    asset = table_asset(CORPUS, settings)
    start = datetime(2026, 12, 1, tzinfo=UTC)
    events = [AssetEventDagRunReferenceResult(
        asset=AssetReferenceAssetEventDagRun(name=asset.name, uri=asset.uri, extra={}), extra=extra,
        source_task_id="decontaminate", source_dag_id="corpus_curation", source_run_id=f"run-{i}",
        source_map_index=-1, source_aliases=[], timestamp=start + timedelta(hours=i),
    ) for i, extra in enumerate(extras)]
    return {"triggering_asset_events": TriggeringAssetEventsAccessor.build(events)}


@pytest.fixture
def lake(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path)
    lake_io.merge_rows(settings, CORPUS, corpus_rows(range(3)))  # 3 rows at version V (create + MERGE)
    return settings


def version(settings: Settings) -> int:
    return int(lake_io.current_version(settings, CORPUS))


def test_event_records_the_version_and_rows_written(lake: Settings) -> None:
    extra = produce(lake)
    assert extra == {"job": "decontaminate", "run_id": "run-1", "table": CORPUS, "version": version(lake),
                     "rows": 3}


def test_consumer_reads_the_event_version_after_a_newer_write(lake: Settings) -> None:
    from models.influence.cli import configure

    written = version(lake)
    extra = produce(lake)
    lake_io.merge_rows(lake, CORPUS, corpus_rows(range(3, 8)))  # a newer write lands: 8 rows
    assert version(lake) == written + 1

    context = consumer_context(lake, extra)
    arguments = pinned_arguments({"--input-version": CORPUS}, context, lake)
    assert arguments == ["--input-version", str(written)]
    # the influence job's own parser and its pinned read (models/influence/job.py: prepare)
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--phase", "prepare", *arguments])
    rows, read = lake_io.read_table_at(lake, CORPUS, args.input_version, columns=["doc_id"])
    assert read == written and sorted(rows.column("doc_id").to_pylist()) == ["d0", "d1", "d2"]


def test_gpu_job_spec_gets_the_pin_from_the_event(lake: Settings) -> None:
    from plugins.gpu_job import GpuJobSpec

    written = version(lake)
    extra = produce(lake)
    lake_io.merge_rows(lake, CORPUS, corpus_rows(range(3, 5)))
    spec = GpuJobSpec(name="influence-prepare", module="models.influence", args=["--phase", "prepare"],
                      pins={"--input-version": CORPUS})
    pinned = spec.pinned(consumer_context(lake, extra), lake)
    assert pinned.command("python")[-2:] == ["--input-version", str(written)]
    # a manual run (no triggering event) adds no flag: the job reads the latest and records it
    assert spec.pinned({"triggering_asset_events": None}, lake).args == ["--phase", "prepare"]


def test_newest_triggering_event_wins_and_unversioned_events_are_ignored(lake: Settings) -> None:
    first = produce(lake)
    lake_io.merge_rows(lake, CORPUS, corpus_rows(range(3, 5)))
    second = produce(lake)
    assert second["version"] == first["version"] + 1 == version(lake)
    asset = table_asset(CORPUS, lake)
    events = consumer_context(lake, first, second)["triggering_asset_events"]
    assert pinned_version(events, asset) == second["version"]
    by_hand = {"note": "asset event created in the UI"}
    assert pinned_version(consumer_context(lake, first, by_hand)["triggering_asset_events"], asset) == first["version"]
    assert pinned_version(consumer_context(lake, by_hand)["triggering_asset_events"], asset) is None
    other = table_asset("gold.selected_texts", lake)
    assert pinned_version(events, other) is None


def test_the_version_a_job_reports_wins_over_a_later_write(lake: Settings) -> None:
    """A job that reports its commit (``summary["tables"][name]["version"]``) is recorded at that
    version even when another writer committed before the task annotated its event."""
    written = version(lake)
    lake_io.merge_rows(lake, CORPUS, corpus_rows(range(3, 6)))  # someone else's later write
    extra = produce(lake, summary={"tables": {CORPUS: {"version": written}}})
    assert (extra["version"], extra["rows"]) == (written, 3)


def test_missing_table_is_recorded_without_a_version(tmp_path: Path) -> None:
    extra = produce(make_settings(tmp_path))
    assert extra["version"] is None and extra["table"] == CORPUS
