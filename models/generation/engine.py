"""The generation engine: ledger + budget around any backend — exactly-once, resumable, capped.

``run_generation(requests, backend, ledger, budget) -> GenerationReport``

1. commit answers an earlier run spilled (its commit failed), deduplicate the requests by key and
   read the ledger: keys that already succeeded (or were abandoned after
   ``generation.max_attempts_per_key`` failed sends) are skipped — the server never sees them
   again — and so are keys held by a submitted, unfinished Batch API batch (unless
   ``cancel_batches`` cancels those batches first and collects what they finished); everything
   else gets a ``pending`` row;
2. hand the backend a lazy iterator whose every ``next()`` first reserves the request's worst
   case in the (per-model) budget — the first refusal ends the iterator, so nothing over a cap
   is sent — and notes the send in the ledger; each retry the backend wants reserves one more
   call first (the call cap counts every HTTP attempt);
3. record every response in the ledger as it arrives, settle its reservation with the real
   token counts, attempts and cost;
4. report: sent, succeeded, failed, abandoned, skipped as done, not sent because of the budget,
   tokens, cost.

Write-through ledgers (paid models, and always for a remote endpoint or an API key in use; see
``models/generation/ledger.py``) make step 2 a durable *claim* before the send (one conditional
commit for all requests dispatched together; a key another live run holds is skipped, and the
caps are checked against every run's durable spend) and step 3 durable before the backend may
send again: the iterator blocks while ``concurrency`` requests are sent and not yet committed, so
a SIGKILL can lose at most the calls in flight — which the ledger still counts as spent on reopen,
and which are the only keys a rerun may send a second time.

``run_batch_generation`` is the same contract for the Batch API, where the send is a batch:
its keys are claimed (``submitting``) before the upload — keys another live run holds are
skipped —, the batch id is written to the ledger before any polling, and a rerun resumes stored
batches instead of submitting them again.

Also runnable: ``python -m models.generation.engine --requests FILE.jsonl ...`` (one request per
line, ``GenerationRequest.to_dict`` form); the last stdout line is the JSON report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.generation.budget import Budget, Reservation, shard_allowances
from models.generation.ledger import (
    ABANDONED,
    CLAIM_LOST,
    DONE,
    FAILED,
    IN_BATCH,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    Ledger,
)
from models.generation.types import Backend, GenerationRequest, GenerationResponse

if TYPE_CHECKING:
    from jzlake.settings import Settings
    from models.generation.backends.openai_batch import BatchState, OpenAIBatchBackend

log = logging.getLogger("jzlake.generation.engine")

# Which budget guards which ledger (settings path, used in messages too).
BUDGETS = {"gold.kd_requests": "teacher_budget", "gold.synthetic_requests": "synthesis_budget"}


@dataclass
class GenerationReport:
    """What one run did; ``as_dict`` is the JSON summary line of the CLIs."""

    run_id: str = ""
    backend: str = ""
    ledger: str = ""
    requested: int = 0
    unique: int = 0
    duplicates_in_input: int = 0
    skipped_done: int = 0
    skipped_abandoned: int = 0  # keys abandoned by earlier runs (not sent again)
    skipped_claimed: int = 0  # keys another live run held (or finished) when this run came to them
    skipped_in_batch: int = 0  # keys in a submitted, unfinished Batch API batch (not sent online)
    batches_cancelled: int = 0
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    abandoned: int = 0  # keys that failed for the last allowed time in this run (also in ``failed``)
    not_sent_budget: int = 0
    not_sent_lease: int = 0  # claimed, but the lease left was shorter than the request timeout: not sent
    claims_lost: int = 0  # answered, but another run had taken the key over (its lease expired): not ours
    unanswered: int = 0  # sent, but the backend ended without an answer (left pending)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    retried: int = 0  # responses that needed more than one HTTP attempt
    possibly_billed: int = 0  # attempts that timed out (charged at their worst case)
    budget_exhausted: bool = False
    message: str | None = None
    batches: list[str] = field(default_factory=list)
    batches_created: int = 0
    batches_resumed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    write_through: bool = False
    ledger_flushes: int = 0
    ledger_commits: int = 0  # write-through commits (markers + answers)
    ledger_seconds: float = 0.0
    ledger_spilled: int = 0  # answers whose commit failed, kept in the spill file
    ledger_spills_recovered: int = 0  # spilled answers of earlier runs committed at this start
    warnings: list[str] = field(default_factory=list)

    def add(self, response: GenerationResponse, cost: float, status: str | None = None) -> None:
        if status == CLAIM_LOST:  # paid, but the key's row is another run's now: neither done nor failed here
            self.claims_lost += 1
        elif response.ok:
            self.succeeded += 1
        else:
            if status == ABANDONED:
                self.abandoned += 1
            else:
                self.failed += 1
            kind = (response.error or "unknown").split(":")[0][:60]
            self.errors[kind] = self.errors.get(kind, 0) + 1
        self.prompt_tokens += response.prompt_tokens
        self.completion_tokens += response.completion_tokens
        self.cost_usd += cost
        self.attempts += response.attempts
        self.retried += int(response.attempts > 1)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost_usd"] = round(self.cost_usd, 6)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["ledger_seconds"] = round(self.ledger_seconds, 3)
        return data


def dedupe(requests: Iterable[GenerationRequest]) -> tuple[list[GenerationRequest], int]:
    """Unique requests by key, first occurrence kept, plus how many repeats were dropped."""
    seen: dict[str, GenerationRequest] = {}
    total = 0
    for request in requests:
        total += 1
        seen.setdefault(request.key, request)
    return list(seen.values()), total - len(seen)


@dataclass(frozen=True)
class ShardScope:
    """One shard of a sharded run: its share of the caps is computed from its own partition of the
    ledger (``assign(doc_id, key) -> shard``, the same function that partitions the input)."""

    index: int
    count: int
    model: str
    assign: Callable[[str | None, str], int]


def budget_for(settings: Settings, ledger: Ledger, backend_name: str = "openai", *,
               shard: ShardScope | None = None) -> Budget:
    """The caps that guard ``ledger`` (teacher or synthesis), per model, seeded with what it already spent.

    With ``shard``, the caps are that shard's deterministic share (``budget.shard_allowances``):
    N shards started in any order, restarted any number of times, together stay within the caps.
    """
    section = BUDGETS.get(ledger.table.full_name, "synthesis_budget")
    config = settings.generation
    caps = getattr(config, section)
    factor = config.batch_price_factor if backend_name == "openai-batch" else 1.0
    label = f"generation.{section}"
    if shard is None:
        return Budget.from_settings(caps, config.prices, spent=ledger.spent_by_model(), price_factor=factor,
                                    label=label)
    if not 0 <= shard.index < shard.count:
        raise ValueError(f"shard {shard.index} of {shard.count}: need 0 <= index < count")
    spends = ledger.spend_by_shard(shard.model, shard.count, shard.assign)
    calls = shard_allowances([s.calls for s in spends], caps.max_calls)[shard.index]
    tokens = shard_allowances([s.tokens for s in spends], caps.max_tokens)[shard.index]
    usd = shard_allowances([s.usd for s in spends], caps.max_usd, integer=False)[shard.index]
    own = spends[shard.index]
    budget = Budget(max_calls=None if calls is None else int(calls),
                    max_tokens=None if tokens is None else int(tokens), max_usd=usd, prices=dict(config.prices),
                    price_factor=factor, spent_by_model={shard.model: own.copy()}, label=label,
                    scope=f", shard {shard.index}/{shard.count}'s share of the cap")
    log.info("shard %d/%d of %s: caps calls=%s tokens=%s usd=%s (own spend %s)", shard.index, shard.count,
             label, budget.max_calls, budget.max_tokens, budget.max_usd, own)
    return budget


def _start(requests: Iterable[GenerationRequest], backend: Backend, ledger: Ledger,
           budget: Budget) -> tuple[GenerationReport, list[GenerationRequest]]:
    """Common first steps: commit spills, dedupe, skip done keys, check prices, write pending rows."""
    unique, duplicates = dedupe(requests)
    report = GenerationReport(run_id=ledger.run_id, backend=getattr(backend, "name", type(backend).__name__),
                              ledger=ledger.table.full_name, requested=len(unique) + duplicates,
                              unique=len(unique), duplicates_in_input=duplicates)
    report.ledger_spills_recovered = ledger.recover_spills()
    state = ledger.state()
    todo = [r for r in unique if r.key not in state or state[r.key].status not in DONE]
    report.skipped_abandoned = sum(1 for r in unique if r.key in state and state[r.key].status == ABANDONED)
    report.skipped_done = len(unique) - len(todo) - report.skipped_abandoned
    budget.check_models({r.model for r in todo})
    ledger.add_pending(todo)
    return report, todo


def is_remote(base_url: str | None) -> bool:
    """Whether ``base_url`` points off this machine (anything but localhost / loopback addresses)."""
    import ipaddress
    from urllib.parse import urlparse

    if not base_url:
        return False
    host = (urlparse(base_url).hostname or "").lower()
    if host in ("localhost", "") or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: assume remote


def _hold_batches(report: GenerationReport, ledger: Ledger, budget: Budget, todo: list[GenerationRequest],
                  cancel_batches: OpenAIBatchBackend | None) -> list[GenerationRequest]:
    """Online runs never send a key a submitted, unfinished batch holds (it would be paid twice).

    With ``cancel_batches`` (a Batch API client), those batches are cancelled first and what they
    finished is collected; their other keys are then sent online. Returns the keys to send.
    """
    state = ledger.state()
    held = [r for r in todo if state[r.key].status in IN_BATCH]
    if not held:
        return todo
    by_batch: dict[str | None, list[GenerationRequest]] = {}
    for request in held:
        entry = state[request.key]
        batch_id = entry.batch_id
        if batch_id is None and cancel_batches is not None and entry.batch_input_file_id:
            batch_id = cancel_batches.find_batch_for_file(entry.batch_input_file_id)
        by_batch.setdefault(batch_id, []).append(request)
    if cancel_batches is None:
        report.skipped_in_batch = len(held)
        message = (f"{len(held)} keys are in submitted Batch API batches {sorted(b or '?' for b in by_batch)}, not "
                   "sent online: collect them (jzlake distil --collect), or cancel the batches first "
                   "(--cancel-batch / run_generation(cancel_batches=...))")
        log.warning(message)
        report.warnings.append(message)
        return [r for r in todo if state[r.key].status not in IN_BATCH]
    mode = ledger.write_through_mode  # collecting records buffered; the online run decides its own mode
    for batch_id, group in by_batch.items():
        if batch_id is None:
            continue  # uploaded, never created: no batch can answer these
        cancel_batches.cancel(batch_id)
        report.batches_cancelled += 1
        batch = cancel_batches.wait(batch_id, min(cancel_batches.poll_interval_s, 5.0),
                                    timeout_s=cancel_batches.timeout_s)
        collect_batch(cancel_batches, ledger, budget, batch, group)  # lines it finished are paid: keep them
    ledger.flush()
    ledger.write_through_mode = mode
    state = ledger.state(refresh=True)
    return [r for r in todo if state[r.key].status not in DONE]


def _finish(report: GenerationReport, ledger: Ledger, budget: Budget, started: float) -> GenerationReport:
    report.elapsed_s = time.perf_counter() - started
    report.write_through = ledger.write_through
    report.ledger_flushes = int(ledger.stats["flushes"])
    report.ledger_commits = int(ledger.stats["commits"])
    report.ledger_seconds = float(ledger.stats["flush_seconds"] + ledger.stats["record_seconds"]
                                  + ledger.stats["commit_seconds"])
    report.ledger_spilled = int(ledger.stats["spilled"])
    if budget.exhausted:
        report.budget_exhausted = True
        report.message = (f"{budget.exhausted}; {report.not_sent_budget} requests not sent (still pending "
                          "in the ledger) — raise the cap to continue; keys already done will not be re-sent")
        log.warning(report.message)
    return report


class _Dispatcher:
    """The lazy request stream the backend pulls from: reserve, mark, and (write-through) throttle.

    ``window``: at most this many requests sent and not yet recorded (write-through with a backend
    that pulls from its own thread: its concurrency). Requests are reserved and marked in groups
    of the free slots, so a burst of dispatches costs one ledger commit.
    """

    def __init__(self, todo: list[GenerationRequest], ledger: Ledger, budget: Budget, report: GenerationReport,
                 window: int | None, group: int, request_timeout_s: float | None = None) -> None:
        self.todo = iter(todo)
        self.request_timeout_s = request_timeout_s
        self.refused: list[GenerationRequest] = []  # claimed, not sent: the lease left was too short
        self.ledger, self.budget, self.report = ledger, budget, report
        self.window, self.group = window, max(1, group)
        self.reservations: dict[str, Reservation] = {}
        self.timed_out: dict[str, int] = {}  # key -> attempts that timed out (possibly billed)
        self.ready: deque[GenerationRequest] = deque()  # reserved + marked, not yet handed out
        self.outstanding = 0
        self.closed = False
        self.cond = threading.Condition()

    def stream(self) -> Iterator[GenerationRequest]:
        # Runs wherever the backend pulls (a worker thread for ``openai``). Returning ends the
        # stream; requests in flight still finish.
        while True:
            with self.cond:
                while self.window is not None and self.outstanding >= self.window and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                request = self.ready.popleft() if self.ready else None
                if request is not None:
                    self.outstanding += 1
                free = self.window - self.outstanding if self.window is not None else self.group
            if request is None:
                if not self._dispatch(free):
                    return
                continue
            if not self._lease_covers(request):
                with self.cond:
                    self.outstanding -= 1
                    self.refused.append(request)
                continue
            self.report.sent += 1
            yield request

    def _lease_covers(self, request: GenerationRequest) -> bool:
        """A claimed request goes out only if its lease outlasts the request timeout (renewed once if not):
        a send must never still be running when another run may take the key over."""
        if self.request_timeout_s is None:
            return True
        left = self.ledger.lease_remaining(request.key)
        if left is None or left >= self.request_timeout_s:
            return True
        self.ledger.renew_leases()
        left = self.ledger.lease_remaining(request.key)
        if left is not None and left >= self.request_timeout_s:
            return True
        log.warning("key %s not sent: %.0fs left on this run's lease, shorter than the request timeout "
                    "(%.0fs); the lease could not be renewed", request.key[:12], left or 0.0, self.request_timeout_s)
        return False

    def _dispatch(self, count: int) -> bool:
        """Reserve and claim up to ``count`` requests (one commit). False when none is left to send."""
        while True:
            candidates = [request for _, request in zip(range(count), self.todo, strict=False)]
            if not candidates:
                return False
            claimed, skipped = self.ledger.claim(candidates, self.budget)
            self.report.skipped_claimed += len(skipped)
            if claimed:
                break
            if self.budget.exhausted:
                return False
            # every candidate was held by another run (or finished meanwhile): on to the next ones
        for request, reservation in claimed:
            self.reservations[request.key] = reservation
        with self.cond:
            self.ready.extend(request for request, _ in claimed)
        return True

    def before_retry(self, request: GenerationRequest, attempt: int) -> bool:
        """The backend asks before re-sending: one more call reserved at its worst case (and durably noted)."""
        reservation = self.reservations.get(request.key)
        if reservation is None or self.closed:
            return False
        return self.ledger.claim_retry(request, reservation, self.budget)

    def possibly_billed(self, request: GenerationRequest) -> None:
        """The backend reports an attempt that timed out: the provider may have done (and billed) it."""
        with self.cond:
            self.timed_out[request.key] = self.timed_out.get(request.key, 0) + 1

    def answered(self) -> None:
        with self.cond:
            self.outstanding -= 1
            self.cond.notify_all()

    def close(self) -> None:
        """Stop the stream (a pull waiting for a free slot returns at once)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def take_unsent(self) -> list[GenerationRequest]:
        """Requests reserved and marked but never handed out (call after the backend stopped)."""
        with self.cond:
            unsent = [*self.refused, *self.ready]
            self.report.not_sent_lease = len(self.refused)
            self.ready.clear()
            self.refused.clear()
        return unsent


