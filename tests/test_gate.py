"""The promotion gate as a pure function: pass, floors, regression vs champion, fail closed."""

from __future__ import annotations

import random

import pytest

from jzlake.settings import GateThresholds, SynthesizerGateThresholds
from models.eval.gate import ExpectedSpec, ModelEvaluation, decide, decide_synthesizer
from models.eval.metrics import SpecMetrics, bootstrap_interval, paired_difference_lower_bound

KEYS = ("gsm8k/cot", "gsm8k/tool", "math500/cot")
N = 200


def expected() -> dict[str, ExpectedSpec]:
    return {key: ExpectedSpec(f"hash-{key}", N) for key in KEYS}


def result(key: str, correct: list[bool], *, spec_hash: str | None = None, exec_rate: float = 0.0) -> SpecMetrics:
    benchmark, setting = key.split("/")
    n = len(correct)
    return SpecMetrics(benchmark, setting, spec_hash or f"hash-{key}", n, N, sum(correct) / n, 0.0, 1.0, 0.0, 0.0,
                       exec_rate, {f"item-{i}": c for i, c in enumerate(correct)})


def answers(accuracy: float, seed: int, n: int = N) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < accuracy for _ in range(n)]


def evaluation(version: str, accuracy: float, seed: int = 0, **overrides: SpecMetrics | None) -> ModelEvaluation:
    results = {k: result(k, answers(accuracy, seed + i)) for i, k in enumerate(KEYS)}
    for key, value in overrides.items():
        key = key.replace("__", "/")
        if value is None:
            results.pop(key)
        else:
            results[key] = value
    return ModelEvaluation("jiuzhang-math", version, results)


def test_first_version_without_champion_passes_on_floors() -> None:
    decision = decide(evaluation("1", 0.6), None, GateThresholds(floors={"gsm8k": 0.4}), expected=expected(),
                      challenger_version="1")
    assert decision.passed, decision.reasons
    assert any("no champion" in c for c in decision.checks)


def test_fails_on_a_floor() -> None:
    decision = decide(evaluation("1", 0.3), None, GateThresholds(floors={"gsm8k/cot": 0.5}), expected=expected(),
                      challenger_version="1")
    assert not decision.passed
    assert len(decision.reasons) == 1 and "gsm8k/cot" in decision.reasons[0] and "floor" in decision.reasons[0]


def test_passes_when_not_worse_than_champion() -> None:
    champion = evaluation("1", 0.5, seed=10)
    # the challenger answers the same items right, plus some more
    better = {k: result(k, [c or random.Random(i).random() < 0.2 for i, c in enumerate(r.correct_by_item.values())])
              for k, r in champion.results.items()}
    decision = decide(ModelEvaluation("jiuzhang-math", "2", better), champion, GateThresholds(), expected=expected(),
                      challenger_version="2")
    assert decision.passed, decision.reasons
    assert sum("paired lower bound" in c for c in decision.checks) == len(KEYS)


def test_fails_on_a_regression_against_the_champion() -> None:
    champion = evaluation("1", 0.6, seed=10)
    worse = dict(champion.results)
    items = list(champion.results["math500/cot"].correct_by_item.values())
    worse["math500/cot"] = result("math500/cot", [c and i % 3 != 0 for i, c in enumerate(items)])  # loses a third
    decision = decide(ModelEvaluation("jiuzhang-math", "2", worse), champion, GateThresholds(), expected=expected(),
                      challenger_version="2")
    assert not decision.passed
    assert len(decision.reasons) == 1 and "math500/cot" in decision.reasons[0] and "regression" in decision.reasons[0]


@pytest.mark.parametrize(("case", "needle"), [
    ("missing_result", "missing metrics"),
    ("stale_spec", "stale metrics"),
    ("partial", "partial metrics"),
    ("other_version", "not the challenger"),
    ("no_results", "no evaluation results"),
    ("champion_stale", "evaluate the champion"),
])
def test_fails_closed_on_missing_partial_or_stale_metrics(case: str, needle: str) -> None:
    challenger = evaluation("2", 0.7)
    champion = evaluation("1", 0.5)
    version = "2"
    if case == "missing_result":
        challenger = evaluation("2", 0.7, gsm8k__tool=None)
    elif case == "stale_spec":
        challenger = evaluation("2", 0.7, gsm8k__cot=result("gsm8k/cot", answers(0.7, 1), spec_hash="old"))
    elif case == "partial":
        challenger = evaluation("2", 0.7, gsm8k__cot=result("gsm8k/cot", answers(0.9, 1, n=20)))
    elif case == "other_version":
        version = "3"
    elif case == "no_results":
        challenger = None
    elif case == "champion_stale":
        champion = evaluation("1", 0.5, math500__cot=result("math500/cot", answers(0.5, 2), spec_hash="old"))
    decision = decide(challenger, champion, GateThresholds(), expected=expected(), challenger_version=version)
    assert not decision.passed
    assert any(needle in r for r in decision.reasons), decision.reasons


