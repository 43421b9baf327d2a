"""Benchmark loaders: the sample's GSM8K / MATH-500 / SVAMP, the shared MATH test split, and
ASDiv / MAWPS / TabMWP-shaped files that load from configuration alone."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from jzlake.benchmarks import (
    BenchmarkFormatError,
    BenchmarkItem,
    after_hashes,
    last_boxed,
    load_benchmark,
    load_benchmarks,
)
from jzlake.settings import BenchmarkSettings, load_settings
from tests.conftest import SAMPLE, SHARED_DATA


def first_json_line(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8").splitlines()[0])


def test_sample_benchmarks_load_from_default_settings() -> None:
    bench = load_benchmarks(load_settings(environ={}))
    assert {k: len(v) for k, v in bench.items()} == {"gsm8k": 1319, "math500": 500, "svamp": 1000}
    gsm = bench["gsm8k"][0]
    raw = first_json_line(SAMPLE / "benchmarks/gsm8k/test.jsonl")
    assert isinstance(gsm, BenchmarkItem)
    assert (gsm.benchmark, gsm.item_id, gsm.text) == ("gsm8k", "0", raw["question"])
    assert gsm.answer == raw["answer"].rsplit("####", 1)[1].strip()
    assert gsm.metadata["answer"] == raw["answer"]  # the full solution stays available
    m5 = bench["math500"][0]
    raw = first_json_line(SAMPLE / "benchmarks/math500/test.jsonl")
    assert (m5.item_id, m5.text, m5.answer) == (raw["unique_id"], raw["problem"], raw["answer"])
    assert m5.metadata["level"] == raw["level"] and "solution" in m5.metadata
    sv = bench["svamp"][0]
    raw = json.loads((SAMPLE / "benchmarks/svamp/SVAMP.json").read_text())[0]
    assert sv.item_id == raw["ID"] and sv.text == f"{raw['Body']} {raw['Question']}"
    assert float(sv.answer) == raw["Answer"]
    assert len({i.item_id for i in bench["svamp"]}) == 1000


def test_math_test_split_answers_come_from_last_boxed() -> None:
    path = SHARED_DATA / "math" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present (shared data is optional)")
    items = load_benchmark("math", BenchmarkSettings(path=str(path)))  # no config at all
    assert len(items) == 5000
    assert all(i.answer for i in items)
    raw = first_json_line(path)
    assert items[0].text == raw["problem"] and items[0].answer == last_boxed(raw["solution"])
    assert items[0].metadata["solution"] == raw["solution"]
    # MATH-500 problems are all in the full split, with the same answers
    m500 = {i.text: i.answer for i in load_benchmarks(load_settings(environ={}))["math500"]}
    same = [i for i in items if i.text in m500]
    assert len(same) == 500
    agree = sum(1 for i in same if i.answer.replace(" ", "") == m500[i.text].replace(" ", ""))
    assert agree >= 0.95 * len(same)


def test_asdiv_mawps_tabmwp_shapes_need_no_code(tmp_path) -> None:
    asdiv = tmp_path / "asdiv.json"  # ASDiv-like: body + question, answer with units, JSON list
    asdiv.write_text(json.dumps([
        {"id": "nluds-0001", "body": "Seven red apples and two green apples are in the basket.",
         "question": "How many apples are in the basket?", "answer": "9 (apples)", "formula": "7+2=9"},
        {"id": "nluds-0002", "body": "Ellen has six more balls than Marin. Marin has nine balls.",
         "question": "How many balls does Ellen have?", "answer": "15 (balls)", "formula": "6+9=15"},
    ]))
    items = load_benchmark("asdiv", BenchmarkSettings(path=str(asdiv), id_field="id"))
    assert [i.item_id for i in items] == ["nluds-0001", "nluds-0002"]
    assert items[0].text.startswith("Seven red apples") and items[0].text.endswith("in the basket?")
    assert items[1].answer == "15 (balls)" and items[1].metadata == {"formula": "6+9=15"}

    mawps = tmp_path / "mawps.jsonl"  # MAWPS original field names, configured
    mawps.write_text("\n".join(json.dumps(r) for r in [
        {"iIndex": 11, "sQuestion": "Joan found 70 seashells. She gave Sam 43. How many are left?",
         "lSolutions": [27.0]},
    ]) + "\n")
    cfg = BenchmarkSettings(path=str(mawps), text_fields=["sQuestion"], id_field="iIndex", answer_field="lSolutions")
    (item,) = load_benchmark("mawps", cfg)
    assert (item.item_id, item.answer) == ("11", "27")

    tabmwp = tmp_path / "problems_test.json"  # TabMWP: an object of items keyed by id
    tabmwp.write_text(json.dumps({"8": {"table_title": "Apples sold", "table": "Day | Apples\nMon | 3\nTue | 5",
                                        "question": "How many apples in total?", "choices": None, "answer": "8",
                                        "ans_type": "integer_number", "solution": "3 + 5 = 8."}}))
    cfg = BenchmarkSettings(path=str(tabmwp), text_fields=["table_title", "table", "question"])
    (item,) = load_benchmark("tabmwp", cfg)
    assert item.item_id == "8" and item.answer == "8"
    assert item.text == "Apples sold\nDay | Apples\nMon | 3\nTue | 5\nHow many apples in total?"


def test_problem_plus_answer_jsonl_loads_without_config(tmp_path) -> None:
    path = tmp_path / "any.jsonl"
    path.write_text('{"problem": "What is $1+1$?", "answer": "2"}\n\n{"problem": "And 2+2?", "answer": 4}\n')
    items = load_benchmark("any", BenchmarkSettings(path=str(path)))
    assert [(i.item_id, i.text, i.answer) for i in items] == [("0", "What is $1+1$?", "2"), ("1", "And 2+2?", "4")]


def test_question_answer_json_list_loads_without_config(tmp_path) -> None:
    # A plain JSON list (not JSON lines) of question/answer items, under a name no setting knows.
    path = tmp_path / "quiz.json"
    path.write_text(json.dumps([
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "7"},
        {"question": "A train goes 60 km in 1.5 hours. What is its speed in km/h?", "answer": 40,
         "source": "worksheet"},
    ], indent=2))
    items = load_benchmark("quiz", BenchmarkSettings(path=str(path)))
    assert [(i.benchmark, i.item_id, i.answer) for i in items] == [("quiz", "0", "7"), ("quiz", "1", "40")]
    assert items[1].text == "A train goes 60 km in 1.5 hours. What is its speed in km/h?"
    assert items[1].metadata == {"source": "worksheet"}


def test_gzipped_jsonl_benchmark_loads_whole(tmp_path) -> None:
    rows = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(250)]
    path = tmp_path / "sums.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    items = load_benchmark("sums", BenchmarkSettings(path=str(path)))
    assert [(i.item_id, i.text, i.answer) for i in items] == [
        (str(n), r["question"], str(2 * n)) for n, r in enumerate(rows)]


def test_errors_name_the_item_and_the_fix(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok?", "answer": "1"}\n{"stem": "no text field", "answer": "2"}\n')
    with pytest.raises(BenchmarkFormatError, match=r"item 1: .*set `text_fields`"):
        load_benchmark("bad", BenchmarkSettings(path=str(path)))
    path.write_text('{"question": "a", "answer": "1"}\nnot json\n')
    with pytest.raises(BenchmarkFormatError, match=r"bad.jsonl:2: invalid JSON"):
        load_benchmark("bad", BenchmarkSettings(path=str(path)))
    path.write_text('{"question": "a", "id": 1}\n{"question": "b", "id": 1}\n')
    with pytest.raises(BenchmarkFormatError, match="repeats item 0"):
        load_benchmark("bad", BenchmarkSettings(path=str(path), id_field="id"))
    with pytest.raises(FileNotFoundError, match="fix the benchmark's `path`"):
        load_benchmark("bad", BenchmarkSettings(path=str(tmp_path / "missing.json")))
    path.write_text('{"question": "a", "solution": "no box here"}\n')
    with pytest.raises(BenchmarkFormatError, match="no \\\\boxed"):
        load_benchmark("bad", BenchmarkSettings(path=str(path), answer_field="solution",
                                                answer_extractor="last_boxed"))


def test_answer_extractors() -> None:
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$ and then \boxed{x^{2}+1}.") == "x^{2}+1"
    assert last_boxed(r"\boxed 5$ done") == "5"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no answer") is None
    assert after_hashes("48/2 = 24\n#### 72") == "72"
    assert after_hashes("no hashes") is None
