"""Accuracy with a seeded bootstrap interval, failure rates, and the paired bootstrap of the gate.

``bootstrap_interval(correct)``: resample items with replacement ``samples`` times (numpy
``default_rng(seed)``), take the (α/2, 1−α/2) percentiles of the mean. Same inputs and seed →
same interval.

``paired_difference_lower_bound(challenger, champion)``: on items both models answered,
resample item indices (the same indices for both — the pairing is what makes the test
sensitive), and return the one-sided lower confidence bound of mean(challenger − champion).
Non-inferiority holds when that bound is ≥ −margin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def bootstrap_interval(correct: Sequence[bool], *, samples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Two-sided percentile bootstrap interval of the accuracy (``(0, 0)`` for no items)."""
    values = np.asarray(correct, dtype=np.float64)
    if values.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_difference_lower_bound(challenger: Sequence[bool], champion: Sequence[bool], *, samples: int = 2000,
                                  confidence: float = 0.95, seed: int = 0) -> float:
    """One-sided lower bound of mean(challenger − champion) over paired items (bootstrap)."""
    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired bootstrap needs two equal, non-empty item lists (got {a.size} and {b.size})")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(samples, diff.size))].mean(axis=1)
    return float(np.quantile(means, 1.0 - confidence))


@dataclass(frozen=True)
class SpecMetrics:
    """One benchmark × setting result of one model version (what the gate reads)."""

    benchmark: str
    setting: str
    spec_hash: str
    items: int
    items_total: int  # items in the benchmark file: fewer evaluated = partial (--limit)
    accuracy: float
    ci_low: float
    ci_high: float
    extraction_failure_rate: float
    truncation_rate: float
    execution_error_rate: float
    correct_by_item: Mapping[str, bool] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.setting}"

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("correct_by_item")
        return data


def summarize(benchmark: str, setting: str, spec_hash: str, items_total: int,
              rows: Sequence[Mapping[str, Any]], *, samples: int = 1000, seed: int = 0) -> SpecMetrics:
    """Metrics of one spec from its per-item rows (``gold.eval_predictions`` columns)."""
    correct = [bool(r["correct"]) for r in rows]
    n = len(rows)
    low, high = bootstrap_interval(correct, samples=samples, seed=seed)

    def rate(predicate: Any) -> float:
        return sum(1 for r in rows if predicate(r)) / n if n else 0.0

    return SpecMetrics(
        benchmark, setting, spec_hash, n, items_total, sum(correct) / n if n else 0.0, low, high,
        extraction_failure_rate=rate(lambda r: r.get("extracted_answer") in (None, "")),
        truncation_rate=rate(lambda r: r.get("finish_reason") == "length"),
        execution_error_rate=rate(lambda r: (r.get("error") or "").startswith("execution")),
        correct_by_item={str(r["item_id"]): bool(r["correct"]) for r in rows})
