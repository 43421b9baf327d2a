"""Lake I/O for GPU jobs: the contract every job under ``models/`` follows (no JVM, no Spark).

GPU jobs run on machines without Java (a CUDA pod, a laptop, a CI runner), sharded, and are
retried by Airflow. So they read and write Delta tables with the ``deltalake`` package (delta-rs)
and obey four rules that make a retry or a rerun change nothing:

1. **Catalogue only.** A job names tables by ``layer.name``; the location is
   ``catalogue.table(name).uri(settings)`` and the schema ``arrow_schema()``. No path is spelled.
2. **Pinned inputs.** A job reads each input at one Delta version (``read_table_at``), resolved
   once per run by its first step and recorded in the run's manifest, so every shard and every
   retry sees the same rows even while upstream jobs commit. Output rows carry that version.
3. **Stage per shard, commit once.** A shard never writes a table. It writes its rows to one
   Parquet file per (run, table, shard) under the staging folder (``stage_shard``; default
   ``<lake root>/_staging/<run_id>/<layer.name>/shard-00003-of-00008.parquet``, replaced
   atomically), so a retried shard overwrites its own file and can never add rows twice. A
   single commit step (``commit_staged``) checks that every shard staged, then MERGEs all
   staged rows into the table on the catalogue's merge keys.
4. **MERGE, and only what changed.** ``merge_rows`` inserts new keys and updates keys whose
   values differ; rows identical to the table's are not written, and when nothing differs no
   commit happens at all: rerunning a finished run leaves the table at the same version.
   Rows carry lineage (``run_id``, input version); content-addressed run ids (a hash of config,
   model and input versions) make a recomputation produce byte-identical rows.

A table that does not exist yet is created from the catalogue schema (with its partitioning) on
first write. Object stores work through the URI (``s3://``, ``abfss://``, ``gs://``) with the
usual credential environment variables, as for Spark.

Typical job::

    corpus, version = lake_io.read_table_at(settings, "gold.corpus", manifest.get("version"))
    rows = score(corpus)                                          # pyarrow.Table, catalogue columns
    lake_io.stage_shard(settings, "gold.influence_scores", run_id, shard_index, num_shards, rows)
    ...                                                           # later, once, in the commit step
    lake_io.commit_staged(settings, "gold.influence_scores", run_id, num_shards)
"""

from __future__ import annotations

import math
import posixpath
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.settings import Settings
from jzlake.uris import arrow_filesystem, arrow_uri, delta_dataset, delta_table

if TYPE_CHECKING:
    import pyarrow as pa
    from deltalake import DeltaTable


class LakeIOError(RuntimeError):
    """A lake read/write that cannot proceed; the message says which table, why, and the fix."""


# ---- locations ----------------------------------------------------------------------------------

def table_uri(settings: Settings, full_name: str) -> str:
    """Where ``full_name`` lives (``file://`` stripped: delta-rs takes plain local paths)."""
    return arrow_uri(catalogue.table(full_name).uri(settings)).removeprefix("file://")


def staging_root(settings: Settings) -> str:
    """Root of per-shard staged outputs (``settings.gpu.staging_dir`` or ``<lake root>/_staging``)."""
    if settings.gpu.staging_dir:
        return arrow_uri(settings.path(settings.gpu.staging_dir)).removeprefix("file://")
    return arrow_uri(f"{settings.lake_root.rstrip('/')}/_staging").removeprefix("file://")


def shard_file_name(shard_index: int, num_shards: int) -> str:
    return f"shard-{shard_index:05d}-of-{num_shards:05d}.parquet"


def staged_dir(settings: Settings, full_name: str, run_id: str) -> str:
    catalogue.table(full_name)  # unknown names fail here, listing the known ones
    return posixpath.join(staging_root(settings), run_id, full_name)


def _filesystem(path: str) -> tuple[Any, str]:
    return arrow_filesystem(path)


# ---- reading ------------------------------------------------------------------------------------

def current_version(settings: Settings, full_name: str) -> int | None:
    """The table's latest Delta version, or ``None`` when it does not exist yet."""
    from deltalake import DeltaTable

    uri = table_uri(settings, full_name)
    if not DeltaTable.is_deltatable(uri):
        return None
    return DeltaTable(uri).version()


