"""``jzlake eval``: evaluate a model on benchmarks in the CoT and tool settings.

::

    jzlake eval [--model models:/NAME@ALIAS] [--benchmark NAME=PATH ...] [--setting cot|tool|both]
                [--limit N] [--backend openai|vllm|transformers] [--serve]
    jzlake eval --self-check --benchmark NAME=PATH ...

Steps: resolve the model (a ``models:/`` reference is read once into a version; a local
directory; or a name the configured server already serves) → load benchmarks and freeze their
specs (``models/eval/spec.py``) → generate (``--serve`` starts ``transformers serve`` over the
model directory for this run; otherwise ``generation.backend``) → grade → MERGE per-item rows
into ``gold.eval_predictions`` (keys: model, version, spec hash, item; a rerun adds nothing) →
log metrics (``eval/<bench>/<setting>/<metric>``), spec hashes and a predictions summary on the
MLflow run linked to the evaluated version, and tag the version with the eval run id.

Items the backend never answered (after its retries) are left out, not graded wrong: the result
is then partial, which the gate refuses, and a rerun fills the gap.

``--self-check`` grades every reference answer against itself and, where the item carries a
worked solution (MATH ``solution``, GSM8K's ``#### answer`` reasoning), the solution's extracted
answer against the reference; no model is needed. The last line is one JSON object with
``items``, ``agreement`` and the ids that disagree.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jzlake.benchmarks import after_hashes
from jzlake.lineage import stable_hash
from models.eval import spec as specs
from models.eval.metrics import SpecMetrics, summarize
from models.eval.runner import ItemResult, run_spec
from models.generation.answers import grade, last_boxed

if TYPE_CHECKING:
    from jzlake.settings import Settings
    from models.registry import RegisteredModel

log = logging.getLogger("jzlake.eval")
TABLE = "gold.eval_predictions"
EVAL_RUN_TAG = "jzlake.eval.run_id"
SPEC_HASHES_TAG = "jzlake.eval.spec_hashes"


@dataclass
class EvaluatedModel:
    """Who is evaluated: name + version for the table, and where its weights are."""

    name: str
    version: str
    model_dir: str | None = None
    registered: RegisteredModel | None = None


def resolve_model(settings: Settings, reference: str) -> EvaluatedModel:
    """``models:/NAME@ALIAS|/VERSION`` → the registered version (alias read once) and its directory;
    a local model directory → (dir name, weights hash); anything else → a served model name."""
    if reference.startswith("models:/"):
        from models.registry import resolve_model_path, resolve_model_version

        version = resolve_model_version(settings, reference)
        directory = resolve_model_path(settings, version.uri)
        return EvaluatedModel(version.name, version.version, str(directory), version)
    path = Path(settings.path(reference))
    if (path / "config.json").is_file():
        from models.tiny import weights_sha256

        return EvaluatedModel(path.name, weights_sha256(path)[:16], str(path.resolve()))
    return EvaluatedModel(reference, "served", None)


@dataclass
class EvalRun:
    """Everything one ``jzlake eval`` produced."""

    model: EvaluatedModel
    run_id: str
    metrics: dict[str, SpecMetrics] = field(default_factory=dict)
    spec_hashes: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    generation_failures: dict[str, list[str]] = field(default_factory=dict)  # spec key → item ids


def build_specs(settings: Settings, benchmarks: Mapping[str, specs.LoadedBenchmark],
                setting_names: Sequence[str]) -> list[tuple[specs.LoadedBenchmark, specs.BenchmarkSpec]]:
    return [(bench, specs.make_spec(bench.name, setting, bench.file_sha256, bench.config,  # type: ignore[arg-type]
                                    settings.eval.max_new_tokens, settings.eval.tool_max_rounds))
            for bench in benchmarks.values() for setting in setting_names]


def load_benchmarks(settings: Settings, overrides: Mapping[str, str] | None, limit: int | None
                    ) -> dict[str, specs.LoadedBenchmark]:
    loaded = {}
    for name, (config, path) in specs.benchmark_configs(settings, dict(overrides or {})).items():
        bench = specs.load(name, config, path, limit)
        missing = [i.item_id for i in bench.items if i.answer in (None, "")]
        if missing:
            raise ValueError(f"benchmark {name!r} ({path}): items {missing[:5]} have no reference answer; set "
                             "`answer_field` in its `benchmarks:` settings")
        loaded[name] = bench
    return loaded


def _backend(settings: Settings, model: EvaluatedModel, backend_name: str, base_url: str | None) -> Any:
    from models.generation.backends import make_backend

    overrides: dict[str, Any] = {}
    if model.model_dir and model.name not in settings.generation.served_models:
        # in-process backends load this directory; a server must have been started over it
        overrides["served_models"] = {**settings.generation.served_models, model.name: model.model_dir}
    if backend_name == "openai":
        overrides["concurrency"] = settings.eval.concurrency
        if base_url:
            overrides["base_url"] = base_url
    return make_backend(settings, backend_name, **overrides)


def evaluate(settings: Settings, model: EvaluatedModel, benchmarks: Mapping[str, specs.LoadedBenchmark],
             setting_names: Sequence[str], *, backend_name: str | None = None, base_url: str | None = None,
             backend: Any = None) -> EvalRun:
    """Generate and grade every spec; rows and metrics (nothing written yet)."""
    from models.generation.pipeline import sandbox_limits

    pairs = build_specs(settings, benchmarks, setting_names)
    spec_hashes = {spec.key: spec.spec_hash for _, spec in pairs}
    run = EvalRun(model, "eval-" + stable_hash(model.name, model.version, sorted(spec_hashes.items()), length=16),
                  spec_hashes=spec_hashes)
    backend = backend or _backend(settings, model, backend_name or settings.eval.backend or
                                  settings.generation.backend, base_url)
    limits = sandbox_limits(settings.sandbox)
    for bench, spec in pairs:
        started = time.perf_counter()
        results: list[ItemResult] = run_spec(bench.items, spec, backend, model.name,
                                             grader_timeout_s=settings.eval.grader_timeout_s, limits=limits)
        # An item the backend never answered (after its retries) is not a wrong answer: it is left
        # out, so the result is partial (the gate refuses it) and a rerun fills it in.
        failed = [r.item_id for r in results if (r.error or "").startswith("generation:")]
        if failed:
            run.generation_failures[spec.key] = failed
            log.warning("%s: %d items got no answer from the backend (left out: partial result): %s",
                        spec.key, len(failed), failed[:5])
        rows = [{**r.as_row(), "model_name": model.name, "model_version": model.version,
                 "spec_hash": spec.spec_hash, "run_id": run.run_id}
                for r in results if not (r.error or "").startswith("generation:")]
        run.metrics[spec.key] = summarize(bench.name, spec.setting, spec.spec_hash, bench.items_total, rows,
                                          samples=settings.eval.bootstrap_samples, seed=settings.eval.seed)
        run.rows += rows
        run.timings[spec.key] = round(time.perf_counter() - started, 3)
        done = run.metrics[spec.key]
        print(f"eval {spec.key}: accuracy {done.accuracy:.4f} [{done.ci_low:.4f}, {done.ci_high:.4f}] on "
              f"{done.items} items ({run.timings[spec.key]:.1f} s)", file=sys.stderr)
    return run


def write_results(settings: Settings, run: EvalRun) -> dict[str, Any]:
    """MERGE the rows into ``gold.eval_predictions``; log metrics and tags on the version's run."""
    from models import lake_io

    merged = lake_io.merge_rows(settings, TABLE, run.rows)
    logged = None
    registered = run.model.registered
    if registered is not None and registered.run_id:
        logged = log_to_mlflow(settings, registered, run)
    return {"table": merged, "mlflow_run_id": logged}


