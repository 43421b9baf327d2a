"""Generate and grade one benchmark spec: the CoT pass and the tool loop.

Generation goes through any ``Backend`` (``models/generation/backends``: an OpenAI-compatible
server, vLLM, transformers) with the backend's own concurrency; requests are plain chat
completions whose single user turn is the transcript so far (the models are trained on the
``## Question`` text format, not on a chat template). Evaluation does not use the request
ledger: it pays nothing and a rerun of the same spec reproduces the same rows (greedy).

Tool loop (``run_tool``), round-synchronous over items so every round is one concurrent batch:

1. generate until the model would write an ```` ```output```` block (stop string);
2. a ``\\boxed{}`` answer in this round's text ends the item; else take the round's last
   ```` ```python```` program, run it in the sandbox (``models.sandbox.run_python``), append
   ```` ```output\\n…\\n```` ```` (stdout, or the error's last line) and go on;
3. at most ``max_rounds`` rounds; no program and no answer ends the item too.

A failing program (crash, timeout, memory, output flood, refused syscall) never stops the
evaluation: the item records ``error="execution: <why>"`` and the loop continues.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from models.eval.spec import OUTPUT_BLOCK, BenchmarkSpec
from models.generation.answers import extract_answer, grade, last_boxed, printed_answer
from models.generation.types import GenerationRequest, GenerationResponse, SamplingParams

if TYPE_CHECKING:
    from jzlake.benchmarks import BenchmarkItem
    from models.generation.types import Backend
    from models.sandbox import SandboxLimits

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
MAX_OUTPUT_CHARS = 2000  # of a program's output shown back to the model


@dataclass
class ItemResult:
    """One item's outcome (the columns of ``gold.eval_predictions`` it fills)."""

    benchmark: str
    setting: str
    item_id: str
    prediction: str
    extracted_answer: str | None
    reference_answer: str
    correct: bool
    rounds_used: int
    finish_reason: str | None
    error: str | None

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def _progress(total: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", file=sys.stderr, disable=not sys.stderr.isatty(),
                leave=False)


def generate_all(backend: Backend, requests: Sequence[GenerationRequest],
                 label: str = "eval") -> dict[str, GenerationResponse]:
    """Responses by request key (duplicate keys are sent once)."""
    unique = list({r.key: r for r in requests}.values())
    responses: dict[str, GenerationResponse] = {}
    with _progress(len(unique), label) as bar:
        for response in backend.generate(iter(unique)):
            responses[response.key] = response
            bar.update(1)
    return responses


def _request(model: str, spec: BenchmarkSpec, transcript: str) -> GenerationRequest:
    decoding = spec.decoding
    sampling = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=int(decoding["max_new_tokens"]), seed=0,
                              stop=tuple(decoding["stop"]))
    return GenerationRequest(model=model, messages=(("user", transcript),), sampling=sampling,
                             template_id=f"eval-{spec.setting}", template_hash=spec.spec_hash)


def _grade(item: BenchmarkItem, extracted: str | None, timeout_s: float) -> tuple[bool, str | None]:
    if extracted is None:
        return False, None
    result = grade(extracted, item.answer, timeout_s=timeout_s)
    return result.equal, (f"grader: {result.error}" if result.error else None)


def run_cot(items: Sequence[BenchmarkItem], spec: BenchmarkSpec, backend: Backend, model: str, *,
            grader_timeout_s: float = 5.0) -> list[ItemResult]:
    """One greedy generation per item; answer = last ``\\boxed{}`` (then "the answer is", last number)."""
    requests = {item.item_id: _request(model, spec, spec.prompt_template.format(question=item.text)) for item in items}
    responses = generate_all(backend, list(requests.values()), f"{spec.benchmark} cot")
    results = []
    for item in items:
        response = responses.get(requests[item.item_id].key)
        if response is None or not response.ok:
            why = response.error if response is not None else "no response"
            results.append(ItemResult(item.benchmark, "cot", item.item_id, "", None, str(item.answer), False, 1,
                                      None, f"generation: {why}"))
            continue
        extracted, _ = extract_answer(response.text)
        correct, grader_error = _grade(item, extracted, grader_timeout_s)
        results.append(ItemResult(item.benchmark, "cot", item.item_id, response.text or "", extracted,
                                  str(item.answer), correct, 1, response.finish_reason, grader_error))
    return results