def read_table_at(settings: Settings, full_name: str, version: int | None = None,
                  columns: Sequence[str] | None = None, row_filter: Any = None) -> tuple[pa.Table, int]:
    """The table's rows at ``version`` (latest when ``None``) and the version actually read;
    ``row_filter`` (a pyarrow dataset expression) is pushed down to the file scan."""
    from deltalake import DeltaTable

    uri = table_uri(settings, full_name)
    if not DeltaTable.is_deltatable(uri):
        raise LakeIOError(f"table {full_name} does not exist at {uri}: run the stage that writes it "
                          "first (gold.corpus: `jzlake curate`), or point --lake-root at the right lake")
    try:
        table = DeltaTable(uri, version=version)
    except Exception as exc:  # delta-rs raises its own error types per cause
        raise LakeIOError(f"cannot open {full_name} at version {version} ({uri}): {exc}; versions "
                          "removed by VACUUM cannot be read — rerun with the current version") from exc
    return delta_table(table, list(columns) if columns else None, row_filter), table.version()


# ---- schema -------------------------------------------------------------------------------------

def conform(full_name: str, rows: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows in the catalogue's column order and types; missing columns become nulls.

    A column the catalogue does not know is an error (it would be silently dropped otherwise).
    """
    import pyarrow as pa

    spec = catalogue.table(full_name)
    schema = spec.arrow_schema()
    if not isinstance(rows, pa.Table):
        records = list(rows)
        names = list(dict.fromkeys(k for record in records for k in record))
        unknown = [c for c in names if c not in schema.names]
        if not unknown:  # with the schema: dicts become maps (not structs), missing keys nulls
            return pa.Table.from_pylist(records, schema=schema)
    else:
        unknown = [c for c in rows.column_names if c not in schema.names]
    if unknown:
        raise LakeIOError(f"rows for {full_name} have columns {unknown} that the catalogue does not "
                          f"define (known: {schema.names}); add them to jzlake/catalogue.py or drop them")
    arrays = []
    for field in schema:
        if field.name in rows.column_names:
            arrays.append(rows.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(rows.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _type_name(delta_type: Any) -> str:
    """A Delta type (its JSON form) as ``long``, ``array<string>``, ``map<string,double>``,
    ``struct<a:long>``: nullability left out, so only a change of type tells two apart."""
    if isinstance(delta_type, str):
        return delta_type
    kind = delta_type["type"]
    if kind == "array":
        return f"array<{_type_name(delta_type['elementType'])}>"
    if kind == "map":
        return f"map<{_type_name(delta_type['keyType'])},{_type_name(delta_type['valueType'])}>"
    fields = ",".join(f"{f['name']}:{_type_name(f['type'])}" for f in delta_type["fields"])
    return f"struct<{fields}>"


def column_type_changes(table: DeltaTable, spec: catalogue.Table) -> list[tuple[str, str, str]]:
    """``(column, type in the lake, catalogued type)`` for each column whose type differs."""
    import json

    from deltalake import Schema

    def types(schema: Any) -> dict[str, str]:
        return {f["name"]: _type_name(f["type"]) for f in json.loads(schema.to_json())["fields"]}

    present, wanted = types(table.schema()), types(Schema.from_arrow(spec.arrow_schema()))
    return [(name, present[name], kind) for name, kind in wanted.items() if name in present and present[name] != kind]


def check_column_types(table: DeltaTable, spec: catalogue.Table) -> None:
    """Refuse a table whose columns have another type than the catalogue's (as the Spark side's
    ``spark_jobs.session.evolve_schema`` does): evolution is additive only, and a write would
    otherwise fail deep inside delta-rs or cast silently."""
    changed = column_type_changes(table, spec)
    if changed:
        columns = ", ".join(f"{name} ({lake} in the lake, {kind} catalogued)" for name, lake, kind in changed)
        raise LakeIOError(f"{spec.full_name} at {table.table_uri} has columns of another type: {columns}. "
                          "Rebuild the table (drop its folder and rerun the stage that writes it).")


def add_missing_columns(table: DeltaTable, spec: catalogue.Table) -> list[str]:
    """Add the catalogued columns ``table`` lacks (rows written before read null): a lake written by
    an earlier release keeps working. Safe against a concurrent adder. A column whose type differs
    from the catalogue's is refused first (``check_column_types``)."""
    from deltalake.schema import Field

    check_column_types(table, spec)
    present = {f.name for f in table.schema().fields}
    wanted = spec.arrow_schema()
    missing = [wanted.field(name) for name in wanted.names if name not in present]
    if missing:
        try:
            table.alter.add_columns([Field.from_arrow(f) for f in missing])
        except Exception:  # another process added them first
            table.update_incremental()
            present = {f.name for f in table.schema().fields}
            if any(f.name not in present for f in missing):
                raise
    return [f.name for f in missing]


