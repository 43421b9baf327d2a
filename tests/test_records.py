"""Reading input files: field mappings on every real source shape, and every kind of broken
input ending up as a quarantine record while the rest of the file loads."""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jzlake.settings import FieldMapping, load_settings
from spark_jobs.transforms.records import (
    QUARANTINE_REASONS,
    Document,
    FileTask,
    LineReader,
    Quarantined,
    expand_glob,
    make_doc_id,
    read_file,
    resolve,
)
from tests.conftest import SAMPLE

GOOD_TEXT = "A perfectly ordinary document about prime numbers and their distribution. " * 3


def write_broken_source(folder: Path, huge_bytes: int = 50_000_000) -> dict[tuple[str, int], str]:
    """Write a folder of damaged inputs; return ``{(file name, line): expected quarantine reason}``.

    Also used by the Spark test. ``conflicting_doc_id`` needs the batch view, so it is listed
    here although ``read_file`` alone yields that record as a document."""
    folder.mkdir(parents=True, exist_ok=True)
    mixed = [
        json.dumps({"id": "good-1", "text": GOOD_TEXT}).encode(),
        b'{"id": "bad-json", "text": ',
        b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}',
        b"[1, 2, 3]",
        json.dumps({"id": "no-text", "body": "the text is under another key"}).encode(),
        json.dumps({"id": "num-text", "text": 42}).encode(),
        json.dumps({"id": "blank-text", "text": "   \n\t "}).encode(),
        b"",  # a blank line is not a record
        json.dumps({"id": "dup", "text": "the same text twice"}).encode(),
        json.dumps({"id": "dup", "text": "the same text twice"}).encode(),
        json.dumps({"id": "dup", "text": "a different text under the same id"}).encode(),
        json.dumps({"text": "no id: keyed by content hash. " + GOOD_TEXT}).encode(),
        json.dumps({"id": "good-2", "text": GOOD_TEXT + " (second)"}).encode(),  # no final newline
    ]
    (folder / "mixed.jsonl").write_bytes(b"\n".join(mixed))
    with (folder / "big.jsonl").open("wb") as out:
        out.write(json.dumps({"id": "before-huge", "text": GOOD_TEXT}).encode() + b"\n")
        out.write(b'{"id": "huge", "text": "')
        block = b"x" * 1_000_000
        for _ in range(huge_bytes // len(block)):
            out.write(block)
        out.write(b'"}\n')
        out.write(json.dumps({"id": "after-huge", "text": GOOD_TEXT}).encode() + b"\n")
        # Valid UTF-8 and valid JSON, but the \ud800 escape decodes to a lone surrogate that no
        # UTF-8 writer (Arrow, Delta) accepts. (Here, not in mixed.jsonl, whose counts the
        # Spark test re-reads.)
        out.write(b'{"id": "lone-surrogate", "text": "half a pair: \\ud800 ' + GOOD_TEXT.encode() + b'"}\n')
    lines = b"".join(json.dumps({"id": f"gz-{i:03d}", "text": f"{i} {GOOD_TEXT} {i * 7919}"}).encode() + b"\n"
                     for i in range(400))
    packed = gzip.compress(lines)
    (folder / "trunc.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    table = pa.table({"id": ["pq-1", "pq-2", "pq-3"], "text": [GOOD_TEXT, None, ""]})
    pq.write_table(table, folder / "rows.parquet")
    (folder / "notes.txt").write_text("not a supported format\n")
    return {
        ("mixed.jsonl", 2): "invalid_json", ("mixed.jsonl", 3): "invalid_utf8",
        ("mixed.jsonl", 4): "not_an_object", ("mixed.jsonl", 5): "missing_text",
        ("mixed.jsonl", 6): "non_string_text", ("mixed.jsonl", 7): "empty_text",
        ("mixed.jsonl", 11): "conflicting_doc_id", ("big.jsonl", 2): "too_large",
        ("big.jsonl", 4): "invalid_utf8",
        ("rows.parquet", 2): "missing_text", ("rows.parquet", 3): "empty_text",
        ("notes.txt", 0): "unreadable_file",
        # trunc.jsonl.gz: one unreadable_file after the lines that decompressed (line depends on zlib)
    }


def _read(path: Path, mapping: FieldMapping | None = None, source: str = "broken",
          **kw) -> list[Document | Quarantined]:
    task = FileTask(str(path), source, path.stat().st_size, path.stat().st_mtime)
    return list(read_file(task, mapping or FieldMapping(), **kw))


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[Path, dict[tuple[str, int], str]]:
    folder = tmp_path_factory.mktemp("broken")
    return folder, write_broken_source(folder)


# ---- mapping ------------------------------------------------------------------------------------


def test_resolve_paths_lists_and_string_encoded_dicts():
    obj = {"q": {"title": "T", "tags": ["a"]}, "answers": [{"body": "x"}, {"body": None}, {"body": "y"}],
           "meta": "{'post_id': 58, 'post_title': 'Witt vectors'}", "js": '{"k": [1, 2]}'}
    assert resolve(obj, "q.title") == ["T"]
    assert resolve(obj, "answers[].body") == ["x", "y"]
    assert resolve(obj, "meta.post_id") == [58]
    assert resolve(obj, "js.k[]") == [1, 2]
    assert resolve(obj, "q.missing") == [] and resolve(obj, "nope.deeper") == []


def test_doc_id_uses_native_id_else_content_hash():
    assert make_doc_id("se", "math:1", "ab" * 32) == "se:math:1"
    assert make_doc_id("se", None, "ab" * 32) == "se:sha256:" + "ab" * 16


@pytest.mark.parametrize("source", ["se_threads", "stackmathqa", "mathlm_stackexchange", "latex_books"])
def test_every_sample_source_reads_cleanly_with_the_default_mapping(source):
    settings = load_settings(environ={})
    spec = settings.sources[source]
    files = expand_glob(settings.path(spec.glob), source)
    assert files, spec.glob
    rows = [r for f in files for r in read_file(f, spec.mapping, spec.format)]
    lines = sum(1 for f in files for line in Path(f.path).read_text().splitlines() if line.strip())
    assert len(rows) == lines
    assert all(isinstance(r, Document) for r in rows), [r for r in rows if isinstance(r, Quarantined)][:2]
    assert all(r.doc_id.startswith(source + ":") and r.text.strip() for r in rows)
    assert {r.markup for r in rows} == {spec.mapping.markup}
    if spec.mapping.id is None:
        assert all(r.doc_id.startswith(f"{source}:sha256:") for r in rows)
    else:
        assert all(r.native_id for r in rows)


def test_se_thread_joins_title_question_and_every_answer():
    path = SAMPLE / "raw_corpus" / "se_threads" / "mathoverflow.net__category-theory.jsonl"
    spec = load_settings(environ={}).sources["se_threads"]
    doc = next(r for r in _read(path, spec.mapping, "se_threads") if isinstance(r, Document))
    thread = json.loads(path.read_text().splitlines()[0])
    parts = [thread["question"]["title"], thread["question"]["body_html"],
             *(a["body_html"] for a in thread["answers"])]
    assert doc.text == "\n\n".join(parts)
    assert doc.doc_id == f"se_threads:{thread['thread_id']}"
    assert doc.metadata["url"] == thread["question"]["url"]


def test_mathlm_meta_as_python_literal_string_is_parsed(tmp_path):
    row = json.loads((SAMPLE / "raw_corpus/mathlm_stackexchange/math_overflow_humanfiltered.jsonl")
                     .read_text().splitlines()[0])
    row["meta"] = repr(row["meta"])  # the original dump's shape: a Python dict in a string
    path = tmp_path / "mathlm.jsonl"
    path.write_text(json.dumps(row) + "\n")
    spec = load_settings(environ={}).sources["mathlm_stackexchange"]
    (doc,) = _read(path, spec.mapping)
    assert isinstance(doc, Document)
    assert doc.native_id == str(eval(row["meta"])["post_id"])
    assert doc.text.startswith(eval(row["meta"])["post_title"] + "\n\n")


# ---- broken input -------------------------------------------------------------------------------


def test_broken_jsonl_lines_are_quarantined_and_good_lines_load(broken):
    folder, expected = broken
    rows = _read(folder / "mixed.jsonl")
    quarantined = {r.line: r for r in rows if isinstance(r, Quarantined)}
    want = {line: reason for (name, line), reason in expected.items()
            if name == "mixed.jsonl" and reason != "conflicting_doc_id"}
    assert {line: r.reason for line, r in quarantined.items()} == want
    docs = [r for r in rows if isinstance(r, Document)]
    assert [d.line for d in docs] == [1, 9, 10, 11, 12, 13]
    assert docs[-1].doc_id == "broken:good-2"
    assert docs[-2].doc_id.startswith("broken:sha256:")
    for rec in quarantined.values():
        assert rec.detail.startswith(rec.reason + ":") and "Fix:" in rec.detail
        assert QUARANTINE_REASONS[rec.reason] in rec.detail
    assert "\\xe9" in quarantined[3].raw_sample  # the bad byte is visible in the sample


def test_a_50_mb_line_is_quarantined_with_bounded_memory(broken):
    folder, _ = broken
    tracemalloc.start()
    try:
        rows = _read(folder / "big.jsonl", max_doc_bytes=5_000_000, raw_sample_chars=200)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [type(r).__name__ for r in rows] == ["Document", "Quarantined", "Document", "Quarantined"]
    huge = rows[1]
    assert huge.reason == "too_large" and huge.line == 2 and huge.byte_size > 50_000_000
    assert len(huge.raw_sample) == 200 and huge.raw_sample.startswith('{"id": "huge"')
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB while reading a 50 MB line"


def test_a_lone_surrogate_escape_is_invalid_utf8(broken):
    folder, _ = broken
    rec = _read(folder / "big.jsonl", max_doc_bytes=5_000_000)[3]
    assert isinstance(rec, Quarantined) and (rec.line, rec.reason) == (4, "invalid_utf8")
    assert "unpaired surrogate at character 13" in rec.detail and "escape without its pair" in rec.detail
    assert rec.raw_sample.startswith('{"id": "lone-surrogate"')
    rec.raw_sample.encode("utf-8")  # the quarantine row itself must be writable


def test_line_reader_never_buffers_more_than_the_cap():
    stream = io.BytesIO(b"a" * 3000 + b"\nshort\n" + b"b" * 10)
    reader = LineReader(stream, max_bytes=1000, head_bytes=5)
    assert list(reader) == [(1, None, 3000), (2, b"short", 5), (3, b"b" * 10, 10)]


def test_truncated_gzip_keeps_the_lines_before_the_damage(broken):
    folder, _ = broken
    rows = _read(folder / "trunc.jsonl.gz")
    docs = [r for r in rows if isinstance(r, Document)]
    assert 0 < len(docs) < 400
    assert [d.native_id for d in docs] == [f"gz-{i:03d}" for i in range(len(docs))]
    last = rows[-1]
    assert isinstance(last, Quarantined) and last.reason == "unreadable_file"
    assert last.line == len(docs) + 1 and "Records before it were ingested" in last.detail


def test_a_complete_gzipped_jsonl_file_loads_every_record(tmp_path):
    rows = [{"id": f"z-{i}", "text": f"{GOOD_TEXT} {i}"} for i in range(300)]
    path = tmp_path / "whole.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    got = _read(path, source="gz")
    assert all(isinstance(r, Document) for r in got), [r for r in got if isinstance(r, Quarantined)][:1]
    assert [(d.line, d.native_id, d.text) for d in got] == [(i + 1, r["id"], r["text"]) for i, r in enumerate(rows)]


def test_parquet_rows_map_like_json_objects(broken):
    folder, expected = broken
    rows = _read(folder / "rows.parquet")
    assert isinstance(rows[0], Document) and rows[0].doc_id == "broken:pq-1" and rows[0].line == 1
    assert {(r.line, r.reason) for r in rows if isinstance(r, Quarantined)} == {
        (line, reason) for (name, line), reason in expected.items() if name == "rows.parquet"}


def test_unknown_format_and_missing_file_are_unreadable(broken, tmp_path):
    folder, _ = broken
    (notes,) = _read(folder / "notes.txt")
    assert notes.reason == "unreadable_file" and "format" in notes.detail
    gone = FileTask(str(tmp_path / "gone.jsonl"), "broken", 1, 0.0)
    (missing,) = read_file(gone, FieldMapping())
    assert missing.reason == "unreadable_file" and missing.line == 0


def test_text_above_the_cap_is_too_large_even_when_the_line_is_not(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "é" * 600}) + "\n")  # 1 200 UTF-8 bytes of text
    (rec,) = _read(path, max_doc_bytes=1_000)
    assert rec.reason == "too_large"


