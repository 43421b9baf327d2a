"""The shared distil/synthesize plumbing without a server: request planning and lineage,
skip reasons, teacher and synthesizer choice, input choice, reconciliation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from jzlake.settings import PromptSettings, SamplingSettings
from models.distil import choose_input, choose_teacher
from models.generation.excerpts import cut_excerpt
from models.generation.pipeline import (
    SKIP_DUPLICATE_EXCERPT,
    SKIP_EMPTY_TEXT,
    SKIP_NO_EXCERPT,
    SKIP_SHORT_EXCERPT,
    SourceDocument,
    ledger_answers,
    parse_outcomes,
    plan_requests,
    reconcile,
    sample_rows,
    write_samples,
)
from models.generation.prompt_library import load_templates
from models.synthesize import content_run_id, resolve_synthesizer, shard_of
from tests.conftest import make_settings
from tests.test_excerpts import real_texts

COT = SamplingSettings(temperature=1.0, top_p=1.0, max_tokens=2500)
TOOL = SamplingSettings(temperature=0.1, top_p=0.95, max_tokens=2500)


def documents(n: int = 12) -> list[SourceDocument]:
    texts = [(s, t) for s, t in real_texts() if len(t) > 300][:n]
    if len(texts) < n:
        pytest.skip("embedded sample missing")
    return [SourceDocument(f"{s}:{i}", s, t) for i, (s, t) in enumerate(texts)]


def plan(docs: list[SourceDocument], **prompts: object) -> object:
    return plan_requests(docs, model="teacher", templates=load_templates(), prompts=PromptSettings(**prompts),
                         cot_sampling=COT, tool_sampling=TOOL, lineage={"input_version": 3})


def test_plan_builds_requests_with_lineage_and_paper_sampling() -> None:
    docs = documents()
    result = plan(docs, tool_fraction=0.5, min_excerpt_chars=50)
    assert result.documents == len(docs) and result.requests
    texts = {d.doc_id: d.text for d in docs}
    sources = {d.doc_id: d.source for d in docs}
    for planned in result.requests:
        request, lineage = planned.request, planned.request.lineage
        excerpt = texts[lineage["doc_id"]][lineage["excerpt_start"]:lineage["excerpt_end"]]
        assert excerpt == planned.excerpt.text and excerpt in request.messages[0][1]
        assert request.template_hash == planned.template.sha256 and lineage["input_version"] == 3
        assert lineage["kind"] == planned.template.kind and lineage["source"] == sources[lineage["doc_id"]]
        assert lineage["stage"] == planned.template.stage
        expected = (0.1, 0.95) if planned.template.kind == "tool" else (1.0, 1.0)
        assert (request.sampling.temperature, request.sampling.top_p) == expected
        assert request.sampling.max_tokens == 2500 and request.sampling.seed == 42
    assert {p.template.kind for p in result.requests} == {"cot", "tool"}
    again = plan(docs, tool_fraction=0.5, min_excerpt_chars=50)
    assert [p.request.key for p in again.requests] == [p.request.key for p in result.requests]


def test_samples_per_prompt_differ_by_seed_and_key() -> None:
    docs = documents(2)
    result = plan_requests(docs, model="m", templates=load_templates(), prompts=PromptSettings(tool_fraction=0),
                           cot_sampling=COT, tool_sampling=TOOL, samples_per_prompt=3)
    assert len(result.requests) == 6
    per_doc = Counter(p.request.lineage["doc_id"] for p in result.requests)
    assert set(per_doc.values()) == {3}
    assert len({p.request.key for p in result.requests}) == 6
    assert sorted({p.request.sampling.seed for p in result.requests}) == [42, 43, 44]


def test_documents_without_a_usable_excerpt_are_counted_not_lost() -> None:
    docs = [
        SourceDocument("blank", "x", "   "),
        SourceDocument("short", "x", "Too short to inspire anything."),
        SourceDocument("all-math", "x", "\\begin{align}" + "a &= b \\\\ " * 300 + "\\end{align}"),
        *documents(2),
    ]
    result = plan(docs, tool_fraction=0.0)
    assert result.skipped == Counter({SKIP_EMPTY_TEXT: 1, SKIP_SHORT_EXCERPT: 1, SKIP_NO_EXCERPT: 1})
    assert len(result.requests) == 2 and result.documents == 5


def twin_documents() -> tuple[SourceDocument, SourceDocument, SourceDocument]:
    """Two real documents that share their first 1,000 characters (the same CoT excerpt) but
    differ after it (different 2,000-character tool excerpts), plus an unrelated third one."""
    texts = [t for _, t in real_texts() if len(t) > 2500]
    for text in texts:
        tail = next(t for t in texts if t[:200] != text[:200])
        twin = text[:1000] + "\n\n" + tail
        same_cot = cut_excerpt(text, 1000) == cut_excerpt(twin, 1000) is not None
        if same_cot and cut_excerpt(text, 2000) != cut_excerpt(twin, 2000):
            other = next(t for t in texts if t[:200] not in (text[:200], tail[:200]))
            return (SourceDocument("a-first", "x", text), SourceDocument("b-twin", "y", twin),
                    SourceDocument("c-other", "x", other))
    pytest.skip("embedded sample missing")


@pytest.mark.parametrize("selection", ["one_stage", "all_stages"])
def test_documents_repeating_an_excerpt_keep_one_request_per_key(selection: str) -> None:
    docs = list(twin_documents())
    prompts = {"tool_fraction": 1.0, "min_excerpt_chars": 50}
    if selection == "one_stage":
        prompts["stages"] = ["cot_college"]  # a random draw of one stage: both twins draw it
    else:
        prompts["stage_selection"] = "all"
    result = plan(docs, **prompts)
    cot_templates = 1 if selection == "one_stage" else 8
    keys = [p.request.key for p in result.requests]
    assert len(keys) == len(set(keys))  # one request per ledger key
    # The twin's CoT prompts repeat the first document's: skipped and counted, not planned twice.
    assert result.skipped == Counter({SKIP_DUPLICATE_EXCERPT: cot_templates})
    by_doc = Counter(p.request.lineage["doc_id"] for p in result.requests)
    assert by_doc == {"a-first": cot_templates + 1, "b-twin": 1, "c-other": cot_templates + 1}
    twin = [p for p in result.requests if p.request.lineage["doc_id"] == "b-twin"]
    assert [p.template.kind for p in twin] == ["tool"]  # its 2,000-character excerpt differs
    # Every (document, template) pair is a request or a counted skip.
    assert len(result.requests) + sum(result.skipped.values()) == 3 * (cot_templates + 1)


def test_repeated_excerpts_parse_and_write_once(tmp_path: Path) -> None:
    """The crash the duplicate keys caused: rows that repeat a merge key (``lake_io._check_keys``)."""
    result = plan(list(twin_documents()), tool_fraction=0.0, min_excerpt_chars=50, stages=["cot_college"])
    reply = ("## Problem\nA shelf holds 3 rows of 24 books and 17 are lent out. How many remain?\n\n"
             "## Solution\n$3 \\times 24 = 72$ and $72 - 17 = 55$, so \\boxed{55}.")
    ledger = {"key": [], "status": [], "response": [], "finish_reason": []}
    for planned in result.requests:
        for column, value in (("key", planned.request.key), ("status", "succeeded"), ("response", reply),
                              ("finish_reason", "stop")):
            ledger[column].append(value)
    keys = {p.request.key for p in result.requests}
    answers, statuses = ledger_answers(ledger, keys)
    rows = sample_rows(result, answers, prompts=PromptSettings(), limits=None, run_id="run-1", workers=1)
    settings = make_settings(tmp_path)
    written = write_samples(settings, rows, "gold.kd_dataset", "gold.kd_rejected")
    assert sum(written.values()) == len(rows) == len(keys) == 2
    accepted, rejected = parse_outcomes(r["reason"] for r in rows)
    reconcile(len(keys), accepted, rejected, 0, len(keys) - statuses["succeeded"])
    assert result.skipped == Counter({SKIP_DUPLICATE_EXCERPT: 1})


def test_reconcile_raises_on_a_gap() -> None:
    reconcile(10, 3, Counter({"empty": 4}), 2, 1)
    with pytest.raises(RuntimeError, match="do not reconcile"):
        reconcile(10, 3, Counter({"empty": 4}), 2, 0)


def test_teacher_is_configured_with_a_key_and_local_without(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, generation={"served_models": {"tiny-llama": "/models/tiny"}})
    with_key = choose_teacher(settings, environ={"OPENAI_API_KEY": "sk-test-secret-value"})
    assert with_key.model == settings.generation.teacher_model and not with_key.local
    assert "sk-test" not in repr(with_key)
    without = choose_teacher(settings, environ={})
    assert without.local and without.model == "tiny-llama" and without.model_uri == "/models/tiny"
    assert "LOCAL" in without.note and "OPENAI_API_KEY" in without.note
    forced = choose_teacher(make_settings(tmp_path, distil={"teacher": "configured"}), environ={})
    assert not forced.local


def test_input_is_the_selection_when_it_exists_else_the_corpus(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert choose_input(settings) == "gold.corpus"
    forced = make_settings(tmp_path, distil={"input_table": "gold.selected_texts"})
    assert choose_input(forced) == "gold.selected_texts"


def test_synthesizer_resolution(tmp_path: Path) -> None:
    model_dir = tmp_path / "synth"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"weights")
    local = resolve_synthesizer(make_settings(tmp_path, synthesis={"model": str(model_dir)}))
    assert local.model == "jiuzhang-synthesizer" and local.model_uri == f"file://{model_dir.resolve()}"
    assert local.served_models["jiuzhang-synthesizer"] == str(model_dir.resolve()) and local.model_version
    served = resolve_synthesizer(make_settings(tmp_path, synthesis={"model": "my-vllm-model"}))
    assert served.model == "my-vllm-model" and served.model_uri == "http://127.0.0.1:18300/v1"
    # A registry URI goes to MLflow; a model nobody registered yet fails naming it.
    registry = make_settings(tmp_path, synthesis={"model": "models:/jiuzhang-synthesizer@champion"},
                             mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    with pytest.raises(Exception, match="jiuzhang-synthesizer"):
        resolve_synthesizer(registry)
    # No --model and nothing registered: the error names the stage that makes the synthesizer.
    unregistered = make_settings(tmp_path, mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    with pytest.raises(Exception, match="jzlake train synthesizer"):
        resolve_synthesizer(unregistered)
    settings = make_settings(tmp_path, synthesis={"model": "jiuzhang-synthesizer"})
    default = resolve_synthesizer(settings)
    assert content_run_id(settings, default, 4, 2) == content_run_id(settings, default, 4, 2)
    assert content_run_id(settings, default, 4, 2) != content_run_id(settings, default, 5, 2)


def test_shards_partition_documents() -> None:
    ids = [f"doc-{i}" for i in range(300)]
    shards = Counter(shard_of(d, 4) for d in ids)
    assert set(shards) == {0, 1, 2, 3} and min(shards.values()) > 40
