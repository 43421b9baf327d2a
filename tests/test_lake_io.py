"""The GPU-job I/O contract (models/lake_io): pinned reads, staged shards, idempotent MERGE."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from models import lake_io
from tests.conftest import make_settings

SCORES = "gold.influence_scores"


def rows(ids: list[str], score: float = 1.0, run_id: str = "r1") -> list[dict]:
    return [{"doc_id": d, "score": score, "subtask_scores": {"gsm8k": score, "math/Algebra": -score},
             "checkpoints": ["epoch-1"], "run_id": run_id} for d in ids]


def test_retried_shard_never_duplicates_rows_and_a_noop_commit_keeps_the_version(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    lake_io.stage_shard(settings, SCORES, "r1", 0, 2, rows(["a", "b"]))
    with pytest.raises(lake_io.LakeIOError, match=r"staged 1/2 shards.*shard-00001-of-00002"):
        lake_io.commit_staged(settings, SCORES, "r1", num_shards=2)
    lake_io.stage_shard(settings, SCORES, "r1", 1, 2, rows(["c"]))
    lake_io.stage_shard(settings, SCORES, "r1", 1, 2, rows(["c"]))  # the retry overwrites its own file

    first = lake_io.commit_staged(settings, SCORES, "r1", num_shards=2)
    assert (first["inserted"], first["rows"], first["committed"]) == (3, 3, True)
    second = lake_io.commit_staged(settings, SCORES, "r1", num_shards=2)
    assert second["committed"] is False and second["version"] == first["version"] and second["unchanged"] == 3
    table, version = lake_io.read_table_at(settings, SCORES)
    assert version == first["version"] and sorted(table.column("doc_id").to_pylist()) == ["a", "b", "c"]
    assert dict(table.to_pylist()[0]["subtask_scores"]) == {"gsm8k": 1.0, "math/Algebra": -1.0}


def test_merge_updates_only_changed_rows_and_reads_pin_versions(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    v1 = lake_io.merge_rows(settings, SCORES, rows(["a", "b"]))["version"]
    result = lake_io.merge_rows(settings, SCORES, rows(["a"], score=2.0) + rows(["b"]) + rows(["c"]))
    assert (result["inserted"], result["updated"], result["unchanged"]) == (1, 1, 1)
    old, version = lake_io.read_table_at(settings, SCORES, v1)
    assert version == v1 and sorted(old.column("score").to_pylist()) == [1.0, 1.0]
    latest, _ = lake_io.read_table_at(settings, SCORES)
    assert {r["doc_id"]: r["score"] for r in latest.to_pylist()} == {"a": 2.0, "b": 1.0, "c": 1.0}
    # Same keys in another run are other rows (merge keys are run_id + doc_id).
    assert lake_io.merge_rows(settings, SCORES, rows(["a"], run_id="r2"))["inserted"] == 1


def test_delete_missing_makes_the_table_hold_exactly_the_rows(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    selected = [{"doc_id": d, "rank": i} for i, d in enumerate(["x", "y", "z"], start=1)]
    lake_io.merge_rows(settings, "gold.selected_texts", selected, delete_missing=True)
    result = lake_io.merge_rows(settings, "gold.selected_texts", selected[:1], delete_missing=True)
    assert (result["deleted"], result["unchanged"]) == (2, 1)
    again = lake_io.merge_rows(settings, "gold.selected_texts", selected[:1], delete_missing=True)
    assert again["committed"] is False and again["version"] == result["version"]
    assert lake_io.read_table_at(settings, "gold.selected_texts")[0].column("doc_id").to_pylist() == ["x"]


def test_contract_errors_name_the_table_and_the_fix(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(lake_io.LakeIOError, match=r"gold.corpus does not exist.*jzlake curate"):
        lake_io.read_table_at(settings, "gold.corpus")
    with pytest.raises(lake_io.LakeIOError, match="does not define"):
        lake_io.conform(SCORES, [{"doc_id": "a", "run_id": "r", "colour": "red"}])
    with pytest.raises(lake_io.LakeIOError, match="repeat the merge key"):
        lake_io.merge_rows(settings, SCORES, rows(["a", "a"]))
    with pytest.raises(lake_io.LakeIOError, match="null merge key"):
        lake_io.merge_rows(settings, SCORES, [{"doc_id": "a", "run_id": None}])
    table = lake_io.conform(SCORES, pa.table({"doc_id": ["a"], "run_id": ["r"]}))
    assert table.schema == lake_io.catalogue.table(SCORES).arrow_schema()  # missing columns → typed nulls