def log_to_mlflow(settings: Settings, registered: RegisteredModel, run: EvalRun) -> str:
    """Metrics, spec hashes and a predictions summary on the MLflow run linked to the version."""
    from mlflow.entities import Metric

    from models.registry import client, set_version_tag

    mlflow_client = client(settings)
    now = int(time.time() * 1000)
    metrics = []
    for key, result in run.metrics.items():
        for name in ("accuracy", "ci_low", "ci_high", "extraction_failure_rate", "truncation_rate",
                     "execution_error_rate", "items"):
            metrics.append(Metric(f"eval/{key}/{name}", float(getattr(result, name)), now, 0))
    mlflow_client.log_batch(registered.run_id, metrics=metrics)
    mlflow_client.set_tag(registered.run_id, EVAL_RUN_TAG, run.run_id)
    for key, spec_hash in run.spec_hashes.items():
        mlflow_client.set_tag(registered.run_id, f"jzlake.eval.spec.{key.replace('/', '.')}", spec_hash)
    summary = {"eval_run_id": run.run_id, "model": registered.uri,
               "results": {k: m.summary() for k, m in run.metrics.items()},
               "predictions": [{k: r[k] for k in ("benchmark", "setting", "item_id", "extracted_answer", "correct",
                                                  "rounds_used", "error")} for r in run.rows]}
    mlflow_client.log_dict(registered.run_id, summary, f"eval/{run.run_id}.json")
    set_version_tag(settings, registered.name, registered.version, EVAL_RUN_TAG, run.run_id)
    set_version_tag(settings, registered.name, registered.version, SPEC_HASHES_TAG,
                    json.dumps(run.spec_hashes, sort_keys=True))
    return registered.run_id