def ensure_table(settings: Settings, full_name: str) -> DeltaTable:
    """The Delta table, created empty from the catalogue schema when missing."""
    from deltalake import DeltaTable

    spec = catalogue.table(full_name)
    uri = table_uri(settings, full_name)
    if DeltaTable.is_deltatable(uri):
        table = DeltaTable(uri)
        add_missing_columns(table, spec)
        return table
    return DeltaTable.create(uri, spec.arrow_schema(), mode="ignore",
                             partition_by=list(spec.partition_by) or None,
                             name=full_name, description=spec.description)


# ---- comparing rows -----------------------------------------------------------------------------

def _normal(value: Any) -> Any:
    """A comparable form of one cell: maps (lists of pairs) sorted, NaN equal to NaN."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, list):
        items = [_normal(v) for v in value]
        if items and all(isinstance(v, tuple) and len(v) == 2 for v in items):
            return tuple(sorted(items, key=repr))
        return tuple(items)
    if isinstance(value, tuple):
        return tuple(_normal(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _normal(v)) for k, v in value.items()))
    return value


def _keyed(rows: pa.Table, keys: Sequence[str]) -> dict[tuple, tuple]:
    names = rows.column_names
    out: dict[tuple, tuple] = {}
    for row in rows.to_pylist():
        out[tuple(row[k] for k in keys)] = tuple(_normal(row[n]) for n in names)
    return out


def _existing_rows(table: DeltaTable, keys: Sequence[str], source: pa.Table) -> pa.Table:
    """Target rows whose first key occurs in ``source`` (a superset of the matching rows).

    Filtered batch by batch in memory: a pushed-down dataset filter trips over delta-rs files
    whose statistics are ``string_view`` (pyarrow has no string/string_view comparison kernel).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    values = source.column(keys[0]).unique()
    dataset = delta_dataset(table)
    schema = dataset.schema
    parts = []
    for batch in dataset.to_batches():
        column = batch.column(keys[0]).cast(values.type)
        mask = pc.is_in(column, value_set=values)
        if pc.any(mask).as_py():
            parts.append(pa.Table.from_batches([batch.filter(mask)]))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _check_keys(full_name: str, rows: pa.Table, keys: Sequence[str]) -> None:
    for key in keys:
        nulls = rows.column(key).null_count
        if nulls:
            raise LakeIOError(f"{nulls} row(s) for {full_name} have a null merge key {key!r}; every row "
                              f"needs {list(keys)} (fix the producing job)")
    seen: set[tuple] = set()
    for row in rows.select(list(keys)).to_pylist():
        key = tuple(row[k] for k in keys)
        if key in seen:
            raise LakeIOError(f"rows for {full_name} repeat the merge key {dict(zip(keys, key, strict=True))}; "
                              "a MERGE needs one source row per key (deduplicate before writing)")
        seen.add(key)


# ---- writing ------------------------------------------------------------------------------------

def merge_rows(settings: Settings, full_name: str, rows: pa.Table | Sequence[Mapping[str, Any]], *,
               delete_missing: bool = False) -> dict[str, Any]:
    """MERGE ``rows`` into the table on its catalogue keys: insert new keys, update changed rows.

    Rows equal to the table's are left alone and, when nothing differs, nothing is committed.
    ``delete_missing=True`` makes the table's content exactly ``rows`` (target rows whose key is
    not in ``rows`` are deleted in the same commit) — for tables that hold "the current" set.
    Returns ``{"table", "version", "committed", "inserted", "updated", "deleted", "unchanged"}``.
    """
    spec = catalogue.table(full_name)
    keys = list(spec.merge_keys)
    source = conform(full_name, rows)
    _check_keys(full_name, source, keys)
    target = ensure_table(settings, full_name)

    existing = _keyed(_existing_rows(target, keys, source), keys) if source.num_rows else {}
    incoming = _keyed(source, keys)
    new = [k for k in incoming if k not in existing]
    changed = [k for k in incoming if k in existing and existing[k] != incoming[k]]
    deleted = 0
    if delete_missing:
        all_keys = delta_table(target, keys).to_pylist()
        deleted = sum(1 for row in all_keys if tuple(row[k] for k in keys) not in incoming)
    result = {"table": full_name, "inserted": len(new), "updated": len(changed), "deleted": deleted,
              "unchanged": len(incoming) - len(new) - len(changed)}
    if not new and not changed and not deleted:
        return {**result, "version": target.version(), "committed": False}

    predicate = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    if delete_missing:
        # The whole source takes part: "not matched by source" is relative to it.
        merger = target.merge(source, predicate, source_alias="s", target_alias="t")
        merger = merger.when_matched_update_all().when_not_matched_insert_all()
        merger = merger.when_not_matched_by_source_delete()
    else:
        import pyarrow as pa

        wanted = set(new) | set(changed)
        mask = [tuple(row[k] for k in keys) in wanted for row in source.select(keys).to_pylist()]
        merger = target.merge(source.filter(pa.array(mask)), predicate, source_alias="s", target_alias="t")
        merger = merger.when_matched_update_all().when_not_matched_insert_all()
    merger.execute()
    target.update_incremental()
    return {**result, "version": target.version(), "committed": True}


