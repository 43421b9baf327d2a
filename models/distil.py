"""``jzlake distil``: teacher knowledge distillation → ``gold.kd_dataset`` (+ ``gold.kd_rejected``).

Two KD rounds, as in the paper (``distil.round`` / ``--round``):

* **initialize** — a seeded random sample of ``gold.corpus`` (``distil.initialize_documents``
  documents: those whose ``hash(initialize_seed, doc_id)`` ranks lowest, so the pick does not
  depend on row order and a grown corpus keeps most of it);
* **boost** — ``gold.selected_texts``, the influence stage's pick (``jzlake influence``);
* ``auto`` (default) — boost when ``gold.selected_texts`` exists, else initialize. The DAG and the
  demo name the round explicitly; ``auto`` keeps a plain ``jzlake distil`` doing the next useful
  thing. The synthesizer trains on the union of both rounds' rows.

Each round may spend at most ``distil.round_max_calls.<round>`` teacher calls (default
initialize 4,650; boost: whatever is left of ``generation.teacher_budget``, 9,300 in all),
counted on the ledger's keys that round asked first. Rows of ``gold.kd_dataset`` /
``gold.kd_rejected`` carry ``round``; a sample both rounds would ask for (the same document,
template and sampling) is asked once and keeps the round that first asked it.

Steps (each rerunnable; a rerun with the same inputs sends nothing and writes nothing):

1. **Input** at a pinned Delta version: the round's table (``distil.input_table`` / ``--input``
   forces one, and so the round). A selection without a ``text`` column is joined to
   ``gold.corpus`` on ``doc_id``. Documents are taken in ``doc_id`` order (after the
   initialize round's sample), up to ``distil.max_documents``.
2. **Prompts**: seeded stage choice, excerpt cut, one request per (document, template, sample)
   with lineage (``models/generation/pipeline.py``).
3. **Generation** through the engine with the ``gold.kd_requests`` ledger and
   ``generation.teacher_budget`` (9,300 calls by default, the paper's total).
4. **Parse and validate** every answered key not yet in the output tables; accepted samples go
   to ``gold.kd_dataset`` in the training format, the rest to ``gold.kd_rejected`` with their
   reason. Counts reconcile: requests = accepted + rejected + failed + not sent.

Which teacher answers (``distil.teacher``):

* ``auto`` (default): the configured ``generation.teacher_model`` (a GPT-4-class model) when an
  API key resolves (``generation.api_key_env`` / ``api_key_conn_id``); **without a key, the
  local tiny model** (``distil.local_teacher_model`` at ``generation.base_url``, the
  ``transformers serve`` of ``make llm-up``) — the summary and the log say so, and every row's
  ``model_name`` is the tiny model's, so demo output can never pass for teacher output;
* ``configured``: always the configured model (e.g. an open model on a keyless vLLM server);
* ``local``: always the local model.

Paper defaults: CoT temperature 1.0, tool temperature 0.1 / top-p 0.95, 2,500 new tokens.

With the ``openai-batch`` backend a batch may take up to 24 h, so the stage can be split around
the wait (the Airflow operator in ``plugins/teacher_batch.py`` defers between the two):

* ``--no-wait``: submit what is not done (or resume the batches the ledger stores: their ids
  are written before any poll), poll each batch once, print the summary with the batch ids and
  statuses, exit 0. Keys in a batch count as ``not_sent`` and as ``awaiting_batch``;
* ``--collect``: submit nothing; collect every *finished* stored batch into the ledger, then
  parse and write samples as usual (batches still running are reported and left alone).

Without either flag the batch path blocks: submit (or resume), poll until done, collect.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jzlake import catalogue
from jzlake.lineage import new_run_id, stable_hash
from models.generation.pipeline import (
    SourceDocument,
    batch_states,
    collect_stored_batches,
    existing_outcomes,
    ledger_answers,
    ledger_rows,
    parse_outcomes,
    plan_requests,
    reconcile,
    sample_rows,
    sandbox_limits,
    summary,
    with_served_models,
    write_samples,
)
from models.generation.prompt_library import templates_for

if TYPE_CHECKING:
    from jzlake.settings import Settings

log = logging.getLogger("jzlake.distil")

LEDGER = "gold.kd_requests"
ACCEPTED = "gold.kd_dataset"
REJECTED = "gold.kd_rejected"
SELECTED = "gold.selected_texts"
CORPUS = "gold.corpus"
Round = Literal["initialize", "boost"]
ROUND_INPUT: dict[str, str] = {"initialize": CORPUS, "boost": SELECTED}


# ---- settings overrides from flags -----------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--round", choices=("auto", "initialize", "boost"),
                        help="KD round: initialize (seeded sample of gold.corpus) or boost (gold.selected_texts); "
                             "auto: boost when the selection exists (default: distil.round)")
    parser.add_argument("--input", choices=("auto", SELECTED, CORPUS), help="input table (default: settings)")
    parser.add_argument("--input-version", type=int, help="Delta version of the input (default: latest)")
    parser.add_argument("--max-documents", type=int, help="use at most N documents (doc_id order)")
    parser.add_argument("--teacher", choices=("auto", "configured", "local"), help="which model answers")
    parser.add_argument("--backend", help="generation backend (default: generation.backend)")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint (default: generation.base_url)")
    parser.add_argument("--max-calls", type=int, help="teacher call cap (default: generation.teacher_budget)")
    parser.add_argument("--max-new-tokens", type=int, help="max new tokens for every request (tests, demos)")
    parser.add_argument("--samples-per-prompt", type=int)
    parser.add_argument("--run-id", help="run id stamped on rows (default: a new one)")
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument("--no-wait", action="store_true",
                      help="openai-batch: submit (or resume) the batch, print its id and status, exit")
    wait.add_argument("--collect", action="store_true",
                      help="openai-batch: collect finished stored batches, submit nothing, then parse/write")


def apply_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    """Settings with the stage's flags applied (validated again)."""
    from jzlake.settings import Settings, deep_merge

    distil: dict[str, Any] = {}
    generation: dict[str, Any] = {}
    if getattr(args, "round", None):
        distil["round"] = args.round
    if getattr(args, "input", None):
        distil["input_table"] = args.input
    if getattr(args, "max_documents", None) is not None:
        distil["max_documents"] = args.max_documents
    if getattr(args, "teacher", None):
        distil["teacher"] = args.teacher
    if getattr(args, "samples_per_prompt", None):
        distil["samples_per_prompt"] = args.samples_per_prompt
    if getattr(args, "max_new_tokens", None):
        distil["cot_sampling"] = {"max_tokens": args.max_new_tokens}
        distil["tool_sampling"] = {"max_tokens": args.max_new_tokens}
    if getattr(args, "backend", None):
        generation["backend"] = args.backend
    if getattr(args, "base_url", None):
        generation["base_url"] = args.base_url
    if getattr(args, "max_calls", None) is not None:
        generation["teacher_budget"] = {"max_calls": args.max_calls}
    update = {k: v for k, v in (("distil", distil), ("generation", generation)) if v}
    return Settings.model_validate(deep_merge(settings.model_dump(), update)) if update else settings


