"""The per-item decontamination rule on real benchmark items planted in real sample documents:
each positive kind (verbatim, edited, numbers changed, re-spaced) and each negative kind (stock
phrase + another item's formula, first sentence only, the issue's "let f be the function defined
by" documents) on short (≤ 25 words) and long items. Pure Python: the functions the Spark job
runs per document (``find_in_text`` = scan → evaluate → qualify → offsets)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pytest

from jzlake.benchmarks import load_benchmarks
from jzlake.settings import load_settings
from spark_jobs.transforms.ngrams import (
    LONG,
    SPAN,
    TEMPLATE,
    DecontamRules,
    build_decontam_index,
    containment,
    find_in_text,
    text_ngram_hashes,
)
from tests.curation_fixtures import sample_texts

# Real items of the sample benchmarks (data/sample/benchmarks), by id.
ITEMS = {
    "gsm8k-short": ("gsm8k", "1"),    # 22 words: "A robe takes 2 bolts of blue fiber ..."
    "gsm8k-short-2": ("gsm8k", "18"),  # 21 words: "Claire makes a 3 egg omelet ..."
    "gsm8k-long": ("gsm8k", "4"),     # 87 words: "Every day, Wendi feeds each of her chickens ..."
    "math-short": ("math500", "test/algebra/2036.json"),      # 21 words, LaTeX
    "math-long": ("math500", "test/prealgebra/1139.json"),    # 86 words, LaTeX
}
STOCK_F = ("math500", "test/intermediate_algebra/1837.json")  # "Let $f$ be the function defined by ..."


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    settings = load_settings(environ={})
    bench = load_benchmarks(settings)
    texts = {(b, i.item_id): i.text for b, items in bench.items() for i in items}
    index = build_decontam_index(((b, i, t) for (b, i), t in texts.items()),
                                 DecontamRules.from_settings(settings.decontam))
    hosts = [t for _, t in sample_texts(min_words=150, max_words=1500)][:40]
    return {"index": index, "texts": texts, "hosts": hosts}


def plant(host: str, insert: str) -> tuple[str, int]:
    """``insert`` between the host's paragraphs (after the first); returns the text and its offset."""
    head, _, tail = host.partition("\n\n")
    before = head + "\n\n"
    return before + insert + "\n\n" + tail, len(before)


def flags(world: dict[str, Any], text: str) -> dict[tuple[str, str], tuple[str, float, int, int]]:
    index = world["index"]
    return {index.items[f.item]: (rule, f.coverage, start, end) for f, rule, start, end in find_in_text(text, index)}


def replace_words(text: str, positions: list[int], new: list[str]) -> str:
    words = text.split(" ")
    prose = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 2]
    for p, w in zip(positions, new, strict=True):
        words[prose[p]] = w
    return " ".join(words)


def variant(kind: str, text: str) -> str:
    if kind == "verbatim":
        return text
    if kind == "edited":  # three words altered: two replaced, one deleted
        edited = replace_words(text, [1, 4], ["carmine", "pelican"]).split(" ")
        del edited[len(edited) // 2]
        return " ".join(edited)
    if kind == "numbers_changed":
        return re.sub(r"\d+", lambda m: str(int(m.group(0)) * 7 + 3), text)
    if kind == "spacing":
        spaced = re.sub(r"\$([^$]+)\$", lambda m: "$" + m.group(1).replace(" ", "").replace("(", "\\left(")
                        .replace(")", "\\right)") + "$", text)
        return spaced.replace(". ", ".\n   ").replace(", ", " ,  ")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["verbatim", "edited", "numbers_changed", "spacing"])
