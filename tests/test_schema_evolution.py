"""A lake written by an earlier release keeps working: catalogued columns it lacks are added."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from jzlake import catalogue
from models import lake_io
from tests.conftest import make_settings

TABLE = catalogue.table("gold.synthetic_problems")
NEW_COLUMN = "synthesis_run_id"


def older(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f for f in schema if f.name != NEW_COLUMN])


def test_deltalake_side_adds_missing_columns(tmp_path: Path) -> None:
    from deltalake import DeltaTable, write_deltalake

    settings = make_settings(tmp_path)
    uri = lake_io.table_uri(settings, TABLE.full_name)
    old_schema = older(TABLE.arrow_schema())
    row = pa.Table.from_pylist([{"request_key": "k1", "run_id": "r0"}], schema=old_schema)
    write_deltalake(uri, row)
    lake_io.ensure_table(settings, TABLE.full_name)
    rows = DeltaTable(uri).to_pyarrow_table().to_pylist()
    assert rows == [{**{name: None for name in TABLE.arrow_schema().names}, "request_key": "k1", "run_id": "r0"}]
    assert lake_io.add_missing_columns(DeltaTable(uri), TABLE) == []  # idempotent


@pytest.mark.spark
def test_spark_side_adds_missing_columns_and_refuses_a_type_change(spark, tmp_path: Path) -> None:
    from pyspark.sql import types as T

    from spark_jobs.session import ensure_table, evolve_schema, read_table

    settings = make_settings(tmp_path)
    uri = TABLE.uri(settings)
    old = T.StructType([f for f in TABLE.spark_schema().fields if f.name != NEW_COLUMN])
    spark.createDataFrame([{"request_key": "k1", "run_id": "r0"}], old).write.format("delta").save(uri)
    ensure_table(spark, TABLE, settings)
    rows = read_table(spark, TABLE, settings).collect()
    assert [(r["request_key"], r[NEW_COLUMN]) for r in rows] == [("k1", None)]
    assert evolve_schema(spark, TABLE, settings) == []  # nothing left to add

    other = catalogue.table("gold.synthetic_dropped")
    bad = T.StructType([T.StructField(f.name, T.LongType() if f.name == "reason" else f.dataType)
                        for f in other.spark_schema().fields])
    spark.createDataFrame([], bad).write.format("delta").save(other.uri(settings))
    with pytest.raises(RuntimeError, match=r"reason \(bigint in the lake, string catalogued\).*Rebuild"):
        ensure_table(spark, other, settings)