# ---- which teacher -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Teacher:
    model: str            # logical name: ledger key, prices, rows' model_name
    model_uri: str        # where it is served
    model_version: str | None
    local: bool
    note: str
    served_models: dict[str, str]


def choose_teacher(settings: Settings, environ: dict[str, str] | None = None) -> Teacher:
    """The model that answers this run (see module docstring); never exposes the key."""
    from models.generation.backends import resolve_api_key

    config = settings.generation
    mode = settings.distil.teacher
    has_key = resolve_api_key(settings, environ) is not None
    if mode == "configured" or (mode == "auto" and has_key):
        return Teacher(config.teacher_model, config.base_url, None, False,
                       f"teacher {config.teacher_model} at {config.base_url}", dict(config.served_models))
    local = settings.distil.local_teacher_model
    served = dict(config.served_models)
    version = None
    if local not in served:
        from models.tiny import ensure_tiny_model, weights_sha256

        model_dir = ensure_tiny_model(settings)
        served[local] = str(Path(model_dir).resolve())
        version = weights_sha256(Path(model_dir))[:16]
    why = "no API key configured" if mode == "auto" else "distil.teacher = local"
    note = (f"{why} ({config.api_key_env or config.api_key_conn_id or 'none'} unset): the LOCAL model "
            f"{local!r} at {config.base_url} answers instead of {config.teacher_model} — plumbing/demo "
            "output only, not teacher-quality data")
    return Teacher(local, served.get(local, config.base_url), version, True, note, served)


