"""Math-aware quality filters: real math pages pass, junk fails with the right reason."""

from __future__ import annotations

import json

import pytest

from jzlake.settings import CleanSettings, load_settings
from spark_jobs.transforms.quality import (
    DROP_REASONS,
    RULES,
    assess,
    compute_metrics,
    duplicate_ngram_fraction,
    failed_rules,
    quality_score,
    text_hash,
    top_ngram_fraction,
)
from spark_jobs.transforms.records import Document, FileTask, read_file
from spark_jobs.transforms.text_normalize import normalize
from tests.conftest import SAMPLE

THRESHOLDS = CleanSettings()
PROSE = (
    "The proof proceeds by induction on the length of the derivation, and each case reduces to "
    "a statement that we have already established for shorter derivations. In the base case the "
    "derivation consists of a single assumption, so the claim holds trivially. For the inductive "
    "step we consider the last rule applied and check that it preserves the property, which "
    "follows from the definition of the rule together with the induction hypothesis. "
)


def _sample_documents(source: str) -> list[Document]:
    settings = load_settings(environ={})
    spec = settings.sources[source]
    docs: list[Document] = []
    for path in sorted((SAMPLE / "raw_corpus" / source).glob("*.jsonl")):
        task = FileTask(str(path), source, path.stat().st_size, path.stat().st_mtime)
        docs.extend(r for r in read_file(task, spec.mapping, spec.format) if isinstance(r, Document))
    return docs


@pytest.fixture(scope="module")
def latex_assessed() -> dict[str, object]:
    return {d.native_id: assess(normalize(d.text, d.markup), THRESHOLDS) for d in _sample_documents("latex_books")}


def test_hott_build_wrappers_are_dropped_with_a_length_reason(latex_assessed):
    wrappers = {k: v for k, v in latex_assessed.items()
                if k.split(":", 1)[1].startswith(("opt-", "hott-", "cover-"))}
    assert len(wrappers) >= 15
    for name, result in wrappers.items():
        assert not result.kept, name
        assert result.reasons[0] == "too_few_words", (name, result.reasons)


def test_typical_book_chapters_survive(latex_assessed):
    hott_chapters = ["HoTT/book:" + p for p in ("logic.tex", "homotopy.tex", "hlevels.tex", "setmath.tex",
                                                  "reals.tex", "formal.tex", "introduction.tex")]
    for name in hott_chapters:
        assert latex_assessed[name].kept, (name, latex_assessed[name].reasons)
    open_logic = {k: v for k, v in latex_assessed.items() if k.startswith("OpenLogic") and v.n_words >= 150}
    assert len(open_logic) > 100
    kept = sum(v.kept for v in open_logic.values())
    assert kept / len(open_logic) > 0.95, [(k, v.reasons) for k, v in open_logic.items() if not v.kept]
    smn = latex_assessed["OpenLogicProject/OpenLogic:content/computability/computability-theory/s-m-n.tex"]
    assert smn.kept and smn.math_density > 0.1


def test_stack_exchange_answers_with_formulas_survive():
    docs = _sample_documents("se_threads") + _sample_documents("mathlm_stackexchange")
    results = [(d, assess(normalize(d.text, d.markup), THRESHOLDS)) for d in docs]
    with_math = [(d, r) for d, r in results if r.metrics["math_spans"] >= 10]
    assert len(with_math) > 150
    kept = [r for _, r in with_math if r.kept]
    assert len(kept) / len(with_math) > 0.97, [(d.doc_id, r.reasons) for d, r in with_math if not r.kept]


def test_formula_heavy_page_passes_where_c4_and_gopher_symbol_rules_would_fail():
    formulas = " ".join(
        f"Then $f_{{{i}}}(x) = \\sum_{{k=0}}^{{{i}}} \\binom{{{i}}}{{k}} x^k \\cdot \\#1 \\ldots$ holds."
        for i in range(40))
    text = PROSE + formulas
    assert "{" in text  # C4 would drop it outright
    result = assess(text, THRESHOLDS)
    assert result.kept, result.reasons
    assert result.metrics["symbol_word_ratio"] == 0  # the '#' are inside math
    assert result.math_density > 3 * compute_metrics(PROSE)["math_density"]


def test_symbols_outside_math_still_count():
    text = PROSE + " ".join(f"read more ... item {i} #tag" for i in range(40))
    result = assess(text, THRESHOLDS)
    assert "symbol_ratio_high" in result.reasons


