"""The grader (models/generation/answers.py): math-verify underneath, three kept rules on top.

Each kept rule has a test that shows math-verify alone gets the pair wrong (so the rule is
needed), and the false positives common graders make must grade as different.
"""

from __future__ import annotations

import threading
import time

import pytest

from models.generation.answers import _MathVerifyWorker, answers_match, extract_answer, grade, grader_version


def math_verify_alone(predicted: str, reference: str) -> bool:
    """What math-verify says with no help from this module (main thread: its own timeouts)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    return verify(parse(f"${reference}$", extraction_config=config), parse(f"${predicted}$", extraction_config=config))


@pytest.mark.parametrize(("a", "b"), [
    ("\\frac{11}{2}", "\\frac{1}{12}"), ("2", "200"), ("70000", "70007"), ("(1,2)", "[1,2]"),
    ("(1,2)", "(1,2]"), ("x=2", "2x"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("1/3", "0.33"), ("Yes", "No"),
    ("3", ""), ("", ""),
])
def test_known_false_positives_grade_as_different(a: str, b: str) -> None:
    assert not grade(a, b).equal
    assert not grade(b, a).equal


@pytest.mark.parametrize(("a", "b"), [
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{3}{4}", "3/4"), ("2\\sqrt{3}", "\\sqrt{12}"), ("70,000", "70000"),
    ("x = 5", "5"), ("\\$18.00", "18"), ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{2}"), ("30^\\circ", "30"),
    ("\\text{(C)}", "C"), ("\\{1, 2\\}", "\\{2, 1\\}"), ("x^2+2x+1", "(x+1)^2"), ("\\infty", "\\infty"),
    ("[2, 5)", "[2,5)"), ("0.3333333", "\\frac{1}{3}"),
])
def test_true_equivalences(a: str, b: str) -> None:
    assert grade(a, b).equal, grade(a, b)


def test_kept_rule_percent_is_needed() -> None:
    assert not math_verify_alone("12.5\\%", "12.5")
    assert grade("12.5\\%", "12.5").equal and grade("12.5%", "0.125").equal
    assert not grade("12.5\\%", "13").equal


def test_kept_rule_trailing_units_is_needed() -> None:
    assert not math_verify_alone("5 dollars", "5")
    assert grade("5 dollars", "5").equal and grade("18 \\text{ cm}", "18").equal
    assert not grade("6 dollars", "5").equal


def test_kept_rule_word_answers_is_needed() -> None:
    assert math_verify_alone("Alice", "Celia")  # read as products of symbols: anagrams agree
    assert not grade("Alice", "Celia").equal
    assert grade("\\text{Yes}", "yes").equal and grade("Monday", "\\text{Monday}").equal


def test_numeric_tolerance() -> None:
    assert grade("18.0000000001", "18").equal
    assert not grade("18.01", "18").equal
    assert grade("18.01", "18", rel_tol=1e-2).equal


def test_pathological_expression_cannot_hang_and_the_grader_recovers() -> None:
    started = time.perf_counter()
    result = grade("2^{2^{2^{2^{40}}}}", "3", timeout_s=2.0)
    assert not result.equal and result.error and "timeout" in result.error
    assert time.perf_counter() - started < 15
    assert grade("\\frac{1}{2}", "0.5").equal  # a fresh helper answers the next one


def test_runaway_answers_are_compared_as_strings_only() -> None:
    runaway = "x+" * 400 + "1"
    assert grade(runaway, "1").method == "too_long" and not grade(runaway, "1").equal
    assert grade(runaway, runaway).equal


def test_grading_from_threads() -> None:
    """math-verify's signal timeouts fail outside the main thread; ours do not."""
    results: list[bool] = []
    pairs = [("\\frac{2}{4}", "\\frac{1}{2}"), ("\\sqrt{8}", "2\\sqrt{2}"), ("(1,2)", "[1,2]")] * 3

    def work(pair: tuple[str, str]) -> None:
        results.append(grade(*pair, timeout_s=10).equal)

    threads = [threading.Thread(target=work, args=(p,)) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 3 + [True] * 6


def test_worker_restarts_after_being_killed() -> None:
    worker = _MathVerifyWorker()
    try:
        assert worker.verify("\\frac{1}{2}", "0.5", 10).equal
        assert worker._proc is not None
        worker._proc.kill()
        worker._proc.wait()
        assert worker.verify("\\frac{1}{2}", "0.5", 10).equal
    finally:
        worker.close()


def test_extract_answer_rules() -> None:
    assert extract_answer("so \\boxed{1} then $\\boxed{\\frac{a}{2}}$") == ("\\frac{a}{2}", "boxed")
    assert extract_answer("Thus the answer is 42.\n") == ("42", "answer_is")
    assert extract_answer("She has 3 apples and 1,200 pears") == ("1,200", "last_number")
    assert extract_answer("no numbers") == (None, None)
    assert answers_match(extract_answer("The answer is $\\frac{3}{4}$.")[0], "0.75")


def test_grader_version_names_math_verify() -> None:
    assert grader_version().startswith("math-verify==")
