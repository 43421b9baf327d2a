"""Word tokens and hashed word n-grams: the shared vocabulary of dedup shingles and decontamination.

Pure Python + numpy, no Spark: the same functions run on the driver (benchmark side) and in
Python workers (document side), so a 13-gram of a GSM8K question and the same 13 words in a
document hash to the same 64-bit value on every machine.

Tokens are lower-cased Unicode word runs (``\\w+``), and a LaTeX command keeps its backslash
(``\\frac`` ≠ ``frac``): punctuation and braces separate tokens, numbers stay tokens
(``$48/2=24$`` → ``48 2 24``). That keeps the numbers of a word problem — the most specific part
of it — while ignoring markup differences between a benchmark's plain text and the same question
rendered in HTML or LaTeX; and it lets ``word_fraction`` tell prose from formula soup.

Hashing: each distinct token gets a 64-bit id from two CRC-32s (stable across processes, unlike
``hash()``); an n-gram's hash is a polynomial over its token ids (mod 2⁶⁴, vectorised over all
positions at once) with ``n`` folded into the seed, finished by the splitmix64 mixer so the
values are uniform enough for MinHash and bucketing.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

_TOKEN = re.compile(r"\\[^\W\d_]+|\w+")
_WORD = re.compile(r"[^\W\d_]{2,}")  # a "word": two or more letters, no digits, no backslash
_U64 = np.uint64
_POLY = _U64(0x100000001B3)  # FNV-64 prime: odd, so the map is a bijection per position
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1

# Token ids are memoised per process: corpora repeat their vocabulary, and a dict hit is
# cheaper than two CRCs. Bounded so a worker that sees junk tokens does not grow forever.
_TOKEN_IDS: dict[str, int] = {}
_TOKEN_CACHE_MAX = 2_000_000


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (see module docstring)."""
    return _TOKEN.findall(text.lower())


def word_fraction(tokens: Sequence[str]) -> float:
    """Fraction of ``tokens`` that are words (≥ 2 letters; numbers and LaTeX commands are not)."""
    if not tokens:
        return 0.0
    return sum(1 for t in tokens if _WORD.fullmatch(t)) / len(tokens)


def _token_id(token: str) -> int:
    data = token.encode("utf-8")
    value = zlib.crc32(data) | (zlib.crc32(data, 0x5BD1E995) << 32)
    if len(_TOKEN_IDS) < _TOKEN_CACHE_MAX:
        _TOKEN_IDS[token] = value
    return value


def token_ids(tokens: Sequence[str]) -> np.ndarray:
    """64-bit ids of ``tokens`` (uint64 array, same order)."""
    get = _TOKEN_IDS.get
    return np.array([get(t) or _token_id(t) for t in tokens], dtype=np.uint64)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on a uint64 array (wraps mod 2⁶⁴ by design)."""
    z = values.astype(np.uint64, copy=True)
    z ^= z >> _U64(30)
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of ``n`` consecutive token ids (``len(ids) - n + 1`` values).

    Empty when ``len(ids) < n``. The value depends on ``n``, so grams of different lengths never
    collide structurally (a whole short benchmark item vs a 13-gram).
    """
    if n <= 0:
        raise ValueError(f"n-gram length must be positive, got {n}")
    count = len(ids) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.full(count, (_GOLDEN * n) & _MASK64, dtype=np.uint64)
    for offset in range(n):
        h *= _POLY
        h += ids[offset:offset + count]
    return mix64(h)


def text_ngram_hashes(text: str, n: int) -> np.ndarray:
    """Convenience: ``ngram_hashes(token_ids(word_tokens(text)), n)``."""
    return ngram_hashes(token_ids(word_tokens(text)), n)


def ngram_texts(tokens: Sequence[str], n: int) -> list[str]:
    """The space-joined text of every window of ``n`` tokens, aligned with ``ngram_hashes``."""
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def to_signed(values: np.ndarray) -> np.ndarray:
    """Reinterpret uint64 as int64 (Spark has no unsigned long); a bijection, no information lost."""
    return values.astype(np.uint64, copy=False).view(np.int64)


def containment(item_grams: Iterable[int], doc_grams: Iterable[int]) -> float:
    """Fraction of the item's distinct grams that occur in the document (0.0 for an empty item)."""
    item = set(item_grams)
    if not item:
        return 0.0
    return len(item & set(doc_grams)) / len(item)


# ---- decontamination: benchmark-side gram index, document-side matching ----------------------

LONG, SHORT, WHOLE = "long", "short", "whole"


