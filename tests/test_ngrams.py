"""Word n-grams and the decontamination gram index (pure Python)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jzlake.benchmarks import load_benchmarks
from jzlake.settings import load_settings
from spark_jobs.transforms.ngrams import (
    LONG,
    SHORT,
    WHOLE,
    GramRules,
    build_gram_index,
    containment,
    match_batches,
    matching_grams,
    ngram_hashes,
    ngram_texts,
    text_ngram_hashes,
    token_ids,
    word_fraction,
    word_tokens,
)

QUESTION = ("Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
            "for her friends every day with four. She sells the remainder at the farmers' market daily for "
            "$2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?")


def test_tokens_keep_numbers_and_latex_commands() -> None:
    assert word_tokens("Janet’s $48/2=24$ \\frac{x^2}{2}") == ["janet", "s", "48", "2", "24", "\\frac", "x", "2", "2"]
    assert word_fraction(word_tokens("\\frac x 2 a 2 frac y")) == 1 / 7
    assert word_fraction(word_tokens("she eats three eggs")) == 1.0


def test_ngram_hashes_are_stable_and_length_specific() -> None:
    ids = token_ids(word_tokens(QUESTION))
    eight = ngram_hashes(ids, 8)
    assert len(eight) == len(ids) - 7 == len(ngram_texts(word_tokens(QUESTION), 8))
    assert np.array_equal(eight, text_ngram_hashes(QUESTION.upper(), 8))
    assert len(ngram_hashes(ids[:5], 8)) == 0
    # the same 8 tokens never hash like a 7-gram + anything, nor like themselves at another n
    assert not set(eight.tolist()) & set(ngram_hashes(ids, 7).tolist())
    assert len(set(eight.tolist())) == len(eight)
    assert containment(eight.tolist(), eight[:10].tolist()) == 10 / len(eight)


def test_gram_index_rules() -> None:
    rules = GramRules()
    items = [
        ("gsm8k", "0", QUESTION),
        ("gsm8k", "1", "How many eggs do three ducks lay?"),  # 7 tokens: one whole-item gram
        ("gsm8k", "2", "Add 2 and 3."),  # 4 tokens: too short to match safely
        ("math", "9", "Compute $\\frac{x^2}{a^2} - \\frac{y^2}{b^2} = 1$ for x y a b c d e f g"),  # formula
    ]
    index = build_gram_index(items, rules)
    kinds = {(g.item_id, g.kind) for g in index.grams}
    assert {("0", LONG), ("0", SHORT), ("1", WHOLE)} <= kinds
    assert not any(g.item_id == "2" for g in index.grams)
    assert index.items_without_grams == {"gsm8k": 1, "math": 1}
    assert index.short_counts[("gsm8k", "0")] == len({g.gram_hash for g in index.grams
                                                     if g.item_id == "0" and g.kind == SHORT})
    # A gram in two items of one benchmark is template language and is dropped from both.
    twins = build_gram_index([("b", "x", QUESTION), ("b", "y", QUESTION.replace("Janet", "Maria"))], rules)
    texts = {g.text for g in twins.grams}
    assert "she eats three for breakfast every morning and" not in texts
    assert any("janet" in t for t in texts) and any("maria" in t for t in texts)


def test_matching_grams_find_planted_item() -> None:
    index = build_gram_index([("gsm8k", "0", QUESTION)], GramRules())
    wanted = index.hashes_by_length()
    doc = "Some unrelated text about groups and rings. " + QUESTION + " More unrelated text."
    found = matching_grams(doc, wanted)
    assert {n for n, _ in found} == {8, 13}
    assert not matching_grams("A completely different paragraph about topology and sheaves.", wanted)
    batch = pa.RecordBatch.from_pydict({"doc_id": ["d1", "d2"], "text": [doc, "nothing here"]})
    (out,) = list(match_batches(wanted)([batch]))
    assert set(out.column("doc_id").to_pylist()) == {"d1"} and out.num_rows == len(found)


def test_sample_benchmarks_index() -> None:
    settings = load_settings(environ={})
    bench = load_benchmarks(settings)
    index = build_gram_index(((i.benchmark, i.item_id, i.text) for v in bench.values() for i in v),
                             GramRules.from_settings(settings.decontam))
    assert index.items == sum(len(v) for v in bench.values())
    # every GSM8K and SVAMP question is prose: each keeps grams
    assert "gsm8k" not in index.items_without_grams and "svamp" not in index.items_without_grams
    assert index.items_without_grams.get("math500", 0) < 0.15 * len(bench["math500"])
