"""Airflow Assets for lake tables: one per catalogued table, named ``lake.<layer>.<name>``.

DAGs use these as outlets/schedules so a corpus refresh flows on to downstream pipelines.
The URI is the table's location (a local path becomes ``file://``), so the same DAG code works
for a local lake and an object store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jzlake import catalogue
from jzlake.settings import Settings, is_uri

if TYPE_CHECKING:
    from airflow.sdk import Asset


def table_asset_uri(full_name: str, settings: Settings) -> str:
    uri = catalogue.table(full_name).uri(settings)
    return uri if is_uri(uri) else f"file://{uri}"


def table_asset(full_name: str, settings: Settings) -> Asset:
    """The Asset for a catalogued table (``catalogue.table`` raises on unknown names)."""
    from airflow.sdk import Asset

    return Asset(name=f"lake.{full_name}", uri=table_asset_uri(full_name, settings), group="delta-table")
