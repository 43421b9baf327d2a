"""``jzlake synthesize``: mass synthesis with the trained synthesizer → ``gold.synthetic_raw``.

Sharded over ``gold.corpus`` at one pinned Delta version: a document belongs to shard
``hash(doc_id) mod num_shards``, so shards are disjoint and stable. Per shard:

1. plan requests (same prompts, excerpts and lineage as ``jzlake distil``;
   ``models/generation/pipeline.py``), paper defaults: CoT temperature 1.0 and 2,500 new tokens,
   tool temperature 0.1 / top-p 0.95 (``synthesis.*_sampling``);
2. generate through the engine with the ``gold.synthetic_requests`` ledger and
   ``generation.synthesis_budget`` (exactly-once per request key). Shards are separate processes
   (Airflow ``.expand``) and share no live account: each gets a deterministic share of the caps,
   counted on its own partition of the ledger (``engine.ShardScope``, water-filling in
   ``models/generation/budget.py``), so N shards together never exceed a cap. **One writer per
   shard**: never run the same shard index twice at the same time;
3. parse/validate every answer (tool code runs in the sandbox) and **stage** the shard's rows
   (``lake_io.stage_shard``). The staged file is the shard's completion marker: it is written
   only when every request of the shard has an answer or was abandoned (it failed
   ``generation.max_attempts_per_key`` sends, e.g. a 4xx such as "context too long"; counted
   under ``rejected_by_reason["abandoned"]``), so a shard with failures or a budget stop stays
   open and the next run finishes it (sending only what is missing).

When every shard is staged, one commit MERGEs them into ``gold.synthetic_raw`` (nothing is
committed when nothing changed). The run id is content-addressed — a hash of the model, the
input version, the shard count and the prompt/sampling settings — so a rerun (or a retried
Airflow task) finds its own staged shards and skips them. ``spark_jobs/synthetic_filter.py``
then filters, deduplicates and decontaminates into ``gold.synthetic_problems``.

The synthesizer (``synthesis.model`` / ``--model``; an explicit value always wins):

* unset — the registry: ``models:/jiuzhang-synthesizer@champion`` (``synthesis.registered_model``)
  when the evaluation gate has promoted one, else ``@challenger`` (the latest ``jzlake train
  synthesizer``) when ``synthesis.allow_challenger`` (on in the embedded default until the gate
  exists; off = fail closed), else an error naming ``jzlake train synthesizer``;
* a local model directory — served under ``generation.synthesizer_model`` (its path goes to
  ``generation.served_models``; a ``transformers serve``/vLLM server over that directory, or the
  in-process ``transformers``/``vllm`` backends);
* an MLflow ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI — the alias is read once,
  and the version's files are fetched into the model cache and sha256-checked against its
  manifest by ``models.registry``; rows carry ``model_uri = models:/NAME/VERSION`` and
  ``model_version = VERSION`` (a moved alias gives a new content-addressed run id);
* a ``runs:/`` URI — downloaded to the model cache;
* anything else — a model name served at ``generation.base_url`` by any OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jzlake.lineage import stable_hash
from models.generation.pipeline import (
    SourceDocument,
    ledger_answers,
    ledger_rows,
    parse_outcomes,
    plan_requests,
    reconcile,
    sample_rows,
    sandbox_limits,
    summary,
    table_columns,
    with_served_models,
)
from models.generation.prompt_library import templates_for

if TYPE_CHECKING:
    from jzlake.settings import Settings

log = logging.getLogger("jzlake.synthesize")

CORPUS = "gold.corpus"
LEDGER = "gold.synthetic_requests"
RAW = "gold.synthetic_raw"


@dataclass(frozen=True)
class Synthesizer:
    model: str
    model_uri: str
    model_version: str | None
    served_models: dict[str, str]


def registered_synthesizer(settings: Settings) -> str:
    """``models:/NAME/VERSION`` of the registry's synthesizer: ``@champion``, else ``@challenger``
    when ``synthesis.allow_challenger``; a clear error naming the stage that registers it."""
    from models import registry

    name = settings.synthesis.registered_model
    champion = registry.get_by_alias(settings, name, "champion")
    if champion is not None:
        return champion.uri
    challenger = registry.get_by_alias(settings, name, "challenger")
    if challenger is not None and settings.synthesis.allow_challenger:
        log.warning("synthesize: no %s@champion yet; using %s@challenger (%s) because synthesis.allow_challenger "
                    "is on", name, name, challenger.uri)
        return challenger.uri
    found = (f"only {challenger.uri} (alias challenger), and synthesis.allow_challenger is off: promote it "
             "through the evaluation gate or allow the challenger") if challenger is not None else \
        "no version at all: train and register one with `jzlake train synthesizer`"
    raise LookupError(f"synthesize: no synthesizer model — models:/{name}@champion is not in the registry "
                      f"({registry.tracking_uri(settings)}), {found}; or pass --model (a model directory, "
                      "a models:/ URI or a served model name)")


def resolve_synthesizer(settings: Settings) -> Synthesizer:
    """Which model synthesizes, under which name, from where (see module docstring)."""
    config = settings.generation
    configured = settings.synthesis.model or registered_synthesizer(settings)
    served = dict(config.served_models)
    directory: str | None = None
    registered_version: str | None = None
    if configured.startswith("models:/"):
        from models import registry

        model = registry.resolve_model_version(settings, configured)  # an alias is read once, here
        directory = str(registry.load_verified(settings, model))
        configured, registered_version = model.uri, model.version
    elif configured.startswith("runs:/"):
        from models.registry import resolve_model_path

        directory = str(resolve_model_path(settings, configured))
    elif Path(settings.path(configured)).is_dir():
        directory = settings.path(configured)
    if directory is None:
        return Synthesizer(configured, config.base_url, None, served)
    if not (Path(directory) / "config.json").exists():
        raise RuntimeError(f"synthesis.model {directory} holds no model (config.json missing); point it at a "
                           "saved model directory")
    from models.tiny import weights_sha256

    resolved = str(Path(directory).resolve())
    served[config.synthesizer_model] = resolved
    version = registered_version or weights_sha256(Path(resolved))[:16]
    uri = configured if configured.startswith(("models:/", "runs:/")) else f"file://{resolved}"
    return Synthesizer(config.synthesizer_model, uri, version, served)


def shard_of(doc_id: str, num_shards: int) -> int:
    """Stable shard of a document (independent of row order and of the other documents)."""
    return int(stable_hash(doc_id, length=12), 16) % num_shards


def content_run_id(settings: Settings, synthesizer: Synthesizer, input_version: int, num_shards: int) -> str:
    """Same inputs, model and settings → same run id (so staged shards are found again)."""
    templates = templates_for(settings.prompts, settings.home)
    digest = stable_hash(
        synthesizer.model, synthesizer.model_uri, synthesizer.model_version, input_version, num_shards,
        settings.prompts.model_dump(), settings.synthesis.model_dump(),
        sorted((t.id, t.sha256) for t in templates.values()), length=16)
    return f"synthesize-{digest}"


# ---- flags ------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local model dir, models:/NAME@ALIAS or /VERSION, or a served model name "
                        "(default: synthesis.model, else the registry's synthesizer @champion)")
    parser.add_argument("--shard-index", type=int, help="run only this shard (default: every open shard)")
    parser.add_argument("--num-shards", type=int, help="number of shards (default: synthesis.num_shards)")
    parser.add_argument("--input-version", type=int, help="gold.corpus Delta version (default: latest)")
    parser.add_argument("--max-documents-per-shard", type=int)
    parser.add_argument("--max-new-tokens", type=int, help="max new tokens for every request (tests, demos)")
    parser.add_argument("--backend", help="generation backend (default: generation.backend)")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint (default: generation.base_url)")
    parser.add_argument("--no-commit", action="store_true", help="stage shards only (a later run commits)")
    parser.add_argument("--run-id", help="override the content-addressed run id")


def apply_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    from jzlake.settings import Settings, deep_merge

    synthesis: dict[str, Any] = {}
    generation: dict[str, Any] = {}
    for flag, name in (("model", "model"), ("num_shards", "num_shards"),
                       ("max_documents_per_shard", "max_documents_per_shard")):
        if getattr(args, flag, None) is not None:
            synthesis[name] = getattr(args, flag)
    if getattr(args, "max_new_tokens", None):
        synthesis["cot_sampling"] = {"max_tokens": args.max_new_tokens}
        synthesis["tool_sampling"] = {"max_tokens": args.max_new_tokens}
    for flag, name in (("backend", "backend"), ("base_url", "base_url")):
        if getattr(args, flag, None):
            generation[name] = getattr(args, flag)
    update = {k: v for k, v in (("synthesis", synthesis), ("generation", generation)) if v}
    return Settings.model_validate(deep_merge(settings.model_dump(), update)) if update else settings


# ---- one shard --------------------------------------------------------------------------------

def shard_documents(settings: Settings, version: int, shard_index: int, num_shards: int,
                    limit: int | None) -> list[SourceDocument]:
    """The documents of one shard (``doc_id`` order, at most ``limit``), reading only their text.

    Shards are assigned from the ``doc_id`` column alone and other shards' rows are filtered out
    while scanning, so a shard's memory scales with the shard, not with the corpus. Two
    documents in different shards whose excerpts render the same prompt are both generated; the
    commit keeps one row per request key (``commit_raw``).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from models import lake_io

    ids, _ = lake_io.read_table_at(settings, CORPUS, version, ["doc_id"])
    mine = sorted(d for d in ids.column("doc_id").to_pylist() if shard_of(d, num_shards) == shard_index)
    mine = mine[:limit] if limit is not None else mine
    if not mine:
        return []
    # The cast: delta-rs writes string_view files, and pyarrow cannot compare them with a string set.
    rows, _ = lake_io.read_table_at(settings, CORPUS, version, ["doc_id", "source", "text"],
                                    row_filter=pc.field("doc_id").cast(pa.string()).isin(mine))
    data = rows.to_pydict()
    return sorted((SourceDocument(d, s, t) for d, s, t in zip(data["doc_id"], data["source"], data["text"],
                                                                strict=True)), key=lambda doc: doc.doc_id)