def test_repetition_rules_fire_on_repeated_boilerplate():
    lines = "\n".join(["Click here to subscribe to our newsletter today"] * 20)
    result = assess(PROSE + "\n" + lines, THRESHOLDS)
    assert "duplicate_lines" in result.reasons
    assert "duplicate_5grams" in result.reasons
    paragraphs = "\n\n".join([PROSE] * 3)
    assert "duplicate_paragraphs" in assess(paragraphs, THRESHOLDS).reasons


def test_latex_markup_lines_are_not_duplicate_lines():
    block = "\\begin{proof}\n" + PROSE + "\n\\end{proof}\n\\[\nx^2\n\\]\n"
    metrics = compute_metrics(block * 1 + "\n".join(["\\end{proof}", "\\]", "$$", "\\item"] * 10))
    assert metrics["duplicate_line_fraction"] == 0


def test_primary_reason_is_the_first_failed_rule_in_the_fixed_order():
    result = assess("buy buy buy ... ... ...", THRESHOLDS)
    assert len(result.reasons) > 1
    order = [DROP_REASONS.index(r) for r in result.reasons]
    assert order == sorted(order)
    assert result.reasons[0] == "too_few_words"


def test_math_density_floor_is_optional():
    metrics = compute_metrics(PROSE)
    assert "low_math_density" not in failed_rules(metrics, THRESHOLDS)
    strict = THRESHOLDS.model_copy(update={"min_math_density": 0.2})
    assert "low_math_density" in failed_rules(metrics, strict)
    mathy = compute_metrics(PROSE + " ".join(f"$x_{i}^2 + \\alpha$" for i in range(40)))
    assert "low_math_density" not in failed_rules(mathy, strict)


def test_every_rule_reads_an_existing_metric_and_setting():
    metrics = compute_metrics(PROSE)
    for rule in RULES:
        assert rule.metric in metrics
        assert rule.threshold in CleanSettings.model_fields


def test_ngram_fractions_follow_gopher_definitions():
    tokens = list("abababc")
    assert top_ngram_fraction(tokens, 2) == pytest.approx(6 / 7)  # "a b" ×3, 2 chars each, 7 chars
    assert duplicate_ngram_fraction(list("xyzxyz"), 3) == pytest.approx(0.5)
    assert top_ngram_fraction(["solo"], 2) == 0.0


def test_quality_score_is_bounded_and_ranks_real_text_above_junk(latex_assessed):
    scores = [r.quality_score for r in latex_assessed.values()]
    assert all(0.0 <= s <= 1.0 for s in scores)
    chapter = latex_assessed["HoTT/book:logic.tex"].quality_score
    junk = latex_assessed["HoTT/book:opt-ebook.tex"].quality_score
    assert chapter > 0.9 > 0.5 > junk
    assert quality_score(compute_metrics("")) == 0.0


def test_text_hash_ignores_case_whitespace_and_punctuation_only():
    base = text_hash("Let $x$ be a real number.")
    assert text_hash("let  $x$ be a REAL number") == base
    assert text_hash("Let $y$ be a real number.") != base


def test_real_sample_documents_round_trip_through_json_metrics():
    doc = _sample_documents("stackmathqa")[0]
    metrics = assess(normalize(doc.text, doc.markup), THRESHOLDS).metrics
    assert json.loads(json.dumps(metrics)) == metrics
    assert all(isinstance(v, float) for v in metrics.values())


def test_clean_batches_turn_bronze_rows_into_typed_result_rows():
    import pyarrow as pa

    from spark_jobs.clean import RESULT_COLUMNS, clean_batches

    docs = _sample_documents("se_threads")[:3]
    batch = pa.RecordBatch.from_pylist(
        [{"doc_id": d.doc_id, "source": d.source, "text": d.text, "markup": d.markup} for d in docs]
        + [{"doc_id": "x:1", "source": "x", "text": "anything", "markup": "no-such-markup"}])
    (out,) = list(clean_batches(iter([batch]), THRESHOLDS))
    assert out.schema.names == [name for name, _ in RESULT_COLUMNS]
    rows = out.to_pylist()
    assert [r["doc_id"] for r in rows] == [d.doc_id for d in docs] + ["x:1"]
    for row in rows[:3]:
        assert row["primary_reason"] is None and "<p>" not in row["text"] and len(row["text_hash"]) == 64
        assert dict(row["metrics"])["n_words"] == row["n_words"]
    assert rows[3]["primary_reason"] == "clean_error" and rows[3]["reasons"] == ["clean_error"]
