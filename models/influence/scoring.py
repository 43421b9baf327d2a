"""LESS scores from features, and the top-k / top-fraction selection.

For candidate i and target j at checkpoint k, cos_k(i, j) is the dot product of L2-normalised
projected features (Adam-preconditioned candidate, plain target). Then::

    s(i, j)    = Σ_k w_k · cos_k(i, j)           w_k = mean LR of epoch k, renormalised to Σ w = 1
    s_sub(i)   = mean over j in subtask          (targets are ordered by subtask, equal counts)
    score(i)   = max over subtasks
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def checkpoint_weights(mean_learning_rates: Sequence[float]) -> list[float]:
    """Mean LR per epoch, renormalised to sum to 1 (uniform when every LR is zero)."""
    total = float(sum(mean_learning_rates))
    if total <= 0:
        return [1.0 / len(mean_learning_rates)] * len(mean_learning_rates)
    return [float(lr) / total for lr in mean_learning_rates]


def weighted_similarity(candidates: Sequence[Any], targets: Sequence[Any], weights: Sequence[float]) -> Any:
    """Σ_k w_k · C_k T_kᵀ → (n_candidates × n_targets)."""
    if not (len(candidates) == len(targets) == len(weights)):
        raise ValueError(f"need one feature matrix per checkpoint on both sides and one weight each, got "
                         f"{len(candidates)}, {len(targets)}, {len(weights)}")
    total = None
    for c, t, w in zip(candidates, targets, weights, strict=True):
        term = w * (c @ t.T.to(c.dtype))
        total = term if total is None else total + term
    return total


def subtask_scores(similarity: Any, n_subtasks: int) -> tuple[Any, Any]:
    """(score per candidate, per-subtask scores (n × S)): mean within a subtask, max over them."""
    n, n_targets = similarity.shape
    if n_subtasks <= 0 or n_targets % n_subtasks:
        raise ValueError(f"{n_targets} targets cannot be split into {n_subtasks} equal subtasks; "
                         "targets must be ordered by subtask with an equal count each")
    per_subtask = similarity.reshape(n, n_subtasks, n_targets // n_subtasks).mean(-1)
    return per_subtask.max(-1).values, per_subtask


def selection_size(n: int, top_k: int | None, top_fraction: float | None) -> int:
    """How many of ``n`` candidates to keep: ``top_k``, else ceil(fraction·n) (at least 1 if n > 0)."""
    if top_k is not None and top_fraction is not None:
        raise ValueError("choose either top_k or top_fraction, not both")
    if top_k is not None:
        if top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {top_k}")
        return min(n, top_k)
    if top_fraction is None:
        raise ValueError("set top_k or top_fraction")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    return min(n, max(1 if n else 0, math.ceil(top_fraction * n)))


def rank(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """(doc_id, score) best first; ties broken by doc_id so the order is reproducible."""
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def select(scores: Mapping[str, float], top_k: int | None = None, top_fraction: float | None = None
           ) -> list[tuple[str, float]]:
    """The top of ``rank(scores)``."""
    return rank(scores)[: selection_size(len(scores), top_k, top_fraction)]
