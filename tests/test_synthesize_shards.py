"""Synthesis sharding: a shard reads only its documents' text; the commit keeps one row per key."""

from __future__ import annotations

from pathlib import Path

from models import lake_io
from models.synthesize import RAW, commit_raw, shard_documents, shard_of
from tests.conftest import make_settings


def test_shards_partition_the_corpus_and_honour_the_limit(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    docs = [{"doc_id": f"d{i:03d}", "source": "s", "text": f"text {i}", "run_id": "r"} for i in range(40)]
    version = lake_io.merge_rows(settings, "gold.corpus", docs)["version"]
    parts = [shard_documents(settings, version, shard, 3, None) for shard in range(3)]
    ids = [[d.doc_id for d in part] for part in parts]
    assert sorted(i for part in ids for i in part) == [d["doc_id"] for d in docs]  # disjoint, complete
    assert all(part == sorted(part) and all(shard_of(i, 3) == s for i in part) for s, part in enumerate(ids))
    assert {d.doc_id: d.text for part in parts for d in part}["d007"] == "text 7"
    assert [d.doc_id for d in shard_documents(settings, version, 1, 3, 2)] == ids[1][:2]


def test_commit_keeps_one_row_per_request_key_across_shards(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    row = {"request_key": "same-prompt", "problem": "p", "run_id": "run-1"}
    lake_io.stage_shard(settings, RAW, "run-1", 0, 2, [{**row, "doc_id": "b-twin", "shard_index": 0},
                                                      {**row, "request_key": "other", "doc_id": "c"}])
    lake_io.stage_shard(settings, RAW, "run-1", 1, 2, [{**row, "doc_id": "a-first", "shard_index": 1}])
    result = commit_raw(settings, "run-1", 2)
    assert result["duplicate_excerpt_across_shards"] == 1 and result["inserted"] == 2
    table, _ = lake_io.read_table_at(settings, RAW, columns=["request_key", "doc_id"])
    assert sorted(map(tuple, (r.values() for r in table.to_pylist()))) == [("other", "c"), ("same-prompt", "a-first")]
    assert commit_raw(settings, "run-1", 2)["committed"] is False  # a rerun commits nothing
