"""What teacher distillation and mass synthesis share: documents → excerpts → prompts →
``GenerationRequest``s, and ledger responses → parsed, validated sample rows.

Both jobs are the same three steps around the engine:

1. ``plan_requests`` — for each document choose its template(s) (seeded, see
   ``prompt_library``), cut an excerpt per template kind, render, and build one request per
   (document, template, sample index) carrying its lineage. Documents without a usable excerpt
   are counted by reason, never silently dropped; one whose prompt repeats an earlier
   document's (same excerpt, same template: same ledger key) is counted as ``duplicate_excerpt``.
2. the engine sends what the ledger has not answered yet (exactly-once, budgets);
3. ``sample_rows`` — read the ledger's answers for the planned keys, parse and validate them
   (tool code in the sandbox) into accepted and rejected rows with lineage.

``reconcile`` checks the invariant every summary reports (``summary``):
``requests = accepted + rejected + failed + not_sent``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.lineage import utc_now
from models.generation.excerpts import Excerpt, cut_excerpt
from models.generation.parsing import ParsedSample, parse_reply, validate_tool
from models.generation.prompt_library import PromptTemplate, choose_template_ids
from models.generation.types import GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from jzlake.settings import PromptSettings, SamplingSettings, SandboxSettings, Settings
    from models.generation.engine import GenerationReport
    from models.generation.ledger import Ledger
    from models.sandbox import SandboxLimits

SKIP_NO_EXCERPT = "no_excerpt"          # no boundary outside math before the cap
SKIP_SHORT_EXCERPT = "excerpt_too_short"  # below prompts.min_excerpt_chars
SKIP_EMPTY_TEXT = "empty_text"
# The same template over the same excerpt text is the same request (the ledger key leaves the
# doc_id out on purpose: one paid call per distinct prompt), so later documents that repeat an
# earlier document's excerpt are skipped; the first one (input order) keeps the request.
SKIP_DUPLICATE_EXCERPT = "duplicate_excerpt"


@dataclass(frozen=True)
class SourceDocument:
    doc_id: str
    source: str | None
    text: str | None


@dataclass(frozen=True)
class PlannedRequest:
    """A request plus what parsing needs that the ledger does not keep (the excerpt, the kind)."""

    request: GenerationRequest
    template: PromptTemplate
    excerpt: Excerpt


@dataclass
class Plan:
    requests: list[PlannedRequest] = field(default_factory=list)
    documents: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # (document, template) pairs by reason

    @property
    def by_key(self) -> dict[str, PlannedRequest]:
        return {p.request.key: p for p in self.requests}


def sampling_params(config: SamplingSettings, seed: int) -> SamplingParams:
    return SamplingParams(temperature=config.temperature, top_p=config.top_p,
                          max_tokens=config.max_tokens, seed=seed)


def plan_requests(
    documents: Iterable[SourceDocument], *, model: str, templates: dict[str, PromptTemplate],
    prompts: PromptSettings, cot_sampling: SamplingSettings, tool_sampling: SamplingSettings,
    samples_per_prompt: int = 1, lineage: dict[str, Any] | None = None,
) -> Plan:
    """One request per (document, chosen template, sample index); see module docstring.

    ``lineage`` (model URI/version, input table/version, shard, ...) is copied into every
    request's lineage next to the per-request fields (doc_id, source, excerpt offsets, stage,
    kind, seed). The sampling seed is ``prompts.seed + sample_index`` so repeated samples of one
    prompt differ on backends that honour seeds.

    Request keys are unique in the plan: a (document, template) whose rendered prompt an earlier
    document already produced is counted as ``duplicate_excerpt`` in ``plan.skipped`` instead.
    """
    plan = Plan()
    base = dict(lineage or {})
    planned_keys: set[str] = set()

    def skip(reason: str, pairs: int = 1) -> None:
        if pairs:
            plan.skipped[reason] += pairs

    for doc in documents:
        plan.documents += 1
        chosen = choose_template_ids(doc.doc_id, doc.source, prompts)
        if not doc.text or not doc.text.strip():
            skip(SKIP_EMPTY_TEXT, len(chosen))
            continue
        cuts: dict[int, Excerpt | None] = {}
        for template_id in chosen:
            template = templates[template_id]
            if template.excerpt_chars not in cuts:
                cuts[template.excerpt_chars] = cut_excerpt(doc.text, template.excerpt_chars)
            excerpt = cuts[template.excerpt_chars]
            if excerpt is None:
                skip(SKIP_NO_EXCERPT)
                continue
            if len(excerpt.text) < prompts.min_excerpt_chars:
                skip(SKIP_SHORT_EXCERPT)
                continue
            messages = template.render(excerpt.text)
            config = tool_sampling if template.kind == "tool" else cot_sampling
            pair: list[PlannedRequest] = []
            for index in range(samples_per_prompt):
                seed = prompts.seed + index
                request_lineage = {
                    **base, "doc_id": doc.doc_id, "source": doc.source, "excerpt_start": excerpt.start,
                    "excerpt_end": excerpt.end, "stage": template.stage, "kind": template.kind, "seed": seed,
                }
                request = GenerationRequest(
                    model=model, messages=messages, sampling=sampling_params(config, seed),
                    template_id=template.id, template_hash=template.sha256, sample_index=index,
                    lineage=request_lineage)
                pair.append(PlannedRequest(request, template, excerpt))
            # all samples of a pair share the prompt: either all of them are new or none is
            if pair and pair[0].request.key in planned_keys:
                skip(SKIP_DUPLICATE_EXCERPT)
                continue
            planned_keys.update(p.request.key for p in pair)
            plan.requests.extend(pair)
    return plan


def sandbox_limits(config: SandboxSettings) -> SandboxLimits:
    from models.sandbox import SandboxLimits

    return SandboxLimits(cpu_seconds=config.cpu_seconds, wall_seconds=config.wall_seconds,
                         memory_bytes=config.memory_mb << 20, max_output_bytes=config.max_output_kb << 10,
                         network_isolation=config.network_isolation,
                         filesystem_isolation=config.filesystem_isolation,
                         allow_weak_isolation=config.allow_weak_isolation, max_disk_bytes=config.max_disk_mb << 20)


def parse_planned(planned: PlannedRequest, text: str | None, finish_reason: str | None,
                  prompts: PromptSettings, limits: SandboxLimits | None) -> ParsedSample:
    """Parse one reply against its own excerpt; tool replies also run in the sandbox."""
    sample = parse_reply(text, finish_reason, planned.template.kind, planned.excerpt.text,
                         copy_ngram=prompts.copy_ngram, max_copy_containment=prompts.max_copy_containment)
    if sample.kind == "tool" and sample.accepted:
        from models.sandbox import run_python

        sample = validate_tool(sample, lambda code: run_python(code, limits))
    return sample


def _lineage_columns(request: GenerationRequest) -> dict[str, Any]:
    lineage = request.lineage
    return {
        "doc_id": lineage.get("doc_id"), "source": lineage.get("source"),
        "excerpt_start": lineage.get("excerpt_start"), "excerpt_end": lineage.get("excerpt_end"),
        "template_id": request.template_id, "template_hash": request.template_hash,
        "stage": lineage.get("stage"), "kind": lineage.get("kind"), "model_name": request.model,
        "model_version": lineage.get("model_version"), "model_uri": lineage.get("model_uri"),
        "sampling": json.dumps(request.sampling.as_dict(), sort_keys=True), "seed": lineage.get("seed"),
        "sample_index": request.sample_index, "input_table": lineage.get("input_table"),
        "input_version": lineage.get("input_version"),
    }


def sample_row(planned: PlannedRequest, sample: ParsedSample, answer: dict[str, Any], run_id: str) -> dict[str, Any]:
    """One output row (accepted or rejected) with the request's lineage.

    ``answer`` is the ledger row (response, finish_reason, token counts, model_version).
    """
    row = {
        "request_key": planned.request.key, "reason": sample.reason, "detail": sample.detail,
        "text": sample.training_text() if sample.accepted else None, "problem": sample.problem,
        "solution": sample.solution, "answer": sample.answer, "code_output": sample.code_output,
        "copy_containment": sample.copy_containment, "finish_reason": answer.get("finish_reason"),
        "prompt_tokens": answer.get("prompt_tokens"), "completion_tokens": answer.get("completion_tokens"),
        "response": answer.get("response"), **_lineage_columns(planned.request),
        # the time the answer was recorded: a re-parse of the same answer gives the same row
        "run_id": run_id, "created_at": answer.get("updated_at") or utc_now(),
    }
    if answer.get("model_version") and not row["model_version"]:
        row["model_version"] = answer["model_version"]  # what the server reported
    return row


def sample_rows(plan: Plan, answers: dict[str, dict[str, Any]], *, prompts: PromptSettings,
                limits: SandboxLimits | None, run_id: str, skip_keys: set[str] | None = None,
                workers: int = 2) -> list[dict[str, Any]]:
    """Parse every succeeded answer of the plan that is not in ``skip_keys`` (already written).

    ``answers``: key → ledger row for keys whose status is ``succeeded``. Tool validation runs
    the sandbox, so parsing fans out over ``workers`` threads (each waits on a subprocess).
    """
    skip = skip_keys or set()
    todo = [(p, answers[p.request.key]) for p in plan.requests
            if p.request.key in answers and p.request.key not in skip]

    def one(item: tuple[PlannedRequest, dict[str, Any]]) -> dict[str, Any]:
        planned, answer = item
        sample = parse_planned(planned, answer.get("response"), answer.get("finish_reason"), prompts, limits)
        return sample_row(planned, sample, answer, run_id)

    if workers <= 1 or len(todo) < 2:
        return [one(item) for item in todo]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, todo))


def ledger_answers(ledger_rows: dict[str, list[Any]], keys: set[str]) -> tuple[dict[str, dict[str, Any]], Counter[str]]:
    """(succeeded key → row, status counts) for ``keys`` from a ledger read as a column dict."""
    answers: dict[str, dict[str, Any]] = {}
    statuses: Counter[str] = Counter()
    names = list(ledger_rows)
    for i, key in enumerate(ledger_rows.get("key", [])):
        if key not in keys:
            continue
        row = {name: ledger_rows[name][i] for name in names}
        statuses[row["status"]] += 1
        if row["status"] == "succeeded":
            answers[key] = row
    return answers, statuses


def batch_states(backend: Any, requests: Iterable[GenerationRequest], ledger: Ledger) -> list[dict[str, Any]]:
    """One poll per stored Batch API batch of ``requests`` (``submitted`` keys in the ledger):
    its id, status and counts, and how many of these requests it holds. Sorted by batch id."""
    groups = _stored_batches(requests, ledger)
    return [{**backend.poll(batch_id).as_dict(), "requests": len(groups[batch_id])} for batch_id in sorted(groups)]


def _stored_batches(requests: Iterable[GenerationRequest], ledger: Ledger) -> dict[str, list[GenerationRequest]]:
    state = ledger.state(refresh=True)
    groups: dict[str, list[GenerationRequest]] = {}
    for request in requests:
        entry = state.get(request.key)
        if entry is not None and entry.status == "submitted" and entry.batch_id:
            groups.setdefault(entry.batch_id, []).append(request)
    return groups


def collect_stored_batches(requests: list[GenerationRequest], backend: Any, ledger: Ledger,
                           budget: Any) -> tuple[GenerationReport, list[dict[str, Any]]]:
    """Collect every *finished* Batch API batch the ledger stores for ``requests``; submit nothing.

    Batches still running are polled once and left alone (their keys stay ``submitted``), so
    this is safe to run at any time, and again: a collected key is ``succeeded``/``failed`` and
    is not collected twice. Returns the report (succeeded/failed as collected now,
    ``skipped_done`` = keys already answered) and each batch's state (``collected`` true/false).
    """
    from models.generation.engine import GenerationReport, collect_batch

    report = GenerationReport(run_id=ledger.run_id, backend=backend.name, ledger=ledger.table.full_name,
                              requested=len(requests), unique=len({r.key for r in requests}))
    state = ledger.state(refresh=True)
    report.skipped_done = sum(1 for r in requests if r.key in state and state[r.key].status == "succeeded")
    groups = _stored_batches(requests, ledger)
    batches = []
    try:
        for batch_id in sorted(groups):
            batch = backend.poll(batch_id)
            if batch.terminal:
                collect_batch(backend, ledger, budget, batch, groups[batch_id], report=report)
            batches.append({**batch.as_dict(), "requests": len(groups[batch_id]), "collected": batch.terminal})
    finally:
        ledger.close()
    report.batches = sorted(groups)
    return report, batches


def reconcile(total: int, accepted: int, rejected: Counter[str], failed: int, not_sent: int) -> None:
    """Raise when the outcome counts do not add up to the planned requests."""
    rejected_total = sum(rejected.values())
    if accepted + rejected_total + failed + not_sent != total:
        raise RuntimeError(
            f"counts do not reconcile: {total} requests != {accepted} accepted + {rejected_total} rejected "
            f"+ {failed} failed + {not_sent} not sent; the ledger and the output tables disagree — rerun "
            "the stage (it is idempotent) and report the ledger rows whose status is unexpected")


def parse_outcomes(reasons: Iterable[str | None]) -> tuple[int, Counter[str]]:
    """(accepted, rejected by reason) over the outcome of each key (``None`` = accepted)."""
    accepted = 0
    rejected: Counter[str] = Counter()
    for reason in reasons:
        if reason:
            rejected[reason] += 1
        else:
            accepted += 1
    return accepted, rejected


# ---- lake I/O shared by the jobs (through models/lake_io.py) ---------------------------------

def with_served_models(settings: Settings, served: dict[str, str]) -> Settings:
    """Settings whose ``generation.served_models`` is ``served`` (validated copy)."""
    if served == settings.generation.served_models:
        return settings
    generation = settings.generation.model_copy(update={"served_models": dict(served)})
    return settings.model_copy(update={"generation": generation})


def ledger_rows(ledger: Ledger) -> dict[str, list[Any]]:
    """The ledger columns parsing needs, as a column dict."""
    columns = ["key", "status", "response", "finish_reason", "prompt_tokens", "completion_tokens",
               "model_version", "updated_at"]
    return ledger.read(columns).to_pydict()


def existing_outcomes(settings: Settings, table_name: str) -> dict[str, str | None]:
    """request_key → reason (``None`` in tables of accepted samples) already written."""
    from models import lake_io

    if lake_io.current_version(settings, table_name) is None:
        return {}
    has_reason = "reason" in catalogue.table(table_name).column_names
    columns = ["request_key", "reason"] if has_reason else ["request_key"]
    data = lake_io.read_table_at(settings, table_name, None, columns)[0].to_pydict()
    reasons = data.get("reason", [None] * len(data["request_key"]))
    return dict(zip(data["request_key"], reasons, strict=True))


def table_columns(table_name: str, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows cut to the catalogue columns of ``table_name``."""
    names = set(catalogue.table(table_name).column_names)
    return [{k: v for k, v in row.items() if k in names} for row in rows]


