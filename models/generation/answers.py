"""Final-answer extraction and comparison, shared by synthesis validation and evaluation.

* ``last_boxed(text)`` — the content of the last ``\\boxed{…}`` (or ``\\fbox{…}``), braces
  balanced, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``.
* ``normalize_answer(s)`` — a canonical string: no ``$``, spacing macros, ``\\left``/``\\right``,
  ``\\text{}`` wrappers, trailing units or full stop, thousands separators; ``\\dfrac`` → ``\\frac``.
* ``to_number(s)`` — a float for numeric answers written in LaTeX or Python style (``3/4``,
  ``\\frac{3}{4}``, ``2\\sqrt{3}``, ``sqrt(3)*2``, ``12.5\\%`` → 0.125, ``1.5e3``), else ``None``. Parsed
  with a small ``ast`` walker over numbers, + − × ÷ ^ and a few functions: model output is never
  handed to ``eval`` or ``sympify``.
* ``answers_match(a, b)`` — numbers compare with a relative/absolute tolerance, everything else
  by normalised string; comma-separated tuples element by element; a percentage matches
  both its fraction and its bare number (``12.5\\%`` ~ ``0.125`` ~ ``12.5``).

Kept here (``models/generation/answers.py``) rather than under ``models/eval``: the synthesis
filter needs it first, and evaluation imports it from here.
"""

from __future__ import annotations

import ast
import math
import operator
import re

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (``\\boxed 5`` form too), else ``None``."""
    if not text:
        return None
    matches = list(_BOX.finditer(text))
    for m in reversed(matches):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        content = text[i + 1:j].strip()
                        return content or None
            continue  # unbalanced: try an earlier box
        word = re.match(r"[^\s$]+", text[i:])  # \boxed 5
        if word:
            return word.group(0)
    return None


def _unwrap_macro(s: str, name: str) -> str:
    """Replace ``\\name{X}`` by ``X`` (balanced braces), repeatedly."""
    token = "\\" + name + "{"
    while True:
        i = s.find(token)
        if i < 0:
            return s
        depth, j = 0, i + len(token) - 1
        for j in range(i + len(token) - 1, len(s)):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    break
        else:
            return s
        s = s[:i] + s[i + len(token):j] + s[j + 1:]


_UNIT_WORDS = (
    r"units?|cm|mm|km|m|meters?|metres?|centimeters?|inches|inch|feet|foot|ft|miles?|kg|g|grams?|"
    r"pounds?|lbs?|hours?|hrs?|minutes?|mins?|seconds?|secs?|s|days?|weeks?|years?|dollars?|cents?|"
    r"degrees?|square|sq|cubic|liters?|litres?|ml|people|students|apples|marbles|points"
)
_TRAILING_UNITS = re.compile(rf"^(-?[\d.,/]+)\s*(?:(?:{_UNIT_WORDS})\b\s*\^?\d?\s*)+$", re.IGNORECASE)


def normalize_answer(answer: str | None) -> str:
    """Canonical string form of an answer (see module docstring); ``""`` for ``None``."""
    if answer is None:
        return ""
    s = str(answer).strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\n", " ").strip().strip("$").strip()
    for macro in ("text", "textbf", "mathrm", "mathbf", "textit", "mbox", "operatorname"):
        s = _unwrap_macro(s, macro)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |~", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)
    s = s.replace("\\%", "%").replace("\\$", "")
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" → "5"
    s = s.strip().rstrip(".").strip()
    unit = _TRAILING_UNITS.match(s)
    if unit:
        s = unit.group(1)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    return s


# ---- numeric parsing: LaTeX/Python-style expression → float, without eval ------------------

_FUNCS = {"sqrt": math.sqrt, "exp": math.exp, "ln": math.log, "log": math.log, "sin": math.sin,
          "cos": math.cos, "tan": math.tan, "abs": abs}
_CONSTS = {"pi": math.pi, "e": math.e}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}


def _latex_to_expr(s: str) -> str:
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"((\1)/(\2))", s)  # \frac12
    s = re.sub(r"\\sqrt\s*\[([^\]]*)\]\s*\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
    s = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"\\sqrt\s*(\d+)", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = re.sub(r"\\(ln|log|exp|sin|cos|tan)\b", r"\1", s)
    s = s.replace("^", "**").replace("{", "(").replace("}", ")")
    s = re.sub(r"(?<=[\d)])\s*(?=[a-zA-Z(])", "*", s)  # 2sqrt(3), 2pi, 3(4)
    s = re.sub(r"(?<=\bpi)\s*(?=[\d(a-zA-Z])", "*", s)
    return s


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _eval_node(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 1e100):
            raise ValueError("exponent too large")  # keep 9**9**9 from hanging the parent
        return float(_BINOPS[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and len(node.args) == 1 and not node.keywords):
        return float(_FUNCS[node.func.id](_eval_node(node.args[0])))
    raise ValueError(f"unsupported expression node {type(node).__name__}")


def to_number(answer: str | None) -> float | None:
    """Numeric value of an answer, or ``None`` when it is not a plain numeric expression."""
    s = normalize_answer(answer)
    if not s or len(s) > 200:
        return None
    percent = s.endswith("%")
    s = s.rstrip("%")
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", s):
        value = float(s)
    else:
        expr = _latex_to_expr(s)
        if "\\" in expr or "=" in expr or "," in expr:
            return None
        try:
            value = _eval_node(ast.parse(expr, mode="eval"))
        except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
            return None
    if not math.isfinite(value):
        return None
    return value / 100 if percent else value


def _number_readings(s: str) -> list[float]:
    """``12.5%`` reads as 0.125 or as 12.5 (answers often drop or keep the sign)."""
    value = to_number(s)
    if value is None:
        return []
    return [value, value * 100] if s.endswith("%") else [value]


def _split_top_level(s: str) -> list[str]:
    """Split on commas not nested in brackets: ``(1,2),3`` → ``["(1,2)", "3"]``."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def answers_match(predicted: str | None, reference: str | None,
                  rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Whether two final answers agree: numerically (tolerance) or as normalised strings."""
    a, b = normalize_answer(predicted), normalize_answer(reference)
    if not a or not b:
        return False
    if a == b:
        return True
    xs, ys = _number_readings(a), _number_readings(b)
    if xs and ys:
        return any(math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol) for x in xs for y in ys)
    strip = "()[]{}"
    pa, pb = _split_top_level(a.strip(strip)), _split_top_level(b.strip(strip))
    if len(pa) > 1 and len(pa) == len(pb):
        return all(answers_match(p, q, rel_tol, abs_tol) for p, q in zip(pa, pb, strict=True))
    return False


def printed_answer(stdout: str | None) -> str | None:
    """The answer a program printed: its last non-empty output line (``None`` if none)."""
    if not stdout:
        return None
    lines = [line.strip() for line in stdout.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None