# ---- input -------------------------------------------------------------------------------------

def _catalogued(name: str) -> bool:
    try:
        catalogue.table(name)
    except KeyError:
        return False
    return True


def choose_input(settings: Settings) -> str:
    """``gold.selected_texts`` when configured so or (auto) when it exists, else ``gold.corpus``."""
    from models import lake_io

    wanted = settings.distil.input_table
    if wanted != "auto":
        return wanted
    if _catalogued(SELECTED) and lake_io.current_version(settings, SELECTED) is not None:
        return SELECTED
    return CORPUS


def choose_round(settings: Settings) -> tuple[Round, str]:
    """``(round, input table)`` for this run (see module docstring); a contradiction between
    ``distil.round`` and a forced ``distil.input_table`` is an error, not a guess."""
    from models import lake_io

    config = settings.distil
    if config.round == "auto":
        table = choose_input(settings)
        return ("boost" if table == SELECTED else "initialize"), table
    table = ROUND_INPUT[config.round]
    if config.input_table not in ("auto", table):
        raise ValueError(f"distil round {config.round!r} reads {table}, but distil.input_table is "
                         f"{config.input_table!r}: drop --input (or pick the round that reads it)")
    if table == SELECTED and lake_io.current_version(settings, SELECTED) is None:
        raise RuntimeError(f"distil --round boost reads {SELECTED}, which does not exist yet: run the influence "
                           "selection first (`jzlake influence`), or distil the initialize round")
    return config.round, table


def seeded_sample(doc_ids: list[str], size: int, seed: int) -> list[str]:
    """The ``size`` documents whose ``hash(seed, doc_id)`` ranks lowest, in ``doc_id`` order.

    A document's rank depends only on its own id, so the pick is independent of row order and a
    grown corpus keeps every earlier pick except those displaced by new, lower-ranked ids.
    """
    ranked = sorted(set(doc_ids), key=lambda d: (stable_hash(seed, d, length=16), d))
    return sorted(ranked[:size])


def read_documents(settings: Settings, table_name: str, version: int | None, limit: int | None,
                   sample: tuple[int, int] | None = None) -> tuple[list[SourceDocument], int, dict[str, Any]]:
    """Documents (doc_id order) from the input table at ``version``; a selection without text
    is joined to ``gold.corpus`` (latest version, recorded). ``sample = (size, seed)`` first
    takes a seeded random sample (``seeded_sample``), then ``limit`` applies."""
    from models import lake_io

    columns = catalogue.table(table_name).column_names
    wanted = [c for c in ("doc_id", "source", "text") if c in columns]
    rows, read_version = lake_io.read_table_at(settings, table_name, version, wanted)
    info: dict[str, Any] = {"input_table": table_name, "input_version": read_version}
    data = rows.to_pydict()
    ids = sorted(set(data["doc_id"]))
    if sample is not None:
        ids = seeded_sample(ids, *sample)
    if limit is not None:
        ids = ids[:limit]
    if "text" not in data:
        corpus, corpus_version = lake_io.read_table_at(settings, CORPUS, None, ["doc_id", "source", "text"])
        info["corpus_version"] = corpus_version
        data = corpus.to_pydict()
    by_id = {d: (s, t) for d, s, t in zip(data["doc_id"], data.get("source", [None] * len(data["doc_id"])),
                                          data["text"], strict=True)}
    missing = [d for d in ids if d not in by_id]
    if missing:
        raise RuntimeError(f"{len(missing)} selected doc_ids (e.g. {missing[:3]}) are not in {CORPUS}; rerun "
                           "the selection against the current corpus")
    return [SourceDocument(d, *by_id[d]) for d in ids], read_version, info


