"""Markup → text: math survives byte for byte, entities are decoded, LaTeX noise goes."""

from __future__ import annotations

import json

import pytest

from spark_jobs.transforms.text_normalize import (
    MATH_SPAN_RE,
    html_to_text,
    latex_to_text,
    markdown_to_text,
    math_spans,
    normalize,
    normalize_unicode,
    normalize_whitespace,
)
from tests.conftest import SAMPLE

SE_THREADS = sorted((SAMPLE / "raw_corpus" / "se_threads").glob("*.jsonl"))
HOTT = SAMPLE / "raw_corpus" / "latex_books" / "hott_book.jsonl"
OPEN_LOGIC = next((SAMPLE / "raw_corpus" / "latex_books").glob("open_logic*.jsonl"))


def _latex_rows(path) -> dict[str, str]:
    return {row["path"]: row["text"] for row in map(json.loads, path.read_text().splitlines())}


# ---- math spans ---------------------------------------------------------------------------------


def test_math_spans_cover_every_delimiter_and_skip_escaped_dollars():
    text = (r"Cost \$5. Inline $a+b$, display $$\sum_i x_i$$, \(x\), \[y\] and "
            "\\begin{align}a&=b\\\\ c&=d\\end{align} but not a \\\\[2pt] break.")
    spans = [text[s:e] for s, e in math_spans(text)]
    assert spans == ["$a+b$", r"$$\sum_i x_i$$", r"\(x\)", r"\[y\]", "\\begin{align}a&=b\\\\ c&=d\\end{align}"]


def test_inline_math_never_spans_a_blank_line():
    text = "price $5\n\nand then $x$"
    assert [text[s:e] for s, e in math_spans(text)] == ["$x$"]


# ---- HTML ---------------------------------------------------------------------------------------


def test_html_keeps_math_and_decodes_entities():
    html = ("<p>Let $a &lt; b$ &amp; $$\\sum_{i=1}^n x_i\n  = 1$$ hold.</p>"
            "<p>Caf&eacute; &mdash; see <a href='https://x.org'>the proof</a><br>next line</p>")
    text = normalize(html, "html")
    assert "$a < b$" in text
    assert "$$\\sum_{i=1}^n x_i\n  = 1$$" in text  # display math keeps its own line break
    assert "Café — see the proof\nnext line" in text
    assert "https://x.org" not in text and "<" not in text.replace("$a < b$", "")
    assert text.count("\n\n") == 1  # two paragraphs


def test_html_structure_code_lists_and_dropped_tags():
    html = ("<script>alert(1)</script><h2>Title</h2><ol><li>first</li><li>second</li></ol>"
            "<ul><li>item</li></ul><pre><code>x  =  1\n    y = 2</code></pre>"
            "<p>img: <img src='a.png' alt='a diagram'> <!-- hidden --> end</p>")
    text = html_to_text(html)
    assert "alert" not in text and "hidden" not in text
    assert "Title\n\n1. first\n2. second\n\n- item" in text
    assert "x  =  1\n    y = 2" in text  # code is verbatim
    assert "img: a diagram end" in text


def test_deep_html_nesting_does_not_recurse():
    html = "<div>" * 3000 + "deep $x$" + "</div>" * 3000
    assert normalize(html, "html") == "deep $x$"


def test_real_se_math_matches_the_sources_own_text_extraction():
    """Every math span we extract appears (up to whitespace) in the dump's own ``body_text``.

    The few misses are the dump's fault: its tag stripper ate ``$i < k$`` as a tag, which our
    parser decodes correctly."""
    spans = missing = 0
    decoded_lt = False
    for path in SE_THREADS:
        for thread in map(json.loads, path.read_text().splitlines()):
            for post in [thread["question"], *thread["answers"]]:
                text = html_to_text(post["body_html"])
                reference = " ".join(post["body_text"].split())
                for match in MATH_SPAN_RE.finditer(text):
                    spans += 1
                    missing += " ".join(match.group(0).split()) not in reference
                decoded_lt |= "$i < k$" in text
    assert spans > 2000
    assert missing / spans < 0.01
    assert decoded_lt


