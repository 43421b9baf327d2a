"""Benchmark loaders: JSON / JSONL evaluation sets → typed ``BenchmarkItem`` records.

Driven by ``settings.benchmarks`` (``BenchmarkSettings``); no code per benchmark:

* A file is a JSON list of objects, a JSON object holding such a list (``data``/``examples``/...),
  a JSON object of objects keyed by item id (TabMWP's ``problems_test.json``), or JSONL.
* Text: ``text_fields`` joined in order; unset, the first match of (case-insensitive)
  ``body`` + ``question`` (SVAMP, ASDiv), ``question``, ``problem``, ``input`` (MAWPS harness).
* Answer: ``answer_field``; unset, ``answer`` / ``target`` / ``final_answer``; with none of them,
  the last ``\\boxed{}`` of ``solution`` (the MATH test split has no answer field). GSM8K-style
  answers (reasoning, then ``#### 72``) keep only the final answer. A field an answer was
  extracted from stays in ``metadata`` under its own name (GSM8K ``answer``, MATH ``solution``).
* Item id: ``id_field``; unset, the object key or the row index — stable for a given file.

Pure Python (no Spark): decontamination broadcasts these items, evaluation prompts them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jzlake.settings import BenchmarkSettings, Settings

_TEXT_DEFAULTS: tuple[tuple[str, ...], ...] = (("body", "question"), ("question",), ("problem",), ("input",))
_ANSWER_DEFAULTS = ("answer", "target", "final_answer")
_LIST_KEYS = ("data", "examples", "items", "test", "problems", "questions")


class BenchmarkFormatError(ValueError):
    """A benchmark file or item does not match its configuration (the message says how to fix it)."""


@dataclass(frozen=True)
class BenchmarkItem:
    """One evaluation item: what decontamination matches and what evaluation asks."""

    benchmark: str
    item_id: str
    text: str
    answer: str | None
    metadata: Mapping[str, Any] = field(default_factory=dict)


def read_records(path: str | Path) -> list[tuple[str | None, dict[str, Any]]]:
    """``(key, record)`` pairs of a JSON / JSONL (optionally gzipped) file, in file order.

    ``key`` is the object key for a JSON object of items, else ``None``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark file {path} does not exist: fix the benchmark's `path` setting")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        raw = handle.read()
    stem = path.name.removesuffix(".gz")
    if stem.endswith(".jsonl"):
        return [(None, rec) for rec in _parse_jsonl(raw, path)]
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return [(None, rec) for rec in _parse_jsonl(raw, path)]  # a .json file holding JSON lines
    return _records_from_json(data, path)


def _parse_jsonl(raw: str, path: Path) -> Iterable[dict[str, Any]]:
    records = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkFormatError(f"{path}:{number}: invalid JSON ({err.msg}); fix or remove the line") from None
        if not isinstance(record, dict):
            raise BenchmarkFormatError(f"{path}:{number}: expected a JSON object per line, got "
                                       f"{type(record).__name__}")
        records.append(record)
    return records


