"""Cut a prompt excerpt from a document: bounded length, clean boundary, never inside math.

The paper feeds the first ~1,000 characters of a seed text to the synthesis prompt. A blind cut
at 1,000 characters lands mid-formula often enough (``$\\int_0^{\\pi``) to hand the model broken
LaTeX, so the cut moves back to the last boundary before the cap:

1. a sentence end (``.``, ``?``, ``!`` followed by whitespace), a paragraph break, or the end of
   a display formula (``$$…$$``, ``\\[…\\]``, ``\\begin{align}…\\end{align}``);
2. if that would keep less than half the cap, also the end of an inline formula or any
   whitespace (line ends included);

and never a position inside a math span (``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]``,
``\\begin{env}…\\end{env}`` for every environment except the prose ones in
``PROSE_ENVIRONMENTS``: a cut inside a long ``proof`` is fine, one inside ``align`` is not).
When no such position exists (the cap falls inside a formula that starts at the beginning)
there is no excerpt and the caller records why.

Offsets are into the source text: ``text[start:end] == excerpt.text``.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

_BEGIN = re.compile(r"\\begin\{([^{}]+)\}")
# Environments that hold prose, not a formula: cutting inside a theorem or a proof leaves
# readable text, while cutting inside align/array/tikzpicture leaves broken markup. Every
# environment not listed here (all math, tables, figures, code) is protected.
PROSE_ENVIRONMENTS = frozenset({
    "document", "abstract", "quote", "quotation", "center", "flushleft", "flushright", "minipage",
    "itemize", "enumerate", "description", "proof", "theorem", "lemma", "corollary", "proposition",
    "definition", "remark", "example", "examples", "exercise", "exercises", "problem", "solution",
    "claim", "conjecture", "fact", "note", "notation", "axiom", "observation", "question", "answer",
    "thm", "lem", "cor", "prop", "defn", "rmk", "eg", "ex", "xca",
})
_ENV_TOKEN = r"\\(begin|end)\{%s\}"


@dataclass(frozen=True)
class Excerpt:
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class MathSpan:
    start: int
    end: int  # exclusive
    display: bool


def _find_unescaped(text: str, needle: str, pos: int, stop: int | None = None) -> int:
    """Index of the next ``needle`` at or after ``pos`` not preceded by a backslash, else -1."""
    stop = len(text) if stop is None else stop
    while True:
        i = text.find(needle, pos, stop)
        if i < 0:
            return -1
        backslashes = 0
        j = i - 1
        while j >= 0 and text[j] == "\\":
            backslashes += 1
            j -= 1
        if backslashes % 2 == 0:
            return i
        pos = i + 1


def _env_end(text: str, name: str, pos: int) -> int:
    """End (exclusive) of the ``\\end{name}`` matching a ``\\begin{name}`` before ``pos``."""
    depth = 1
    for m in re.finditer(_ENV_TOKEN % re.escape(name), text[pos:]):
        depth += 1 if m.group(1) == "begin" else -1
        if depth == 0:
            return pos + m.end()
    return len(text)  # unclosed: everything after it counts as math (conservative)


def math_spans(text: str) -> list[MathSpan]:
    """Top-level math spans of ``text``, in order, non-overlapping.

    Unclosed display math runs to the end of the text (nothing after it is a safe cut). An
    unclosed inline ``$`` that finds no partner before a blank line is a literal dollar
    (currency in forum posts), as in LaTeX where inline math cannot cross a paragraph.
    """
    spans: list[MathSpan] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            nxt = text[i + 1]
            if nxt in "[(":
                close = "\\]" if nxt == "[" else "\\)"
                j = text.find(close, i + 2)
                end = n if j < 0 else j + 2
                spans.append(MathSpan(i, end, nxt == "["))
                i = end
                continue
            m = _BEGIN.match(text, i)
            if m and m.group(1).rstrip("*").lower() not in PROSE_ENVIRONMENTS:
                end = _env_end(text, m.group(1), m.end())
                spans.append(MathSpan(i, end, True))
                i = end
                continue
            i += 2  # an escaped character (\$, \\, \{ ...) or a macro's first letter
            continue
        if ch == "$":
            if text.startswith("$$", i):
                j = _find_unescaped(text, "$$", i + 2)
                end = n if j < 0 else j + 2
                spans.append(MathSpan(i, end, True))
                i = end
                continue
            para = text.find("\n\n", i + 1)
            j = _find_unescaped(text, "$", i + 1, n if para < 0 else para)
            if j < 0:
                i += 1  # a lone dollar: literal
                continue
            spans.append(MathSpan(i, j + 1, False))
            i = j + 1
            continue
        i += 1
    return spans


def _inside(spans: list[MathSpan], starts: list[int], pos: int) -> bool:
    """True when a cut at ``pos`` (between pos-1 and pos) would split a math span."""
    k = bisect.bisect_right(starts, pos - 1) - 1
    return k >= 0 and spans[k].start < pos < spans[k].end


def _candidates(text: str, lo: int, hi: int, spans: list[MathSpan]) -> tuple[list[int], list[int]]:
    """(primary, fallback) cut positions in ``(lo, hi]`` as exclusive ends."""
    primary: list[int] = []
    fallback: list[int] = []
    for m in re.finditer(r"[.?!][)\"'\]]*(?=\s)|\n\s*\n", text[lo:hi + 1]):
        end = lo + (m.start() + 1 if m.group(0).startswith("\n") else m.end())
        if lo < end <= hi:
            primary.append(end)
    for span in spans:
        if lo < span.end <= hi:
            (primary if span.display else fallback).append(span.end)
    for m in re.finditer(r"\s", text[lo:hi + 1]):
        end = lo + m.start()
        if lo < end <= hi:
            fallback.append(end)
    return primary, fallback


def cut_excerpt(text: str, max_chars: int = 1000, start: int = 0) -> Excerpt | None:
    """The longest clean excerpt of at most ``max_chars`` characters from ``start`` (see module doc).

    Returns ``None`` when ``text`` is blank from ``start`` or no boundary outside math exists.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    n = len(text)
    while start < n and text[start].isspace():
        start += 1
    if start >= n:
        return None
    spans = math_spans(text)
    starts = [s.start for s in spans]
    if _inside(spans, starts, start):
        raise ValueError(f"excerpt start {start} falls inside a math span; start at a boundary instead")
    limit = start + max_chars
    if n <= limit:
        end = n
    else:
        primary, fallback = _candidates(text, start, limit, spans)
        safe_primary = [e for e in primary if not _inside(spans, starts, e)]
        safe_fallback = [e for e in fallback if not _inside(spans, starts, e)]
        best = max(safe_primary, default=None)
        if best is None or best - start < max_chars // 2:
            best = max([*safe_primary, *safe_fallback], default=None)
        if best is None:
            return None
        end = best
    while end > start and text[end - 1].isspace():
        end -= 1
    if end <= start:
        return None
    return Excerpt(text[start:end], start, end)