# ---- Markdown -----------------------------------------------------------------------------------


def test_markdown_keeps_math_with_angle_brackets_and_unwraps_links():
    md = "If $a<b$ and $c>d$ see [this answer](https://mathoverflow.net/a/1) &amp; ![fig](http://i/x.png)"
    assert markdown_to_text(md) == "If $a<b$ and $c>d$ see this answer & fig"


def test_markdown_does_not_touch_entities_inside_math():
    assert markdown_to_text("$a &lt; b$ &lt; c") == "$a &lt; b$ < c"


# ---- LaTeX --------------------------------------------------------------------------------------


def test_latex_comments_follow_tex_rules():
    src = "50\\% of cases % a comment\nnext \\\\% also a comment\n% whole line\n\nnew para"
    assert latex_to_text(src) == "50\\% of cases next \\\\\nnew para"


def test_latex_drops_preamble_definitions_and_layout_but_keeps_math_and_environments():
    src = (
        "\\documentclass{book}\n\\usepackage[utf8]{inputenc}\n\\newcommand{\\R}{\\mathbb{R}}\n"
        "\\begin{document}\n\\def\\OPTsize{10pt}\n\\setlength{\\parindent}{0pt}\n\\input{chapter1}\n"
        "\\begin{thm}\\label{thm:main}\nFor all $x \\in \\R$, \\[ x^2 \\ge 0. \\]\n\\end{thm}\n"
        "\\begin{verbatim}\n100% literal\n\\end{verbatim}\n\\end{document}\ntrailing junk"
    )
    text = normalize(src, "latex")
    assert text == ("\\begin{thm}\nFor all $x \\in \\R$, \\[ x^2 \\ge 0. \\]\n\\end{thm}\n"
                    "\\begin{verbatim}\n100% literal\n\\end{verbatim}")


def test_latex_comment_joining_does_not_glue_a_control_word():
    assert latex_to_text("\\selectfont%\nHomotopy") == "\\selectfont Homotopy"


def test_openlogic_templates_render_as_words():
    src = "!!^a{formula} is !!a{derivation} of !!{sentence}s; !!a{interpretation}."
    assert latex_to_text(src) == "A formula is a derivation of sentences; an interpretation."


def test_hott_build_wrappers_clean_to_almost_nothing():
    rows = _latex_rows(HOTT)
    wrappers = [p for p in rows if p.startswith(("opt-", "hott-", "cover-"))]
    assert len(wrappers) >= 10
    for path in wrappers:
        assert len(normalize(rows[path], "latex").split()) < 10, path


def test_real_latex_chapter_keeps_its_formulas():
    rows = _latex_rows(OPEN_LOGIC)
    src = rows["content/computability/computability-theory/s-m-n.tex"]
    text = normalize(src, "latex")
    assert "\\cfind{s^m_n(e, a_0, \\dots, a_{m-1})}[n](y_0, \\dots, y_{n-1}) \\simeq" in text
    assert "\\begin{thm}" in text and "% Part:" not in text and "\\documentclass" not in text
    assert "\\ollabel" not in text and "\\olfileid" not in text
    hott = normalize(_latex_rows(HOTT)["logic.tex"], "latex")
    assert len(math_spans(hott)) > 500


# ---- Unicode and whitespace ---------------------------------------------------------------------


@pytest.mark.parametrize("math", ["x²", "ℝ", "𝔽_q", "½", "ⁿ√x", "α ≤ β", "∑"])
def test_unicode_math_symbols_survive(math):
    assert normalize_unicode(f"let {math} be") == f"let {math} be"


def test_unicode_normalisation_composes_folds_and_strips():
    raw = "Cafe\u0301 \ufb01eld\u00a0x\u200b\x07y\r\nz\u2028w"
    assert normalize_unicode(raw) == "Café field xy\nz\nw"


def test_whitespace_collapses_blank_lines_and_trailing_spaces():
    assert normalize_whitespace("  a  \n\n\n\n b\t \n") == "a\n\n b"


def test_unknown_markup_is_a_clear_error():
    with pytest.raises(ValueError, match=r"mapping\.markup"):
        normalize("x", "rtf")
