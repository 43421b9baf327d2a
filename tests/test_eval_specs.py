"""Benchmark specs and loading (models/eval/spec.py) and the grader self-check (``jzlake eval --self-check``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jzlake.settings import BenchmarkSettings
from models.eval import spec as specs
from models.eval.job import self_check, worked_answer
from tests.conftest import SAMPLE, SHARED_DATA, make_settings


def test_spec_hash_changes_with_everything_that_decides_a_score() -> None:
    config = BenchmarkSettings(path="x.jsonl")
    base = specs.make_spec("gsm8k", "cot", "a" * 64, config)
    moved = specs.make_spec("gsm8k", "cot", "a" * 64, BenchmarkSettings(path="elsewhere.jsonl"))
    assert base.spec_hash == moved.spec_hash  # the content hash counts, not where the file lies
    changed = [
        specs.make_spec("gsm8k", "tool", "a" * 64, config),
        specs.make_spec("gsm8k", "cot", "b" * 64, config),
        specs.make_spec("gsm8k", "cot", "a" * 64, config, max_new_tokens=512),
        specs.make_spec("gsm8k", "cot", "a" * 64, BenchmarkSettings(path="x.jsonl", answer_field="target")),
        specs.make_spec("svamp", "cot", "a" * 64, config),
    ]
    assert len({base.spec_hash, *(c.spec_hash for c in changed)}) == 6
    assert base.decoding == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 1024, "stop": ["## Question"]}
    assert base.prompt_template.format(question="Q?") == "## Question\nQ?\n\n## Solution\n"
    assert specs.make_spec("m", "tool", "a" * 64, config).max_rounds == 4


def test_any_question_or_problem_file_loads_without_config(tmp_path: Path) -> None:
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps({"problem": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(3)))
    as_json = tmp_path / "other.json"
    as_json.write_text(json.dumps([{"question": "Half of 9?", "answer": "4.5"}]))
    settings = make_settings(tmp_path)
    configs = specs.benchmark_configs(settings, {"mine": str(jsonl), "other": str(as_json)})
    mine = specs.load("mine", *configs["mine"])
    assert [i.answer for i in mine.items] == ["1", "2", "3"] and mine.items_total == 3
    assert specs.load("other", *configs["other"]).items[0].text == "Half of 9?"
    assert len(specs.load("mine", *configs["mine"], limit=2).items) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        specs.load("gone", BenchmarkSettings(path="nope.jsonl"), str(tmp_path / "nope.jsonl"))


def test_worked_answers() -> None:
    assert worked_answer({"solution": "so $\\boxed{\\frac{1}{2}}$."}) == "\\frac{1}{2}"
    assert worked_answer({"answer": "2+2=<<2+2=4>>4\n#### 4"}) == "4"
    assert worked_answer({"Equation": "( 1 + 2 )"}) is None


def _self_check_cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    from jzlake.cli import main

    assert main(["eval", "--self-check", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_self_check_on_the_repo_sample(capsys: pytest.CaptureFixture[str]) -> None:
    bench = SAMPLE / "benchmarks"
    report = _self_check_cli(capsys, "--benchmark", f"gsm8k={bench / 'gsm8k' / 'test.jsonl'}",
                             "--benchmark", f"math500={bench / 'math500' / 'test.jsonl'}",
                             "--benchmark", f"svamp={bench / 'svamp' / 'SVAMP.json'}")
    assert set(report["benchmarks"]) == {"gsm8k", "math500", "svamp"}
    assert report["min_agreement"] >= 0.99
    per = report["benchmarks"]
    # every GSM8K and MATH500 item has a worked solution, checked as a second comparison
    assert per["gsm8k"]["checks"] == 2 * per["gsm8k"]["items"]
    assert per["math500"]["checks"] == 2 * per["math500"]["items"]
    assert per["svamp"]["checks"] == per["svamp"]["items"]


@pytest.mark.skipif(not (SHARED_DATA / "math" / "test.jsonl").exists(), reason="../shared/data not present")
def test_self_check_on_the_shared_data(capsys: pytest.CaptureFixture[str]) -> None:
    report = _self_check_cli(capsys, "--config", str(SAMPLE.parents[1] / "config" / "shared-data.yaml"),
                             "--benchmark", f"gsm8k={SHARED_DATA / 'gsm8k' / 'test.jsonl'}",
                             "--benchmark", f"math={SHARED_DATA / 'math' / 'test.jsonl'}",
                             "--benchmark", f"math500={SHARED_DATA / 'math500' / 'test.jsonl'}",
                             "--benchmark", f"svamp={SHARED_DATA / 'svamp' / 'SVAMP.json'}")
    assert report["items"] == 1319 + 5000 + 500 + 1000
    assert all(b["agreement"] >= 0.99 for b in report["benchmarks"].values()), report["disagreeing"][:20]


def test_self_check_finds_a_wrong_reference(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    rows = [{"problem": "p1", "solution": "so \\boxed{\\frac{11}{2}}", "answer": "\\frac{1}{12}"},
            {"problem": "p2", "solution": "so \\boxed{200}", "answer": "200"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    bench = specs.load("bad", BenchmarkSettings(path=str(path)), str(path))
    report = self_check({"bad": bench})
    assert report["disagreeing"] == ["bad:0"] and report["agreement"] == pytest.approx(3 / 4)


def test_unanswered_items_make_a_partial_result_not_wrong_answers(tmp_path: Path) -> None:
    from models.eval.job import EvaluatedModel, evaluate, load_benchmarks
    from models.generation.types import GenerationResponse

    class HalfDownServer:  # a Backend double: the server fails for good on one question
        name = "half-down"

        def generate(self, requests: Any) -> Any:
            for request in requests:
                prompt = request.messages[-1][1]
                if "Q1?" in prompt:
                    yield GenerationResponse(request.key, None, None, error="HTTP 503: overloaded (gave up)")
                else:
                    yield GenerationResponse(request.key, "so \\boxed{7}", "stop")

    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"Q{i}?", "answer": "7"}) for i in range(3)))
    settings = make_settings(tmp_path)
    benchmarks = load_benchmarks(settings, {"b": str(path)}, None)
    run = evaluate(settings, EvaluatedModel("m", "1"), benchmarks, ["cot"], backend=HalfDownServer())
    metrics = run.metrics["b/cot"]
    assert (metrics.items, metrics.items_total, metrics.accuracy) == (2, 3, 1.0)
    assert run.generation_failures == {"b/cot": ["1"]} and {r["item_id"] for r in run.rows} == {"0", "2"}
