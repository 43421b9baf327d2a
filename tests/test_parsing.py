"""Parsing and validation of replies: every rejection reason from a concrete reply, the
training format, and the answer normaliser shared with evaluation."""

from __future__ import annotations

import pytest

from models.generation.answers import answers_match, last_boxed, normalize_answer, printed_answer, to_number
from models.generation.excerpts import cut_excerpt
from models.generation.parsing import REJECTION_REASONS, ParsedSample, parse_reply, validate_tool
from models.sandbox import SandboxLimits, run_python
from tests.test_excerpts import real_texts

COT_OK = """## Problem
A library has 3 shelves with 24 books each. It lends out 17 books. How many books remain?

## Solution
1. Total books: $3 \\times 24 = 72$.
2. After lending: $72 - 17 = 55$.

The library keeps \\boxed{55} books."""

TOOL_OK = """## Problem
How many positive divisors does $2^{10} \\cdot 3^5$ have?

## Code Solution
```python
from sympy import divisor_count
n = 2**10 * 3**5
print(divisor_count(n))
```

## Final Answer
\\boxed{66}"""

TOOL_PURE = TOOL_OK.replace("from sympy import divisor_count\n", "").replace(
    "print(divisor_count(n))", "print(sum(1 for d in range(1, n + 1) if n % d == 0))")

RUN = lambda code: run_python(code, SandboxLimits(cpu_seconds=5, wall_seconds=20))  # noqa: E731


@pytest.fixture(scope="module")
def excerpt() -> str:
    texts = [t for src, t in real_texts() if src == "stackmathqa" and len(t) > 600]
    if not texts:
        pytest.skip("embedded sample missing")
    cut = cut_excerpt(texts[0], 1000)
    assert cut is not None
    return cut.text


def test_accepts_well_formed_cot_and_formats_for_training(excerpt: str) -> None:
    sample = parse_reply(COT_OK, "stop", "cot", excerpt)
    assert sample.accepted and sample.answer == "55"
    assert sample.training_text() == (
        "## Question\n" + COT_OK.split("## Solution")[0].removeprefix("## Problem\n").strip()
        + "\n\n## Solution\n" + COT_OK.split("## Solution\n")[1])


def test_tolerates_heading_variants_and_a_short_preamble(excerpt: str) -> None:
    variant = "Sure, here it is.\n\n**Problem:**\nWhat is $2+3$?\n\n### Solution:\nAdd: \\boxed{5}"
    sample = parse_reply(variant, "stop", "cot", excerpt)
    assert sample.accepted and sample.problem == "What is $2+3$?"


def test_tool_sample_runs_in_the_sandbox_and_keeps_the_output(excerpt: str) -> None:
    sample = validate_tool(parse_reply(TOOL_PURE, "stop", "tool", excerpt), RUN)
    assert sample.accepted, sample.detail
    assert sample.code_output == "66\n"
    text = sample.training_text()
    assert text.startswith("## Question\nHow many positive divisors")
    assert "## Code Solution\n```python\n" in text and "```output\n66\n```" in text
    assert text.endswith("The answer is $\\boxed{66}$.")


def test_every_rejection_reason_from_a_real_reply(excerpt: str) -> None:
    cases = {
        "empty": parse_reply("   \n", "stop", "cot", excerpt),
        "truncated": parse_reply(COT_OK[:120], "length", "cot", excerpt),
        "refusal": parse_reply("I'm sorry, but I can't help with creating that problem.", "stop", "cot", excerpt),
        "unparsable": parse_reply("The answer is 55 because 3 times 24 minus 17.", "stop", "cot", excerpt),
        "no_final_answer": parse_reply(COT_OK.replace("\\boxed{55}", "55"), "stop", "cot", excerpt),
        "copies_excerpt": parse_reply(f"## Problem\n{excerpt}\n\n## Solution\nSo \\boxed{{1}}.", "stop", "cot",
                                      excerpt),
        "code_failed": validate_tool(parse_reply(TOOL_PURE.replace("print(", "print(undefined_name + "),
                                                 "stop", "tool", excerpt), RUN),
        "answer_mismatch": validate_tool(parse_reply(TOOL_PURE.replace("\\boxed{66}", "\\boxed{60}"),
                                                     "stop", "tool", excerpt), RUN),
    }
    assert set(cases) == set(REJECTION_REASONS)
    for reason, sample in cases.items():
        assert sample.reason == reason, (reason, sample)
        assert not sample.accepted and sample.detail
        with pytest.raises(ValueError):
            sample.training_text()
    assert cases["copies_excerpt"].copy_containment > 0.9
    assert "NameError" in cases["code_failed"].detail
    assert "'66'" in cases["answer_mismatch"].detail