@dataclass(frozen=True)
class GramRules:
    """Which benchmark grams count (``settings.decontam``; see ``spark_jobs.decontaminate``)."""

    ngram: int = 13
    short_ngram: int = 8
    min_item_tokens: int = 6
    min_word_fraction: float = 0.5
    max_items_per_gram: int = 1

    @classmethod
    def from_settings(cls, decontam: object) -> GramRules:
        return cls(**{f: getattr(decontam, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class BenchmarkGram:
    """One hashed gram of one benchmark item; ``kind`` is long (13), short (8) or whole (item)."""

    gram_hash: int  # signed 64-bit (Spark long)
    length: int
    benchmark: str
    item_id: str
    kind: str
    position: int
    text: str


@dataclass
class GramIndex:
    """Every counted gram of every item, plus what the document side needs to find them."""

    grams: list[BenchmarkGram]
    short_counts: dict[tuple[str, str], int]  # distinct short grams per (benchmark, item)
    items: int = 0
    items_without_grams: dict[str, int] = field(default_factory=dict)

    def hashes_by_length(self) -> dict[int, np.ndarray]:
        """Sorted uint64 hash arrays per gram length (the document-side prefilter)."""
        by_length: dict[int, set[int]] = {}
        for g in self.grams:
            by_length.setdefault(g.length, set()).add(g.gram_hash)
        return {n: np.sort(np.array(sorted(h), dtype=np.int64).view(np.uint64)) for n, h in by_length.items()}


def build_gram_index(items: Iterable[tuple[str, str, str]], rules: GramRules) -> GramIndex:
    """Hashed grams of benchmark items ``(benchmark, item_id, text)``.

    Long grams (``rules.ngram``) and short grams (``rules.short_ngram``) of every item; an item
    shorter than ``ngram`` tokens but at least ``min_item_tokens`` long is also one whole gram.
    A gram is kept only if it is prose enough (``min_word_fraction``) and, within its benchmark,
    not shared by more than ``max_items_per_gram`` distinct item texts (template language).
    """
    per_item: list[tuple[str, str, list[tuple[int, str, int, int, str]]]] = []
    frequency: dict[tuple[str, int, int], set[tuple[str, ...]]] = {}
    n_items = 0
    for benchmark, item_id, text in items:
        n_items += 1
        tokens = word_tokens(text)
        ids = token_ids(tokens)
        candidates: list[tuple[int, str, int, int, str]] = []  # (length, kind, position, hash, text)
        specs = [(rules.ngram, LONG), (rules.short_ngram, SHORT)]
        if rules.min_item_tokens <= len(tokens) < rules.ngram:
            specs.append((len(tokens), WHOLE))
        is_word = np.array([1 if _WORD.fullmatch(t) else 0 for t in tokens], dtype=np.int64)
        words_before = np.concatenate([[0], np.cumsum(is_word)])
        for n, kind in specs:
            hashes = ngram_hashes(ids, n)
            words_in_window = words_before[n:] - words_before[:-n] if len(hashes) else np.empty(0)
            for position in np.flatnonzero(words_in_window >= rules.min_word_fraction * n).tolist():
                candidates.append((n, kind, position, int(hashes[position]), " ".join(tokens[position:position + n])))
        key = tuple(tokens)
        for n, _, _, value, _ in candidates:
            frequency.setdefault((benchmark, n, value), set()).add(key)
        per_item.append((benchmark, item_id, candidates))

    grams: list[BenchmarkGram] = []
    short_counts: dict[tuple[str, str], int] = {}
    without: dict[str, int] = {}
    for benchmark, item_id, candidates in per_item:
        kept = [c for c in candidates if len(frequency[(benchmark, c[0], c[3])]) <= rules.max_items_per_gram]
        seen: set[tuple[int, int]] = set()
        for n, kind, position, value, text in kept:
            if (n, value) in seen:  # a gram repeated inside one item counts once
                continue
            seen.add((n, value))
            signed = int(np.array([value], dtype=np.uint64).view(np.int64)[0])
            grams.append(BenchmarkGram(signed, n, benchmark, item_id, kind, position, text))
        short_counts[(benchmark, item_id)] = len({c[3] for c in kept if c[1] == SHORT})
        if not kept:
            without[benchmark] = without.get(benchmark, 0) + 1
    return GramIndex(grams, short_counts, n_items, without)


def matching_grams(text: str, hashes_by_length: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """Distinct ``(length, signed hash)`` of the document's grams that occur in the index."""
    ids = token_ids(word_tokens(text))
    found: list[tuple[int, int]] = []
    for n, wanted in hashes_by_length.items():
        hashes = ngram_hashes(ids, n)
        if len(hashes) == 0 or len(wanted) == 0:
            continue
        # ``wanted`` is sorted: a binary search per gram (np.isin would re-sort it every call).
        slots = np.minimum(np.searchsorted(wanted, hashes), len(wanted) - 1)
        hits = np.unique(hashes[wanted[slots] == hashes])
        found.extend((n, h) for h in hits.view(np.int64).tolist())
    return found


def match_batches(hashes_by_length: object):  # -> mapInArrow function
    """A ``mapInArrow`` function: ``(doc_id, text)`` → ``(doc_id, length, gram_hash)`` hits only.

    ``hashes_by_length`` is the dict of ``GramIndex.hashes_by_length`` or a Spark broadcast of it
    (anything with ``.value``), so the arrays ship once per executor, not once per task.
    """

    def compute(batches):  # type: ignore[no-untyped-def]
        import pyarrow as pa

        wanted = getattr(hashes_by_length, "value", hashes_by_length)
        for batch in batches:
            doc_ids, lengths, hashes = [], [], []
            for doc_id, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist(),
                                    strict=True):
                for n, h in matching_grams(text or "", wanted):
                    doc_ids.append(doc_id)
                    lengths.append(n)
                    hashes.append(h)
            yield pa.RecordBatch.from_arrays(
                [pa.array(doc_ids, pa.string()), pa.array(lengths, pa.int32()), pa.array(hashes, pa.int64())],
                names=["doc_id", "length", "gram_hash"],
            )

    return compute
