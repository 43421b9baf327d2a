"""Final answers: extraction and grading, shared by synthesis validation and evaluation.

Grading is the ``math-verify`` library (LaTeX / plain-text parsing, symbolic and numeric
equivalence, sets, intervals, relations). This module is a thin layer over it that keeps only:

* **extraction** — ``last_boxed`` (balanced braces), ``printed_answer`` (a program's last
  output line), ``extract_answer`` (boxed, then "the answer is …", then the last number);
* **a fast path for plain numbers** — ``42`` vs ``42.0`` needs no parser (≥ 1,000 answers/s on
  one core, ``make bench-eval``); tolerance ``rel_tol``/``abs_tol``;
* **three rules math-verify gets wrong**, each with a test showing math-verify's answer
  (``tests/test_answers.py``):

  1. a percentage equals its bare number (``12.5\\%`` ~ ``12.5`` ~ ``0.125``): math-verify
     keeps ``12.5\\%`` ≠ ``12.5``;
  2. trailing unit words in plain text (``5 dollars``): math-verify reads them as a product of
     symbols (``5*d*o*l*l*a*r*s``);
  3. word answers (``Yes``, names) compare as text: math-verify reads ``Alice`` as the product
     ``A*l*i*c*e``, so anagrams (``Celia``) come out equal.

**Time limit.** math-verify's own timeout is ``signal.alarm``: main thread only, and it cannot
interrupt a long C-level computation (a huge integer power inside sympy). So math-verify runs
in a helper process (``_MathVerifyWorker``, one per process, shared by all threads under a
lock) and the parent waits at most ``timeout_s`` per answer; past that the helper is killed and
restarted and the answer grades as different with ``error="grader timeout"``. "Answers" over
``MAX_PARSED_CHARS`` (runaway generations) are compared as strings only. Model output is never
handed to ``eval`` or ``sympify`` in this process.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

GRADER_RULES_VERSION = "jz-answers-2"  # bump when a rule here changes (part of every eval spec hash)
DEFAULT_TIMEOUT_S = 5.0
MAX_PARSED_CHARS = 500  # longer "answers" (runaway generations) are compared as strings only

# ---- extraction -----------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (``\\boxed 5`` form too), else ``None``."""
    if not text:
        return None
    for m in reversed(list(_BOX.finditer(text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip() or None
            continue  # unbalanced: try an earlier box
        word = re.match(r"[^\s$]+", text[i:])  # \boxed 5
        if word:
            return word.group(0)
    return None


def printed_answer(stdout: str | None) -> str | None:
    """The answer a program printed: its last non-empty output line (``None`` if none)."""
    if not stdout:
        return None
    lines = [line.strip() for line in stdout.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\$?([^\n$]+?)\$?\s*(?:\.\s|\.?$|\n)", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str | None) -> tuple[str | None, str | None]:
    """``(answer, rule)`` from a model's solution: the last ``\\boxed{}``; else the last
    "the answer is X"; else the last number in the text; ``(None, None)`` when nothing is found."""
    if not text:
        return None, None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    stated = _ANSWER_IS.findall(text)
    if stated and stated[-1].strip():
        return stated[-1].strip(), "answer_is"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].rstrip(","), "last_number"
    return None, None


# ---- normalisation (string fallback and the fast path) ------------------------------------------

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
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def clean_answer(answer: str | None) -> str:
    """An answer with presentation removed but spacing kept (what math-verify is given):
    no ``$``, ``\\boxed``, ``\\text{}`` wrappers, ``\\left``/``\\right``, degree signs, trailing
    full stop or unit words (rule 2), thousands separators; ``x = 5`` → ``5``."""
    if answer is None:
        return ""
    s = str(answer).strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\n", " ").strip().strip("$").strip()
    for macro in ("text", "textbf", "mathrm", "mathbf", "textit", "mbox", "operatorname"):
        s = _unwrap_macro(s, macro)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\:|~", "", s).replace("\\ ", " ")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)
    s = s.replace("\\%", "%").replace("\\$", "")
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" → "5"
    s = s.strip().rstrip(".").strip()
    unit = _TRAILING_UNITS.match(s)
    if unit:
        s = unit.group(1)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return re.sub(r"\s+", " ", s).strip()


def normalize_answer(answer: str | None) -> str:
    """Canonical string form of an answer (``clean_answer`` without spaces); ``""`` for ``None``."""
    return clean_answer(answer).replace(" ", "")


_PLAIN_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def to_number(answer: str | None) -> float | None:
    """The value of a plain number (``18``, ``-2.5``, ``1,000``, ``1.5e3``, ``12.5%`` → 0.125),
    else ``None``. Expressions are math-verify's job; nothing here evaluates anything."""
    s = normalize_answer(answer)
    percent = s.endswith("%")
    s = s.rstrip("%")
    if not s or len(s) > 64 or not _PLAIN_NUMBER.fullmatch(s):
        return None
    value = float(s)
    if not math.isfinite(value):
        return None
    return value / 100 if percent else value


def _number_readings(s: str) -> list[float]:
    """Rule 1: ``12.5%`` reads as 0.125 or as 12.5 (answers often drop or keep the sign)."""
    value = to_number(s)
    if value is None:
        return []
    return [value, value * 100] if s.endswith("%") else [value]


_WORDS = re.compile(r"[A-Za-z][A-Za-z'\- ]*")


def _is_word_answer(s: str) -> bool:
    """Rule 3: a word or phrase (letters only, some word of 3+ letters), not a formula."""
    return bool(_WORDS.fullmatch(s)) and any(len(w) >= 3 for w in re.split(r"[ '\-]", s))


# ---- grading ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grade:
    """One comparison: ``equal``, how it was decided (``method``), and any grader error."""

    equal: bool
    method: str  # empty | numeric | string | text | math-verify | unparsed | error
    error: str | None = None


def grade(predicted: str | None, reference: str | None, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9,
          timeout_s: float = DEFAULT_TIMEOUT_S) -> Grade:
    """Whether ``predicted`` and ``reference`` are the same final answer (see module docstring)."""
    a, b = clean_answer(predicted), clean_answer(reference)
    if not a or not b:
        return Grade(False, "empty")
    xs, ys = _number_readings(a.replace(" ", "")), _number_readings(b.replace(" ", ""))
    if xs and ys:
        return Grade(any(math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol) for x in xs for y in ys), "numeric")
    if _is_word_answer(a) or _is_word_answer(b):
        return Grade(a.casefold() == b.casefold(), "text")
    if a.replace(" ", "") == b.replace(" ", ""):
        return Grade(True, "string")
    if max(len(a), len(b)) > MAX_PARSED_CHARS:
        return Grade(False, "too_long")  # not a final answer; don't spend the time limit on it
    return _worker().verify(a, b, timeout_s)


def answers_match(predicted: str | None, reference: str | None,
                  rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Whether two final answers agree (``grade(...).equal``)."""
    return grade(predicted, reference, rel_tol=rel_tol, abs_tol=abs_tol).equal


@lru_cache(maxsize=1)
def grader_version() -> str:
    """The grader's identity for spec hashes: math-verify's version + this module's rules."""
    from importlib.metadata import version

    return f"math-verify=={version('math-verify')};{GRADER_RULES_VERSION}"


# ---- the math-verify helper process -----------------------------------------------------------------

class _MathVerifyWorker:
    """A long-lived ``python -c`` child running ``_serve`` (JSON lines over pipes).

    Thread-safe (one request at a time under a lock); killed and restarted when an answer
    takes longer than its time limit or the child dies.
    """

    STARTUP_TIMEOUT_S = 120.0  # importing sympy + math-verify, on a busy machine

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self.restarts = 0

    def _start(self) -> subprocess.Popen[str]:
        repo = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {repo!r}); from models.generation.answers import _serve; _serve()"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)
        # A first trivial answer pays the imports, so every real answer gets exactly its own limit.
        if self._ask(proc, "1", "1", self.STARTUP_TIMEOUT_S) is None:
            proc.kill()
            proc.wait()
            raise RuntimeError("the math-verify helper process did not start (is math-verify installed? "
                               "`make setup`)")
        return proc

    @staticmethod
    def _ask(proc: subprocess.Popen[str], predicted: str, reference: str, timeout_s: float) -> dict | None:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps([predicted, reference]) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
            line = proc.stdout.readline() if ready else ""
        except (BrokenPipeError, OSError, ValueError):
            return None
        return json.loads(line) if line else None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def verify(self, predicted: str, reference: str, timeout_s: float) -> Grade:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            out = self._ask(self._proc, predicted, reference, timeout_s)
            if out is None:
                self._kill()  # hung on this answer (or died): the next answer gets a fresh helper
                self.restarts += 1
                return Grade(False, "error", f"grader timeout ({timeout_s:g}s) or helper died")
            return Grade(bool(out["equal"]), out["method"], out.get("error"))

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER: tuple[int, _MathVerifyWorker] | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> _MathVerifyWorker:
    """This process's helper (a forked child, e.g. a Spark Python worker, starts its own)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None or _WORKER[0] != os.getpid():
            _WORKER = (os.getpid(), _MathVerifyWorker())
        return _WORKER[1]


def _serve() -> None:  # pragma: no cover - runs in the helper process
    """The helper's loop: ``[predicted, reference]`` lines in, ``{"equal", "method"}`` lines out."""
    import logging

    logging.disable(logging.CRITICAL)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

    @lru_cache(maxsize=4096)
    def parsed(s: str) -> list:
        # $…$ makes math-verify read the whole string as one LaTeX expression
        return parse(f"${s}$", extraction_config=config, parsing_timeout=None)

    for line in sys.stdin:
        predicted, reference = json.loads(line)
        try:
            gold, pred = parsed(reference), parsed(predicted)
            if not gold or not pred:
                result = {"equal": False, "method": "unparsed"}
            else:
                result = {"equal": bool(verify(gold, pred, timeout_seconds=None)), "method": "math-verify"}
        except Exception as exc:  # a parser bug on odd input: a wrong answer, not a crash
            result = {"equal": False, "method": "error", "error": f"{type(exc).__name__}: {exc}"[:200]}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