def test_unparsable_variants(excerpt: str) -> None:
    swapped = "## Solution\nSo \\boxed{1}\n\n## Problem\nWhat is 1?"
    assert parse_reply(swapped, "stop", "cot", excerpt).reason == "unparsable"
    no_code = TOOL_OK.replace("```python", "").replace("```", "")
    assert parse_reply(no_code, "stop", "tool", excerpt).reason == "unparsable"
    cot_for_tool = parse_reply(COT_OK, "stop", "tool", excerpt)
    assert cot_for_tool.reason == "unparsable" and "Code Solution" in cot_for_tool.detail
    assert parse_reply("## Problem\n\n## Solution\n\\boxed{1}", "stop", "cot").reason == "empty"


def test_sandbox_limit_in_tool_code_is_code_failed(excerpt: str) -> None:
    looping = TOOL_PURE.replace("print(sum(", "while True: pass\nprint(sum(")
    sample = validate_tool(parse_reply(looping, "stop", "tool", excerpt),
                           lambda c: run_python(c, SandboxLimits(cpu_seconds=1, wall_seconds=1)))
    assert sample.reason == "code_failed" and sample.detail.startswith(("timeout", "cpu"))


def test_refusal_only_when_no_problem_was_written(excerpt: str) -> None:
    apologetic = "I'm sorry for the delay.\n" + COT_OK
    assert parse_reply(apologetic, "stop", "cot", excerpt).accepted


def test_rejected_training_text_raises() -> None:
    with pytest.raises(ValueError, match="rejected sample"):
        ParsedSample("cot", "empty").training_text()


# ---- answers ----------------------------------------------------------------------------


def test_last_boxed_balances_braces() -> None:
    assert last_boxed("first \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\boxed 7") == "7"
    assert last_boxed("\\boxed{unclosed and \\boxed{3}") == "3"
    assert last_boxed("nothing here") is None


@pytest.mark.parametrize(("a", "b"), [
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{3}{4}", "3/4"), ("2\\sqrt{3}", "3.4641016151"),
    ("sqrt(3)*2", "2\\sqrt{3}"), ("1,000", "1000"), ("5 \\text{ cm}", "5"), ("x = 5", "5.0"),
    ("\\left(1, 2\\right)", "(1,2)"), ("\\pi/2", "1.5707963267948966"), ("45^\\circ", "45"),
    ("12.5\\%", "0.125"), ("\\text{odd}", "odd"), ("$\\boxed{7}$", "7"),
])
def test_answers_match(a: str, b: str) -> None:
    assert answers_match(a, b, rel_tol=1e-9, abs_tol=1e-9) or answers_match(a, b, rel_tol=1e-6)


@pytest.mark.parametrize(("a", "b"), [("3", "4"), ("(1,2)", "(2,1)"), ("odd", "even"), ("", ""), ("1/3", "0.33")])
def test_answers_differ(a: str, b: str) -> None:
    assert not answers_match(a, b)


def test_numbers_are_parsed_without_eval() -> None:
    assert to_number("__import__('os').system('true')") is None
    assert to_number("9**9**9") is None  # refused, not computed
    assert to_number("1.5e3") == 1500.0
    assert normalize_answer(" $ 18 \\text{ dollars}. $ ") == "18"
    assert printed_answer("working...\n\n 42 \n") == "42" and printed_answer("") is None