def test_failure_rate_ceiling_and_unknown_floor() -> None:
    challenger = evaluation("1", 0.9, gsm8k__tool=result("gsm8k/tool", answers(0.9, 3), exec_rate=0.4))
    decision = decide(challenger, None, GateThresholds(max_execution_error_rate=0.2, floors={"svamp": 0.1}),
                      expected=expected(), challenger_version="1")
    assert not decision.passed
    assert any("execution_error_rate" in r for r in decision.reasons)
    assert any("svamp" in r and "names no required" in r for r in decision.reasons)


def test_synthesizer_gate() -> None:
    thresholds = SynthesizerGateThresholds(min_valid_rate=0.6, max_contaminated_rate=0.05, max_heldout_kd_loss=2.0)
    good = {"synth.valid_rate": 0.8, "synth.contaminated_rate": 0.01, "kd.heldout_loss": 1.5}
    assert decide_synthesizer(good, thresholds).passed
    bad = decide_synthesizer({**good, "synth.contaminated_rate": 0.2}, thresholds)
    assert not bad.passed and "contaminated" in bad.reasons[0]
    missing = decide_synthesizer({"synth.valid_rate": 0.8, "synth.contaminated_rate": 0.0}, thresholds)
    assert not missing.passed and "kd.heldout_loss missing" in missing.reasons[0]


def test_bootstrap_is_seeded_and_covers_the_accuracy() -> None:
    correct = answers(0.7, 5, n=400)
    low, high = bootstrap_interval(correct, seed=3)
    assert (low, high) == bootstrap_interval(correct, seed=3)
    accuracy = sum(correct) / len(correct)
    assert low < accuracy < high and 0.05 < high - low < 0.12  # ~ 2 * 1.96 * sqrt(.21/400) = 0.09
    assert paired_difference_lower_bound(correct, correct) == 0.0


def test_synthesizer_metrics_come_from_its_own_samples_in_the_lake(tmp_path) -> None:
    from models import lake_io
    from models.eval.promote import synthesizer_metrics
    from tests.conftest import make_settings

    settings = make_settings(tmp_path)
    assert synthesizer_metrics(settings, "w-new") == {}  # nothing synthesized yet: the gate fails closed
    raw = [{"request_key": f"k{i}", "model_version": "w-new", "reason": None if i < 8 else "unparsable"}
           for i in range(10)]
    raw += [{"request_key": f"old{i}", "model_version": "w-old", "reason": "truncated"} for i in range(5)]
    lake_io.merge_rows(settings, "gold.synthetic_raw", raw)
    dropped = [{"request_key": "k0", "model_version": "w-new", "reason": "contaminated"},
               {"request_key": "k1", "model_version": "w-new", "reason": "near_duplicate"},
               {"request_key": "old0", "model_version": "w-old", "reason": "contaminated"}]
    lake_io.merge_rows(settings, "gold.synthetic_dropped", dropped)
    metrics = synthesizer_metrics(settings, "w-new")
    assert metrics["synth.valid_rate"] == pytest.approx(0.8)
    assert metrics["synth.contaminated_rate"] == pytest.approx(1 / 8)
    thresholds = SynthesizerGateThresholds(min_valid_rate=0.7, max_contaminated_rate=0.2)
    assert decide_synthesizer(metrics, thresholds).passed
    assert not decide_synthesizer(synthesizer_metrics(settings, "w-old") or {}, thresholds).passed


def test_a_registered_synthesizer_is_matched_by_the_registry_uri_synthesis_stamps(tmp_path) -> None:
    # Synthesis from the registry stamps model_uri = models:/NAME/VERSION and model_version = VERSION:
    # the gate must find those rows, and another version's rows must not count.
    from models import lake_io
    from models.eval.promote import synthesizer_metrics
    from tests.conftest import make_settings

    settings = make_settings(tmp_path)
    raw = [{"request_key": f"v2-{i}", "model_uri": "models:/jiuzhang-synthesizer/2", "model_version": "2",
            "reason": None if i < 3 else "unparsable"} for i in range(4)]
    raw += [{"request_key": f"v1-{i}", "model_uri": "models:/jiuzhang-synthesizer/1", "model_version": "1",
             "reason": "unparsable"} for i in range(6)]
    lake_io.merge_rows(settings, "gold.synthetic_raw", raw)
    metrics = synthesizer_metrics(settings, "models:/jiuzhang-synthesizer/2", column="model_uri")
    assert metrics["synth.valid_rate"] == pytest.approx(0.75) and metrics["synth.sampled"] == 4
    assert metrics["synth.contaminated_rate"] == 0.0  # nothing dropped as contaminated
    assert synthesizer_metrics(settings, "models:/jiuzhang-synthesizer/3", column="model_uri") == {}