# ---- per-round teacher budget -------------------------------------------------------------------

def ledger_rounds(ledger: Any) -> dict[str, str]:
    """Key → the KD round whose plan first wrote it to the ledger (its stored lineage)."""
    data = ledger.read(["key", "lineage"]).to_pydict()
    rounds = {}
    for key, lineage in zip(data.get("key", []), data.get("lineage", []), strict=True):
        found = json.loads(lineage).get("round") if lineage else None
        if found:
            rounds[key] = found
    return rounds


def round_calls(ledger: Any, model: str, kd_round: str) -> int:
    """Teacher calls ``model`` spent on the keys ``kd_round`` asked first (ledger accounting)."""
    mine = {key for key, found in ledger_rounds(ledger).items() if found == kd_round}
    return sum(entry.spend().calls for key, entry in ledger.state().items() if key in mine and entry.model == model)


def round_allowance(total_cap: int | None, spent_total: int, round_cap: int | None, spent_round: int) -> int | None:
    """The ledger-wide ``max_calls`` that lets this run spend what both the total cap and the
    round's cap still allow: ``spent_total + min(total left, round left)`` (None: no cap at all)."""
    left = [cap - spent for cap, spent in ((total_cap, spent_total), (round_cap, spent_round)) if cap is not None]
    return None if not left else spent_total + max(0, min(left))


def with_round_cap(settings: Settings, spent_total: int, spent_round: int, round_cap: int | None) -> Settings:
    """Settings whose ``generation.teacher_budget.max_calls`` also enforces the round's cap (the
    engine's ``budget_for`` builds the Budget from it, seeded with the ledger's spend)."""
    caps = settings.generation.teacher_budget
    allowed = round_allowance(caps.max_calls, spent_total, round_cap, spent_round)
    if allowed == caps.max_calls:
        return settings
    capped = caps.model_copy(update={"max_calls": allowed})
    return settings.model_copy(update={"generation": settings.generation.model_copy(update={"teacher_budget": capped})})


# ---- the stage ---------------------------------------------------------------------------------

BatchMode = Literal["wait", "no-wait", "collect"]