def stage_shard(settings: Settings, full_name: str, run_id: str, shard_index: int, num_shards: int,
                rows: pa.Table | Sequence[Mapping[str, Any]]) -> str:
    """Write one shard's rows for ``full_name`` to its staging file (atomically replaced).

    An empty shard still stages an (empty) file: the commit step tells "no rows" from "not run".
    """
    import pyarrow.parquet as pq

    if not 0 <= shard_index < num_shards:
        raise LakeIOError(f"shard index {shard_index} is outside 0..{num_shards - 1} for {full_name}")
    table = conform(full_name, rows)
    directory = staged_dir(settings, full_name, run_id)
    filesystem, path = _filesystem(directory)
    filesystem.create_dir(path, recursive=True)
    final = posixpath.join(path, shard_file_name(shard_index, num_shards))
    temporary = posixpath.join(path, f".tmp-{uuid.uuid4().hex}.parquet")
    pq.write_table(table, temporary, filesystem=filesystem)
    filesystem.move(temporary, final)  # rename: a reader sees the old file or the new one
    return final


def staged_files(settings: Settings, full_name: str, run_id: str) -> list[str]:
    """The staged shard files of a run for one table, sorted by shard."""
    from pyarrow import fs

    filesystem, path = _filesystem(staged_dir(settings, full_name, run_id))
    infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos
                  if i.type == fs.FileType.File and posixpath.basename(i.path).startswith("shard-"))


def read_staged(settings: Settings, full_name: str, run_id: str,
                num_shards: int | None = None) -> pa.Table:
    """All staged rows of a run for ``full_name``; with ``num_shards``, every shard must be there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = staged_files(settings, full_name, run_id)
    if num_shards is not None:
        expected = {shard_file_name(i, num_shards) for i in range(num_shards)}
        present = {posixpath.basename(f) for f in files}
        missing = sorted(expected - present)
        if missing:
            raise LakeIOError(f"run {run_id} staged {len(expected) - len(missing)}/{num_shards} shards of "
                              f"{full_name}; missing {missing}: run those shards before the commit step")
        files = [f for f in files if posixpath.basename(f) in expected]
    if not files:
        raise LakeIOError(f"run {run_id} staged nothing for {full_name} under "
                          f"{staged_dir(settings, full_name, run_id)}: run the shards first")
    filesystem, _ = _filesystem(files[0])
    schema = catalogue.table(full_name).arrow_schema()
    return pa.concat_tables([pq.read_table(f, filesystem=filesystem, schema=schema) for f in files])


def commit_staged(settings: Settings, full_name: str, run_id: str, num_shards: int | None = None,
                  *, delete_missing: bool = False) -> dict[str, Any]:
    """MERGE every staged shard of ``run_id`` into ``full_name`` (one commit, or none if unchanged)."""
    rows = read_staged(settings, full_name, run_id, num_shards)
    return {**merge_rows(settings, full_name, rows, delete_missing=delete_missing), "rows": rows.num_rows}


def clear_staged(settings: Settings, run_id: str, tables: Iterable[str] | None = None) -> None:
    """Remove a committed run's staged files (optional: keeping them costs only disk)."""
    names = list(tables) if tables is not None else [None]
    for name in names:
        target = (staged_dir(settings, name, run_id) if name
                  else posixpath.join(staging_root(settings), run_id))
        filesystem, path = _filesystem(target)
        filesystem.delete_dir_contents(path, missing_dir_ok=True)
