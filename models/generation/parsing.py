"""Turn a model's reply into a training sample, or a rejection with a reason.

Expected reply (the templates' "Output format" section)::

    ## Problem            ## Problem
    ...                   ...
    ## Solution           ## Code Solution
    ... \\boxed{42}        ```python
                          ...
                          ```
                          ## Final Answer
                          \\boxed{42}

Headings may use 1–4 ``#`` or ``**bold**``, with an optional colon. Checks run in this order
and the first failure is the reason (``REJECTION_REASONS``):

``empty``            no text, or an empty problem/solution section
``truncated``        the generation hit max tokens (``finish_reason == "length"``)
``refusal``          the reply declines the task instead of writing a problem
``unparsable``       the sections are missing or out of order, or the tool reply has no code
``no_final_answer``  no ``\\boxed{}`` answer in the solution (final-answer section for tool)
``copies_excerpt``   the problem's word n-grams are mostly the excerpt's (containment)
``code_failed``      tool only: the program crashed, timed out or hit a sandbox limit
``answer_mismatch``  tool only: the program's printed answer differs from the boxed one

Training format (what the synthesizer learns to emit): ``## Question\\n…\\n\\n## Solution\\n…``
(CoT) or ``## Question\\n…\\n\\n## Code Solution\\n```python…``` + output + boxed answer (tool).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from models.generation.answers import answers_match, last_boxed, printed_answer
from spark_jobs.transforms.ngrams import containment, text_ngram_hashes

REJECTION_REASONS: tuple[str, ...] = (
    "empty", "truncated", "refusal", "unparsable", "no_final_answer", "copies_excerpt",
    "code_failed", "answer_mismatch",
)
Kind = Literal["cot", "tool"]

_HEADING = re.compile(
    r"^[ \t]*(?:#{1,4}[ \t]*(?:\*\*)?|\*\*)[ \t]*(new problem|problem|code solution|solution|final answer)"
    r"[ \t]*:?[ \t]*(?:\*\*)?[ \t]*:?[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry, |i apologi[sz]e|i cannot|i can'?t|i can not|i won'?t|"
    r"i am unable|i'?m unable|i am not able|i'?m not able|as an ai\b|unfortunately,? i)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParsedSample:
    """A parsed reply. ``accepted`` ⇔ ``reason is None``; ``solution`` holds the code for tool."""

    kind: Kind
    reason: str | None = None
    detail: str | None = None
    problem: str | None = None
    solution: str | None = None
    answer: str | None = None
    code_output: str | None = None
    copy_containment: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.reason is None

    def training_text(self) -> str:
        """The sample in the training format (only for accepted samples)."""
        if not self.accepted or self.problem is None or self.solution is None:
            raise ValueError(f"rejected sample ({self.reason}) has no training text")
        if self.kind == "cot":
            return f"## Question\n{self.problem}\n\n## Solution\n{self.solution}"
        output = (self.code_output or "").rstrip("\n")
        return (f"## Question\n{self.problem}\n\n## Code Solution\n```python\n{self.solution.rstrip()}\n```\n"
                f"```output\n{output}\n```\nThe answer is $\\boxed{{{self.answer}}}$.")


def split_sections(text: str) -> dict[str, str] | None:
    """``{"problem": …, "solution" | "code solution": …, "final answer": …}`` or ``None``.

    The first heading of each name wins; text before the first heading must be blank (a
    preamble like "Sure! Here is…" is tolerated when short).
    """
    matches = list(_HEADING.finditer(text))
    if not matches:
        return None
    preamble = text[:matches[0].start()].strip()
    if len(preamble) > 200:
        return None
    sections: dict[str, str] = {}
    order: list[str] = []
    for i, m in enumerate(matches):
        name = m.group(1).lower().replace("new problem", "problem")
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        if name not in sections:
            sections[name] = text[m.end():end].strip()
            order.append(name)
    return sections | {"_order": "|".join(order)}


def copy_containment(problem: str, excerpt: str, n: int) -> float:
    """Share of the problem's distinct word n-grams that also occur in the excerpt."""
    return containment(text_ngram_hashes(problem, n).tolist(), text_ngram_hashes(excerpt, n).tolist())


def parse_reply(text: str | None, finish_reason: str | None, kind: Kind, excerpt: str = "",
                *, copy_ngram: int = 6, max_copy_containment: float = 0.5) -> ParsedSample:
    """Split and check a reply (everything but running the code; see ``validate_tool``)."""
    if text is None or not text.strip():
        return ParsedSample(kind, "empty", "the reply is empty")
    if finish_reason == "length":
        return ParsedSample(kind, "truncated", "generation stopped at max tokens")
    sections = split_sections(text)
    if _REFUSAL.match(text.strip()) and (sections is None or "problem" not in sections):
        return ParsedSample(kind, "refusal", text.strip()[:120])
    solution_key = "solution" if kind == "cot" else "code solution"
    if sections is None or "problem" not in sections or solution_key not in sections:
        found = sections["_order"] if sections else "no headings"
        return ParsedSample(kind, "unparsable", f"need '## Problem' and '## {solution_key.title()}'; found: {found}")
    order = sections["_order"].split("|")
    if order.index("problem") > order.index(solution_key):
        return ParsedSample(kind, "unparsable", f"'## Problem' must come before '## {solution_key.title()}'")
    problem, body = sections["problem"], sections[solution_key]
    if not problem or not body:
        return ParsedSample(kind, "empty", "the problem or the solution section is empty")
    if kind == "cot":
        solution, answer = body, last_boxed(body)
    else:
        code = _CODE_BLOCK.search(body)
        if not code or not code.group(1).strip():
            return ParsedSample(kind, "unparsable", "no ```python block in '## Code Solution'",
                                problem=problem)
        solution = code.group(1).strip("\n")
        answer = last_boxed(sections.get("final answer", "")) or last_boxed(body[code.end():])
    if not answer:
        return ParsedSample(kind, "no_final_answer", "no \\boxed{} answer", problem=problem, solution=solution)
    score = copy_containment(problem, excerpt, copy_ngram) if excerpt else 0.0
    sample = ParsedSample(kind, None, None, problem, solution, answer, None, round(score, 4))
    if score >= max_copy_containment:
        return replace(sample, reason="copies_excerpt",
                       detail=f"{score:.2f} of the problem's {copy_ngram}-grams are in the excerpt "
                              f"(limit {max_copy_containment})")
    return sample


def validate_tool(sample: ParsedSample, run: object) -> ParsedSample:
    """Run an accepted tool sample's code with ``run(code) -> SandboxResult`` and keep it only
    if the printed answer matches the boxed one."""
    if sample.kind != "tool" or not sample.accepted or sample.solution is None:
        return sample
    result = run(sample.solution)  # type: ignore[operator]
    if not result.ok:
        tail = (result.stderr.strip().splitlines() or [""])[-1][:200]
        why = result.killed_by or f"exit code {result.exit_code}"
        return replace(sample, reason="code_failed", detail=f"{why}: {tail}", code_output=result.stdout)
    printed = printed_answer(result.stdout)
    if not answers_match(printed, sample.answer):
        return replace(sample, reason="answer_mismatch", code_output=result.stdout,
                       detail=f"printed {printed!r}, boxed {sample.answer!r}")
    return replace(sample, code_output=result.stdout)
