"""Real sample texts as ``silver.documents`` rows, for the dedupe/decontaminate tests that must not
depend on the ingest/clean stages (those have their own tests)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from tests.conftest import SAMPLE


def sample_texts(root: Path = SAMPLE / "raw_corpus", min_words: int = 50,
                 max_words: int = 4000) -> list[tuple[str, str]]:
    """``(doc_id, text)`` for every sample record with a usable length, in a stable order.

    Field choice mirrors the default source mappings (SE question + answers, Q + A, post title +
    question + answer, LaTeX file text); markup is left in, which is fine for word shingles.
    """
    extractors = {
        "se_threads": lambda r: [r["question"]["title"], r["question"]["body_text"],
                                 *[a.get("body_text") or "" for a in r.get("answers", [])]],
        "stackmathqa": lambda r: [r["Q"], r["A"]],
        "mathlm_stackexchange": lambda r: [r["input"], r["output"]],
        "latex_books": lambda r: [r["text"]],
    }
    docs: list[tuple[str, str]] = []
    for source, extract in extractors.items():
        for path in sorted((root / source).glob("*.jsonl")):
            for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                text = "\n\n".join(p for p in extract(json.loads(line)) if p)
                if min_words <= len(text.split()) <= max_words:
                    docs.append((f"{source}:{path.stem}:{line_no:04d}", text))
    return docs


def text_hash(text: str) -> str:
    """Exact-dedup key of the tests (the clean stage has its own, richer normal form)."""
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def quality_for(doc_id: str) -> float:
    """A stable pseudo quality score in [0.3, 0.7) (planted docs set theirs explicitly)."""
    return 0.3 + 0.4 * (int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 16**8)


def silver_row(doc_id: str, text: str, quality: float | None = None, run_id: str = "test-clean") -> dict[str, Any]:
    return {
        "doc_id": doc_id, "source": doc_id.split(":")[0], "text": text, "text_hash": text_hash(text),
        "n_words": len(text.split()), "n_chars": len(text),
        "quality_score": quality_for(doc_id) if quality is None else quality,
        "math_density": 0.1, "metrics": {"n_words": float(len(text.split()))}, "bronze_version": 0,
        "run_id": run_id,
    }


def substitute_words(text: str, rate: float, rng: random.Random, keep_numbers: bool = False,
                     count: int | None = None) -> str:
    """Replace ``count`` words, else a ``rate`` fraction of them (at least one), with made-up words."""
    words = text.split()
    positions = [i for i, w in enumerate(words) if not (keep_numbers and any(c.isdigit() for c in w))]
    for i in rng.sample(positions, count if count is not None else max(1, round(rate * len(words)))):
        words[i] = f"zq{rng.randrange(10**6)}"
    return " ".join(words)


def write_silver(spark: Any, settings: Any, rows: list[dict[str, Any]]) -> None:
    """MERGE rows into silver.documents (insert-only on doc_id)."""
    from jzlake import catalogue
    from spark_jobs.session import merge_insert_new

    table = catalogue.table("silver.documents")
    merge_insert_new(spark, spark.createDataFrame(rows, table.spark_schema()), table, settings)
