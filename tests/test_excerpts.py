"""Excerpt cap and boundary rule on the real sample (LaTeX books, SE posts) and hand-made cases."""

from __future__ import annotations

import json

import pytest

from models.generation.excerpts import cut_excerpt, math_spans
from tests.conftest import SAMPLE

RAW = SAMPLE / "raw_corpus"


def real_texts() -> list[tuple[str, str]]:
    """(source file, text) for every text field of the embedded raw sample."""
    found: list[tuple[str, str]] = []
    for path in sorted(RAW.glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for field in ("text", "Q", "A", "input", "output"):
                if isinstance(record.get(field), str) and record[field].strip():
                    found.append((path.parent.name, record[field]))
            question = record.get("question")
            if isinstance(question, dict) and question.get("body_html"):
                found.append((path.parent.name, question["body_html"]))
    return found


@pytest.fixture(scope="module")
def texts() -> list[tuple[str, str]]:
    found = real_texts()
    if len(found) < 100:
        pytest.skip("embedded sample missing")
    return found


def splits_math(text: str, pos: int) -> bool:
    return any(s.start < pos < s.end for s in math_spans(text))


@pytest.mark.parametrize("cap", [1000, 2000])
def test_cap_offsets_and_boundary_on_real_text(texts: list[tuple[str, str]], cap: int) -> None:
    sources = set()
    for source, text in texts:
        excerpt = cut_excerpt(text, cap)
        assert excerpt is not None, text[:200]
        assert len(excerpt.text) <= cap
        assert text[excerpt.start:excerpt.end] == excerpt.text
        # (the whole document may end inside an unclosed formula; then the excerpt is all of it)
        whole = excerpt.start == len(text) - len(text.lstrip()) and excerpt.end == len(text.rstrip())
        assert whole or not splits_math(text, excerpt.end), (source, excerpt.text[-120:])
        assert excerpt.text == excerpt.text.strip()
        sources.add(source)
    assert sources == {"se_threads", "stackmathqa", "mathlm_stackexchange", "latex_books"}


def test_blind_cut_would_split_math_where_ours_does_not(texts: list[tuple[str, str]]) -> None:
    """The rule matters on this data: a plain 1,000-char cut lands inside math in many documents."""
    risky = [t for _, t in texts if len(t) > 1000 and splits_math(t, 1000)]
    assert len(risky) >= 20
    for text in risky:
        excerpt = cut_excerpt(text, 1000)
        assert excerpt is not None and excerpt.end < 1000
        assert not splits_math(text, excerpt.end)


def test_excerpt_ends_on_a_sentence_or_formula_boundary_when_one_exists(texts: list[tuple[str, str]]) -> None:
    ends = [cut_excerpt(t, 1000) for _, t in texts if len(t) > 1500]
    clean = [e for e in ends if e and (e.text[-1] in ".?!$])}" or e.text.endswith(("\\]", "$$")))]
    assert len(clean) / len(ends) > 0.8


def test_cut_moves_back_before_a_formula_that_crosses_the_cap() -> None:
    text = "We start here. " + "Words go on. " * 5 + "Then $$" + "x+" * 100 + "1$$ and more."
    excerpt = cut_excerpt(text, 120)
    assert excerpt is not None
    assert "$$" not in excerpt.text
    assert excerpt.text.endswith("Words go on.")


def test_prefers_sentence_end_over_whitespace() -> None:
    text = "First sentence is here. Second one runs on and on without stopping " + "word " * 40
    excerpt = cut_excerpt(text, 40)
    assert excerpt is not None and excerpt.text == "First sentence is here."
    # ... unless the sentence keeps less than half the cap: then any whitespace outside math
    longer = cut_excerpt(text, 100)
    assert longer is not None and len(longer.text) > 90 and longer.text.endswith("word")


def test_long_single_sentence_falls_back_to_whitespace_outside_math() -> None:
    text = "Let $a_1$ and " + "then $x_{i}$ and " * 30 + "so on."
    excerpt = cut_excerpt(text, 200)
    assert excerpt is not None and len(excerpt.text) > 100
    assert not splits_math(text, excerpt.end)


def test_all_math_prefix_gives_no_excerpt() -> None:
    text = "\\begin{align}" + "a &= b \\\\ " * 200 + "\\end{align} Done."
    assert cut_excerpt(text, 1000) is None


def test_prose_environment_may_be_cut_but_math_environment_not() -> None:
    body = "This is a sentence of the proof. " * 60
    proof = cut_excerpt("\\begin{proof}" + body + "\\end{proof}", 500)
    assert proof is not None and 400 < len(proof.text) <= 500
    align = cut_excerpt("Intro text. \\begin{align*}" + "x &= y. " * 100 + "\\end{align*}", 500)
    assert align is not None and align.text == "Intro text."


def test_math_spans_delimiters() -> None:
    text = r"Cost \$5 today. Then $a+b$, \(c\), \[d\], $$e$$ and \\[2pt] \begin{cases}f\end{cases}"
    got = [text[s.start:s.end] for s in math_spans(text)]
    assert got == ["$a+b$", r"\(c\)", r"\[d\]", "$$e$$", r"\begin{cases}f\end{cases}"]


def test_unclosed_inline_dollar_does_not_cross_a_paragraph() -> None:
    text = "It costs $5 today.\n\nA paragraph with $x$ in it."
    assert [text[s.start:s.end] for s in math_spans(text)] == ["$x$"]


def test_nested_environments_close_on_the_matching_end() -> None:
    text = r"\begin{array}{c}\begin{array}{c}1\end{array}\end{array} tail"
    spans = math_spans(text)
    assert len(spans) == 1 and text[spans[0].start:spans[0].end].endswith(r"\end{array}\end{array}")


def test_start_offset_and_blank_text() -> None:
    text = "   Leading blanks. Then text."
    excerpt = cut_excerpt(text, 1000)
    assert excerpt is not None and excerpt.start == 3 and text[excerpt.start:excerpt.end] == excerpt.text
    assert cut_excerpt("   \n ", 100) is None
    with pytest.raises(ValueError, match="inside a math span"):
        cut_excerpt("a $x+y$ b", 100, start=4)