def commit_raw(settings: Settings, run_id: str, num_shards: int) -> dict[str, Any]:
    """MERGE every staged shard into ``gold.synthetic_raw``, one row per request key.

    A key staged by two shards (two documents whose excerpts render the same prompt) keeps the row
    of the smaller ``doc_id``; the others are counted as ``duplicate_excerpt_across_shards``.
    """
    from jzlake import catalogue
    from models import lake_io

    rows = lake_io.read_staged(settings, RAW, run_id, num_shards)
    keys = list(catalogue.table(RAW).merge_keys)
    ordered = rows.sort_by([(k, "ascending") for k in [*keys, "doc_id"]])
    first, seen = [], set()
    for index, row in enumerate(ordered.select(keys).to_pylist()):
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            first.append(index)
    unique = ordered.take(first)
    result = lake_io.merge_rows(settings, RAW, unique)
    return {**result, "rows": unique.num_rows, "duplicate_excerpt_across_shards": rows.num_rows - unique.num_rows}


def run_shard(settings: Settings, synthesizer: Synthesizer, run_id: str, version: int, shard_index: int,
              num_shards: int) -> dict[str, Any]:
    """Generate, parse and (when complete) stage one shard; returns its summary."""
    from models import lake_io
    from models.generation.backends import make_backend
    from models.generation.engine import ShardScope, budget_for, run_generation
    from models.generation.ledger import ABANDONED, FAILED, SUCCEEDED, Ledger

    config = settings.synthesis
    documents = shard_documents(settings, version, shard_index, num_shards, config.max_documents_per_shard)
    plan = plan_requests(
        documents, model=synthesizer.model, templates=templates_for(settings.prompts, settings.home),
        prompts=settings.prompts, cot_sampling=config.cot_sampling, tool_sampling=config.tool_sampling,
        samples_per_prompt=config.samples_per_prompt,
        lineage={"model_uri": synthesizer.model_uri, "model_version": synthesizer.model_version,
                 "input_table": CORPUS, "input_version": version, "shard_index": shard_index,
                 "num_shards": num_shards},
    )
    requests = [p.request for p in plan.requests]
    backend = make_backend(settings)
    ledger = Ledger.open(settings, LEDGER, run_id=run_id, backend=backend.name)
    report = None
    if requests:
        scope = ShardScope(shard_index, num_shards, synthesizer.model,
                           lambda doc_id, key: shard_of(doc_id or key, num_shards))
        report = run_generation(requests, backend, ledger, budget_for(settings, ledger, backend.name, shard=scope))

    keys = {r.key for r in requests}
    answers, statuses = ledger_answers(ledger_rows(ledger), keys)
    rows = sample_rows(plan, answers, prompts=settings.prompts, limits=sandbox_limits(settings.sandbox),
                       run_id=run_id)
    for row in rows:
        row.update(shard_index=shard_index, num_shards=num_shards)
    accepted, rejected = parse_outcomes(r["reason"] for r in rows)
    failed, abandoned = statuses.get(FAILED, 0), statuses.get(ABANDONED, 0)
    if abandoned:  # no reply will ever come: a rejection, so the shard can complete
        rejected[ABANDONED] += abandoned
    not_sent = len(keys) - statuses.get(SUCCEEDED, 0) - failed - abandoned
    reconcile(len(keys), accepted, rejected, failed, not_sent)
    complete = failed == 0 and not_sent == 0
    if complete:
        lake_io.stage_shard(settings, RAW, run_id, shard_index, num_shards, table_columns(RAW, rows))
    else:
        log.warning("shard %d/%d incomplete (%d failed, %d not sent): not staged; rerun to finish it",
                    shard_index, num_shards, failed, not_sent)
    return summary("synthesize", run_id, "", plan, report, accepted=accepted, rejected=rejected, failed=failed,
                   not_sent=not_sent, written={}, extra={"shard_index": shard_index, "staged": complete})