# ---- self-check ----------------------------------------------------------------------------------

def worked_answer(metadata: Mapping[str, Any]) -> str | None:
    """The final answer of an item's worked solution (MATH ``solution``, GSM8K ``answer`` with ####)."""
    solution = metadata.get("solution")
    if isinstance(solution, str) and solution.strip():
        return last_boxed(solution)
    reasoning = metadata.get("answer")
    if isinstance(reasoning, str) and "####" in reasoning:
        return after_hashes(reasoning)
    return None


def self_check(benchmarks: Mapping[str, specs.LoadedBenchmark], timeout_s: float = 5.0) -> dict[str, Any]:
    """Reference vs itself and worked solution vs reference, per benchmark."""
    per_benchmark: dict[str, Any] = {}
    total_items = total_checks = total_agree = 0
    for name, bench in benchmarks.items():
        checks = agree = 0
        disagreeing: list[str] = []
        started = time.perf_counter()
        for item in bench.items:
            pairs = [(item.answer, item.answer)]
            worked = worked_answer(item.metadata)
            if worked is not None:
                pairs.append((worked, item.answer))
            ok = True
            for predicted, reference in pairs:
                checks += 1
                if grade(predicted, reference, timeout_s=timeout_s).equal:
                    agree += 1
                else:
                    ok = False
            if not ok:
                disagreeing.append(item.item_id)
        per_benchmark[name] = {"items": len(bench.items), "checks": checks,
                               "agreement": round(agree / checks, 6) if checks else 0.0,
                               "disagreeing": disagreeing, "seconds": round(time.perf_counter() - started, 3)}
        total_items += len(bench.items)
        total_checks += checks
        total_agree += agree
    return {"items": total_items, "checks": total_checks,
            "agreement": round(total_agree / total_checks, 6) if total_checks else 0.0,
            "min_agreement": min((b["agreement"] for b in per_benchmark.values()), default=0.0),
            "disagreeing": [f"{n}:{i}" for n, b in per_benchmark.items() for i in b["disagreeing"]],
            "benchmarks": per_benchmark}


# ---- CLI -----------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="models:/NAME@ALIAS or /VERSION, a local model dir, or a served model name "
                                        "(default: eval.model)")
    parser.add_argument("--benchmark", action="append", metavar="NAME=PATH",
                        help="evaluate on this file (repeatable; default: eval.benchmarks from the settings)")
    parser.add_argument("--setting", choices=("cot", "tool", "both"), help="default: eval.settings")
    parser.add_argument("--limit", type=int, help="first N items per benchmark (partial: the gate refuses it)")
    parser.add_argument("--backend", help="generation backend (default: eval.backend, else generation.backend)")
    parser.add_argument("--serve", action="store_true",
                        help="start `transformers serve` over the model directory for this run")
    parser.add_argument("--self-check", action="store_true", help="grade reference answers against themselves")


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from jzlake.cli import parse_key_values

    started = time.perf_counter()
    overrides = parse_key_values(args.benchmark, "--benchmark", paths=True)
    limit = args.limit if args.limit is not None else settings.eval.limit
    benchmarks = load_benchmarks(settings, overrides, None if args.self_check else limit)
    if args.self_check:
        return self_check(benchmarks, settings.eval.grader_timeout_s)
    setting_names = list(specs.SETTINGS) if args.setting == "both" else (
        [args.setting] if args.setting else list(settings.eval.settings))
    model = resolve_model(settings, args.model or settings.eval.model)
    server = None
    base_url = None
    if args.serve:
        if not model.model_dir:
            raise SystemExit(f"--serve needs a model directory; {args.model!r} is a served name")
        from models.generation.local_server import start_server

        server = start_server(model.model_dir, _free_port())
        base_url = server.base_url
        settings = settings.model_copy(update={"generation": settings.generation.model_copy(
            update={"served_models": {**settings.generation.served_models, model.name: server.served_model}})})
        model = EvaluatedModel(model.name, model.version, None, model.registered)
    try:
        result = evaluate(settings, model, benchmarks, setting_names,
                          backend_name="openai" if server else args.backend, base_url=base_url)
    finally:
        if server is not None:
            server.stop()
    written = write_results(settings, result)
    return {"model": model.name, "version": model.version, "eval_run_id": result.run_id,
            "results": {k: m.summary() for k, m in result.metrics.items()}, "table": written["table"],
            "mlflow_run_id": written["mlflow_run_id"], "stage_seconds": result.timings,
            "generation_failures": {k: len(v) for k, v in result.generation_failures.items()},
            "elapsed_s": round(time.perf_counter() - started, 3)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