def _records_from_json(data: Any, path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    if isinstance(data, dict):
        for key in _LIST_KEYS:
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            if data and all(isinstance(v, dict) for v in data.values()):
                return [(str(k), v) for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise BenchmarkFormatError(
            f"{path}: expected a JSON list of objects, an object holding such a list under one of "
            f"{list(_LIST_KEYS)}, an object of objects keyed by id, or JSON lines"
        )
    return [(None, r) for r in data]


def _lookup(record: Mapping[str, Any], name: str) -> str | None:
    """The record's key matching ``name`` exactly, else case-insensitively."""
    if name in record:
        return name
    lowered = name.lower()
    return next((k for k in record if k.lower() == lowered), None)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list | tuple):
        return " ".join(_as_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # SVAMP answers are floats: 51.0 → "51"
    return str(value)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces kept."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for match in reversed(starts):
        pos = match.end()
        if pos < len(text) and text[pos] == "{":
            depth = 0
            for end in range(pos, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    return text[pos + 1:end].strip()
            continue  # unbalanced: try an earlier one
        bare = re.match(r"[^\s$]+", text[pos:])  # "\boxed 5$"
        if bare:
            return bare.group(0)
    return None


def after_hashes(text: str) -> str | None:
    """The final answer of a GSM8K-style solution (the text after the last ``####``)."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip() or None


def _text_fields(record: Mapping[str, Any], config: BenchmarkSettings, where: str) -> list[str]:
    if config.text_fields:
        keys = [_lookup(record, f) for f in config.text_fields]
        missing = [f for f, k in zip(config.text_fields, keys, strict=True) if k is None]
        if missing:
            raise BenchmarkFormatError(f"{where}: text field(s) {missing} missing (item keys: {sorted(record)}); "
                                       "fix `text_fields` in the benchmark's settings")
        return [k for k in keys if k is not None]
    for candidate in _TEXT_DEFAULTS:
        keys = [_lookup(record, f) for f in candidate]
        if all(k is not None for k in keys):
            return [k for k in keys if k is not None]
    raise BenchmarkFormatError(
        f"{where}: none of question/problem/body+question/input found (item keys: {sorted(record)}); "
        "set `text_fields` in the benchmark's settings"
    )


def _answer(record: Mapping[str, Any], config: BenchmarkSettings, where: str) -> tuple[str | None, str | None, Any]:
    """``(answer, field used, raw value)``."""
    extractor = config.answer_extractor
    if config.answer_field:
        key = _lookup(record, config.answer_field)
        if key is None:
            raise BenchmarkFormatError(f"{where}: answer field {config.answer_field!r} missing (item keys: "
                                       f"{sorted(record)}); fix `answer_field` in the benchmark's settings")
    else:
        key = next((k for k in (_lookup(record, f) for f in _ANSWER_DEFAULTS) if k is not None), None)
        if key is None and (solution := _lookup(record, "solution")) is not None:
            key, extractor = solution, ("last_boxed" if extractor == "auto" else extractor)
    if key is None:
        return None, None, None
    raw = record[key]
    text = _as_text(raw)
    if extractor == "raw":
        return text, key, raw
    if extractor == "last_boxed":
        answer = last_boxed(text)
        if answer is None:
            raise BenchmarkFormatError(f"{where}: no \\boxed{{}} answer in field {key!r}; set "
                                       "`answer_extractor: raw` or point `answer_field` at the answer")
        return answer, key, raw
    if extractor == "after_hashes":
        answer = after_hashes(text)
        if answer is None:
            raise BenchmarkFormatError(f"{where}: no '#### answer' line in field {key!r}; set "
                                       "`answer_extractor: raw`")
        return answer, key, raw
    return (after_hashes(text) or text), key, raw  # auto


def load_benchmark(name: str, config: BenchmarkSettings, path: str | Path | None = None) -> list[BenchmarkItem]:
    """All items of one benchmark (``path`` overrides ``config.path``, e.g. resolved by settings)."""
    path = Path(path or config.path)
    items: list[BenchmarkItem] = []
    seen: dict[str, int] = {}
    for index, (key, record) in enumerate(read_records(path)):
        where = f"benchmark {name!r} ({path}) item {index}"
        fields = _text_fields(record, config, where)
        text = _join(_as_text(record[k]) for k in fields)
        if not text:
            raise BenchmarkFormatError(f"{where}: empty text in {fields}; fix the item or `text_fields`")
        if config.id_field:
            id_key = _lookup(record, config.id_field)
            if id_key is None:
                raise BenchmarkFormatError(f"{where}: id field {config.id_field!r} missing; fix `id_field`")
            item_id = _as_text(record[id_key])
        else:
            id_key, item_id = None, key if key is not None else str(index)
        if item_id in seen:
            raise BenchmarkFormatError(f"{where}: item id {item_id!r} repeats item {seen[item_id]}; "
                                       "set `id_field` to a unique field (or leave it unset for row numbers)")
        seen[item_id] = index
        answer, answer_key, raw_answer = _answer(record, config, where)
        used = {*fields, id_key}
        if answer_key is not None and _as_text(raw_answer) == answer:
            used.add(answer_key)  # nothing extracted: the field is the answer
        metadata = {k: v for k, v in record.items() if k not in used}
        items.append(BenchmarkItem(name, item_id, text, answer, metadata))
    if not items:
        raise BenchmarkFormatError(f"benchmark {name!r}: {path} holds no items")
    return items


def _join(parts: Iterable[str]) -> str:
    parts = [p for p in parts if p]
    return ("\n" if any("\n" in p for p in parts) else " ").join(parts)


def benchmark_path(settings: Settings, name: str) -> Path:
    """The resolved file path of a configured benchmark."""
    if name not in settings.benchmarks:
        raise KeyError(f"no benchmark {name!r} configured; known: {sorted(settings.benchmarks)}")
    return Path(settings.path(settings.benchmarks[name].path))


def load_benchmarks(settings: Settings, names: Iterable[str] | None = None) -> dict[str, list[BenchmarkItem]]:
    """Every configured benchmark (or the ``names`` given), in configuration order."""
    selected = list(names) if names is not None else list(settings.benchmarks)
    return {n: load_benchmark(n, settings.benchmarks[n], benchmark_path(settings, n)) for n in selected}


def file_sha256(path: str | Path) -> str:
    """Content hash of a benchmark file (decontamination fingerprints the sets it checked against)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
