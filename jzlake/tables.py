"""``jzlake tables``: every catalogued table with its Delta version and row count.

Reads Delta logs with the ``deltalake`` package (no JVM), so it answers in a second.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jzlake import catalogue
from jzlake.settings import Settings
from jzlake.uris import arrow_uri, delta_dataset


def describe_table(table: catalogue.Table, settings: Settings) -> dict[str, Any]:
    """``{"version": v, "rows": n}`` for an existing table, ``None`` values when absent."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:  # delta-rs wants s3:// where Spark's lake root says s3a://
        delta = DeltaTable(arrow_uri(table.uri(settings)))
    except TableNotFoundError:
        return {"version": None, "rows": None, "uri": table.uri(settings)}
    rows = delta_dataset(delta).count_rows()
    return {"version": delta.version(), "rows": rows, "uri": table.uri(settings)}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    tables = {t.full_name: describe_table(t, settings) for t in catalogue.all_tables()}
    if not args.json:
        for name, info in tables.items():
            version = "-" if info["version"] is None else info["version"]
            rows = "-" if info["rows"] is None else info["rows"]
            print(f"{name:32} version {version!s:>5}  rows {rows!s:>9}", file=sys.stderr)
    return {"lake_root": settings.lake_root, "tables": tables}
