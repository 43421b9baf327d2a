"""Word tokens and hashed word n-grams: the shared vocabulary of dedup shingles and decontamination;
and, below them, decontamination's template tokens, benchmark index and per-document span rule.

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
from typing import Any

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


# ---- decontamination: template tokens, benchmark index, the per-item span rule ----------------
#
# Decontamination reads text as a *template*: lower-cased letter runs, LaTeX commands and number
# runs, where every run of numbers is one placeholder token (``48/2=24`` → ``<num>``), so an item
# with its numbers changed reads exactly like the original, and ``3x``, ``3 x``, ``\frac{1}{2}``,
# ``\frac12`` tokenise alike. Presentation-only LaTeX (``\left``, ``\displaystyle``, ``\text``,
# spacing) is dropped and a few synonyms are folded (``\dfrac`` → ``\frac``, ``\leq`` → ``\le``).

NUMBER = "<num>"
_TEMPLATE_TOKEN = re.compile(r"\\(?:begin|end)\s*\{[^\W\d_]+\*?\}|\\[^\W\d_]+|[^\W\d_]+|\d+")
_LATEX_NOISE = frozenset({
    "\\left", "\\right", "\\bigl", "\\bigr", "\\big", "\\bigg", "\\biggl", "\\biggr", "\\displaystyle",
    "\\textstyle", "\\quad", "\\qquad", "\\text", "\\textrm", "\\mathrm", "\\mbox", "\\hspace", "\\limits",
    "\\nolimits", "\\phantom",
})
_LATEX_ALIASES = {"\\dfrac": "\\frac", "\\tfrac": "\\frac", "\\leq": "\\le", "\\geq": "\\ge", "\\neq": "\\ne",
                  "\\ldots": "\\dots", "\\cdots": "\\dots", "\\lvert": "|", "\\rvert": "|"}
_TEMPLATE_IDS: dict[str, int] = {}  # raw token → id of its template token; 0 = dropped


def informative(token: str) -> bool:
    """A template token that is evidence: a word of two or more letters. LaTeX commands and
    numbers count as tokens (coverage) but not as evidence: with numbers as wildcards,
    ``\\binom <num> \\binom <num>`` is in every combinatorics text."""
    return bool(_WORD.fullmatch(token))


def _template_token(raw: str) -> str:
    """The template form of one raw token ("" when it is dropped)."""
    if raw[0].isdigit():
        return NUMBER
    if raw in _LATEX_NOISE:
        return ""
    if "{" in raw:  # \begin {env} → \begin{env}
        return "".join(raw.split())
    return _LATEX_ALIASES.get(raw, raw)


def _template_id(raw: str) -> int:
    token = _template_token(raw)
    value = 0 if not token else (_TOKEN_IDS.get(token) or _token_id(token))
    if len(_TEMPLATE_IDS) < _TOKEN_CACHE_MAX:
        _TEMPLATE_IDS[raw] = value
    return value


def template_ids(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Template token ids of ``text`` (uint64) and, per id, the index of its raw token.

    The raw tokens are ``_TEMPLATE_TOKEN`` matches of ``text.lower()``; ``template_offsets`` maps
    the raw indices back to character offsets (needed only for documents that are flagged).
    """
    get = _TEMPLATE_IDS.get
    raw = _TEMPLATE_TOKEN.findall(text.lower())
    ids = np.array([v if (v := get(t)) is not None else _template_id(t) for t in raw], dtype=np.uint64)
    index = np.flatnonzero(ids)
    ids = ids[index]
    if len(ids) > 1:  # a run of numbers (``3.14``, ``1,000``, ``2/3``) is one placeholder
        is_number = ids == _NUMBER_ID
        repeat = np.zeros(len(ids), dtype=bool)
        repeat[1:] = is_number[1:] & is_number[:-1]
        ids, index = ids[~repeat], index[~repeat]
    return ids, index


def template_tokens(text: str) -> list[str]:
    """The template tokens of ``text`` as strings (what ``template_ids`` hashes; for tests and display)."""
    out: list[str] = []
    for raw in _TEMPLATE_TOKEN.findall(text.lower()):
        token = _template_token(raw)
        if token and not (token == NUMBER and out and out[-1] == NUMBER):
            out.append(token)
    return out