def distil(settings: Settings, run_id: str | None = None, *, input_version: int | None = None,
           environ: dict[str, str] | None = None, batch_mode: BatchMode = "wait") -> dict[str, Any]:
    """Run the whole stage; returns the JSON summary (see module docstring).

    ``batch_mode`` (``openai-batch`` backend only): ``wait`` blocks until the batches finish;
    ``no-wait`` submits/resumes and returns; ``collect`` collects finished stored batches.
    """
    from models.generation.backends import make_backend
    from models.generation.engine import budget_for, run_batch_generation, run_generation
    from models.generation.ledger import ABANDONED, FAILED, SUCCEEDED, Ledger

    run_id = run_id or new_run_id("distil")
    config = settings.distil
    teacher = choose_teacher(settings, environ)
    (log.warning if teacher.local else log.info)("distil: %s", teacher.note)

    kd_round, table_name = choose_round(settings)
    sample = (config.initialize_documents, config.initialize_seed) if kd_round == "initialize" else None
    documents, version, input_info = read_documents(settings, table_name, input_version, config.max_documents,
                                                    sample)
    templates = templates_for(settings.prompts, settings.home)
    plan = plan_requests(
        documents, model=teacher.model, templates=templates, prompts=settings.prompts,
        cot_sampling=config.cot_sampling, tool_sampling=config.tool_sampling,
        samples_per_prompt=config.samples_per_prompt,
        lineage={"model_uri": teacher.model_uri, "model_version": teacher.model_version, "round": kd_round,
                 **input_info},
    )
    requests = [p.request for p in plan.requests]
    log.info("distil %s round: %d documents from %s@v%d → %d requests (%s skipped)", kd_round, plan.documents,
             table_name, version, len(requests), dict(plan.skipped))

    settings = with_served_models(settings, teacher.served_models)
    backend = make_backend(settings)
    if batch_mode != "wait" and backend.name != "openai-batch":
        raise ValueError(f"--no-wait/--collect defer a Batch API batch, but the backend is {backend.name!r}: "
                         "use --backend openai-batch (generation.backend)")
    ledger = Ledger.open(settings, LEDGER, run_id=run_id, backend=backend.name)
    round_cap = config.round_max_calls.model_dump()[kd_round]
    round_spent = round_calls(ledger, teacher.model, kd_round)
    budget = budget_for(with_round_cap(settings, ledger.spent(teacher.model).calls, round_spent, round_cap),
                        ledger, backend.name)
    batches: list[dict[str, Any]] | None = None
    if not requests:
        report = None
    elif batch_mode == "no-wait":
        report = run_batch_generation(requests, backend, ledger, budget, wait=False)  # type: ignore[arg-type]
        batches = batch_states(backend, requests, ledger)
    elif batch_mode == "collect":
        report, batches = collect_stored_batches(requests, backend, ledger, budget)
    else:
        report = run_generation(requests, backend, ledger, budget)

    keys = {r.key for r in requests}
    answers, statuses = ledger_answers(ledger_rows(ledger), keys)
    done = {**existing_outcomes(settings, ACCEPTED), **existing_outcomes(settings, REJECTED)}
    rows = sample_rows(plan, answers, prompts=settings.prompts, limits=sandbox_limits(settings.sandbox),
                       run_id=run_id, skip_keys=set(done))
    asked_first = ledger_rounds(ledger)
    for row in rows:  # the round that first asked for the key (the ledger's pending row says which)
        row["round"] = asked_first.get(row["request_key"], kd_round)
    written = write_samples(settings, rows, ACCEPTED, REJECTED)

    outcome = {k: r for k, r in done.items() if k in keys} | {r["request_key"]: r["reason"] for r in rows}
    accepted, rejected = parse_outcomes(outcome.values())
    failed, abandoned = statuses.get(FAILED, 0), statuses.get(ABANDONED, 0)
    if abandoned:  # failed generation.max_attempts_per_key sends: no reply will come (as in synthesize)
        rejected[ABANDONED] += abandoned
    not_sent = len(keys) - statuses.get(SUCCEEDED, 0) - failed - abandoned
    reconcile(len(keys), accepted, rejected, failed, not_sent)
    extra: dict[str, Any] = {"round": kd_round, **input_info, "teacher": teacher.model,
                             "teacher_is_local": teacher.local,
                             "round_calls": {"spent_before": round_spent, "cap": round_cap,
                                             "spent_after": round_calls(ledger, teacher.model, kd_round)}}
    if batches is not None:
        extra.update(batch_mode=batch_mode, batches=batches,
                     awaiting_batch=statuses.get("submitted", 0) + statuses.get("submitting", 0))
    return summary("distil", run_id, teacher.note, plan, report, accepted=accepted, rejected=rejected,
                   failed=failed, not_sent=not_sent, written=written, extra=extra)


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """CLI entry (``jzlake distil``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = apply_overrides(settings, args)
    mode: BatchMode = "no-wait" if getattr(args, "no_wait", False) else \
        "collect" if getattr(args, "collect", False) else "wait"
    return distil(settings, getattr(args, "run_id", None), input_version=getattr(args, "input_version", None),
                  batch_mode=mode)


