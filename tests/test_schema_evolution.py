"""A lake written by an earlier release keeps working: catalogued columns it lacks are added, and a
column whose type changed is refused with the fix, on both the ``deltalake`` and the Spark side."""

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


def test_deltalake_side_refuses_a_type_change_naming_table_column_types_and_fix(tmp_path: Path) -> None:
    from deltalake import DeltaTable, write_deltalake

    settings = make_settings(tmp_path)
    other = catalogue.table("gold.synthetic_dropped")
    uri = lake_io.table_uri(settings, other.full_name)
    bad = pa.schema([pa.field(f.name, pa.int64()) if f.name == "reason" else f for f in other.arrow_schema()])
    write_deltalake(uri, bad.empty_table())
    refusal = rf"gold.synthetic_dropped at .*{tmp_path}.* reason \(long in the lake, string catalogued\).*Rebuild"
    with pytest.raises(lake_io.LakeIOError, match=refusal):
        lake_io.ensure_table(settings, other.full_name)
    with pytest.raises(lake_io.LakeIOError, match=refusal):  # a write never reaches delta-rs
        lake_io.merge_rows(settings, other.full_name, [{"request_key": "k1", "reason": "too_long", "run_id": "r"}])
    assert DeltaTable(uri).version() == 0

    # A change inside a nested type is one too.
    documents = catalogue.table("silver.documents")
    nested = pa.schema([pa.field(f.name, pa.map_(pa.string(), pa.int64())) if f.name == "metrics" else f
                        for f in documents.arrow_schema()])
    write_deltalake(lake_io.table_uri(settings, documents.full_name), nested.empty_table())
    refusal = r"metrics \(map<string,long> in the lake, map<string,double> catalogued"
    with pytest.raises(lake_io.LakeIOError, match=refusal):
        lake_io.ensure_table(settings, documents.full_name)


def test_the_request_ledger_refuses_a_type_change_the_same_way(tmp_path: Path) -> None:
    from deltalake import write_deltalake

    from models.generation.ledger import Ledger

    settings = make_settings(tmp_path)
    ledger = catalogue.table("gold.kd_requests")
    older_ledger = pa.schema([pa.field(f.name, pa.int32()) if f.name == "prompt_tokens" else f
                              for f in ledger.arrow_schema()])
    uri = lake_io.table_uri(settings, ledger.full_name)
    write_deltalake(uri, older_ledger.empty_table(), partition_by=list(ledger.partition_by) or None)
    refusal = r"gold.kd_requests .*prompt_tokens \(integer in the lake, long catalogued\)"
    with pytest.raises(lake_io.LakeIOError, match=refusal):
        Ledger(uri, ledger).ensure_table()


def test_nullability_alone_is_not_a_type_change(tmp_path: Path) -> None:
    from deltalake import write_deltalake

    settings = make_settings(tmp_path)
    strict = pa.schema([f.with_nullable(False) if f.name in TABLE.merge_keys else f for f in TABLE.arrow_schema()])
    write_deltalake(lake_io.table_uri(settings, TABLE.full_name), strict.empty_table())
    assert lake_io.column_type_changes(lake_io.ensure_table(settings, TABLE.full_name), TABLE) == []


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
