"""Math-aware quality metrics and filters (Gopher-style), the math-density score, the quality
score and the normalised text hash. Pure functions over one cleaned document.

Why not plain Gopher/C4 rules: they were written for web prose, and a formula page trips them.

* C4 drops every page containing ``{`` (to catch code). Every LaTeX page has braces
  (``\\frac{a}{b}``, ``\\mathbb{R}``), so the rule would drop the whole math corpus. It is replaced
  by nothing brace-specific: code and markup junk are caught by the alphabetic-word fraction,
  the mean word length and the stop-word rule, all measured on the *prose view* below.
* Gopher caps symbols (``#``, ``...``, ``…``) at 0.1 per word and wants 80 % of words to contain a
  letter. Inside math, ``#`` (macro args), ``\\dots`` and letter-free tokens (``=``, ``2^{n}``,
  ``(a,b)``) are normal. So symbol and alphabetic ratios are counted on the *prose view*: the
  text with math spans removed and LaTeX control words and braces stripped.
* Repetition (duplicate lines/paragraphs, top n-grams, duplicate 5-grams) uses tokens in which a
  whole math span is one token, so ``let $x$ be`` and ``let $y$ be`` do not count as the same
  n-gram, and lines that hold only markup (``\\begin{proof}``, ``\\]``, ``$$``) are not counted as
  duplicate lines: LaTeX repeats them by construction.

Rule order (``RULES``) is fixed: the first failed rule is a dropped document's ``primary_reason``.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from spark_jobs.transforms.text_normalize import MATH_SPAN_RE

if TYPE_CHECKING:
    from jzlake.settings import CleanSettings

# Gopher's stop words: a real English sentence contains a few of them.
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})

# Words that mark mathematical prose; with LaTeX tokens they make up the math density.
_MATH_WORDS = """
theorem theorems lemma lemmas proof proofs prove proves proved corollary proposition definition
axiom axioms conjecture equation equations inequality identity formula formulas integer integers
prime primes polynomial polynomials function functions derivative derivatives integral integrals
matrix matrices vector vectors eigenvalue eigenvalues determinant group groups ring rings field
fields module modules category categories functor functors morphism morphisms isomorphism
isomorphic homomorphism set sets subset subsets map maps space spaces topology topological
homotopy manifold manifolds probability variable variables sum product limit limits sequence
sequences series converge converges convergence bounded finite infinite countable real complex
rational irrational number numbers solve solution solutions algebra algebraic geometry triangle
angle circle radius area volume fraction denominator numerator divisible modulo logarithm
exponent square root roots graph vertex vertices injective surjective bijective continuous
differentiable dimension basis linear quadratic cubic coefficient coefficients variable
arithmetic calculus lattice measure metric norm operator kernel quotient induction lambda
formula formulas sentence sentences structure structures derivation derivations
"""
MATH_VOCABULARY = frozenset(_MATH_WORDS.split())

_CONTROL_WORD_RE = re.compile(r"\\[A-Za-z@]+\*?")
_ENV_MARK_RE = re.compile(r"\\(?:begin|end)\{[^{}]*\}")
_PROSE_STRIP_RE = re.compile(r"[{}\[\]\\]")
_PUNCT_EDGES = "\"'`.,;:!?()[]{}<>*_~|/«»“”‘’"
_HEADING_RE = re.compile(r"^#{1,6}\s", re.MULTILINE)
_BULLET_RE = re.compile(r"^\s*(?:[-*•‣◦▪]\s|\\item\b)")


@dataclass(frozen=True)
class Rule:
    """One filter: drop when ``metric`` is ``"<"`` or ``">"`` the setting ``threshold``."""

    reason: str
    metric: str
    op: str
    threshold: str


# The fixed order: size first, then "is this language", then repetition, then the optional
# math-density floor. The first failure is the primary reason.
RULES: tuple[Rule, ...] = (
    Rule("too_few_words", "n_words", "<", "min_words"),
    Rule("too_many_words", "n_words", ">", "max_words"),
    Rule("few_stopwords", "stopword_count", "<", "min_stopwords"),
    Rule("mean_word_length_low", "mean_word_length", "<", "min_mean_word_length"),
    Rule("mean_word_length_high", "mean_word_length", ">", "max_mean_word_length"),
    Rule("symbol_ratio_high", "symbol_word_ratio", ">", "max_symbol_word_ratio"),
    Rule("alpha_fraction_low", "alpha_word_fraction", "<", "min_alpha_word_fraction"),
    Rule("bullet_lines_high", "bullet_line_fraction", ">", "max_bullet_line_fraction"),
    Rule("ellipsis_lines_high", "ellipsis_line_fraction", ">", "max_ellipsis_line_fraction"),
    Rule("duplicate_lines", "duplicate_line_fraction", ">", "max_duplicate_line_fraction"),
    Rule("duplicate_paragraphs", "duplicate_paragraph_fraction", ">", "max_duplicate_paragraph_fraction"),
    Rule("top_2gram_high", "top_2gram_fraction", ">", "max_top_2gram_fraction"),
    Rule("top_3gram_high", "top_3gram_fraction", ">", "max_top_3gram_fraction"),
    Rule("top_4gram_high", "top_4gram_fraction", ">", "max_top_4gram_fraction"),
    Rule("duplicate_5grams", "dup_5gram_fraction", ">", "max_dup_5gram_fraction"),
    Rule("low_math_density", "math_density", "<", "min_math_density"),
)
DROP_REASONS: tuple[str, ...] = tuple(r.reason for r in RULES)


@dataclass(frozen=True)
class Assessment:
    """Everything the clean job stores about one document."""

    metrics: dict[str, float]
    n_words: int
    n_chars: int
    math_density: float
    quality_score: float
    reasons: list[str]

    @property
    def kept(self) -> bool:
        return not self.reasons


# ---- views of a document ----------------------------------------------------------------------

_HAS_LETTER_RE = re.compile(r"[^\W\d_]")
_NOT_NEWLINE_RE = re.compile(r"[^\n]")
_PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t]*\n\s*")
_MASK = "\x00"  # stands in for math characters in the masked view (never in cleaned text)


@dataclass(frozen=True)
class _Views:
    """One pass over the math spans of a document, shared by every metric."""

    text: str
    bounds: list[tuple[int, int]]  # (start, end) of each math span, in order
    masked: str                    # ``text`` with each math character (but newlines) replaced by ``_MASK``

    @classmethod
    def of(cls, text: str) -> _Views:
        pieces, bounds, pos = [], [], 0
        for match in MATH_SPAN_RE.finditer(text):
            pieces.append(text[pos:match.start()])
            pieces.append(_NOT_NEWLINE_RE.sub(_MASK, match.group(0)))
            bounds.append(match.span())
            pos = match.end()
        pieces.append(text[pos:])
        return cls(text, bounds, "".join(pieces))

    @property
    def spans(self) -> list[str]:
        return [self.text[start:end] for start, end in self.bounds]

    def pieces(self) -> Iterator[tuple[bool, str]]:
        """``(is_math, piece)`` in document order."""
        pos = 0
        for start, end in self.bounds:
            if start > pos:
                yield False, self.text[pos:start]
            yield True, self.text[start:end]
            pos = end
        if pos < len(self.text):
            yield False, self.text[pos:]


def prose_view(text: str) -> str:
    """The text with math spans removed and LaTeX control words, environment markers and braces
    stripped: what is left is the natural-language part."""
    return _prose(_Views.of(text).masked)


def _prose(masked: str) -> str:
    outside = masked.replace(_MASK, " ")
    outside = _ENV_MARK_RE.sub(" ", outside)
    outside = _CONTROL_WORD_RE.sub(" ", outside)
    return _PROSE_STRIP_RE.sub(" ", outside)


def repetition_tokens(text: str) -> list[str]:
    """Lower-cased words with edge punctuation stripped; each math span is one token; tokens
    with a LaTeX command or without any letter are left out."""
    return _repetition_tokens(_Views.of(text))


def _repetition_tokens(views: _Views) -> list[str]:
    tokens: list[str] = []
    for is_math, piece in views.pieces():
        if is_math:
            # An empty span (``$ $``) is an artefact of an unpaired dollar, not a formula.
            if piece.strip("$ \n\t"):
                tokens.append(" ".join(piece.split()))
            continue
        for word in piece.lower().split():
            word = word.strip(_PUNCT_EDGES)
            # Tokens holding LaTeX commands (``\\item``, ``\\sFmla{\\False}{A``) or no letter at
            # all (``}``) are skipped: they are markup or formulas written with macros, which
            # LaTeX repeats by construction (derivations, tableaux), not repeated prose.
            if word and "\\" not in word and _HAS_LETTER_RE.search(word):
                tokens.append(word)
    return tokens


def _has_prose(masked: str) -> bool:
    """Whether a (masked) line or paragraph holds a prose word, i.e. is not only math, LaTeX
    commands and punctuation (``\\]``, ``\\end{proof}``, ``[\\sFmla{\\True}{A}, just={\\TRule{..}}``)."""
    return any("\\" not in word and _HAS_LETTER_RE.search(word) for word in masked.split())


def _units(views: _Views, separator: re.Pattern[str]) -> list[str]:
    """Lines or paragraphs that hold prose, whitespace-normalised (math included)."""
    units, pos = [], 0
    bounds = [(m.start(), m.end()) for m in separator.finditer(views.masked)] + [(len(views.text),) * 2]
    for start, end in bounds:
        if _has_prose(views.masked[pos:start]):
            units.append(" ".join(views.text[pos:start].split()))
        pos = end
    return units


# ---- individual metrics -----------------------------------------------------------------------


def duplicate_fraction(units: Iterable[str]) -> float:
    """Fraction of units (lines or paragraphs) that repeat an earlier one."""
    seen: set[str] = set()
    total = dup = 0
    for unit in units:
        total += 1
        if unit in seen:
            dup += 1
        else:
            seen.add(unit)
    return dup / total if total else 0.0


def top_ngram_fraction(tokens: list[str], n: int) -> float:
    """Gopher: characters covered by the most frequent word n-gram / characters in all words."""
    total = sum(len(t) for t in tokens)
    if total == 0 or len(tokens) < n:
        return 0.0
    counts = Counter(zip(*(tokens[i:] for i in range(n)), strict=False))
    top = max(counts.values())
    if top < 2:
        return 0.0
    chars = max(sum(len(t) for t in gram) for gram, c in counts.items() if c == top)
    return min(1.0, chars * top / total)


def duplicate_ngram_fraction(tokens: list[str], n: int) -> float:
    """Gopher: characters in words covered by an n-gram seen earlier / characters in all words."""
    total = sum(len(t) for t in tokens)
    if total == 0 or len(tokens) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(tokens)
    for i, gram in enumerate(zip(*(tokens[j:] for j in range(n)), strict=False)):
        if gram in seen:
            for j in range(i, i + n):
                covered[j] = True
        else:
            seen.add(gram)
    return sum(len(t) for t, c in zip(tokens, covered, strict=True) if c) / total


def _symbol_count(prose_source: str) -> int:
    """Gopher's symbols (``#``, ``...``, ``…``) outside math; Markdown heading marks and ``\\#``
    do not count."""
    text = _HEADING_RE.sub("", prose_source)
    hashes = len(re.findall(r"(?<!\\)#", text))
    return hashes + text.count("...") + text.count("…")


# ---- all metrics, rules, score ----------------------------------------------------------------


def compute_metrics(text: str) -> dict[str, float]:
    """Every quality metric of one cleaned document (all floats; counts as whole numbers)."""
    views = _Views.of(text)
    n_words = len(text.split())
    prose_words = [w.strip(_PUNCT_EDGES) for w in _prose(views.masked).split()]
    prose_words = [w for w in prose_words if w]
    n_prose = len(prose_words)
    lower_prose = [w.lower() for w in prose_words]

    stopwords = sum(1 for w in lower_prose if w in STOP_WORDS)
    vocab = sum(1 for w in lower_prose if w in MATH_VOCABULARY)
    latex_tokens = sum(len(_CONTROL_WORD_RE.findall(span)) for span in views.spans)

    lines = [line.strip() for line in text.split("\n") if line.strip()]
    tokens = _repetition_tokens(views)

    metrics: dict[str, float] = {
        "n_words": float(n_words),
        "n_chars": float(len(text)),
        "n_prose_words": float(n_prose),
        "mean_word_length": (sum(len(w) for w in prose_words) / n_prose) if n_prose else 0.0,
        "symbol_word_ratio": _symbol_count(views.masked) / max(n_prose, 1),
        "alpha_word_fraction": (sum(1 for w in prose_words if _HAS_LETTER_RE.search(w)) / n_prose)
        if n_prose else 0.0,
        "stopword_count": float(stopwords),
        "stopword_fraction": stopwords / n_prose if n_prose else 0.0,
        "bullet_line_fraction": (sum(1 for line in lines if _BULLET_RE.match(line)) / len(lines))
        if lines else 0.0,
        "ellipsis_line_fraction": (sum(1 for line in lines if line.endswith(("...", "…"))) / len(lines))
        if lines else 0.0,
        "duplicate_line_fraction": duplicate_fraction(_units(views, _NEWLINE_RE)),
        "duplicate_paragraph_fraction": duplicate_fraction(_units(views, _PARAGRAPH_BREAK_RE)),
        "top_2gram_fraction": top_ngram_fraction(tokens, 2),
        "top_3gram_fraction": top_ngram_fraction(tokens, 3),
        "top_4gram_fraction": top_ngram_fraction(tokens, 4),
        "dup_5gram_fraction": duplicate_ngram_fraction(tokens, 5),
        "math_spans": float(len(views.spans)),
        "latex_tokens": float(latex_tokens),
        "math_vocab_words": float(vocab),
    }
    metrics["math_density"] = math_density_from(metrics)
    return {k: round(v, 6) for k, v in metrics.items()}


_NEWLINE_RE = re.compile("\n")


def math_density_from(metrics: dict[str, float]) -> float:
    """(math spans + LaTeX control words inside math + math-vocabulary words) per word, in [0, 1]."""
    signal = metrics["math_spans"] + metrics["latex_tokens"] + metrics["math_vocab_words"]
    return min(1.0, signal / metrics["n_words"]) if metrics["n_words"] else 0.0


def failed_rules(metrics: dict[str, float], thresholds: CleanSettings) -> list[str]:
    """Reasons of every failed rule, in ``RULES`` order; a threshold set to None is off."""
    reasons = []
    for rule in RULES:
        limit = getattr(thresholds, rule.threshold)
        if limit is None:
            continue
        value = metrics[rule.metric]
        if (rule.op == "<" and value < limit) or (rule.op == ">" and value > limit):
            reasons.append(rule.reason)
    return reasons


def quality_score(metrics: dict[str, float]) -> float:
    """A [0, 1] score used to rank documents (dedup keeps the best copy of a cluster)::

        0.20 · length      clip(log10(n_words) / 3)           1 000 words or more → 1
      + 0.30 · originality 1 − max(dup lines, dup paragraphs, dup 5-grams, top 2-gram)
      + 0.15 · alphabetic  alpha_word_fraction
      + 0.15 · language    clip(stopword_fraction / 0.10)     English prose sits at 10–15 %
      + 0.20 · math        clip(math_density / 0.20)

    Each term is in [0, 1] and the weights sum to 1, so the score is in [0, 1]; an empty
    document scores 0."""
    def clip(x: float) -> float:
        return max(0.0, min(1.0, x))

    n_words = metrics["n_words"]
    if n_words < 1:
        return 0.0
    length = clip(math.log10(n_words) / 3)
    repetition = max(metrics["duplicate_line_fraction"], metrics["duplicate_paragraph_fraction"],
                     metrics["dup_5gram_fraction"], metrics["top_2gram_fraction"])
    score = (0.20 * length + 0.30 * (1 - clip(repetition)) + 0.15 * clip(metrics["alpha_word_fraction"])
             + 0.15 * clip(metrics["stopword_fraction"] / 0.10) + 0.20 * clip(metrics["math_density"] / 0.20))
    return round(clip(score), 6)


@cache
def _punctuation_table() -> dict[int, None]:
    # Planes 0-1 hold every punctuation character (planes 2+ are CJK ideographs, tags, private
    # use); scanning them alone keeps the first call at ~0.1 s instead of ~0.4 s.
    return {cp: None for cp in range(0x20000) if unicodedata.category(chr(cp)).startswith("P")}


def text_hash(text: str) -> str:
    """sha256 of the dedup normal form: NFKC, case-folded, Unicode punctuation removed, whitespace
    collapsed. NFKC is fine *here* (and only here): this is a matching key, not stored text."""
    norm = unicodedata.normalize("NFKC", text).casefold().translate(_punctuation_table())
    return hashlib.sha256(" ".join(norm.split()).encode("utf-8")).hexdigest()


def assess(text: str, thresholds: CleanSettings) -> Assessment:
    """Metrics, rules and score for one cleaned document."""
    metrics = compute_metrics(text)
    return Assessment(
        metrics=metrics,
        n_words=int(metrics["n_words"]),
        n_chars=len(text),
        math_density=metrics["math_density"],
        quality_score=quality_score(metrics),
        reasons=failed_rules(metrics, thresholds),
    )
