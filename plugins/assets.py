"""Airflow Assets for lake tables: one per catalogued table, named ``lake.<layer>.<name>``.

DAGs use these as outlets/schedules so a corpus refresh flows on to downstream pipelines.
The URI is the table's location (a local path becomes ``file://``), so the same DAG code works
for a local lake and an object store.

**Versions travel with the events.** A producing task records, in each outlet table's asset
event, the Delta version it wrote (``record_outlet_versions``: ``extra = {"table", "version",
"rows", "job", "run_id"}``). A consumer DAG run triggered by those events reads exactly that
version (``pinned_version`` / ``pinned_arguments``), not whatever is latest when its task
starts — so a newer write landing between the event and the read changes nothing, and a rerun of
the consumer run reads the same rows. A run with no triggering event (manual) reads the latest
version and records it in its own outputs' lineage, as the jobs always do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.settings import Settings, is_uri

if TYPE_CHECKING:
    from airflow.sdk import Asset

ASSET_PREFIX = "lake."
VERSION_KEY = "version"  # the asset event extra's key for the Delta version written


def table_asset_uri(full_name: str, settings: Settings) -> str:
    uri = catalogue.table(full_name).uri(settings)
    return uri if is_uri(uri) else f"file://{uri}"


def table_asset(full_name: str, settings: Settings) -> Asset:
    """The Asset for a catalogued table (``catalogue.table`` raises on unknown names)."""
    from airflow.sdk import Asset

    return Asset(name=f"{ASSET_PREFIX}{full_name}", uri=table_asset_uri(full_name, settings), group="delta-table")


def table_of(asset: Any) -> str | None:
    """``layer.name`` of a lake table Asset, ``None`` for any other outlet."""
    from airflow.sdk import Asset

    if isinstance(asset, Asset) and asset.name.startswith(ASSET_PREFIX):
        return asset.name[len(ASSET_PREFIX):]
    return None


# ---- producers: the version written goes into the event ------------------------------------------

def describe_delta(uri: str, version: int | None = None) -> dict[str, Any]:
    """Delta version and row count at ``uri`` (``file://`` or object store; the latest version, or
    ``version``), read without a JVM; both ``None`` when no table exists there."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from jzlake.uris import arrow_uri, delta_dataset

    try:
        table = DeltaTable(arrow_uri(uri).removeprefix("file://"), version=version)
    except TableNotFoundError:
        return {VERSION_KEY: None, "rows": None}
    return {VERSION_KEY: table.version(), "rows": delta_dataset(table).count_rows()}


def reported_version(summary: Mapping[str, Any] | None, full_name: str) -> int | None:
    """The version a job's summary says it wrote to ``full_name`` (``summary["tables"][name]["version"]``)."""
    tables = (summary or {}).get("tables")
    entry = tables.get(full_name) if isinstance(tables, Mapping) else None
    version = entry.get(VERSION_KEY) if isinstance(entry, Mapping) else None
    return int(version) if version is not None else None


def outlet_extra(asset: Asset, summary: Mapping[str, Any] | None = None, **lineage: Any) -> dict[str, Any]:
    """The event extra for one table outlet: the version the job reported writing, else the table's
    latest version right after the job finished; with the row count at that version."""
    full_name = table_of(asset)
    described = describe_delta(asset.uri, reported_version(summary, full_name or ""))
    extra = {**lineage, "table": full_name, **described}
    return json.loads(json.dumps(extra, default=str))  # events store JSON only


def record_outlet_versions(context: Mapping[str, Any], outlets: Iterable[Any],
                           summary: Mapping[str, Any] | None = None,
                           warn: Callable[..., None] | None = None, **lineage: Any) -> list[str]:
    """Put each lake table outlet's written version into its asset event (``outlet_events[asset].extra``).

    ``lineage`` (job, run id, ...) is added to every extra. A table that cannot be described is
    logged through ``warn`` and gets the lineage only (the finished job must not fail for it).
    Returns the tables whose version was recorded.
    """
    annotated = []
    for asset in outlets:
        if table_of(asset) is None:
            continue
        try:
            extra = outlet_extra(asset, summary, **lineage)
            annotated.append(table_of(asset))
        except Exception as exc:  # an unreadable log must not fail a finished job: lineage only
            if warn is not None:
                warn("could not describe %s at %s: %s", asset.name, asset.uri, exc)
            extra = json.loads(json.dumps({**lineage, "table": table_of(asset)}, default=str))
        context["outlet_events"][asset].extra.update(extra)
    return annotated


# ---- consumers: read the version in the triggering event ------------------------------------------

def pinned_version(triggering_asset_events: Mapping[Any, Any] | None, asset: Asset) -> int | None:
    """The version of ``asset`` this DAG run must read: the one in its newest triggering event.

    ``None`` when no event for the asset triggered the run (a manual run) or the events carry no
    version (an event made by hand in the UI); the job then reads the latest version.
    """
    if not triggering_asset_events:
        return None
    try:
        events = list(triggering_asset_events[asset])
    except KeyError:
        return None
    versioned = [(event.timestamp, event.extra[VERSION_KEY]) for event in events
                 if (event.extra or {}).get(VERSION_KEY) is not None]
    if not versioned:
        return None
    return int(max(versioned, key=lambda pair: pair[0])[1])


def pinned_arguments(pins: Mapping[str, str], context: Mapping[str, Any], settings: Settings) -> list[str]:
    """``[flag, version, ...]`` for each ``flag → table`` whose version a triggering event names
    (e.g. ``{"--input-version": "gold.corpus"}`` → ``["--input-version", "7"]``)."""
    events = context.get("triggering_asset_events")
    arguments: list[str] = []
    for flag, full_name in pins.items():
        version = pinned_version(events, table_asset(full_name, settings))
        if version is not None:
            arguments += [flag, str(version)]
    return arguments