def template_offsets(text: str, raw_index: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """Character range ``[start, end)`` of ``text`` holding template tokens ``first..last``.

    The end runs to the last raw token before the next template token, so a collapsed number
    run (``3.14``) or a dropped ``\\right)`` at the end stays inside the range.
    """
    lowered = text.lower()
    source = lowered if len(lowered) == len(text) else text  # lower() may grow exotic letters
    spans = [m.span() for m in _TEMPLATE_TOKEN.finditer(source)]
    if not spans:
        return 0, 0
    start_raw = int(raw_index[first])
    end_raw = int(raw_index[last + 1]) - 1 if last + 1 < len(raw_index) else int(raw_index[last])
    start_raw, end_raw = min(start_raw, len(spans) - 1), min(max(end_raw, start_raw), len(spans) - 1)
    return spans[start_raw][0], spans[end_raw][1]


_NUMBER_ID = _token_id(NUMBER)

# The rule that fired (gold.contamination.rule): the span's evidence was a long n-gram of a long
# item, short grams that are not stop grams, or (an item made of template language) nothing but
# a near-whole copy.
LONG, SPAN, TEMPLATE = "ngram", "span", "template"


@dataclass(frozen=True)
class DecontamRules:
    """The per-item rule (``settings.decontam``; the measured choices: ``spark_jobs.decontaminate``)."""

    ngram: int = 13                 # long items: one shared n-gram of this length is evidence enough
    long_item_tokens: int = 25      # an item with at least this many tokens is long
    short_ngram: int = 4            # grams whose overlap inside one span scores every item
    min_coverage: float = 0.65      # share of the item's tokens the best span must reproduce in order
    min_evidence_tokens: int = 5    # ... with at least this many covered by grams that are not stop grams,
    template_coverage: float = 0.8  # ... else (stop grams only) it must reproduce this share
    template_min_tokens: int = 10   # ... and this many tokens ("what is the value of <num>" is no copy)
    min_candidate_coverage: float = 0.3  # grams anywhere in the document: below this, no alignment is tried
    span_slack: float = 1.5         # the grams of a span lie within this many times the item's length
    edit_gap: int = 3               # the aligned span may reach this many tokens past its outer grams
    min_block: int = 2              # aligned runs shorter than this do not count (stray common words)
    min_item_tokens: int = 10       # shorter items are never matched (too little to tell)
    min_word_fraction: float = 0.5  # a prose gram: at least this share of informative tokens
    max_items_per_gram: int = 4     # a gram in more benchmark items is a stop gram (template language)
    max_doc_share: float = 0.002    # ... and so is one in more than this share of the documents checked
    min_doc_count: int = 20         # ... (and in at least this many: small batches say nothing)

    @classmethod
    def from_settings(cls, decontam: object) -> DecontamRules:
        return cls(**{f: getattr(decontam, f) for f in cls.__dataclass_fields__})


@dataclass
class DecontamIndex:
    """Every benchmark item's grams, as sorted numpy arrays (broadcast once to every executor).

    ``gram_*``: every item's short grams in item order (item i's are ``gram_start[i]:gram_start[i+1]``);
    ``gram_stop`` marks template language (a gram in more than ``max_items_per_gram`` item texts),
    ``gram_prose`` a gram with at least ``min_word_fraction`` words (only those are evidence).
    ``short_*`` rows: the grams that are not stop grams, sorted by hash — what finds candidate
    items (a stop gram would fan out to hundreds). ``anchor_*``: each item's two rarest grams,
    sorted by hash — how an item made of stop grams only becomes a candidate. ``long_*``: the long
    n-grams of long items (prose, not shared by other item texts). ``*_keys``: distinct hashes.
    """

    items: list[tuple[str, str]]
    item_tokens: np.ndarray
    item_ids: np.ndarray    # every item's template ids, concatenated (alignment)
    item_start: np.ndarray  # item i's ids: item_ids[item_start[i]:item_start[i + 1]]
    gram_hash: np.ndarray
    gram_stop: np.ndarray
    gram_prose: np.ndarray
    gram_start: np.ndarray
    short_hash: np.ndarray
    short_item: np.ndarray
    short_prose: np.ndarray
    short_keys: np.ndarray
    anchor_hash: np.ndarray
    anchor_item: np.ndarray
    long_hash: np.ndarray
    long_item: np.ndarray
    long_keys: np.ndarray
    rules: DecontamRules
    items_unmatchable: dict[str, int] = field(default_factory=dict)  # too short, or template only

    def __len__(self) -> int:
        return len(self.items)


def _sorted(values: Sequence[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def build_decontam_index(items: Iterable[tuple[str, str, str]], rules: DecontamRules) -> DecontamIndex:
    """The index of benchmark items ``(benchmark, item_id, text)`` under ``rules``.

    Stop grams are counted over distinct item *texts* across every benchmark given, so MATH-500
    inside MATH, or one item in two benchmarks, does not make its own grams stop grams.
    """
    keys: list[tuple[str, str]] = []
    lengths: list[int] = []
    token_ids_of: list[np.ndarray] = []
    short_rows: list[tuple[int, int, int, bool]] = []  # (hash, item, position, prose)
    long_rows: list[tuple[int, int, int]] = []  # (hash, item, position)
    texts_per_gram: dict[int, set[bytes]] = {}
    unmatchable: dict[str, int] = {}
    identities: dict[int, bytes] = {}
    for item, (benchmark, item_id, text) in enumerate(items):
        keys.append((benchmark, item_id))
        ids, _ = template_ids(text)
        lengths.append(len(ids))
        token_ids_of.append(ids)
        if len(ids) < rules.min_item_tokens:
            unmatchable[benchmark] = unmatchable.get(benchmark, 0) + 1
            continue
        identity = identities[item] = ids.tobytes()
        is_word = np.array([1 if informative(t) else 0 for t in template_tokens(text)], dtype=np.int64)
        words = np.concatenate([[0], np.cumsum(is_word)])

        def prose(n: int, count: int, words: np.ndarray = words) -> np.ndarray:  # windows that are words enough
            return ((words[n:] - words[:-n]) >= rules.min_word_fraction * n)[:count]

        short = ngram_hashes(ids, rules.short_ngram)
        for position, (value, wordy) in enumerate(zip(short.tolist(), prose(rules.short_ngram, len(short)).tolist(),
                                                      strict=True)):
            short_rows.append((value, item, position, wordy))
            texts_per_gram.setdefault(value, set()).add(identity)
        if len(ids) >= rules.long_item_tokens:
            long = ngram_hashes(ids, rules.ngram)
            for position in np.flatnonzero(prose(rules.ngram, len(long))).tolist():
                long_rows.append((int(long[position]), item, position))
    # Long n-grams shared by several item texts are template language too.
    long_texts: dict[int, set[bytes]] = {}
    for value, item, _ in long_rows:
        long_texts.setdefault(value, set()).add(identities[item])
    long_rows = sorted(r for r in long_rows if len(long_texts[r[0]]) <= rules.max_items_per_gram)
    rows = np.array([r[:3] for r in short_rows], dtype=np.uint64).reshape(-1, 3)  # item order
    gram_hash, gram_item = rows[:, 0], rows[:, 1].astype(np.int64)
    gram_prose = np.array([r[3] for r in short_rows], dtype=bool)
    frequency = np.array([len(texts_per_gram[int(h)]) for h in gram_hash.tolist()], dtype=np.int64)
    gram_stop = frequency > rules.max_items_per_gram
    counts = np.bincount(gram_item, minlength=len(keys)) if len(gram_item) else np.zeros(len(keys), dtype=np.int64)
    gram_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rare = np.flatnonzero(~gram_stop)
    rare = rare[np.argsort(gram_hash[rare], kind="stable")]
    anchors = [a for lo, hi in zip(gram_start[:-1].tolist(), gram_start[1:].tolist(), strict=True)
               for a in _rarest(np.arange(lo, hi), frequency, 2)]
    anchors.sort(key=lambda a: int(gram_hash[a]))
    long_hash = _sorted([r[0] for r in long_rows])
    index = DecontamIndex(
        items=keys, item_tokens=np.array(lengths, dtype=np.int32),
        item_ids=np.concatenate(token_ids_of) if token_ids_of else np.empty(0, dtype=np.uint64),
        item_start=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        gram_hash=gram_hash, gram_stop=gram_stop, gram_prose=gram_prose,
        gram_start=gram_start,
        short_hash=gram_hash[rare], short_item=gram_item[rare].astype(np.int32), short_prose=gram_prose[rare],
        short_keys=np.unique(gram_hash),
        anchor_hash=gram_hash[anchors] if anchors else np.empty(0, dtype=np.uint64),
        anchor_item=gram_item[anchors].astype(np.int32) if anchors else np.empty(0, dtype=np.int32),
        long_hash=long_hash, long_item=np.array([r[1] for r in long_rows], dtype=np.int32),
        long_keys=np.unique(long_hash), rules=rules,
    )
    index.items_unmatchable = _unmatchable(index, unmatchable)
    return index


def _gram_items(index: DecontamIndex) -> np.ndarray:
    """The item of every ``gram_*`` row."""
    return np.repeat(np.arange(len(index.items)), np.diff(index.gram_start))


def _rarest(rows: np.ndarray, frequency: np.ndarray, count: int) -> list[int]:
    """``count`` of ``rows`` with the lowest frequency (first positions on ties)."""
    return rows[np.argsort(frequency[rows], kind="stable")[:count]].tolist()


def _unmatchable(index: DecontamIndex, too_short: dict[str, int]) -> dict[str, int]:
    """Per benchmark: items that no document can match (too short, or no prose gram at all:
    formula-only items) — said in the job summary, never silently."""
    counts = dict(too_short)
    evidence = np.zeros(len(index.items), dtype=np.int64)
    np.add.at(evidence, _gram_items(index)[index.gram_prose], 1)
    for item in np.flatnonzero((evidence == 0) & (index.item_tokens >= index.rules.min_item_tokens)):
        benchmark = index.items[int(item)][0]
        counts[benchmark] = counts.get(benchmark, 0) + 1
    return counts


def _in_sorted(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``values`` occur in the sorted array ``keys``."""
    if len(keys) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    slots = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return keys[slots] == values


@dataclass
class DocumentHits:
    """Where a document's template grams occur in the index (token positions, unsigned hashes)."""

    short_pos: np.ndarray
    short_hash: np.ndarray
    long_pos: np.ndarray
    long_hash: np.ndarray

    def __bool__(self) -> bool:
        return bool(len(self.short_pos) or len(self.long_pos))


def scan_document(ids: np.ndarray, index: DecontamIndex) -> DocumentHits:
    """The index grams found in a document's template ids (the per-document hashing pass)."""
    short = ngram_hashes(ids, index.rules.short_ngram)
    short_pos = np.flatnonzero(_in_sorted(short, index.short_keys))
    long = ngram_hashes(ids, index.rules.ngram) if len(index.long_keys) else np.empty(0, dtype=np.uint64)
    long_pos = np.flatnonzero(_in_sorted(long, index.long_keys))
    return DocumentHits(short_pos, short[short_pos], long_pos, long[long_pos])


@dataclass(frozen=True)
class Finding:
    """One (document, item) candidate: its best span, in document template-token positions, and
    the evidence inside it (``qualifies`` decides; corpus stop grams can withdraw evidence)."""

    item: int                 # row of ``DecontamIndex.items``
    coverage: float           # share of the item's tokens the span reproduces, in order
    containment: float        # share of the item's tokens its grams cover anywhere in the document
    first_token: int          # the span (inclusive)
    last_token: int
    long_hit: bool            # a long n-gram of the item lies in the span
    prose_tokens: int         # item tokens covered by prose grams in the span
    evidence_hash: tuple[int, ...]  # the span's non-stop prose grams (unsigned) ...
    evidence_pos: tuple[int, ...]   # ... and their item positions


def qualifies(finding: Finding, rules: DecontamRules, item_tokens: int,
              corpus_stop: np.ndarray | None = None) -> str | None:
    """The rule under which a candidate is contamination, or None (module docstring of
    ``spark_jobs.decontaminate``); ``corpus_stop``: sorted hashes of corpus-frequent grams."""
    if item_tokens < rules.min_item_tokens:
        return None
    if finding.long_hit and finding.coverage >= rules.min_coverage:
        return LONG
    hashes = np.array(finding.evidence_hash, dtype=np.uint64)
    positions = np.array(finding.evidence_pos, dtype=np.int64)
    if corpus_stop is not None and len(corpus_stop):
        positions = positions[~_in_sorted(hashes, corpus_stop)]
    if finding.coverage >= rules.min_coverage and \
            _covered(np.unique(positions), rules.short_ngram) >= rules.min_evidence_tokens:
        return SPAN
    # No evidence gram: only a near-whole copy with prose in it counts (formula soup never does).
    if finding.coverage >= rules.template_coverage and finding.prose_tokens >= rules.min_evidence_tokens \
            and finding.coverage * item_tokens >= rules.template_min_tokens:
        return TEMPLATE
    return None


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(lo[i], hi[i])`` for every i (vectorised)."""
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
    return np.arange(total) + starts


def _covered(positions: np.ndarray, n: int) -> int:
    """Tokens covered by grams of length ``n`` starting at sorted unique ``positions``."""
    if len(positions) == 0:
        return 0
    return int(np.minimum(np.diff(positions), n).sum()) + n


def _gram_window(doc_pos: np.ndarray, item_pos: np.ndarray, evidence: np.ndarray, n: int, width: int
                 ) -> tuple[int, int]:
    """``[left, right)`` of the hits (sorted by ``doc_pos``) in the window of at most ``width``
    document tokens whose grams cover most of the item, evidence-bearing windows first."""
    ends = np.searchsorted(doc_pos, doc_pos + (width - n), side="right")
    best, best_key = (0, 1), (False, -1)
    seen_end = -1
    for left, right in zip(range(len(doc_pos)), ends.tolist(), strict=True):
        if right <= seen_end:  # a window inside the previous one cannot score higher
            continue
        seen_end = right
        key = (bool(evidence[left:right].any()), _covered(np.unique(item_pos[left:right]), n))
        if key > best_key:
            best, best_key = (left, right), key
    return best


def _aligned(item: list[int], doc: list[int], min_block: int) -> tuple[int, int, int]:
    """``(tokens, first, last)``: item tokens reproduced in order by ``doc`` (matching blocks of
    at least ``min_block`` tokens: stray common words are no evidence) and the doc range used."""
    from difflib import SequenceMatcher

    blocks = [b for b in SequenceMatcher(None, item, doc, autojunk=False).get_matching_blocks()
              if b.size >= min_block]
    if not blocks:
        return 0, 0, -1
    return sum(b.size for b in blocks), blocks[0].b, blocks[-1].b + blocks[-1].size - 1


def _lookup(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, value index)``: every row of sorted ``keys`` equal to each of ``values``."""
    lo = np.searchsorted(keys, values, side="left")
    hi = np.searchsorted(keys, values, side="right")
    return _ranges(lo, hi), np.repeat(np.arange(len(values)), hi - lo)


def evaluate_document(ids: np.ndarray, hits: DocumentHits, index: DecontamIndex) -> list[Finding]:
    """Candidate findings of one document (template ``ids`` and their ``scan_document`` hits).

    Candidates are the items behind the document's evidence grams (prose, not stop grams), long
    n-grams and anchors (template-only items); each is then matched from its own side — its grams
    looked up among the document's hits — so a stop gram never fans out to every item holding it.
    """
    rules, n = index.rules, index.rules.short_ngram
    if not len(hits.short_pos):
        return []
    rows, _ = _lookup(index.short_hash, hits.short_hash)
    candidates = set(index.short_item[rows][index.short_prose[rows]].tolist())
    rows, _ = _lookup(index.anchor_hash, hits.short_hash)
    candidates.update(index.anchor_item[rows].tolist())
    long_items: dict[int, list[int]] = {}
    if len(hits.long_pos):
        rows, which = _lookup(index.long_hash, hits.long_hash)
        for item, at in zip(index.long_item[rows].tolist(), hits.long_pos[which].tolist(), strict=True):
            long_items.setdefault(item, []).append(at)
        candidates.update(long_items)
    if not candidates:
        return []
    found: list[Finding] = []
    doc_ids = ids.tolist()
    by_hash = np.argsort(hits.short_hash, kind="stable")
    doc_hashes = hits.short_hash[by_hash]
    for item in sorted(candidates):
        g0, g1 = int(index.gram_start[item]), int(index.gram_start[item + 1])
        rows, item_pos = _lookup(doc_hashes, index.gram_hash[g0:g1])  # (document hit, item gram) pairs
        if not len(rows):
            continue
        length = int(index.item_tokens[item])
        anywhere = _covered(np.unique(item_pos), n) / length
        if anywhere < rules.min_candidate_coverage:
            continue
        doc_pos = hits.short_pos[by_hash[rows]]
        by_doc = np.argsort(doc_pos, kind="stable")
        doc_pos, item_pos = doc_pos[by_doc], item_pos[by_doc]
        prose = index.gram_prose[g0 + item_pos]
        evidence = prose & ~index.gram_stop[g0 + item_pos]
        width = max(int(np.ceil(rules.span_slack * length)), length)
        left, right = _gram_window(doc_pos, item_pos, evidence, n, width)
        first = max(0, int(doc_pos[left]) - rules.edit_gap)
        last = min(len(doc_ids) - 1, int(doc_pos[right - 1]) + n - 1 + rules.edit_gap)
        item_ids = index.item_ids[index.item_start[item]:index.item_start[item + 1]].tolist()
        tokens, a, b = _aligned(item_ids, doc_ids[first:last + 1], rules.min_block)
        if tokens == 0:
            continue
        span_first, span_last = first + a, first + b
        in_span = (doc_pos >= span_first) & (doc_pos + n - 1 <= span_last)
        found.append(Finding(
            item=item, coverage=tokens / length, containment=anywhere,
            first_token=span_first, last_token=span_last,
            long_hit=any(span_first <= p and p + rules.ngram - 1 <= span_last for p in long_items.get(item, ())),
            prose_tokens=_covered(np.unique(item_pos[in_span & prose]), n),
            evidence_hash=tuple(index.gram_hash[g0 + item_pos[in_span & evidence]].tolist()),
            evidence_pos=tuple(item_pos[in_span & evidence].tolist()),
        ))
    return found


def find_in_text(text: str, index: DecontamIndex, corpus_stop: np.ndarray | None = None
                 ) -> list[tuple[Finding, str, int, int]]:
    """``(finding, rule, start, end)`` for every item ``text`` is contaminated with, ``[start, end)``
    the character range of the span (the per-document work of the Spark job, and tests)."""
    ids, raw_index = template_ids(text)
    hits = scan_document(ids, index)
    if not hits:
        return []
    out = []
    for finding in evaluate_document(ids, hits, index):
        rule = qualifies(finding, index.rules, int(index.item_tokens[finding.item]), corpus_stop)
        if rule is not None:
            out.append((finding, rule, *template_offsets(text, raw_index, finding.first_token, finding.last_token)))
    return out


# ---- Arrow batch functions (Spark ``mapInArrow``; the index arrives as a broadcast) -----------

SCAN_SCHEMA = ("doc_id string, gram_hash long, gram_docs int, item int, coverage double, containment double, "
               "span_start long, span_end long, span_text string, long_hit boolean, prose_tokens int, "
               "evidence_hash array<long>, evidence_pos array<int>")
FINDING_SCHEMA = ("doc_id string, benchmark string, item_id string, rule string, matched_ngram string, "
                  "containment double, coverage double, span_start long, span_end long")
MAX_SPAN_TEXT = 600  # characters of the matched span kept for the report (offsets locate the rest)


def _value(maybe_broadcast: object) -> Any:
    return getattr(maybe_broadcast, "value", maybe_broadcast)


def scan_batches(index: object, emit_grams: bool):  # -> mapInArrow function
    """``(doc_id, text)`` batches → candidate findings, plus (``emit_grams``) the partition's
    evidence grams with the number of its documents holding each (rows with ``item`` null and
    ``gram_docs`` set; counted per partition so the shuffle carries grams, not gram × document)."""

    def compute(batches):  # type: ignore[no-untyped-def]
        import pyarrow as pa

        idx: DecontamIndex = _value(index)
        schema = _arrow_schema(SCAN_SCHEMA)
        gram_docs: dict[int, int] = {}
        for batch in batches:
            rows: dict[str, list[Any]] = {name: [] for name in schema.names}
            for doc_id, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist(),
                                    strict=True):
                text = text or ""
                ids, raw_index = template_ids(text)
                hits = scan_document(ids, idx)
                if not hits:
                    continue
                if emit_grams:
                    for value in _evidence_hashes(np.unique(hits.short_hash), idx).tolist():
                        gram_docs[value] = gram_docs.get(value, 0) + 1
                for finding in evaluate_document(ids, hits, idx):
                    if qualifies(finding, idx.rules, int(idx.item_tokens[finding.item])) is None:
                        continue
                    start, end = template_offsets(text, raw_index, finding.first_token, finding.last_token)
                    _append(rows, doc_id=doc_id, item=finding.item, coverage=finding.coverage,
                            containment=finding.containment, span_start=start, span_end=end,
                            span_text=text[start:min(end, start + MAX_SPAN_TEXT)], long_hit=finding.long_hit,
                            prose_tokens=finding.prose_tokens,
                            evidence_hash=to_signed(np.array(finding.evidence_hash, dtype=np.uint64)).tolist(),
                            evidence_pos=list(finding.evidence_pos))
            yield pa.RecordBatch.from_pydict(rows, schema=schema)
        if gram_docs:
            rows = {name: [None] * len(gram_docs) for name in schema.names}
            rows["gram_hash"] = to_signed(np.array(list(gram_docs), dtype=np.uint64)).tolist()
            rows["gram_docs"] = list(gram_docs.values())
            yield pa.RecordBatch.from_pydict(rows, schema=schema)

    return compute


def _evidence_hashes(hashes: np.ndarray, index: DecontamIndex) -> np.ndarray:
    """The distinct hit hashes that are evidence grams of some item (prose, not stop grams)."""
    rows, _ = _lookup(index.short_hash, hashes)
    return np.unique(index.short_hash[rows][index.short_prose[rows]])


def judge_batches(index: object, corpus_stop: object):  # -> mapInArrow function
    """Candidate rows of ``scan_batches`` → ``FINDING_SCHEMA`` rows that still qualify once the
    corpus stop grams (sorted uint64, or its broadcast) carry no evidence."""

    def compute(batches):  # type: ignore[no-untyped-def]
        import pyarrow as pa

        idx: DecontamIndex = _value(index)
        stop = np.asarray(_value(corpus_stop), dtype=np.uint64)
        schema = _arrow_schema(FINDING_SCHEMA)
        for batch in batches:
            rows: dict[str, list[Any]] = {name: [] for name in schema.names}
            for row in batch.to_pylist():
                item = int(row["item"])
                finding = Finding(item, row["coverage"], row["containment"], 0, 0, bool(row["long_hit"]),
                                  int(row["prose_tokens"]),
                                  tuple(np.array(row["evidence_hash"], dtype=np.int64).view(np.uint64).tolist()),
                                  tuple(row["evidence_pos"]))
                rule = qualifies(finding, idx.rules, int(idx.item_tokens[item]), stop)
                if rule is None:
                    continue
                benchmark, item_id = idx.items[item]
                _append(rows, doc_id=row["doc_id"], benchmark=benchmark, item_id=item_id, rule=rule,
                        matched_ngram=row["span_text"], containment=row["containment"], coverage=row["coverage"],
                        span_start=row["span_start"], span_end=row["span_end"])
            yield pa.RecordBatch.from_pydict(rows, schema=schema)

    return compute


def _append(rows: dict[str, list[Any]], **values: Any) -> None:
    for name, column in rows.items():
        column.append(values.get(name))


def _arrow_schema(ddl: str) -> Any:
    """A pyarrow schema for the simple DDL strings above (string, long, int, double, boolean, array<...>)."""
    import pyarrow as pa

    types = {"string": pa.string(), "long": pa.int64(), "int": pa.int32(), "double": pa.float64(),
             "boolean": pa.bool_()}
    fields = []
    for part in ddl.split(", "):
        name, kind = part.split(" ", 1)
        if kind.startswith("array<"):
            fields.append(pa.field(name, pa.list_(types[kind[6:-1]])))
        else:
            fields.append(pa.field(name, types[kind]))
    return pa.schema(fields)
