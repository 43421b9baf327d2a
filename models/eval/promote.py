"""``jzlake promote NAME``: gate the ``challenger`` version of NAME and move ``champion`` (or refuse).

The JiuZhang model is gated on ``gold.eval_predictions`` (the per-item rows ``jzlake eval``
wrote): the required results are ``eval.benchmarks`` × ``eval.settings`` at their *current* spec
hashes and full item counts, computed here from the settings and files, so results made with
another prompt, file, grader or ``--limit`` do not count. The synthesizer
(``train.synthesizer.registered_model``, or ``--kind synthesizer``) is gated on what its samples
show in the lake — validity in ``gold.synthetic_raw``, decontamination drops in
``gold.synthetic_dropped``, matched by weights hash (run ``jzlake synthesize`` + ``filter-synthetic``
with ``synthesis.model: models:/NAME@challenger`` on a sample first) — plus the metrics its run
carries (``kd.heldout_loss``); see ``models.eval.gate.SYNTH_METRICS``.

Pass: ``champion`` moves to the challenger, the previous champion is tagged. Fail: the challenger
is tagged with the reasons and ``GateFailed`` is raised (the CLI prints the JSON summary, then
exits with status 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from models.eval.gate import (
    CHAMPION,
    ExpectedSpec,
    GateDecision,
    GateFailed,
    ModelEvaluation,
    apply_decision,
    decide,
    decide_synthesizer,
)
from models.eval.job import EVAL_RUN_TAG, TABLE, build_specs, load_benchmarks
from models.eval.metrics import SpecMetrics, summarize

if TYPE_CHECKING:
    from jzlake.settings import Settings
    from models.registry import RegisteredModel

CHALLENGER = "challenger"


def expected_specs(settings: Settings, overrides: Mapping[str, str] | None = None) -> dict[str, ExpectedSpec]:
    """The current spec hash and item count of every required ``benchmark/setting``."""
    benchmarks = load_benchmarks(settings, overrides, None)
    return {spec.key: ExpectedSpec(spec.spec_hash, bench.items_total)
            for bench, spec in build_specs(settings, benchmarks, settings.eval.settings)}


def load_evaluation(settings: Settings, name: str, version: str,
                    expected: Mapping[str, ExpectedSpec]) -> ModelEvaluation | None:
    """A version's results from ``gold.eval_predictions``: per ``benchmark/setting`` the rows with the
    expected spec hash, else (so the gate can say "stale") those of another spec."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in _rows_where(settings, TABLE, {"model_name": name, "model_version": version}):
        groups[(row["benchmark"], row["setting"], row["spec_hash"])].append(row)
    if not groups:
        return None
    results: dict[str, SpecMetrics] = {}
    eval_config = settings.eval
    for (benchmark, setting, spec_hash), rows in sorted(groups.items()):
        key = f"{benchmark}/{setting}"
        want = expected.get(key)
        if key in results and (want is None or results[key].spec_hash == want.spec_hash):
            continue  # the current spec's rows win over a stale one
        total = want.items_total if want is not None else len(rows)
        results[key] = summarize(benchmark, setting, spec_hash, total, rows,
                                 samples=eval_config.bootstrap_samples, seed=eval_config.seed)
    return ModelEvaluation(name, version, results)


def synthesizer_metrics(settings: Settings, identity: str, column: str = "model_version") -> dict[str, float]:
    """``synth.valid_rate`` (parsed + validated share of the synthesizer's replies in
    ``gold.synthetic_raw``) and ``synth.contaminated_rate`` (share of the valid ones the filter
    dropped as ``contaminated``) for the rows whose ``column`` equals ``identity``: a registered
    synthesizer's ``model_uri`` (``models:/NAME/VERSION``, what synthesis stamps when it resolves
    the registry), or the weights hash synthesis stamps as ``model_version`` for a plain model
    directory. Empty when it synthesized nothing."""
    raw = _rows_where(settings, "gold.synthetic_raw", {column: identity}, ["reason"])
    if not raw:
        return {}
    valid = sum(1 for row in raw if row["reason"] is None)
    metrics = {"synth.valid_rate": valid / len(raw), "synth.sampled": float(len(raw))}
    if valid:
        dropped = _rows_where(settings, "gold.synthetic_dropped", {column: identity}, ["reason"])
        metrics["synth.contaminated_rate"] = sum(1 for row in dropped if row["reason"] == "contaminated") / valid
    return metrics


