"""Turn raw document markup (HTML, Markdown, LaTeX source, plain text) into clean text that
keeps LaTeX math byte-for-byte.

Pure functions, no Spark: ``normalize(text, markup)`` is what the clean job applies per document.

Math is the payload of this corpus, so every step protects it:

* HTML goes through a real parser (BeautifulSoup + lxml). The parser decodes entities
  (``$a &lt; b$`` → ``$a < b$``), and math lives in text nodes, so it survives intact; whitespace is
  collapsed only *outside* math spans, so multi-line ``$$…$$`` / ``\\begin{align}`` blocks keep
  their lines. Code blocks (``<pre>``) are kept verbatim.
* LaTeX sources lose what is not content: ``%`` comments (TeX semantics: ``\\%`` is a percent sign),
  the preamble, macro/length/colour definitions, ``\\input``-style includes and page-layout
  commands. Math and environments (``\\begin{thm}``) stay.
* Unicode is NFC-normalised, never NFKC: NFKC maps ``x²`` → ``x2``, ``ℝ`` → ``R``, ``𝔽`` → ``F``,
  ``½`` → ``1⁄2``, which silently changes mathematics. Only a short, justified list of
  compatibility characters is folded (Latin ligatures, exotic spaces); invisible format
  characters and control characters are removed.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import Literal

Markup = Literal["text", "html", "markdown", "latex"]

# ---- math spans -------------------------------------------------------------------------------

# Display environments whose whole body is math. Theorem-like environments (thm, proof) are
# prose containers and are deliberately not listed.
MATH_ENVIRONMENTS = (
    "equation", "align", "alignat", "flalign", "gather", "multline", "eqnarray", "displaymath",
    "math", "split", "array", "matrix", "pmatrix", "bmatrix", "vmatrix", "Vmatrix", "cases",
    "tikzcd", "xy",
    "prooftree",  # bussproofs derivations: formulas laid out as a tree, i.e. displayed math
)
MATH_SPAN_RE = re.compile(
    r"\$\$(?:[^$\\]|\\.)+?\$\$"                          # $$ display $$
    r"|(?<![\\$])\$(?:[^$\\\n]|\\.|\n(?![ \t]*\n))+?\$"  # $ inline $ (never across a blank line)
    r"|(?<!\\)\\\[.+?\\\]"                               # \[ display \] (not the \\[2pt] break)
    r"|(?<!\\)\\\(.+?\\\)"                               # \( inline \)
    r"|\\begin\{(" + "|".join(MATH_ENVIRONMENTS) + r")(\*?)\}.*?\\end\{\1\2\}",
    re.DOTALL,
)


def math_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every LaTeX math span in ``text``, left to right, non-overlapping."""
    return [m.span() for m in MATH_SPAN_RE.finditer(text)]


def split_math(text: str) -> Iterator[tuple[bool, str]]:
    """Yield ``(is_math, piece)`` pieces that concatenate back to ``text``."""
    pos = 0
    for start, end in math_spans(text):
        if start > pos:
            yield False, text[pos:start]
        yield True, text[start:end]
        pos = end
    if pos < len(text):
        yield False, text[pos:]


def map_outside_math(text: str, fn: Callable[[str], str]) -> str:
    """Apply ``fn`` to the non-math pieces of ``text`` only."""
    return "".join(piece if is_math else fn(piece) for is_math, piece in split_math(text))


# ---- Unicode and whitespace -------------------------------------------------------------------

# Compatibility characters folded on purpose: none of them carries mathematical meaning.
_FOLD = {
    "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
    "\ufb05": "st", "\ufb06": "st",
    "\u00a0": " ", "\u1680": " ", "\u2000": " ", "\u2001": " ", "\u2002": " ", "\u2003": " ",
    "\u2004": " ", "\u2005": " ", "\u2006": " ", "\u2007": " ", "\u2008": " ", "\u2009": " ",
    "\u200a": " ", "\u202f": " ", "\u205f": " ", "\u3000": " ",
    "\u2028": "\n", "\u2029": "\n\n", "\x0b": "\n", "\x0c": "\n", "\x85": "\n",
}
# Invisible format characters that only break tokenisation (ZWSP, word joiner, BOM, soft hyphen,
# bidi marks). ZWJ/ZWNJ are left alone: they matter in some scripts.
_INVISIBLE = "\u200b\u2060\ufeff\u00ad\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_TRANSLATE = str.maketrans({**_FOLD, **{c: None for c in _INVISIBLE}})
# C0/C1 control characters except tab and newline (CR is handled as a line break first).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]")


