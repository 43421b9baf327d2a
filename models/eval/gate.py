"""The promotion gate: a pure decision, and the thin MLflow step that applies it.

``decide(challenger, champion, thresholds, expected=..., challenger_version=...)`` → ``GateDecision``
(passed + every reason). It fails closed:

* the challenger's results must be for the challenger's version, for every required
  ``benchmark/setting`` (``expected``: the current spec hash and item count of each), complete
  (every item) and current (same spec hash) — anything else is a failure, never a skip;
* per-benchmark floors (``eval.gate.floors``: ``bench/setting`` or ``bench`` for both settings);
* failure-rate ceilings (extraction failure, truncation, execution error);
* non-inferiority against the champion on paired items: the one-sided paired-bootstrap lower
  bound of (challenger − champion) accuracy must be ≥ −margin. Champion results that are
  missing or stale fail the gate too (evaluate the champion again with the current spec). A first
  version, with no champion, passes on floors and ceilings alone.

``decide_synthesizer(metrics, thresholds)``: the synthesizer's gate — validity rate of sampled
problems, share flagged by decontamination, held-out KD loss; a missing metric fails.

``apply_decision`` (MLflow): tags the challenger with the decision, reasons, thresholds, spec
hashes and eval run id; on pass moves ``champion`` to it and tags the previous champion; on fail
raises ``GateFailed`` (the Airflow layer maps it to "no retry": a retry cannot change metrics).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.eval.metrics import SpecMetrics, paired_difference_lower_bound

if TYPE_CHECKING:
    from jzlake.settings import GateThresholds, Settings, SynthesizerGateThresholds
    from models.registry import RegisteredModel

CHAMPION = "champion"
TAG_PREFIX = "jzlake.gate."


class GateFailed(RuntimeError):
    """The gate refused a version; ``reasons`` says why. Not retryable."""

    def __init__(self, model: str, reasons: tuple[str, ...]) -> None:
        self.model = model
        self.reasons = reasons
        super().__init__(f"gate refused {model}: " + "; ".join(reasons))


@dataclass(frozen=True)
class ExpectedSpec:
    """What a current, complete result of one ``benchmark/setting`` looks like."""

    spec_hash: str
    items_total: int


@dataclass(frozen=True)
class ModelEvaluation:
    """A model version's results, by ``benchmark/setting``."""

    model_name: str
    model_version: str
    results: Mapping[str, SpecMetrics] = field(default_factory=dict)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]  # why it failed (empty when passed)
    checks: tuple[str, ...] = ()  # what was checked and held (for the record)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons), "checks": list(self.checks)}


def _floors_for(key: str, floors: Mapping[str, float]) -> list[tuple[str, float]]:
    benchmark = key.split("/", 1)[0]
    return [(name, floors[name]) for name in (key, benchmark) if name in floors]


def _result_problems(who: str, key: str, result: SpecMetrics | None, expected: ExpectedSpec) -> list[str]:
    if result is None:
        return [f"{who}: no {key} result (missing metrics)"]
    if result.spec_hash != expected.spec_hash:
        return [f"{who}: {key} was evaluated with spec {result.spec_hash}, current is {expected.spec_hash} "
                "(stale metrics: evaluate again)"]
    if result.items < expected.items_total:
        return [f"{who}: {key} covers {result.items} of {expected.items_total} items (partial metrics)"]
    return []


