"""Shared fixtures: one Spark session per test process (JVM start is the slow part), a fresh
lake root per test, and the embedded sample's paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jzlake.settings import Settings, load_settings
from tests.airflow_env import isolate_airflow_home

# Before anything imports Airflow: in-process DAG parsing must never touch ~/airflow.
isolate_airflow_home()

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED_DATA = REPO.parent / "shared" / "data"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Default settings with the lake (and run reports) under ``tmp_path``."""
    base: dict[str, Any] = {"lake": {"root": str(tmp_path / "lake"), "runs_dir": str(tmp_path / "runs")}}
    for key, value in overrides.items():
        base[key] = value
    return load_settings(overrides=base, environ={})


def copy_lake(settings: Settings, destination: Path) -> Settings:
    """``settings`` with its lake (and run reports) copied under ``destination``.

    For test modules that build one lake (slow: Spark jobs) and give each test a private copy, so a
    test that writes to it cannot change what another sees, whatever the order. Delta logs hold
    relative file paths, so the copy is a complete table set.
    """
    import shutil

    shutil.copytree(settings.lake_root, destination / "lake")
    update = {"root": str(destination / "lake")}
    if settings.lake.runs_dir:  # else the reports live in the lake, copied with it
        if Path(settings.runs_dir).is_dir():
            shutil.copytree(settings.runs_dir, destination / "runs")
        update["runs_dir"] = str(destination / "runs")
    return settings.model_copy(update={"lake": settings.lake.model_copy(update=update)})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from spark_jobs.session import get_spark

    session = get_spark(load_settings(environ={}), app_name="jzlake-tests")
    yield session
    session.stop()
