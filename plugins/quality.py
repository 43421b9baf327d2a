"""Data-quality gates: a task fails when a stage's kept fraction or a table's row count leaves its bounds.

Bounds live in settings (``quality.stages``: stage → metric → ``{min, max}``). A stage's metrics
are the numbers in its summary (``input``, ``kept``, ``contaminated``, ...), ``kept_fraction``
(kept / input, only when input > 0: an incremental run with nothing new has none) and
``rows.<layer>.<name>`` for a table's row count. ``check_bounds`` is the pure rule;
``check_stage`` gathers the numbers of one run (summary from the runs folder, rows from the lake);
``enforce_stage_quality`` is what an operator calls after its job: it raises with every number in
the message, as ``AirflowFailException`` — a data-quality failure is not transient, so no retry.

``LakeSparkSubmitOperator`` calls it after each job whose stage has bounds and before the job's
outlet events are recorded: a failed check fails the task, so no asset event is emitted and no
downstream DAG starts on data that failed its checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jzlake.settings import Bounds, Settings

ROWS_PREFIX = "rows."


class DataQualityError(ValueError):
    """A stage's numbers left their configured bounds (the message has every number)."""


@dataclass
class QualityResult:
    stage: str
    metrics: dict[str, float] = field(default_factory=dict)      # the values checked
    violations: list[str] = field(default_factory=list)          # one sentence per broken bound
    unmeasured: list[str] = field(default_factory=list)          # bounded metrics this run has no value for

    @property
    def passed(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "passed": self.passed, "metrics": self.metrics,
                "violations": self.violations, "unmeasured": self.unmeasured}


def stage_metrics(summary: Mapping[str, Any], table_rows: Mapping[str, int | None] | None = None
                  ) -> dict[str, float]:
    """The checkable numbers of a stage summary: its numeric top-level fields, ``kept_fraction``
    (when ``input`` > 0 and ``kept`` is reported) and ``rows.<table>`` for each known row count."""
    metrics = {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if metrics.get("input", 0) > 0 and "kept" in metrics:
        metrics["kept_fraction"] = metrics["kept"] / metrics["input"]
    for table, rows in (table_rows or {}).items():
        if rows is not None:
            metrics[f"{ROWS_PREFIX}{table}"] = float(rows)
    return metrics


def _number(value: float) -> str:
    return f"{value:.4g}" if value != int(value) else f"{int(value)}"


def check_bounds(stage: str, metrics: Mapping[str, float], bounds: Mapping[str, Bounds]) -> QualityResult:
    """Each bounded metric against its ``min``/``max``; a metric without a value is ``unmeasured``."""
    result = QualityResult(stage)
    for metric, bound in sorted(bounds.items()):
        value = metrics.get(metric)
        if value is None:
            result.unmeasured.append(metric)
            continue
        result.metrics[metric] = value
        detail = ""
        if metric == "kept_fraction" and "kept" in metrics and "input" in metrics:
            detail = f" (kept {_number(metrics['kept'])} of {_number(metrics['input'])})"
        if bound.min is not None and value < bound.min:
            result.violations.append(f"{metric} = {_number(value)}{detail} is below the minimum {_number(bound.min)}")
        if bound.max is not None and value > bound.max:
            result.violations.append(f"{metric} = {_number(value)}{detail} is above the maximum {_number(bound.max)}")
    return result


def check_stage(settings: Settings, run_id: str, stage: str,
                summary: Mapping[str, Any] | None = None) -> QualityResult:
    """The configured bounds of ``stage`` against run ``run_id``'s numbers.

    ``summary``: the stage summary when the caller has it (else read from the runs folder). A
    missing summary is itself a violation: a gate that cannot see the numbers must not pass."""
    from jzlake.runs import read_stage_summary
    from plugins.assets import describe_delta, table_asset_uri

    bounds = settings.quality.stages.get(stage, {})
    summary = summary if summary is not None else read_stage_summary(settings, run_id, stage)
    if summary is None:
        return QualityResult(stage, violations=[f"no {stage} summary for run {run_id} in {settings.runs_dir}: "
                                                "the stage did not finish or wrote it elsewhere"])
    tables = [m[len(ROWS_PREFIX):] for m in bounds if m.startswith(ROWS_PREFIX)]
    rows = {t: describe_delta(table_asset_uri(t, settings))["rows"] for t in tables}
    return check_bounds(stage, stage_metrics(summary, rows), bounds)


def failure_message(result: QualityResult, run_id: str) -> str:
    return (f"data-quality check of {result.stage} failed for run {run_id}: " + "; ".join(result.violations)
            + f". Bounds: quality.stages.{result.stage} in the settings; fix the input or, if the change is "
            "expected, widen the bounds and rerun.")


def enforce_stage_quality(settings: Settings, run_id: str, stage: str, summary: Mapping[str, Any] | None = None,
                          *, airflow: bool = True) -> dict[str, Any] | None:
    """Check ``stage`` when it has bounds; raise when one is broken (``AirflowFailException`` inside
    Airflow, so the task is not retried; ``DataQualityError`` otherwise). Returns the result."""
    if not settings.quality.enabled or not settings.quality.stages.get(stage):
        return None
    result = check_stage(settings, run_id, stage, summary)
    if not result.passed:
        message = failure_message(result, run_id)
        if airflow:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(message)
        raise DataQualityError(message)
    return result.as_dict()
