"""Word n-grams, template tokens and the decontamination index and batch functions (pure Python)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jzlake.benchmarks import load_benchmarks
from jzlake.settings import load_settings
from spark_jobs.transforms.ngrams import (
    NUMBER,
    DecontamRules,
    build_decontam_index,
    containment,
    judge_batches,
    ngram_hashes,
    ngram_texts,
    scan_batches,
    template_ids,
    template_offsets,
    template_tokens,
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


def test_template_tokens_mask_numbers_and_latex_spacing() -> None:
    assert template_tokens("Janet’s $48/2=24$ eggs") == ["janet", "s", NUMBER, "eggs"]
    # spacing, \left/\right, \dfrac and digit-letter runs do not change the template
    assert template_tokens("$\\dfrac{3x}{\\left( y+1 \\right)}$") == template_tokens("$\\frac {3 x}{(y + 1)}$")
    assert template_tokens("\\begin {pmatrix} 1 & 2 \\end{pmatrix}") == ["\\begin{pmatrix}", NUMBER, "\\end{pmatrix}"]
    ids, raw = template_ids("Sum 1, 2 and 3.5 now")
    assert len(ids) == 5 and raw.tolist() == [0, 1, 3, 4, 6]  # "1, 2" and "3.5" are one placeholder each
    text = "Sum 1, 2 and 3.5 now"
    assert text[slice(*template_offsets(text, raw, 1, 3))] == "1, 2 and 3.5"


def test_index_marks_stop_grams_and_prose() -> None:
    rules = DecontamRules()
    opening = "Let $f$ be the function defined by $f(x) = {}$. Compute the sum of the roots of $g$ where {}."
    items = [("math", str(i), opening.format(f"x^{i} + {i}", w)) for i, w in
             enumerate(["g is its inverse", "g is f shifted left", "g(x)=f(x+1) holds", "g doubles it",
                        "g halves it"])]
    items.append(("gsm8k", "q", QUESTION))
    items.append(("gsm8k", "tiny", "Add 2 and 3."))
    index = build_decontam_index(items, rules)
    assert len(index) == 7 and index.items_unmatchable == {"gsm8k": 1}  # "Add 2 and 3." is too short
    item_of_gram = np.repeat(np.arange(len(index)), np.diff(index.gram_start))
    assert set(item_of_gram[index.gram_stop].tolist()) == set(range(5))  # the shared opening is template language
    janet = item_of_gram == 5
    assert not index.gram_stop[janet].any() and index.gram_prose[janet].all()
    # candidates are found through grams that are not stop grams, and two anchors per item
    assert not set(index.short_hash.tolist()) & set(index.gram_hash[index.gram_stop].tolist())
    assert np.bincount(index.anchor_item, minlength=7).tolist() == [2, 2, 2, 2, 2, 2, 0]
    assert len(index.long_keys) > 0 and set(index.long_item.tolist()) <= set(range(6))


def test_scan_and_judge_batches_find_planted_item_with_its_span() -> None:
    index = build_decontam_index([("gsm8k", "0", QUESTION)], DecontamRules())
    doc = "Some unrelated text about groups and rings.\n\n" + QUESTION + "\n\nMore unrelated text."
    batch = pa.RecordBatch.from_pydict({"doc_id": ["d1", "d2", "d3"],
                                        "text": [doc, "A different paragraph on sheaves.", QUESTION]})
    scanned = pa.Table.from_batches(list(scan_batches(index, emit_grams=True)([batch])))
    candidates = scanned.filter(pa.compute.is_valid(scanned.column("item")))
    grams = scanned.filter(pa.compute.is_null(scanned.column("item")))
    assert candidates.column("doc_id").to_pylist() == ["d1", "d3"]
    # the evidence grams' document counts, aggregated per partition (both copies hold every gram)
    assert set(grams.column("gram_docs").to_pylist()) == {2} and grams.num_rows == len(set(index.short_hash.tolist()))
    candidates = candidates.slice(0, 1)
    (found,) = list(judge_batches(index, np.empty(0, dtype=np.uint64))(candidates.to_batches()))
    (row,) = found.to_pylist()
    assert (row["benchmark"], row["item_id"], row["rule"], row["coverage"]) == ("gsm8k", "0", "ngram", 1.0)
    assert doc[row["span_start"]:row["span_end"]] == QUESTION.rstrip("?") == row["matched_ngram"]
    # Corpus stop grams withdraw short-gram evidence, never a long n-gram of a long item.
    every = np.unique(index.gram_hash)
    (found,) = list(judge_batches(index, every)(candidates.to_batches()))
    assert found.column("rule").to_pylist() == ["ngram"]  # the long n-gram is never a stop gram


def test_sample_benchmarks_index() -> None:
    settings = load_settings(environ={})
    bench = load_benchmarks(settings)
    index = build_decontam_index(((i.benchmark, i.item_id, i.text) for v in bench.values() for i in v),
                                 DecontamRules.from_settings(settings.decontam))
    assert len(index) == sum(len(v) for v in bench.values())
    # every GSM8K question is prose and long enough; MATH-500 loses only short or formula-only items
    assert "gsm8k" not in index.items_unmatchable
    assert index.items_unmatchable.get("math500", 0) < 0.15 * len(bench["math500"])