def _accepts(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` takes the keyword ``name`` (backends written before a hook existed do not)."""
    import inspect

    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def run_generation(requests: Iterable[GenerationRequest], backend: Backend, ledger: Ledger, budget: Budget,
                   *, progress_every: int = 100, cancel_batches: OpenAIBatchBackend | None = None
                   ) -> GenerationReport:
    """Generate every request not yet succeeded in ``ledger``, within ``budget``; see module doc.

    ``cancel_batches``: a Batch API client; keys held by submitted, unfinished batches are then
    sent online after those batches are cancelled (and what they finished is collected).
    Without it such keys are skipped (``report.skipped_in_batch``).
    """
    if getattr(backend, "name", "") == "openai-batch":
        return run_batch_generation(requests, backend, ledger, budget)  # type: ignore[arg-type]
    started = time.perf_counter()
    report, todo = _start(requests, backend, ledger, budget)
    todo = _hold_batches(report, ledger, budget, todo, cancel_batches)
    by_key = {r.key: r for r in todo}
    models = {r.model for r in todo}
    remote = is_remote(getattr(backend, "base_url", None)) or bool(getattr(backend, "api_key_in_use", False))
    if remote:
        for model in sorted(m for m in models if budget.price(m) is None):
            message = (f"model {model} at {getattr(backend, 'base_url', '?')} has no price in generation.prices: "
                       f"its USD spend is recorded as 0 and no USD cap can hold it; set "
                       f"generation.prices.{model} (input_per_1m, output_per_1m)")
            log.warning(message)
            report.warnings.append(message)
    write_through = ledger.resolve_write_through(any(budget.is_paid(m) for m in models), remote=remote)
    if ledger.override_warning:
        report.warnings.append(ledger.override_warning)
    timeout = getattr(backend, "timeout_s", None) if write_through else None
    if timeout is not None and ledger.lease_s < timeout:
        ledger.close()
        raise ValueError(f"generation.ledger_lease_s ({ledger.lease_s:g}s) is shorter than the request timeout "
                         f"({timeout:g}s, generation.request_timeout_s): another run could take a key over while "
                         "its request is still running, and pay for it twice. Raise the lease (default 900) or "
                         "lower the timeout; nothing was sent")
    concurrent = getattr(backend, "pulls_concurrently", False)
    window = int(getattr(backend, "concurrency", 1)) if write_through and concurrent else None
    group = window or int(getattr(backend, "batch_size", 1) or 1)
    dispatcher = _Dispatcher(todo, ledger, budget, report, window, group, timeout)
    if write_through:
        ledger.start_heartbeat()  # renews this run's leases while its requests are in flight
    hooks: dict[str, Any] = {"before_retry": dispatcher.before_retry} if concurrent else {}
    if concurrent and _accepts(backend.generate, "possibly_billed"):
        hooks["possibly_billed"] = dispatcher.possibly_billed

    ledger.start_autoflush()
    stream = backend.generate(dispatcher.stream(), **hooks)
    try:
        for response in stream:
            request, reservation = by_key.get(response.key), dispatcher.reservations.pop(response.key, None)
            if request is None or reservation is None:
                log.warning("backend %s answered key %s that was not sent in this run; ignored",
                            report.backend, response.key)
                continue
            ok = response.ok
            timed_out = dispatcher.timed_out.pop(response.key, 0)
            charged = budget.settle_spend(reservation, response.prompt_tokens if ok else 0,
                                          response.completion_tokens if ok else 0, calls=response.attempts,
                                          possibly_billed=timed_out)
            cost = charged.usd
            report.possibly_billed += timed_out
            status = ledger.record(request, response, cost, calls=response.attempts, charged_tokens=charged.tokens)
            dispatcher.answered()  # write-through: committed, so the slot may send again
            report.add(response, cost, status)
            if progress_every and (report.succeeded + report.failed) % progress_every == 0:
                log.info("%d/%d answered (%d failed)", report.succeeded + report.failed, len(todo), report.failed)
    finally:
        dispatcher.close()
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # the backend stops pulling and joins its worker
        unsent = dispatcher.take_unsent()
        for request in unsent:  # reserved and marked, never handed to the backend
            budget.release(dispatcher.reservations.pop(request.key))
        for reservation in dispatcher.reservations.values():
            # sent, never answered: a write-through ledger keeps them ``sending`` (counted as spent
            # on reopen); either way the next run sends them again
            budget.release(reservation)
        report.unanswered = len(dispatcher.reservations)
        try:
            ledger.cancel_sending(unsent)
        finally:
            ledger.close()
    report.not_sent_budget = len(todo) - report.sent - report.skipped_claimed - report.not_sent_lease
    if report.claims_lost:
        message = (f"{report.claims_lost} answers not recorded: another run took their keys over after this "
                   "run's lease (generation.ledger_lease_s) expired — they were paid twice; they are counted "
                   "in claims_lost, not in succeeded")
        log.warning(message)
        report.warnings.append(message)
    return _finish(report, ledger, budget, started)


# ---- Batch API ------------------------------------------------------------------------------

def run_batch_generation(requests: Iterable[GenerationRequest], backend: OpenAIBatchBackend, ledger: Ledger,
                         budget: Budget, *, wait: bool = True, poll_interval_s: float | None = None,
                         timeout_s: float | None = None, metadata: dict[str, str] | None = None,
                         sleep: Callable[[float], None] = time.sleep) -> GenerationReport:
    """Submit what is not done as Batch API batches, resume stored batches, collect results.

    With ``wait=False`` it returns after submission (``report.batches`` lists the ids to poll:
    an Airflow sensor/trigger calls ``backend.poll`` and then ``collect_batch``).
    """
    started = time.perf_counter()
    report, todo = _start(requests, backend, ledger, budget)
    _batch_ledger(ledger)
    state = ledger.state()
    submitted: dict[str, list[GenerationRequest]] = {}
    uploaded: dict[str, list[GenerationRequest]] = {}
    fresh: list[GenerationRequest] = []
    for request in todo:
        entry = state[request.key]
        if entry.status == SUBMITTED and entry.batch_id:
            submitted.setdefault(entry.batch_id, []).append(request)
        elif entry.status == SUBMITTING and entry.batch_input_file_id:
            uploaded.setdefault(entry.batch_input_file_id, []).append(request)
        else:
            fresh.append(request)
    metadata = {"jzlake_ledger": ledger.table.full_name, "jzlake_run_id": ledger.run_id, **(metadata or {})}
    reservations: dict[str, Reservation] = {}
    not_uploaded: list[GenerationRequest] = []  # claimed by this run, not in an uploaded file yet
    ledger.start_heartbeat()  # an upload of a big file may take a while: the claims stay this run's
    try:
        report.batches_resumed = len(submitted)
        # Uploaded but the batch id never reached the ledger: take the claim over (its run is dead
        # or its lease expired), then find the batch, or create it once.
        for file_id, group in uploaded.items():
            taken, held = ledger.claim(group, None, status=SUBMITTING)
            if held:  # another live run is creating this file's batch (or took some keys): leave it
                ledger.cancel_sending([r for r, _ in taken])
                report.skipped_claimed += len(group)
                continue
            batch_id = backend.find_batch_for_file(file_id)
            if batch_id is None:
                batch_id = backend.create(file_id, metadata)
                report.batches_created += 1
            else:
                report.batches_resumed += 1
            ledger.mark_batch(group, SUBMITTED, input_file_id=file_id, batch_id=batch_id)
            submitted[batch_id] = group
        for group in submitted.values():  # already paid for: hold their tokens, no new call
            for request in group:
                reservation = budget.reserve(request, count_call=False, force=True)
                assert reservation is not None
                reservations[request.key] = reservation
        # Fresh keys: claimed (``submitting``, one conditional commit per batch) before the upload, so
        # no online run and no second Batch run sends them too; keys another live run holds are skipped.
        size = max(1, backend.max_requests_per_batch)
        skipped_fresh = 0
        for start in range(0, len(fresh), size):
            claimed, held = ledger.claim(fresh[start:start + size], budget, status=SUBMITTING)
            skipped_fresh += len(held)
            chunk = [request for request, _ in claimed]
            for request, reservation in claimed:
                if reservation is not None:
                    reservations[request.key] = reservation
            if chunk:
                not_uploaded = chunk
                file_id = backend.upload(chunk)
                ledger.mark_batch(chunk, SUBMITTING, input_file_id=file_id)
                not_uploaded = []
                batch_id = backend.create(file_id, metadata)
                ledger.mark_batch(chunk, SUBMITTED, input_file_id=file_id, batch_id=batch_id)  # before any poll
                submitted[batch_id] = chunk
                report.batches_created += 1
                report.sent += len(chunk)
            if budget.exhausted:
                break
        report.skipped_claimed += skipped_fresh
        report.not_sent_budget = len(fresh) - report.sent - skipped_fresh
        report.batches = sorted(submitted)
        if wait:
            for batch_id, group in submitted.items():
                batch = backend.wait(batch_id, poll_interval_s, timeout_s, sleep=sleep)
                collect_batch(backend, ledger, budget, batch, group, reservations=reservations, report=report)
    finally:
        for reservation in reservations.values():
            budget.release(reservation)
        try:
            ledger.cancel_sending(not_uploaded)  # claimed, never uploaded: claimable again at once
        finally:
            ledger.close()
    return _finish(report, ledger, budget, started)


def _batch_ledger(ledger: Ledger) -> None:
    # The Batch API needs no write-through for answers: what is paid for is the batch, claimed before
    # the upload and whose id ``mark_batch`` writes at once, and its results stay downloadable — so
    # results are recorded buffered.
    ledger.write_through_mode = False


def collect_batch(backend: OpenAIBatchBackend, ledger: Ledger, budget: Budget, batch: BatchState,
                  requests: Sequence[GenerationRequest], *, reservations: dict[str, Reservation] | None = None,
                  report: GenerationReport | None = None) -> GenerationReport:
    """Record a terminal batch's results in the ledger (the step after a deferred poll)."""
    report = report if report is not None else GenerationReport(
        run_id=ledger.run_id, backend=backend.name, ledger=ledger.table.full_name)
    _batch_ledger(ledger)
    by_key = {r.key: r for r in requests}
    state = ledger.state()
    for response in backend.results(batch, by_key):
        entry = state.get(response.key)
        if entry is not None and entry.status == SUCCEEDED:
            continue  # collected before (a rerun of the collect step)
        request = by_key[response.key]
        ok = response.ok
        prompt_tokens, completion_tokens = (response.prompt_tokens, response.completion_tokens) if ok else (0, 0)
        reservation = (reservations or {}).pop(response.key, None)
        if reservation is not None:
            cost = budget.settle(reservation, prompt_tokens, completion_tokens)
        else:
            cost = budget.cost(request.model, prompt_tokens, completion_tokens)
        status = ledger.record(request, response, cost, calls=0)  # the call was counted when submitted
        report.add(response, cost, status)
    ledger.flush()
    return report


# ---- CLI (subprocess runs, benchmarks) --------------------------------------------------------

def read_requests(path: str | Path) -> list[GenerationRequest]:
    """Requests from a JSONL file written with ``GenerationRequest.to_dict``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            requests.append(GenerationRequest.from_dict(json.loads(line)))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a GenerationRequest ({exc}); write lines with "
                             "GenerationRequest.to_dict()") from exc
    return requests


def write_requests(path: str | Path, requests: Iterable[GenerationRequest]) -> None:
    Path(path).write_text("".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in requests),
                          encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.generation.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", required=True, help="JSONL file of GenerationRequest.to_dict() lines")
    parser.add_argument("--ledger", default="gold.kd_requests", choices=sorted(BUDGETS), help="ledger table")
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--lake-root", help="lake root (overrides the config)")
    parser.add_argument("--backend", help="openai | openai-batch | vllm | transformers (default: settings)")
    parser.add_argument("--base-url", help="OpenAI-compatible base URL (default: settings)")
    parser.add_argument("--served-model", action="append", default=[], metavar="NAME=SERVED",
                        help="send model NAME as SERVED (a local server wants its model path)")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--timeout-s", type=float, help="per-request timeout")
    parser.add_argument("--max-retries", type=int)
    parser.add_argument("--max-calls", type=int, help="override the ledger's call cap")
    parser.add_argument("--max-tokens", type=int, help="override the ledger's token cap")
    parser.add_argument("--max-usd", type=float, help="override the ledger's USD cap")
    parser.add_argument("--flush-every", type=int, help="ledger flush every N responses")
    parser.add_argument("--flush-seconds", type=float, help="ledger flush every T seconds")
    parser.add_argument("--write-through", choices=("auto", "true", "false"),
                        help="ledger write-through (default: generation.ledger_write_through)")
    parser.add_argument("--max-attempts-per-key", type=int, help="failed sends before a key is abandoned")
    parser.add_argument("--poll-interval-s", type=float, help="Batch API poll interval")
    parser.add_argument("--no-wait", action="store_true", help="Batch API: submit and return")
    parser.add_argument("--cancel-batch", action="store_true",
                        help="online: cancel submitted, unfinished batches holding these keys first (their "
                             "finished lines are collected), then send the rest online")
    parser.add_argument("--run-id", help="run id stamped on ledger rows (default: a new one)")
    return parser


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    generation: dict[str, Any] = {}
    for flag, name in (("backend", "backend"), ("base_url", "base_url"), ("concurrency", "concurrency"),
                       ("timeout_s", "request_timeout_s"), ("max_retries", "max_retries"),
                       ("flush_every", "ledger_flush_every"), ("flush_seconds", "ledger_flush_seconds"),
                       ("poll_interval_s", "batch_poll_interval_s"),
                       ("max_attempts_per_key", "max_attempts_per_key")):
        if getattr(args, flag) is not None:
            generation[name] = getattr(args, flag)
    if args.write_through is not None:
        generation["ledger_write_through"] = {"true": True, "false": False}.get(args.write_through, "auto")
    if args.served_model:
        from jzlake.cli import parse_key_values

        generation["served_models"] = parse_key_values(args.served_model, "--served-model")
    caps = {k: getattr(args, k) for k in ("max_calls", "max_tokens", "max_usd") if getattr(args, k) is not None}
    if caps:
        generation[BUDGETS[args.ledger]] = caps
    overrides: dict[str, Any] = {"generation": generation} if generation else {}
    if args.lake_root:
        overrides["lake"] = {"root": args.lake_root}
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    from jzlake.settings import load_settings
    from models.generation.backends import make_backend

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    settings = load_settings(args.config, overrides=settings_overrides(args))
    backend = make_backend(settings)
    ledger = Ledger.open(settings, args.ledger, run_id=args.run_id, backend=backend.name)
    budget = budget_for(settings, ledger, backend.name)
    requests = read_requests(args.requests)
    if backend.name == "openai-batch":
        report = run_batch_generation(requests, backend, ledger, budget, wait=not args.no_wait)  # type: ignore[arg-type]
    else:
        batches = make_backend(settings, "openai-batch") if args.cancel_batch else None
        report = run_generation(requests, backend, ledger, budget, cancel_batches=batches)  # type: ignore[arg-type]
    print(json.dumps(report.as_dict(), sort_keys=True))
    return 0 if report.failed == 0 and report.abandoned == 0 else 3


__all__ = ["ABANDONED", "FAILED", "GenerationReport", "ShardScope", "budget_for", "collect_batch", "dedupe",
           "read_requests", "run_batch_generation", "run_generation", "write_requests"]

if __name__ == "__main__":
    sys.exit(main())