def execution_error(result: Any) -> str:
    """``execution: <why>: <last stderr line>`` for a failed sandbox run."""
    why = result.killed_by or f"exit code {result.exit_code}"
    tail = (result.stderr.strip().splitlines() or [""])[-1][:200]
    return f"execution: {why}: {tail}".rstrip(": ")


def _output_block(result: Any) -> str:
    text = result.stdout if result.ok else (result.stdout + (result.stderr.strip().splitlines() or [""])[-1])
    text = text.strip("\n")
    if len(text) > MAX_OUTPUT_CHARS:
        text = text[:MAX_OUTPUT_CHARS] + "\n...(output truncated)"
    return OUTPUT_BLOCK.format(output=text)


@dataclass
class _ToolState:
    item: BenchmarkItem
    transcript: str
    generated: str = ""
    rounds: int = 0
    answer: str | None = None
    printed: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False


def run_tool(items: Sequence[BenchmarkItem], spec: BenchmarkSpec, backend: Backend, model: str, *,
             limits: SandboxLimits | None = None, grader_timeout_s: float = 5.0,
             sandbox_workers: int = 4, run_code: Any = None) -> list[ItemResult]:
    """The tool loop (module docstring) over every item; ``run_code(code) -> SandboxResult``
    defaults to ``models.sandbox.run_python`` with ``limits``."""
    if run_code is None:
        from models.sandbox import run_python

        def run_code(code: str) -> Any:
            return run_python(code, limits)

    states = [_ToolState(item, spec.prompt_template.format(question=item.text)) for item in items]
    with ThreadPoolExecutor(max_workers=max(1, sandbox_workers), thread_name_prefix="eval-sandbox") as pool:
        for round_number in range(1, spec.max_rounds + 1):
            active = [s for s in states if not s.done]
            if not active:
                break
            requests = [_request(model, spec, s.transcript) for s in active]
            responses = generate_all(backend, requests, f"{spec.benchmark} tool r{round_number}")
            programs: list[tuple[_ToolState, str]] = []
            for state, request in zip(active, requests, strict=True):
                state.rounds = round_number
                response = responses.get(request.key)
                if response is None or not response.ok:
                    state.error = f"generation: {response.error if response is not None else 'no response'}"
                    state.done = True
                    continue
                text = response.text or ""
                state.transcript += text
                state.generated += text
                state.finish_reason = response.finish_reason
                boxed = last_boxed(text)
                code_blocks = _CODE_BLOCK.findall(text)
                if boxed is not None:
                    state.answer, state.done = boxed, True
                elif response.finish_reason == "length" or not code_blocks:
                    state.done = True
                else:
                    programs.append((state, code_blocks[-1]))
            for (state, _), result in zip(programs, pool.map(run_code, [code for _, code in programs]), strict=True):
                block = _output_block(result)
                state.transcript += block
                state.generated += block
                if result.ok:
                    state.printed = printed_answer(result.stdout)
                else:
                    state.error = execution_error(result)
    results = []
    for state in states:
        extracted = state.answer if state.answer is not None else state.printed
        correct, grader_error = _grade(state.item, extracted, grader_timeout_s)
        results.append(ItemResult(state.item.benchmark, "tool", state.item.item_id, state.generated, extracted,
                                  str(state.item.answer), correct, state.rounds, state.finish_reason,
                                  state.error or grader_error))
    return results


def run_spec(items: Iterable[BenchmarkItem], spec: BenchmarkSpec, backend: Backend, model: str,
             **kwargs: Any) -> list[ItemResult]:
    """``run_cot`` or ``run_tool`` by the spec's setting."""
    items = list(items)
    if spec.setting == "cot":
        return run_cot(items, spec, backend, model, grader_timeout_s=kwargs.get("grader_timeout_s", 5.0))
    return run_tool(items, spec, backend, model, **kwargs)
