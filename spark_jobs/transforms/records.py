"""Read one input file into documents and quarantine records. Pure Python, no Spark.

The ingest job distributes *files* over Spark and runs ``read_file`` on each, so this module is
what actually touches the data. It must never lose a record silently: every non-blank line (or
Parquet row) comes out either as a ``Document`` or as a ``Quarantined`` row with a reason.

Files are opened with ``pyarrow.fs`` (``jzlake.uris.arrow_filesystem``): local paths, ``file://``,
``s3a://``/``s3://``, ``gs://``, ``hdfs://`` all work the same way on a cluster. JSONL is read as a
byte stream in chunks, so a huge line costs at most ``max_doc_bytes`` of memory before it is
quarantined.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import posixpath
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from jzlake.settings import FieldMapping
from jzlake.uris import arrow_filesystem

# Reasons a record goes to bronze.quarantine instead of bronze.documents.
QUARANTINE_REASONS: dict[str, str] = {
    "invalid_json": "the line is not valid JSON; fix or drop the line in the source file",
    "invalid_utf8": "the record is not valid UTF-8 (undecodable bytes, or a JSON \\ud800-\\udfff escape "
                    "without its pair); re-encode the file as UTF-8 or fix the exporter's escaping",
    "not_an_object": "a JSON Lines record must be a JSON object ({...}); wrap the value in an object",
    "missing_text": "none of the mapped text fields is present; fix the record or the source's mapping.text",
    "non_string_text": "a mapped text field holds a non-string value; map a string field "
                       "(use 'field[]' to flatten a list of strings)",
    "empty_text": "the mapped text fields are empty or whitespace only; drop the record upstream",
    "too_large": "the record exceeds ingest.max_doc_bytes; split the document or raise the cap",
    "unreadable_file": "the file could not be read to the end (corrupt or truncated); re-export it",
    "conflicting_doc_id": "another record already holds this doc_id with different content",
}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_PARQUET_BATCH_ROWS = 256


@dataclass(frozen=True)
class FileTask:
    """One input file to read: where, for which source, and its (size, mtime) for the manifest."""

    path: str
    source: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Document:
    doc_id: str
    source: str
    native_id: str | None
    text: str
    markup: str
    metadata: dict[str, str]
    content_sha256: str
    byte_size: int
    file: str
    line: int


@dataclass(frozen=True)
class Quarantined:
    file: str
    line: int
    source: str
    reason: str
    detail: str
    raw_sample: str
    byte_size: int


Record = Document | Quarantined


# ---- field mapping ----------------------------------------------------------------------------


class _Missing:
    pass


MISSING = _Missing()


def resolve(obj: Any, path: str) -> list[Any]:
    """Values at a dotted ``path``; ``name[]`` flattens a list. Missing keys give ``[]``.

    A string met on the way (math-lm's ``meta`` is a Python-literal dict in a string) is parsed
    as JSON, or as a Python literal, when the path needs to go into it."""
    values = [obj]
    for part in path.split("."):
        flatten = part.endswith("[]")
        key = part[:-2] if flatten else part
        nxt: list[Any] = []
        for value in values:
            value = _as_container(value)
            if isinstance(value, dict):
                found = value.get(key, MISSING) if key else value
            elif isinstance(value, list) and key.isdigit():
                index = int(key)
                found = value[index] if index < len(value) else MISSING
            else:
                found = MISSING
            if found is MISSING or found is None:
                continue
            if flatten:
                found = _as_container(found)
                if isinstance(found, list):
                    nxt.extend(v for v in found if v is not None)
                    continue
            nxt.append(found)
        values = nxt
    return values


def _as_container(value: Any) -> Any:
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("{", "["):
            try:
                return json.loads(stripped)
            except ValueError:
                try:
                    return ast.literal_eval(stripped)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    return value
    return value


def map_record(obj: dict[str, Any], mapping: FieldMapping) -> tuple[str | None, str, dict[str, str]] | tuple[str, str]:
    """``(native_id, text, metadata)`` for a good record, or ``(reason, detail)`` for a bad one."""
    parts: list[str] = []
    found_any = False
    for path in mapping.text:
        for value in resolve(obj, path):
            found_any = True
            if not isinstance(value, str):
                return ("non_string_text",
                        f"field {path!r} holds {type(value).__name__}, not a string")
            if value.strip():
                parts.append(value)
    if not found_any:
        return ("missing_text", f"none of the text fields {mapping.text} is present "
                                f"(record keys: {sorted(obj)[:12]})")
    if not parts:
        return ("empty_text", f"text fields {mapping.text} are empty or whitespace only")
    native_id = None
    if mapping.id:
        ids = resolve(obj, mapping.id)
        if ids:
            value = ids[0]
            native_id = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            native_id = native_id.strip() or None
    metadata: dict[str, str] = {}
    for name, path in mapping.metadata.items():
        values = resolve(obj, path)
        if values:
            value = values[0]
            metadata[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return native_id, "\n\n".join(parts), metadata


def make_doc_id(source: str, native_id: str | None, content_sha256: str) -> str:
    """``source:native_id``, else ``source:sha256:<first 32 hex of the content hash>``."""
    return f"{source}:{native_id}" if native_id else f"{source}:sha256:{content_sha256[:32]}"


def record_to_result(obj: Any, *, source: str, mapping: FieldMapping, file: str, line: int,
                     byte_size: int, max_doc_bytes: int, sample: str) -> Record:
    """A parsed record → ``Document`` or ``Quarantined``."""
    def quarantine(reason: str, detail: str) -> Quarantined:
        return Quarantined(file, line, source, reason, f"{reason}: {detail}. Fix: {QUARANTINE_REASONS[reason]}",
                           sample, byte_size)

    if not isinstance(obj, dict):
        return quarantine("not_an_object", f"got a JSON {type(obj).__name__}")
    mapped = map_record(obj, mapping)
    if len(mapped) == 2:
        return quarantine(*mapped)  # type: ignore[arg-type]
    native_id, text, metadata = mapped  # type: ignore[misc]
    encoded = text.encode("utf-8", errors="surrogatepass")
    if len(encoded) > max_doc_bytes:
        return quarantine("too_large", f"text is {len(encoded)} bytes, cap is {max_doc_bytes}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from \ud800 escapes in JSON
        return quarantine("invalid_utf8", f"text holds an unpaired surrogate at character {exc.start}")
    content = hashlib.sha256(encoded).hexdigest()
    return Document(make_doc_id(source, native_id, content), source, native_id, text, mapping.markup,
                    metadata, content, len(encoded), file, line)


# ---- reading files ----------------------------------------------------------------------------


@dataclass
class LineReader:
    """Split a binary stream into lines without ever holding more than ``max_bytes`` of one line.

    Yields ``(line_number, data, size)``; ``data`` is None for a line longer than ``max_bytes``
    (its first ``head_bytes`` are in ``self.head``). After an exception, ``pending`` holds the
    partial line and ``lines`` the number of complete lines read."""

    stream: BinaryIO
    max_bytes: int
    head_bytes: int = 4096
    lines: int = 0
    pending: bytearray = field(default_factory=bytearray)
    head: bytes = b""
    _overflow: int = -1  # bytes of the current over-long line, or -1

    def __iter__(self) -> Iterator[tuple[int, bytes | None, int]]:
        # read1 returns what one underlying read decompressed: with a truncated .gz, a plain
        # read(n) would raise and throw away everything it had decompressed towards n bytes.
        read = getattr(self.stream, "read1", self.stream.read)
        while True:
            chunk = read(_CHUNK)
            if not chunk:
                break
            start = 0
            while True:
                newline = chunk.find(b"\n", start)
                piece = chunk[start:] if newline < 0 else chunk[start:newline]
                self._add(piece)
                if newline < 0:
                    break
                yield self._finish()
                start = newline + 1
        if self.pending or self._overflow >= 0:
            yield self._finish()

    def _add(self, piece: bytes) -> None:
        if self._overflow >= 0:
            self._overflow += len(piece)
            return
        self.pending += piece
        if len(self.pending) > self.max_bytes:
            self.head = bytes(self.pending[: self.head_bytes])
            self._overflow = len(self.pending)
            self.pending = bytearray()

    def _finish(self) -> tuple[int, bytes | None, int]:
        self.lines += 1
        if self._overflow >= 0:
            size, self._overflow = self._overflow, -1
            return self.lines, None, size
        data = bytes(self.pending)
        if data.endswith(b"\r"):
            data = data[:-1]
        self.pending = bytearray()
        return self.lines, data, len(data)


def sample_text(data: bytes, chars: int) -> str:
    """Printable prefix of raw bytes for the quarantine table (bad UTF-8 shown as \\xNN)."""
    return data[: chars * 4].decode("utf-8", errors="backslashreplace")[:chars]


def detect_format(path: str, configured: str = "auto") -> str:
    """``jsonl`` or ``parquet`` from the configured format or the file name (``.gz`` allowed)."""
    if configured != "auto":
        return configured
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "unknown"


def read_file(task: FileTask, mapping: FieldMapping, fmt: str = "auto", max_doc_bytes: int = 5_000_000,
              raw_sample_chars: int = 1000) -> Iterator[Record]:
    """Every record of one file, in order. Never raises for bad data: a file that cannot be read
    (to the end) yields an ``unreadable_file`` record after the records read before the failure."""
    kind = detect_format(task.path, fmt)
    if kind == "unknown":
        yield Quarantined(task.path, 0, task.source, "unreadable_file",
                          f"unreadable_file: cannot tell the format of {posixpath.basename(task.path)!r}. "
                          f"Fix: name it .jsonl, .jsonl.gz or .parquet, or set sources.{task.source}.format",
                          "", task.size)
        return
    reader = _read_parquet if kind == "parquet" else _read_jsonl
    yield from reader(task, mapping, max_doc_bytes, raw_sample_chars)


_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


def _unreadable(task: FileTask, line: int, exc: BaseException, sample: str, size: int) -> Quarantined:
    return Quarantined(
        task.path, line, task.source, "unreadable_file",
        f"unreadable_file: reading stopped at record {line}: {type(exc).__name__}: {exc}. "
        f"Records before it were ingested. Fix: {QUARANTINE_REASONS['unreadable_file']}",
        sample, size)


def filesystem_for(path: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a local path (relative ones too) or a URI;
    Spark's ``s3a://`` spelling is accepted (``jzlake.uris.arrow_filesystem``)."""
    return arrow_filesystem(path)


def open_binary(path: str) -> BinaryIO:
    """Open a local path or URI (file, s3, gs, hdfs, ...) for sequential binary reading."""
    filesystem, inner = filesystem_for(path)
    return filesystem.open_input_stream(inner, compression=None)  # type: ignore[return-value]


def _read_jsonl(task: FileTask, mapping: FieldMapping, max_doc_bytes: int, chars: int) -> Iterator[Record]:
    try:
        raw = open_binary(task.path)
    except _READ_ERRORS as exc:
        yield _unreadable(task, 0, exc, "", task.size)
        return
    reader: LineReader | None = None
    try:
        magic = raw.read(2)
        stream: BinaryIO = _Prefixed(magic, raw)
        if magic == GZIP_MAGIC or task.path.lower().endswith(".gz"):
            stream = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
        reader = LineReader(stream, max_doc_bytes, head_bytes=chars * 4)
        for number, data, size in reader:
            record = _jsonl_line(task, mapping, number, data, size, reader.head, max_doc_bytes, chars)
            if record is not None:
                yield record
    except _READ_ERRORS as exc:
        line = (reader.lines + 1) if reader else 1
        pending = bytes(reader.pending) if reader else b""
        yield _unreadable(task, line, exc, sample_text(pending, chars), len(pending))
    finally:
        raw.close()


class _Prefixed:
    """A stream with already-read bytes pushed back in front (for format sniffing)."""

    def __init__(self, prefix: bytes, stream: Any) -> None:
        self._prefix = prefix
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            head, self._prefix = self._prefix, b""
            if size < 0:
                return head + self._stream.read()
            return head + self._stream.read(max(0, size - len(head)))
        return self._stream.read(size)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._stream.close()


def _jsonl_line(task: FileTask, mapping: FieldMapping, number: int, data: bytes | None, size: int,
                head: bytes, max_doc_bytes: int, chars: int) -> Record | None:
    def quarantine(reason: str, detail: str, raw: bytes) -> Quarantined:
        return Quarantined(task.path, number, task.source, reason,
                           f"{reason}: {detail}. Fix: {QUARANTINE_REASONS[reason]}", sample_text(raw, chars), size)

    if data is None:
        return quarantine("too_large", f"line is {size} bytes, cap is {max_doc_bytes} (ingest.max_doc_bytes)", head)
    if not data.strip():
        return None  # a blank line holds no record
    try:
        line = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return quarantine("invalid_utf8", f"byte {exc.start} ({data[exc.start:exc.start + 1]!r}) is not UTF-8", data)
    if number == 1:
        line = line.lstrip("\ufeff")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return quarantine("invalid_json", f"{exc}", data)
    return record_to_result(obj, source=task.source, mapping=mapping, file=task.path, line=number,
                            byte_size=size, max_doc_bytes=max_doc_bytes, sample=sample_text(data, chars))


def _read_parquet(task: FileTask, mapping: FieldMapping, max_doc_bytes: int, chars: int) -> Iterator[Record]:
    """Parquet rows; ``line`` is the 1-based row number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        filesystem, inner = filesystem_for(task.path)
        with filesystem.open_input_file(inner) as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for obj in batch.to_pylist():
                    row += 1
                    sample = json.dumps(obj, ensure_ascii=False, default=str)[:chars]
                    yield record_to_result(
                        _decode_bytes(obj), source=task.source, mapping=mapping, file=task.path, line=row,
                        byte_size=len(sample.encode("utf-8")) if len(sample) < chars else _row_bytes(obj),
                        max_doc_bytes=max_doc_bytes, sample=sample)
    except (*_READ_ERRORS, pa.ArrowException) as exc:
        yield _unreadable(task, row + 1, exc, "", 0)


def _row_bytes(obj: Any) -> int:
    return len(json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8"))


def _decode_bytes(obj: Any) -> Any:
    """Binary Parquet columns holding UTF-8 text read as strings (anything else stays bytes)."""
    if isinstance(obj, dict):
        return {k: _decode_bytes(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_bytes(v) for v in obj]
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj
    return obj


# ---- finding files ----------------------------------------------------------------------------

_GLOB_CHARS = re.compile(r"[*?\[]")


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Shell-style glob over ``/``-separated paths: ``*`` and ``?`` stay within one folder,
    ``**/`` spans any number of folders."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1:end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def expand_glob(pattern: str, source: str) -> list[FileTask]:
    """Files matching ``pattern`` (a local path or URI with glob characters), sorted by path,
    with their size and mtime. A pattern without glob characters names one file or a folder."""
    from pyarrow import fs as pafs

    parts = pattern.split("/")
    first_glob = next((i for i, p in enumerate(parts) if _GLOB_CHARS.search(p)), None)
    if first_glob is None:
        base, rest = pattern.rstrip("/"), ""
    else:
        base, rest = "/".join(parts[:first_glob]) or "/", "/".join(parts[first_glob:])
    filesystem, inner = filesystem_for(base)
    info = filesystem.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File and not rest:
        return [FileTask(base, source, int(info.size or 0), _mtime(info))]
    recursive = "/" in rest or "**" in rest
    regex = glob_to_regex(rest or "*")
    tasks = []
    for entry in filesystem.get_file_info(pafs.FileSelector(inner, recursive=recursive)):
        if entry.type != pafs.FileType.File:
            continue
        relative = entry.path[len(inner):].lstrip("/")
        if regex.match(relative) and not posixpath.basename(relative).startswith((".", "_")):
            tasks.append(FileTask(f"{base.rstrip('/')}/{relative}", source, int(entry.size or 0), _mtime(entry)))
    return sorted(tasks, key=lambda t: t.path)


def _mtime(info: Any) -> float:
    return (info.mtime_ns or 0) / 1e9