@pytest.mark.parametrize("which", sorted(ITEMS))
def test_planted_item_is_flagged_with_its_span(world: dict[str, Any], kind: str, which: str) -> None:
    key = ITEMS[which]
    planted = variant(kind, world["texts"][key])
    assert kind == "verbatim" or planted != world["texts"][key]
    host = world["hosts"][sorted(ITEMS).index(which)]
    doc, at = plant(host, planted)
    found = flags(world, doc)
    assert key in found, f"{kind} {which} not flagged"
    rule, coverage, start, end = found[key]
    assert rule in {LONG, SPAN, TEMPLATE} and coverage >= world["index"].rules.min_coverage
    # the evidence is the planted text: the span lies inside it (give or take the edit gap's words)
    assert at - 40 <= start < end <= at + len(planted) + 1, (doc[start:end], planted)
    assert end - start >= 0.5 * len(planted)
    if kind != "edited":
        assert coverage >= 0.95
    # the same host without the item is clean (the flag came from the plant, not the host)
    assert key not in flags(world, host)


@pytest.mark.parametrize("which", sorted(ITEMS))
def test_first_sentence_only_is_not_a_copy(world: dict[str, Any], which: str) -> None:
    text = world["texts"][ITEMS[which]]
    first = re.split(r"(?<=[.?!])\s+", text, maxsplit=1)[0]
    doc, _ = plant(world["hosts"][0], first)
    assert ITEMS[which] not in flags(world, doc)


@pytest.mark.parametrize("which", sorted(ITEMS))
def test_stock_opening_and_another_items_formula_are_not_a_copy(world: dict[str, Any], which: str) -> None:
    text = world["texts"][ITEMS[which]]
    opening = " ".join(text.split()[:6])
    formula = re.search(r"\$[^$]{8,}\$", world["texts"][STOCK_F]).group(0)
    doc, _ = plant(world["hosts"][1], f"{opening} the answer is well known from the textbook chapter.")
    doc, _ = plant(doc, f"Recall the example {formula} from the lecture.")
    assert not flags(world, doc)


def test_let_f_be_the_function_defined_by_is_not_the_problem(world: dict[str, Any]) -> None:
    """The issue's false positive: documents sharing the item's stock opening (and its
    formula), old-rule containment 0.33–0.44, none holding the problem."""
    item = world["texts"][STOCK_F]
    docs = [
        "Let $f$ be the function defined by $f(x) = x^3 - 49x^2 + 623x - 2015,$ and suppose that $f$ is "
        "continuous on $[0, 1]$. Show that $f$ attains its maximum there.",
        "Let $f$ be the function defined by $f(x) = x^3 - 49x^2 + 623x - 2015,$ for every real $x$. Is $f$ "
        "injective? We compute the derivative and look at its sign on each interval.",
    ]
    for extra in docs:
        doc, _ = plant(world["hosts"][2], extra)
        old = containment(text_ngram_hashes(item, 8).tolist(), text_ngram_hashes(doc, 8).tolist())
        assert 0.33 <= old <= 0.44, old  # the old 8-gram containment of the documents
        assert STOCK_F not in flags(world, doc)
    # ... while the problem itself, re-spaced and with its numbers changed, is flagged
    doc, _ = plant(world["hosts"][2], variant("spacing", variant("numbers_changed", item)))
    assert STOCK_F in flags(world, doc)


def test_corpus_stop_grams_withdraw_short_gram_evidence(world: dict[str, Any]) -> None:
    index = world["index"]
    key = ITEMS["gsm8k-short"]
    doc, _ = plant(world["hosts"][3], variant("edited", world["texts"][key]))

    def rule_for(idx: Any, stop: np.ndarray | None = None) -> str | None:
        return next((rule for f, rule, *_ in find_in_text(doc, idx, corpus_stop=stop) if idx.items[f.item] == key),
                    None)

    ((finding, rule, *_),) = [f for f in find_in_text(doc, index) if index.items[f[0].item] == key]
    assert rule == SPAN and finding.evidence_hash
    stop = np.unique(np.array(finding.evidence_hash, dtype=np.uint64))
    # without its evidence grams the edited copy is judged as a template: near-whole, or nothing
    assert finding.coverage >= index.rules.template_coverage and rule_for(index, stop) == TEMPLATE
    stricter = dataclasses.replace(index, rules=dataclasses.replace(index.rules, template_coverage=0.95))
    assert rule_for(stricter) == SPAN and rule_for(stricter, stop) is None
