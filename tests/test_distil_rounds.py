"""KD rounds of ``jzlake distil``: initialize (seeded random sample of ``gold.corpus``) and boost
(``gold.selected_texts``), the ``round`` column, and the per-round share of the teacher budget.

The teacher is an in-process backend that answers CoT prompts with a well-formed problem and
solution and tool prompts with prose (rejected as unparsable), so both output tables get rows
without a model server; the real server path is covered by ``test_distil_synthesize.py`` and
``test_train_e2e.py``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jzlake.settings import Settings
from models import distil as kd
from models import lake_io
from models.generation.types import GenerationRequest, GenerationResponse
from tests.conftest import make_settings
from tests.test_excerpts import real_texts
from tests.test_parsing import COT_OK

N_DOCS = 10


class TeacherStandIn:
    """Answers like a teacher would (CoT well formed; tool replies without code), counts sends."""

    name = "echo"

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.docs: Counter[str] = Counter()

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        for request in requests:
            self.sent[request.key] += 1
            self.docs[request.lineage["doc_id"]] += 1
            tool = request.lineage.get("kind") == "tool"
            reply = "I would write some code here." if tool else COT_OK
            yield GenerationResponse(request.key, reply, "stop", prompt_tokens=50, completion_tokens=40,
                                     latency_s=0.0, model="teacher-1")


@pytest.fixture
def teacher(monkeypatch: pytest.MonkeyPatch) -> TeacherStandIn:
    backend = TeacherStandIn()
    monkeypatch.setattr("models.generation.backends.make_backend", lambda *args, **kwargs: backend)
    return backend


def _settings(tmp_path: Path, *, distil: dict[str, Any] | None = None, max_calls: int = 9300) -> Settings:
    return make_settings(
        tmp_path, generation={"served_models": {"tiny-llama": "stand-in"}, "teacher_budget": {"max_calls": max_calls}},
        prompts={"tool_fraction": 0.5, "min_excerpt_chars": 100},
        distil={"teacher": "local", "initialize_documents": 4, "initialize_seed": 7, **(distil or {})})


def _corpus(settings: Settings, n: int = N_DOCS) -> list[str]:
    texts = [(s, t) for s, t in real_texts() if len(t) > 400][:n]
    assert len(texts) == n, "embedded sample too small"
    rows = [{"doc_id": f"{s}:{hashlib.sha256(t.encode()).hexdigest()[:12]}", "source": s, "text": t,
             "quality_score": 0.5, "math_density": 0.1, "n_words": len(t.split()), "run_id": "corpus"}
            for s, t in texts]
    lake_io.merge_rows(settings, "gold.corpus", rows)
    return sorted(r["doc_id"] for r in rows)


def _select(settings: Settings, doc_ids: list[str]) -> None:
    lake_io.merge_rows(settings, "gold.selected_texts", [
        {"rank": i, "doc_id": d, "score": 1.0 - i / 10, "source": d.split(":")[0], "input_table": "gold.corpus",
         "input_version": 0, "run_id": "influence-test"} for i, d in enumerate(doc_ids)])


def _rows(settings: Settings, name: str) -> list[dict[str, Any]]:
    return lake_io.read_table_at(settings, name)[0].to_pylist()


def _expected_sample(doc_ids: list[str], size: int, seed: int) -> list[str]:
    """The documents whose sha256 over JSON ``[seed, doc_id]`` ranks lowest (spelled out here)."""
    rank = {d: hashlib.sha256(json.dumps([seed, d]).encode()).hexdigest()[:16] for d in doc_ids}
    return sorted(sorted(doc_ids, key=lambda d: (rank[d], d))[:size])


def test_seeded_sample_is_stable_under_order_and_growth() -> None:
    ids = [f"doc-{i:03d}" for i in range(200)]
    pick = kd.seeded_sample(ids, 20, seed=42)
    assert pick == _expected_sample(ids, 20, 42) and len(pick) == 20 == len(set(pick))
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert kd.seeded_sample(shuffled + ids[:5], 20, seed=42) == pick  # order and duplicates do not matter
    assert kd.seeded_sample(ids, 20, seed=43) != pick
    grown = kd.seeded_sample(ids + [f"new-{i}" for i in range(20)], 20, seed=42)
    displaced = set(pick) - set(grown)
    assert all(d.startswith("new-") for d in set(grown) - set(pick)) and len(displaced) < 20
    assert kd.seeded_sample(ids[:5], 20, seed=42) == ids[:5]


def test_round_allowance_is_the_tighter_of_total_and_round() -> None:
    assert kd.round_allowance(9300, 0, 4650, 0) == 4650
    assert kd.round_allowance(9300, 4650, None, 0) == 9300          # boost: the rest of the total
    assert kd.round_allowance(9300, 5000, 4650, 4650) == 5000        # round spent: nothing more
    assert kd.round_allowance(9300, 9000, 4650, 100) == 9300         # total nearly spent: total binds
    assert kd.round_allowance(None, 10, 4650, 10) == 4650
    assert kd.round_allowance(None, 10, None, 10) is None
    assert kd.round_allowance(2, 0, 4650, 0) == 2


def test_initialize_then_boost_rounds(tmp_path: Path, teacher: TeacherStandIn) -> None:
    settings = _settings(tmp_path, distil={"round_max_calls": {"initialize": 3, "boost": None}}, max_calls=8)
    corpus = _corpus(settings)
    assert kd.choose_round(settings) == ("initialize", "gold.corpus")  # auto, no selection yet

    first = kd.distil(settings, environ={})
    sample = _expected_sample(corpus, 4, 7)
    assert first["round"] == "initialize" and first["documents"] == 4
    assert first["sent"] == 3 and first["budget_exhausted"]  # the round's cap, below the total of 8
    assert first["round_calls"] == {"spent_before": 0, "cap": 3, "spent_after": 3}
    assert set(teacher.docs) <= set(sample)
    resumed = kd.distil(settings, environ={})  # the round's cap holds across runs
    assert resumed["sent"] == 0 and resumed["round_calls"]["spent_before"] == 3

    # The influence pick arrives: one document both rounds ask for, two new ones.
    asked = sorted(teacher.docs)
    overlap = asked[0]
    _select(settings, [overlap, *[d for d in corpus if d not in sample][:2]])
    assert kd.choose_round(settings) == ("boost", "gold.selected_texts")
    boost = kd.distil(settings, environ={})
    assert boost["round"] == "boost" and boost["documents"] == 3 and boost["input_table"] == "gold.selected_texts"
    assert boost["round_calls"]["cap"] is None and boost["round_calls"]["spent_before"] == 0
    assert boost["accepted"] + boost["rejected"] + boost["failed"] + boost["not_sent"] == boost["requests"]
    assert max(teacher.sent.values()) == 1  # the shared document's prompts were not paid twice
    assert sum(teacher.sent.values()) <= 8  # the total cap spans both rounds

    rows = _rows(settings, "gold.kd_dataset") + _rows(settings, "gold.kd_rejected")
    ledger = {r["key"]: json.loads(r["lineage"])["round"] for r in _rows(settings, "gold.kd_requests")}
    assert {r["round"] for r in _rows(settings, "gold.kd_dataset")} == {"initialize", "boost"}
    assert {r["round"] for r in _rows(settings, "gold.kd_rejected")} <= {"initialize", "boost"}
    for row in rows:
        assert row["round"] == ledger[row["request_key"]]
        expected = "initialize" if row["doc_id"] in sample else "boost"
        assert row["round"] == expected, row["doc_id"]
        assert row["input_table"] == ("gold.corpus" if expected == "initialize" else "gold.selected_texts")
    assert len(rows) == sum(teacher.sent.values())  # every answered key has exactly one row

    # Forced rounds: the initialize round still reads its sample even though a selection exists.
    forced = _settings(tmp_path, distil={"round": "initialize", "round_max_calls": {"initialize": 3}}, max_calls=8)
    assert kd.choose_round(forced) == ("initialize", "gold.corpus")
    again = kd.distil(forced, environ={})
    assert again["round"] == "initialize" and again["sent"] == 0 and again["written"] == {
        "gold.kd_dataset": 0, "gold.kd_rejected": 0}


def test_round_errors_are_clear_before_anything_is_sent(tmp_path: Path, teacher: TeacherStandIn) -> None:
    settings = _settings(tmp_path, distil={"round": "boost"})
    _corpus(settings, 4)
    with pytest.raises(RuntimeError, match=r"gold\.selected_texts.*jzlake influence"):
        kd.distil(settings, environ={})
    contradiction = _settings(tmp_path, distil={"round": "boost", "input_table": "gold.corpus"})
    with pytest.raises(ValueError, match=r"round 'boost' reads gold\.selected_texts"):
        kd.choose_round(contradiction)
    assert not teacher.sent


def test_cli_round_flag_reaches_the_settings(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    kd.configure(parser)
    args = parser.parse_args(["--round", "initialize", "--max-documents", "3"])
    settings = kd.apply_overrides(_settings(tmp_path), args)
    assert (settings.distil.round, settings.distil.max_documents) == ("initialize", 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--round", "final"])