# ---- the stage --------------------------------------------------------------------------------

def synthesize(settings: Settings, *, shard_index: int | None = None, input_version: int | None = None,
               commit: bool = True, run_id: str | None = None) -> dict[str, Any]:
    """Run the open shards (or one), then commit when all are staged; returns the summary."""
    from models import lake_io

    num_shards = settings.synthesis.num_shards
    if num_shards < 1 or (shard_index is not None and not 0 <= shard_index < num_shards):
        raise ValueError(f"shard {shard_index} of {num_shards}: need num_shards >= 1 and 0 <= index < num_shards")
    synthesizer = resolve_synthesizer(settings)
    settings = with_served_models(settings, synthesizer.served_models)
    version = input_version if input_version is not None else lake_io.current_version(settings, CORPUS)
    if version is None:
        raise RuntimeError(f"{CORPUS} does not exist: run `jzlake curate` first (or point --lake-root at a lake)")
    run_id = run_id or content_run_id(settings, synthesizer, version, num_shards)
    staged = {Path(f).name for f in lake_io.staged_files(settings, RAW, run_id)}
    shards = [shard_index] if shard_index is not None else list(range(num_shards))

    totals: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    documents_skipped: Counter[str] = Counter()
    ran, skipped_shards, incomplete = [], [], []
    for shard in shards:
        if lake_io.shard_file_name(shard, num_shards) in staged:
            skipped_shards.append(shard)
            continue
        result = run_shard(settings, synthesizer, run_id, version, shard, num_shards)
        ran.append(shard)
        if not result["staged"]:
            incomplete.append(shard)
        for name in ("documents", "requests", "sent", "succeeded", "skipped_done", "failed", "not_sent",
                     "accepted", "prompt_tokens", "completion_tokens", "tokens"):
            totals[name] += result[name]
        totals["cost_usd_micro"] += round(result["cost_usd"] * 1e6)
        rejected.update(result["rejected_by_reason"])
        documents_skipped.update(result["documents_skipped"])

    commit_result: dict[str, Any] = {"committed": False}
    staged_now = len(lake_io.staged_files(settings, RAW, run_id))
    if commit and staged_now == num_shards:
        commit_result = commit_raw(settings, run_id, num_shards)
    elif commit:
        commit_result["waiting_for_shards"] = num_shards - staged_now
    note = f"synthesizer {synthesizer.model} ({synthesizer.model_uri})"
    return {
        "stage": "synthesize", "run_id": run_id, "note": note, "input_table": CORPUS, "input_version": version,
        "num_shards": num_shards, "shards_run": ran, "shards_skipped_done": skipped_shards,
        "shards_incomplete": incomplete, **{k: v for k, v in totals.items() if k != "cost_usd_micro"},
        "cost_usd": totals["cost_usd_micro"] / 1e6, "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "documents_skipped": dict(sorted(documents_skipped.items())),
        "written": {RAW: commit_result.get("inserted", 0)}, "commit": commit_result,
    }


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """CLI entry (``jzlake synthesize``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = apply_overrides(settings, args)
    return synthesize(settings, shard_index=getattr(args, "shard_index", None),
                      input_version=getattr(args, "input_version", None),
                      commit=not getattr(args, "no_commit", False), run_id=getattr(args, "run_id", None))