def write_samples(settings: Settings, rows: list[dict[str, Any]], accepted_table: str,
                  rejected_table: str) -> dict[str, int]:
    """MERGE accepted rows into ``accepted_table`` and rejected ones into ``rejected_table``;
    returns rows inserted per table (an unchanged rerun commits nothing)."""
    from models import lake_io

    written = {}
    for name, part in ((accepted_table, [r for r in rows if not r["reason"]]),
                       (rejected_table, [r for r in rows if r["reason"]])):
        lake_io.ensure_table(settings, name)  # readers find both tables, even when one is empty
        written[name] = lake_io.merge_rows(settings, name, table_columns(name, part))["inserted"] if part else 0
    return written


def summary(stage: str, run_id: str, note: str, plan: Plan, report: GenerationReport | None, *,
            accepted: int, rejected: Counter[str], failed: int, not_sent: int, written: dict[str, int],
            extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary line shared by ``jzlake distil`` and ``jzlake synthesize``."""
    done = report.as_dict() if report is not None else {}
    tokens = done.get("prompt_tokens", 0) + done.get("completion_tokens", 0)
    return {
        "stage": stage, "run_id": run_id, "note": note, **extra,
        "documents": plan.documents, "documents_skipped": dict(sorted(plan.skipped.items())),
        "requests": len(plan.requests), "sent": done.get("sent", 0), "succeeded": done.get("succeeded", 0),
        "skipped_done": done.get("skipped_done", 0), "failed": failed, "not_sent": not_sent,
        "accepted": accepted, "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "prompt_tokens": done.get("prompt_tokens", 0), "completion_tokens": done.get("completion_tokens", 0),
        "tokens": tokens, "cost_usd": done.get("cost_usd", 0.0),
        "budget_exhausted": done.get("budget_exhausted", False), "message": done.get("message"),
        "written": written,
    }