def decide(challenger: ModelEvaluation | None, champion: ModelEvaluation | None, thresholds: GateThresholds, *,
           expected: Mapping[str, ExpectedSpec], challenger_version: str) -> GateDecision:
    """The gate's decision (module docstring). Pure: no I/O, same inputs → same decision."""
    reasons: list[str] = []
    checks: list[str] = []
    if not expected:
        return GateDecision(False, ("no benchmark/setting is required: configure eval.benchmarks",))
    if challenger is None:
        return GateDecision(False, (f"no evaluation results for version {challenger_version} (missing metrics)",))
    if challenger.model_version != challenger_version:
        return GateDecision(False, (f"results are for version {challenger.model_version}, not the challenger "
                                    f"{challenger_version} (stale metrics)",))
    for floor_key in thresholds.floors:
        if not any(k == floor_key or k.split("/", 1)[0] == floor_key for k in expected):
            reasons.append(f"floor {floor_key!r} names no required benchmark/setting (fix eval.gate.floors)")
    ceilings = (("extraction_failure_rate", thresholds.max_extraction_failure_rate),
                ("truncation_rate", thresholds.max_truncation_rate),
                ("execution_error_rate", thresholds.max_execution_error_rate))
    for key, spec in sorted(expected.items()):
        result = challenger.results.get(key)
        problems = _result_problems("challenger", key, result, spec)
        if problems or result is None:
            reasons += problems
            continue
        for name, floor in _floors_for(key, thresholds.floors):
            if result.accuracy < floor:
                reasons.append(f"{key}: accuracy {result.accuracy:.4f} below the floor {floor} ({name})")
            else:
                checks.append(f"{key}: accuracy {result.accuracy:.4f} >= floor {floor}")
        for metric, ceiling in ceilings:
            value = getattr(result, metric)
            if value > ceiling:
                reasons.append(f"{key}: {metric} {value:.4f} above the ceiling {ceiling}")
        if champion is None:
            continue
        if champion.model_version == challenger.model_version:
            checks.append(f"{key}: the champion is this version")
            continue
        champion_result = champion.results.get(key)
        champion_problems = _result_problems(f"champion (version {champion.model_version})", key,
                                             champion_result, spec)
        if champion_problems or champion_result is None:
            reasons += [p + " — evaluate the champion with the current spec" for p in champion_problems]
            continue
        shared = sorted(set(result.correct_by_item) & set(champion_result.correct_by_item))
        if not shared:
            reasons.append(f"{key}: no items in common with the champion")
            continue
        low = paired_difference_lower_bound([result.correct_by_item[i] for i in shared],
                                            [champion_result.correct_by_item[i] for i in shared],
                                            samples=thresholds.bootstrap_samples, confidence=thresholds.confidence)
        verdict = (f"{key}: paired lower bound {low:+.4f} of accuracy difference vs champion "
                   f"{champion.model_version} (margin {thresholds.non_inferiority_margin}, {len(shared)} items)")
        if low < -thresholds.non_inferiority_margin:
            reasons.append(verdict + " — regression")
        else:
            checks.append(verdict)
    if champion is None and not reasons:
        checks.append("no champion yet: floors and ceilings only")
    return GateDecision(not reasons, tuple(reasons), tuple(checks))


SYNTH_METRICS = {"valid_rate": "synth.valid_rate", "contaminated_rate": "synth.contaminated_rate",
                 "heldout_kd_loss": "kd.heldout_loss"}


def decide_synthesizer(metrics: Mapping[str, float], thresholds: SynthesizerGateThresholds) -> GateDecision:
    """The synthesizer's gate on its run's metrics (``SYNTH_METRICS`` names); missing → fail."""
    reasons: list[str] = []
    checks: list[str] = []
    rules = [("valid_rate", thresholds.min_valid_rate, ">="),
             ("contaminated_rate", thresholds.max_contaminated_rate, "<=")]
    if thresholds.max_heldout_kd_loss is not None:
        rules.append(("heldout_kd_loss", thresholds.max_heldout_kd_loss, "<="))
    for name, limit, op in rules:
        metric = SYNTH_METRICS[name]
        value = metrics.get(metric)
        if value is None:
            reasons.append(f"{metric} missing (log it on the version's run before promoting)")
            continue
        held = value >= limit if op == ">=" else value <= limit
        (checks if held else reasons).append(f"{metric} {value:.4f} {op if held else 'violates ' + op} {limit}")
    return GateDecision(not reasons, tuple(reasons), tuple(checks))


# ---- applying it (MLflow registry) -------------------------------------------------------------

def apply_decision(settings: Settings, challenger: RegisteredModel, decision: GateDecision, *,
                   record: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Tag the challenger with the decision (+ ``record``: thresholds, spec hashes, eval run id);
    pass → move ``champion`` to it and tag the version it replaces; fail → ``GateFailed``."""
    from models.registry import get_by_alias, set_alias, set_version_tag

    name, version = challenger.name, challenger.version
    tags = {f"{TAG_PREFIX}decision": "pass" if decision.passed else "fail",
            f"{TAG_PREFIX}reasons": json.dumps(list(decision.reasons))[:4900],
            f"{TAG_PREFIX}checks": json.dumps(list(decision.checks))[:4900], **(record or {})}
    for key, value in tags.items():
        set_version_tag(settings, name, version, key, value)
    previous = get_by_alias(settings, name, CHAMPION)
    if not decision.passed:
        raise GateFailed(challenger.uri, decision.reasons)
    set_alias(settings, name, CHAMPION, version)
    replaced = previous.version if previous is not None and previous.version != version else None
    if replaced is not None:
        set_version_tag(settings, name, replaced, f"{TAG_PREFIX}replaced_by", version)
    return {"model": name, "version": version, "champion": version, "previous_champion": replaced}