def _rows_where(settings: Settings, table: str, equals: Mapping[str, str],
                columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a lake table whose string columns equal ``equals`` (``[]`` when the table is absent)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from models import lake_io

    if lake_io.current_version(settings, table) is None:
        return []
    wanted = None if columns is None else list(dict.fromkeys([*equals, *columns]))
    rows, _ = lake_io.read_table_at(settings, table, columns=wanted)
    mask = None
    for column, value in equals.items():  # delta-rs may hand strings back as string_view: compare as string
        test = pc.equal(rows.column(column).cast(pa.string()), value)
        mask = test if mask is None else pc.and_(mask, test)
    return rows.filter(mask).to_pylist() if mask is not None else rows.to_pylist()


def _record(settings: Settings, challenger: RegisteredModel, thresholds: Any,
            expected: Mapping[str, ExpectedSpec] | None) -> dict[str, str]:
    record = {"jzlake.gate.thresholds": json.dumps(thresholds.model_dump(), sort_keys=True)[:4900],
              "jzlake.gate.eval_run_id": challenger.tags.get(EVAL_RUN_TAG, ""),
              "jzlake.gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if expected is not None:
        record["jzlake.gate.spec_hashes"] = json.dumps({k: v.spec_hash for k, v in expected.items()},
                                                       sort_keys=True)[:4900]
    return record


def promote(settings: Settings, name: str, *, kind: str | None = None,
            overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Gate ``NAME@challenger``; returns the summary or raises ``GateFailed`` (after tagging)."""
    from models.registry import client, get_by_alias

    challenger = get_by_alias(settings, name, CHALLENGER)
    if challenger is None:
        raise LookupError(f"model {name!r} has no {CHALLENGER!r} version: train and register one first "
                          "(`jzlake train`)")
    champion = get_by_alias(settings, name, CHAMPION)
    kind = kind or ("synthesizer" if name == settings.train.synthesizer.registered_model else "model")
    expected: dict[str, ExpectedSpec] | None = None
    if kind == "synthesizer":
        from models.registry import resolve_model_path
        from models.tiny import weights_sha256

        thresholds: Any = settings.eval.synthesizer_gate
        # the run's own metrics (held-out KD loss from training), then what its samples show in the lake
        metrics = dict(client(settings).get_run(challenger.run_id).data.metrics) if challenger.run_id else {}
        # its samples by registry URI; a copy synthesized from its directory by weights hash
        samples = synthesizer_metrics(settings, challenger.uri, column="model_uri")
        if not samples:
            samples = synthesizer_metrics(settings, weights_sha256(resolve_model_path(settings, challenger.uri))[:16])
        metrics.update(samples)
        decision: GateDecision = decide_synthesizer(metrics, thresholds)
    else:
        thresholds = settings.eval.gate
        expected = expected_specs(settings, overrides)
        challenger_eval = load_evaluation(settings, name, challenger.version, expected)
        champion_eval = (load_evaluation(settings, name, champion.version, expected)
                         if champion is not None and champion.version != challenger.version else None)
        if champion is not None and champion.version != challenger.version and champion_eval is None:
            champion_eval = ModelEvaluation(name, champion.version, {})  # fail closed: champion has no results
        decision = decide(challenger_eval, champion_eval, thresholds, expected=expected,
                          challenger_version=challenger.version)
    summary = {"model": name, "kind": kind, "challenger": challenger.version,
               "previous_champion": champion.version if champion else None, **decision.as_dict()}
    applied = apply_decision(settings, challenger, decision, record=_record(settings, challenger, thresholds,
                                                                             expected))
    return {**summary, "champion": applied["champion"]}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model name (e.g. jiuzhang-math, jiuzhang-synthesizer)")
    parser.add_argument("--kind", choices=("model", "synthesizer"),
                        help="which gate (default: synthesizer for train.synthesizer.registered_model)")
    parser.add_argument("--benchmark", action="append", metavar="NAME=PATH",
                        help="required benchmark files (default: eval.benchmarks from the settings)")


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from jzlake.cli import parse_key_values

    started = time.perf_counter()
    try:
        summary = promote(settings, args.name, kind=args.kind,
                          overrides=parse_key_values(args.benchmark, "--benchmark", paths=True))
    except GateFailed as failure:
        print(json.dumps({"model": args.name, "passed": False, "reasons": list(failure.reasons),
                          "elapsed_s": round(time.perf_counter() - started, 3)}, sort_keys=True))
        sys.stdout.flush()
        raise SystemExit(3) from failure
    return {**summary, "elapsed_s": round(time.perf_counter() - started, 3)}