# ---- finding files ------------------------------------------------------------------------------


def test_expand_glob_matches_like_a_shell_and_skips_hidden_files(tmp_path):
    for name in ("a/x.jsonl", "a/b/y.jsonl", "a/b/c/z.jsonl", "a/.hidden.jsonl", "a/b/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    names = lambda pattern: [Path(t.path).relative_to(tmp_path).as_posix()  # noqa: E731
                             for t in expand_glob(str(tmp_path / pattern), "s")]
    assert names("a/*.jsonl") == ["a/x.jsonl"]
    assert names("a/**/*.jsonl") == ["a/b/c/z.jsonl", "a/b/y.jsonl", "a/x.jsonl"]
    assert names("a/b/y.jsonl") == ["a/b/y.jsonl"]
    assert names("missing/*.jsonl") == []
    task = expand_glob(str(tmp_path / "a/x.jsonl"), "s")[0]
    assert task.size == 3 and task.mtime > 0


def test_s3a_sources_are_listed_and_read_through_pyarrows_s3_filesystem(tmp_path, monkeypatch):
    """Spark's ``s3a://`` spelling reaches pyarrow as S3; file paths keep the user's spelling."""
    from pyarrow import fs as pafs

    import spark_jobs.transforms.records as records
    from jzlake.uris import arrow_filesystem

    filesystem, inner = records.filesystem_for("s3a://bucket/raw/a.jsonl")
    assert isinstance(filesystem, pafs.S3FileSystem) and inner == "bucket/raw/a.jsonl"

    bucket = tmp_path / "bucket-standin"  # a local folder stands in for the bucket: no network
    (bucket / "bucket/raw/sub").mkdir(parents=True)
    (bucket / "bucket/raw/a.jsonl").write_text(json.dumps({"id": "a", "text": GOOD_TEXT}) + "\n")
    (bucket / "bucket/raw/sub/b.jsonl").write_text(json.dumps({"id": "b", "text": GOOD_TEXT}) + "\n")
    kinds: set[type] = set()

    def stand_in(path):
        real, inner = arrow_filesystem(path)
        kinds.add(type(real))
        return pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()), inner

    monkeypatch.setattr(records, "arrow_filesystem", stand_in)
    tasks = expand_glob("s3a://bucket/raw/**/*.jsonl", "s3src")
    assert [t.path for t in tasks] == ["s3a://bucket/raw/a.jsonl", "s3a://bucket/raw/sub/b.jsonl"]
    docs = [r for t in tasks for r in read_file(t, FieldMapping())]
    assert [(d.doc_id, d.file) for d in docs] == [("s3src:a", tasks[0].path), ("s3src:b", tasks[1].path)]
    assert kinds == {pafs.S3FileSystem}
