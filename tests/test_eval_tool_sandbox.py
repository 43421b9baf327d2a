"""The tool loop with hostile model output: every attack fails safely inside the real sandbox,
the evaluation goes on, and each is counted as an execution error.

The model is a test double of the ``Backend`` protocol replaying canned replies (the subject
here is the loop and the sandbox, not generation); the programs run in ``models.sandbox``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from jzlake.benchmarks import BenchmarkItem
from jzlake.settings import BenchmarkSettings
from models.eval.metrics import summarize
from models.eval.runner import run_tool
from models.eval.spec import make_spec
from models.generation.types import GenerationRequest, GenerationResponse
from models.sandbox import SandboxLimits


class ScriptedModel:
    """Replies from a script: question → one reply per round (round = output blocks so far)."""

    name = "scripted"

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.prompts: list[str] = []

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        for request in requests:
            transcript = request.messages[-1][1]
            self.prompts.append(transcript)
            question = transcript.split("## Question\n", 1)[1].split("\n\n", 1)[0]
            replies = self.script[question]
            round_index = transcript.count("```output")
            text = replies[min(round_index, len(replies) - 1)]
            yield GenerationResponse(key=request.key, text=text, finish_reason="stop")


def program(code: str) -> str:
    return f"```python\n{code}\n```\n"


@pytest.fixture
def attacks(tmp_path: Path) -> dict[str, str]:
    return {
        "socket": "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=2)\nprint('connected')",
        "write": f"open({str(tmp_path / 'escaped.txt')!r}, 'w').write('pwned')\nprint('written')",
        "secret": "import os\nprint(os.environ['JZ_EVAL_PARENT_SECRET'])",
        "fork_bomb": "import os\nwhile True:\n    os.fork()",
        "infinite_loop": "while True:\n    pass",
        "huge_allocation": "x = bytearray(64 * 1024 ** 3)\nprint(len(x))",
    }


def test_hostile_programs_fail_safely_and_count_as_execution_errors(
        attacks: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JZ_EVAL_PARENT_SECRET", "s3cr3t-value")
    script = {f"Attack {name}?": [program(code), "I could not compute it, so \\boxed{0}."]
              for name, code in attacks.items()}
    script["What is 6 times 7?"] = [program("print(6 * 7)"), "The answer is $\\boxed{42}$."]
    script["What is 2 plus 2?"] = [program("print(2 + 2)"), "Let me check again.\n" + program("print(4)"),
                                   program("print(4)"), program("print(4)"), "never reached"]
    items = [BenchmarkItem("attacks", f"a-{name}", f"Attack {name}?", "1") for name in attacks]
    items += [BenchmarkItem("attacks", "good", "What is 6 times 7?", "42"),
              BenchmarkItem("attacks", "rounds", "What is 2 plus 2?", "4")]
    spec = make_spec("attacks", "tool", "0" * 64, BenchmarkSettings(path="x"), max_new_tokens=64)
    model = ScriptedModel(script)
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=4, memory_bytes=512 << 20)

    results = {r.item_id: r for r in run_tool(items, spec, model, "scripted", limits=limits, sandbox_workers=3)}

    assert set(results) == {i.item_id for i in items}  # the evaluation went on past every attack
    for name in attacks:
        result = results[f"a-{name}"]
        assert result.error and result.error.startswith("execution:"), (name, result.error)
        assert result.rounds_used == 2 and result.extracted_answer == "0" and not result.correct, name
        assert "s3cr3t-value" not in result.prediction
    assert not (tmp_path / "escaped.txt").exists()
    assert "connected" not in results["a-socket"].prediction.split("```output")[1]
    assert any(why in results["a-infinite_loop"].error for why in ("timeout", "cpu"))
    assert "memory" in results["a-huge_allocation"].error or "MemoryError" in results["a-huge_allocation"].error
    good = results["good"]
    assert good.correct and good.error is None and good.rounds_used == 2
    assert "```output\n42\n```" in good.prediction
    rounds = results["rounds"]  # never boxes: four rounds, then the last program's printed answer
    assert rounds.rounds_used == 4 and rounds.extracted_answer == "4" and rounds.correct
    assert sum(1 for p in model.prompts if "What is 2 plus 2?" in p) == 4

    metrics = summarize("attacks", "tool", spec.spec_hash, len(items), [r.as_row() for r in results.values()])
    assert metrics.execution_error_rate == pytest.approx(len(attacks) / len(items))
    assert metrics.accuracy == pytest.approx(2 / len(items))
    assert metrics.extraction_failure_rate == 0.0