def normalize_unicode(text: str) -> str:
    """NFC, CRLF → LF, fold the few compatibility characters above, drop control characters.

    NFKC is not used: it would rewrite ``²``, ``ℝ``, ``𝔽``, ``ⁿ``, ``½`` — meaningful math — into
    other characters. Math inside ``$…$`` therefore comes out exactly as it went in (up to NFC,
    which only composes accents)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text).translate(_TRANSLATE)
    return _CONTROL_RE.sub("", text)


def normalize_whitespace(text: str) -> str:
    """Trim line ends and the document, at most one blank line in a row.

    Inner spaces and indentation are left alone: they matter in code blocks and aligned
    displays, and the HTML converter already collapsed the soft whitespace of prose."""
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n").strip()


# ---- HTML -------------------------------------------------------------------------------------

_DROP_TAGS = frozenset({"script", "style", "noscript", "template", "head", "svg", "iframe", "object"})
# Tags that start a new paragraph / a new line. Everything else is inline: its text flows on.
_PARAGRAPH_TAGS = frozenset({
    "p", "div", "blockquote", "section", "article", "aside", "header", "footer", "main", "nav",
    "figure", "figcaption", "table", "ul", "ol", "dl", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
    "details", "summary", "form", "fieldset", "address",
})
_LINE_TAGS = frozenset({"li", "tr", "dt", "dd", "caption"})
_PARA, _LINE = "\x00P", "\x00L"  # block markers, resolved after rendering (never in real text)
_WS_RE = re.compile(r"\s+")


def html_to_text(markup: str) -> str:
    """HTML → text: paragraphs and ``<br>`` become newlines, list items ``- ``, link text is kept
    (URLs dropped), ``<img>`` becomes its alt text, ``<pre>`` code is kept verbatim, entities are
    decoded, and LaTeX math (``$…$``, ``$$…$$``, ``\\[…\\]``, ``\\(…\\)``, ``\\begin{…}``) is left
    intact."""
    from bs4 import BeautifulSoup, Comment, Doctype, NavigableString, ProcessingInstruction

    soup = BeautifulSoup(markup, "lxml")
    pieces: list[str] = []
    verbatim: list[str] = []
    skip_types = (Comment, Doctype, ProcessingInstruction)
    # Explicit stack instead of recursion: pathological nesting must not hit the recursion limit.
    stack: list[object] = [soup]
    while stack:
        node = stack.pop()
        if isinstance(node, str) and not isinstance(node, NavigableString):
            pieces.append(node)  # a marker pushed below
            continue
        if isinstance(node, NavigableString):
            if not isinstance(node, skip_types):
                pieces.append(str(node))
            continue
        name = getattr(node, "name", None)
        if name in _DROP_TAGS:
            continue
        if name == "br":
            pieces.append(_LINE)
            continue
        if name == "img":
            alt = (node.get("alt") or "").strip()  # type: ignore[union-attr]
            if alt:
                pieces.append(f" {alt} ")
            continue
        if name == "pre":
            verbatim.append(node.get_text())  # type: ignore[union-attr]
            pieces.extend([_PARA, f"\x00V{len(verbatim) - 1}\x00", _PARA])
            continue
        children = list(getattr(node, "children", []))
        if name in _PARAGRAPH_TAGS or name in _LINE_TAGS:
            marker = _PARA if name in _PARAGRAPH_TAGS else _LINE
            prefix = []
            if name == "li":
                parent = node.parent  # type: ignore[union-attr]
                if parent is not None and parent.name == "ol":
                    index = sum(1 for s in node.find_previous_siblings("li")) + 1  # type: ignore[union-attr]
                    prefix = [f"{index}. "]
                else:
                    prefix = ["- "]
            stack.append(marker)
            stack.extend(reversed(children))
            stack.extend(reversed([marker, *prefix]))
        elif name in ("td", "th"):
            stack.append(" | ")
            stack.extend(reversed(children))
        else:
            stack.extend(reversed(children))
    return _assemble_blocks("".join(pieces), verbatim)


def _assemble_blocks(rendered: str, verbatim: list[str]) -> str:
    """Resolve block markers: collapse whitespace inside each block (outside math), join blocks
    with a blank line (paragraphs) or a newline (``<br>``, list items), restore ``<pre>`` code."""
    out: list[str] = []
    for token in re.split(r"(\x00P|\x00L)", rendered):
        if token in (_PARA, _LINE):
            if out and out[-1] not in ("\n", "\n\n"):
                out.append("\n\n" if token == _PARA else "\n")
            elif out and token == _PARA:
                out[-1] = "\n\n"
            continue
        block = map_outside_math(token, lambda s: _WS_RE.sub(" ", s)).strip()
        if block:
            out.append(block)
    text = "".join(out).strip()
    return re.sub(r"\x00V(\d+)\x00", lambda m: verbatim[int(m.group(1))].strip("\n"), text)


# ---- Markdown ---------------------------------------------------------------------------------

_MD_IMAGE_RE = re.compile(r"!\[([^\]\n]*)\]\((?:https?://|/|www\.)[^)\s]*(?:\s+\"[^\"]*\")?\)")
_MD_LINK_RE = re.compile(r"\[([^\]\n]+)\]\((?:https?://|/|www\.|#)[^)\s]*(?:\s+\"[^\"]*\")?\)")
_HTML_COMMENT_RE = re.compile(r"<!--.*?-->", re.DOTALL)
_SIMPLE_TAG_RE = re.compile(r"</?(?:p|br|div|span|em|strong|b|i|sup|sub|hr|blockquote|code|pre)\b[^<>]*>",
                            re.IGNORECASE)


def markdown_to_text(text: str) -> str:
    """Light-touch Markdown cleanup: links and images keep their text, stray HTML comments and
    simple formatting tags go, entities are decoded — all outside math. Emphasis markers and
    headings are kept: ``*`` and ``_`` also occur in prose math, and headings carry structure.

    This is not an HTML parse on purpose: Markdown math such as ``$a<b$`` would look like a tag."""
    def clean(piece: str) -> str:
        piece = _HTML_COMMENT_RE.sub("", piece)
        piece = _MD_IMAGE_RE.sub(lambda m: m.group(1), piece)
        piece = _MD_LINK_RE.sub(lambda m: m.group(1), piece)
        piece = _SIMPLE_TAG_RE.sub(lambda m: "\n" if m.group(0).lower().startswith("<br") else "", piece)
        return html.unescape(piece)

    return map_outside_math(text, clean)


# ---- LaTeX sources ----------------------------------------------------------------------------

_VERBATIM_ENVS = ("verbatim", "Verbatim", "lstlisting", "minted", "alltt")
_VERBATIM_RE = re.compile(r"\\begin\{(" + "|".join(_VERBATIM_ENVS) + r")\*?\}.*?\\end\{\1\*?\}", re.DOTALL)
_COMMENT_ENV_RE = re.compile(r"\\begin\{comment\}.*?\\end\{comment\}", re.DOTALL)
# A TeX comment: a % preceded by an even number of backslashes; it eats the rest of the line,
# the newline and the next line's leading blanks (that is how TeX reads it).
_TEX_COMMENT_RE = re.compile(r"(?<!\\)((?:\\\\)*)%[^\n]*(?:\n[ \t]*)?")

# Commands that carry no document content, with the shape of their arguments:
#   *  optional star      c  a control sequence or a {group} naming one    [  optional [..] group
#   {  mandatory {..}     p  \def parameter text then the body {..}        =  \let-style assignment
_NOISE_COMMANDS: dict[str, str] = {
    **dict.fromkeys(("newcommand", "renewcommand", "providecommand"), "*c[[{"),
    **dict.fromkeys(("newenvironment", "renewenvironment"), "*{[[{{"),
    "newtheorem": "*{[{[",
    **dict.fromkeys(("DeclareMathOperator", "DeclareRobustCommand"), "*c[[{"),
    **dict.fromkeys(("def", "gdef", "edef", "xdef"), "cp"),
    **dict.fromkeys(("let", "global\\let"), "c="),
    **dict.fromkeys(("documentclass", "usepackage", "RequirePackage"), "[{["),
    "PassOptionsToPackage": "{{",
    **dict.fromkeys(("input", "include", "includeonly", "subfile", "olimport", "import"), "[{"),
    **dict.fromkeys(("setlength", "addtolength", "settowidth"), "c{"),
    **dict.fromkeys(("newlength", "newcounter", "newif", "newsavebox"), "c["),
    **dict.fromkeys(("setcounter", "addtocounter"), "{{"),
    **dict.fromkeys(("definecolor",), "{{{"),
    "colorlet": "{{",
    "hypersetup": "{",
    **dict.fromkeys(("pagestyle", "thispagestyle", "pagenumbering", "pagecolor", "graphicspath",
                     "DeclareGraphicsExtensions", "bibliographystyle", "bibliography", "label",
                     "index", "ollabel", "newgeometry", "geometry", "linespread"), "{"),
    **dict.fromkeys(("addcontentsline",), "{{{"),
    "markboth": "{{",
    "markright": "{",
    "olfileid": "{{{",
    **dict.fromkeys(("vspace", "hspace"), "*{"),
    **dict.fromkeys(("cleartooddpage", "cleartoevenpage"), "["),
    **dict.fromkeys(("makeatletter", "makeatother", "phantomsection", "clearpage", "cleardoublepage",
                     "newpage", "pagebreak", "maketitle", "tableofcontents", "listoffigures",
                     "listoftables", "frontmatter", "mainmatter", "backmatter", "appendix",
                     "noindent", "restoregeometry", "nopagecolor", "printindex", "vfill", "hfill",
                     "centering", "raggedright", "raggedbottom", "flushbottom", "sloppy"), ""),
}
_NOISE_RE = re.compile(
    r"\\(" + "|".join(sorted((re.escape(k) for k in _NOISE_COMMANDS), key=len, reverse=True))
    + r")(?![A-Za-z@])"
)
# OpenLogic's template syntax: !!{formula} → formula, !!a{formula} → a formula, !!^{..} capitalised.
_OLP_TEMPLATE_RE = re.compile(r"!!(\^?)(a?)\{([^{}\n]*)\}")


def latex_to_text(source: str) -> str:
    """Clean a LaTeX source file: drop comments, the preamble, definitions and layout commands;
    keep math, sectioning and environments. Text inside verbatim environments is untouched."""
    source = source.replace("\r\n", "\n")
    verbatim: list[str] = []

    def stash(match: re.Match[str]) -> str:
        verbatim.append(match.group(0))
        return f"\x00V{len(verbatim) - 1}\x00"

    source = _VERBATIM_RE.sub(stash, source)
    source = _COMMENT_ENV_RE.sub("", source)
    source = _TEX_COMMENT_RE.sub(_strip_comment, source)
    source = _body_only(source)
    # On the whole body, math included: a definition body may hold $…$, and \label or \vspace inside
    # a display are layout noise too.
    source = _drop_noise_commands(source)
    source = _OLP_TEMPLATE_RE.sub(_render_template, source)
    return re.sub(r"\x00V(\d+)\x00", lambda m: verbatim[int(m.group(1))], source)


def _strip_comment(match: re.Match[str]) -> str:
    # Joining lines must not glue a control word to the next letter (\selectfont%⏎Text).
    before = match.string[max(0, match.start() - 40):match.start()] + match.group(1)
    after = match.string[match.end():match.end() + 1]
    glue = " " if after.isalpha() and _CONTROL_WORD_END_RE.search(before) else ""
    return match.group(1) + glue


_CONTROL_WORD_END_RE = re.compile(r"(?<!\\)\\[A-Za-z@]+$")


def _body_only(source: str) -> str:
    """Keep what lies between ``\\begin{document}`` and ``\\end{document}`` when they exist."""
    begin = source.find("\\begin{document}")
    if begin >= 0:
        source = source[begin + len("\\begin{document}"):]
    end = source.find("\\end{document}")
    return source[:end] if end >= 0 else source


def _render_template(match: re.Match[str]) -> str:
    capital, article, word = match.groups()
    if article:
        word = ("an " if word[:1].lower() in "aeiou" else "a ") + word
    return word[:1].upper() + word[1:] if capital else word


def _drop_noise_commands(text: str) -> str:
    out: list[str] = []
    pos = 0
    for match in _NOISE_RE.finditer(text):
        if match.start() < pos:
            continue  # inside something already removed
        start, end = match.start(), _skip_arguments(text, match.end(), _NOISE_COMMANDS[match.group(1)])
        # A command alone on its line takes the line with it (no phantom paragraph breaks).
        line_start = text.rfind("\n", 0, start) + 1
        line_end = text.find("\n", end)
        line_end = len(text) if line_end < 0 else line_end
        if line_start >= pos and not text[line_start:start].strip() and not text[end:line_end].strip():
            start, end = line_start, min(line_end + 1, len(text))
        out.append(text[pos:start])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _skip_arguments(text: str, pos: int, spec: str) -> int:
    """Index just past the arguments of a command whose name ended at ``pos``."""
    for kind in spec:
        scan = _skip_blanks(text, pos)
        if kind == "*":
            pos = scan + 1 if text.startswith("*", scan) else pos
        elif kind == "[":
            if text.startswith("[", scan):
                pos = _skip_group(text, scan, "[", "]")
        elif kind == "{":
            if not text.startswith("{", scan):
                return pos
            pos = _skip_group(text, scan, "{", "}")
        elif kind == "c":
            pos = _skip_token(text, scan)
        elif kind == "=":
            scan = _skip_blanks(text, pos)
            if text.startswith("=", scan):
                scan = _skip_blanks(text, scan + 1)
            pos = _skip_token(text, scan)
        elif kind == "p":  # \def parameter text (#1#2 / delimiters) up to the body
            brace = text.find("{", pos)
            if brace < 0 or "\n\n" in text[pos:brace]:
                return pos
            pos = _skip_group(text, brace, "{", "}")
    return pos


def _skip_blanks(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    if pos < len(text) and text[pos] == "\n" and not text.startswith("\n\n", pos):
        pos += 1
        while pos < len(text) and text[pos] in " \t":
            pos += 1
    return pos


def _skip_token(text: str, pos: int) -> int:
    """A control sequence (``\\name`` or ``\\@``), a ``{group}``, or one character."""
    if pos >= len(text):
        return pos
    if text[pos] == "{":
        return _skip_group(text, pos, "{", "}")
    if text[pos] == "\\":
        end = pos + 1
        while end < len(text) and (text[end].isalpha() or text[end] == "@"):
            end += 1
        return max(end, pos + 2)
    return pos + 1


def _skip_group(text: str, pos: int, open_: str, close: str) -> int:
    """Index past the balanced group starting at ``pos``; escaped braces do not count. An
    unbalanced group ends at the next blank line so one typo cannot eat the whole file."""
    depth = 0
    i = pos
    limit = len(text)
    while i < limit:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return i + 1
        elif ch == "\n" and text.startswith("\n\n", i) and open_ == "[":
            return i
        i += 1
    blank = text.find("\n\n", pos)
    return blank if blank >= 0 else limit


# ---- entry point ------------------------------------------------------------------------------

_CONVERTERS: dict[str, Callable[[str], str]] = {
    "html": html_to_text,
    "markdown": markdown_to_text,
    "latex": latex_to_text,
    "text": lambda s: s,
}


def normalize(text: str, markup: str) -> str:
    """Raw document → clean text: markup conversion, then Unicode, then whitespace."""
    try:
        convert = _CONVERTERS[markup]
    except KeyError:
        raise ValueError(
            f"unknown markup {markup!r}; sources.<name>.mapping.markup must be one of {sorted(_CONVERTERS)}"
        ) from None
    return normalize_whitespace(normalize_unicode(convert(normalize_unicode(text))))
