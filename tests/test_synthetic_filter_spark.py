"""spark_jobs.synthetic_filter on hand-made synthetic rows: every drop reason, per-kind dedup,
decontamination against the sample GSM8K test set, reconciliation and an idempotent rerun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jzlake import catalogue
from models import lake_io
from tests.conftest import SAMPLE, make_settings

pytestmark = pytest.mark.spark

LONG = ("A farmer plants rows of apple trees along the northern edge of a rectangular field that measures "
        "one hundred twenty meters by eighty meters. Each tree needs a circle of clear ground with a radius of "
        "two meters, and neighbouring circles may touch but must not overlap. Along the southern edge he "
        "plants pear trees that need circles of radius three meters under the same rule. A path of width one "
        "meter runs around the inside of the whole field and no tree circle may reach into it. If he fills "
        "both edges with as many trees as the rules allow, starting each row right at the path in the western "
        "corner, how many trees does he plant in total along the two edges of the field?")
OTHER = ("Let f be a polynomial with integer coefficients such that f(0) = 3 and f(1) = 7. Show how many "
         "integers n between 1 and 100 can satisfy f(n) = 0, and give that count as your final answer.")
SHORT_BAKERY = ("A bakery packs 48 muffins into boxes of 6 muffins each and then sells every full box for "
                "5 dollars. How much money does it make?")


def gsm8k_question(index: int = 0) -> str:
    lines = (SAMPLE / "benchmarks" / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return json.loads(lines[index])["question"]


def raw_row(key: str, problem: str | None, kind: str = "cot", reason: str | None = None,
            solution: str = "Step by step we find the value. \\boxed{3}") -> dict[str, Any]:
    text = None if reason else f"## Question\n{problem}\n\n## Solution\n{solution}"
    return {
        "request_key": key, "reason": reason, "detail": "planted" if reason else None, "text": text,
        "problem": problem, "solution": None if reason else solution, "answer": None if reason else "3",
        "doc_id": f"doc-{key}", "source": "stackmathqa", "excerpt_start": int(key[1:]), "excerpt_end": 900,
        "template_id": "cot_high_school" if kind == "cot" else "tool_code", "template_hash": f"sha-{kind}",
        "stage": "high_school" if kind == "cot" else "tool", "kind": kind, "model_name": "jiuzhang-synthesizer",
        "model_version": "v1", "model_uri": "file:///m", "sampling": json.dumps({"temperature": 1.0}),
        "seed": 42, "sample_index": 0, "input_table": "gold.corpus", "input_version": 1, "shard_index": 0,
        "num_shards": 1, "run_id": "synthesize-test",
    }


def test_filter_dedupe_decontaminate_and_rerun(spark: Any, tmp_path: Path) -> None:
    from spark_jobs import synthetic_filter

    settings = make_settings(tmp_path)
    near = LONG.replace("pear trees", "plum trees")
    rows = [
        raw_row("k01", LONG),
        raw_row("k02", LONG.upper().replace(".", " ."), solution="Another route. \\boxed{3}"),  # exact (normal form)
        raw_row("k03", near),                                                                   # near duplicate
        raw_row("k04", LONG, kind="tool"),                  # same problem, other kind: kept
        raw_row("k05", gsm8k_question(0)),                  # a benchmark question verbatim
        raw_row("k06", "What is 2 + 2?"),                   # too short
        raw_row("k07", None, reason="unparsable"),          # rejected while parsing
        raw_row("k08", OTHER),
        raw_row("k09", SHORT_BAKERY, solution="word " * 2100 + "\\boxed{40}"),  # solution too long
    ]
    lake_io.merge_rows(settings, "gold.synthetic_raw", rows)
    raw_version = lake_io.current_version(settings, "gold.synthetic_raw")

    summary = synthetic_filter.run(spark, settings, "filter-test-1")
    assert summary["raw"] == 9 and summary["kept"] + summary["dropped"] == 9
    kept = {r["request_key"]: r for r in lake_io.read_table_at(settings, "gold.synthetic_problems")[0].to_pylist()}
    dropped = {r["request_key"]: r for r in lake_io.read_table_at(settings, "gold.synthetic_dropped")[0].to_pylist()}
    assert set(kept) == {"k01", "k04", "k08"}
    assert {k: r["reason"] for k, r in dropped.items()} == {
        "k02": "exact_duplicate", "k03": "near_duplicate", "k05": "contaminated", "k06": "too_short_problem",
        "k07": "unparsable", "k09": "too_long_solution"}
    assert dropped["k02"]["duplicate_of"] == "k01" and dropped["k03"]["duplicate_of"] == "k01"
    assert dropped["k05"]["benchmark"] == "gsm8k"
    assert summary["dropped_by_reason"] == {"contaminated": 1, "exact_duplicate": 1, "near_duplicate": 1,
                                            "too_long_solution": 1, "too_short_problem": 1, "unparsable": 1}
    assert kept["k01"]["near_dup_cluster"] == "k01" and kept["k04"]["near_dup_cluster"] is None
    for row in kept.values():
        assert row["raw_version"] == raw_version and row["text"].startswith("## Question\n")
    # Lineage on every output row, kept or dropped: the raw row's sample lineage, the synthesis
    # run that wrote it (synthesis_run_id) and this filter run (run_id).
    raw_by_key = {r["request_key"]: r for r in rows}
    lineage = [name for name, _ in catalogue.SAMPLE_LINEAGE]
    for table, out in (("gold.synthetic_problems", kept), ("gold.synthetic_dropped", dropped)):
        assert set(lineage) | {"synthesis_run_id", "run_id", "raw_version"} <= set(catalogue.table(table).column_names)
        for key, row in out.items():
            assert {c: row[c] for c in lineage} == {c: raw_by_key[key][c] for c in lineage}, (table, key)
            assert all(row[c] is not None for c in lineage), (table, key)
            assert (row["synthesis_run_id"], row["run_id"], row["raw_version"]) == (
                "synthesize-test", "filter-test-1", raw_version)

    before = {t: lake_io.current_version(settings, t) for t in ("gold.synthetic_problems", "gold.synthetic_dropped")}
    again = synthetic_filter.run(spark, settings, "filter-test-2")
    assert again["written"] == {"gold.synthetic_problems": {"upserted": 0, "deleted": 0},
                                "gold.synthetic_dropped": {"upserted": 0, "deleted": 0}}
    assert {t: lake_io.current_version(settings, t) for t in before} == before
