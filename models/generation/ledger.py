"""The request ledger: one Delta row per request key, the memory that makes generation exactly-once.

Keyed by ``GenerationRequest.key`` (a hash of model, template id + hash, rendered prompt, sampling
and sample index). Status moves ``pending → [sending →] succeeded | failed | abandoned`` for online
backends and ``pending → submitting → submitted → succeeded | failed`` for the Batch API. A run
reads the ledger first and never sends a key that succeeded or was abandoned.

Two durability modes (``generation.ledger_write_through``; ``auto`` = on for models with a
non-zero price, i.e. paid teachers):

* **write-through** — before a request is sent, a durable ``sending`` row records the call
  (``calls``/``attempts`` + 1 and the reserved worst-case tokens/USD in ``spent_tokens``/
  ``spent_usd``); requests dispatched together share one commit. Every retry adds one call the
  same way before it goes out. Every answer is committed before the engine lets its worker slot
  send again. A SIGKILL therefore loses nothing that was paid for: each answered key is recorded
  (never re-sent) and each call in flight is still counted on reopen (``sending`` rows are spent;
  those keys are sent again, at most ``concurrency`` of them). Cost: two small commits per
  request — UPDATEs (about twice as fast as a MERGE) that rewrite one of the 16 ``key_bucket``
  partitions, so they stay cheap as the ledger grows (``make bench-synthesis`` reports them).
* **buffered** (free local models, mass synthesis) — no ``sending`` rows; answers are MERGEd every
  ``flush_every`` rows or ``flush_seconds`` seconds (a background timer flushes while no answer
  arrives). A killed process loses at most the unflushed buffer: those keys are still pending or
  failed and are simply sent again; no key recorded as succeeded is ever sent again.

Either way the MERGE never overwrites a succeeded row, so two writers cannot turn a success back
into a failure, and a key has exactly one row.

A key whose sends failed ``max_failures`` times (``generation.max_attempts_per_key``; a 4xx such
as "context too long" fails every time) becomes ``abandoned`` and is never sent again, so its shard
can complete. A send cut short by the run itself (stopped, budget exhausted before a retry) does
not count. Raising the setting makes abandoned keys with fewer failures eligible again.

Spend: ``calls`` counts every HTTP attempt (retries included), ``spent_tokens``/``spent_usd`` are
cumulative over all calls of the key. ``spent_by_model`` sums them per model (caps are per model);
``spend_by_shard`` splits one model's spend by shard (see ``models/generation/budget.py``).

Written with the ``deltalake`` package (no JVM), location and schema from the catalogue
(``gold.kd_requests`` for teacher KD, ``gold.synthetic_requests`` for mass synthesis) through
``models.lake_io.table_uri``. The ledger is the one table that deliberately does not follow
lake_io's "stage per shard, commit once" rule: its durability *during* a run is the point (a
staged file would be lost with a killed shard, and its keys paid twice). Shards send disjoint
keys, each MERGE touches only its own keys, and a commit conflict between shards is retried.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.lineage import new_run_id, utc_now
from models.generation.budget import Spend
from models.generation.types import LINEAGE_COLUMNS, GenerationRequest, GenerationResponse

if TYPE_CHECKING:
    import pyarrow as pa

    from jzlake.settings import Settings

log = logging.getLogger("jzlake.generation.ledger")

PENDING, SENDING, SUBMITTING, SUBMITTED = "pending", "sending", "submitting", "submitted"
SUCCEEDED, FAILED, ABANDONED = "succeeded", "failed", "abandoned"
STATUSES = (PENDING, SENDING, SUBMITTING, SUBMITTED, SUCCEEDED, FAILED, ABANDONED)
DONE = (SUCCEEDED, ABANDONED)  # never sent again
COMMIT_RETRIES = 6
KEY_BUCKET_CHARS = 1  # partitions by the key's first hex digit: 16 partitions
# A failed response whose error carries this was cut short by the run (stopped, budget), not by
# the key: it does not count towards ``max_failures``. Backends append it to such errors.
INTERRUPTED = "(interrupted: "
_STATE_COLUMNS = ["key", "status", "model", "attempts", "calls", "failures", "batch_id", "batch_input_file_id",
                  "prompt_tokens", "completion_tokens", "cost_usd", "spent_tokens", "spent_usd"]


@dataclass
class LedgerEntry:
    """What a run needs to know about a key before (and while) sending it."""

    key: str
    status: str
    attempts: int = 0
    calls: int = 0
    batch_id: str | None = None
    batch_input_file_id: str | None = None
    failures: int = 0
    spent_tokens: int = 0
    spent_usd: float = 0.0
    model: str = ""

    def spend(self) -> Spend:
        return Spend(self.calls, self.spent_tokens, self.spent_usd)


def counts_as_failure(response: GenerationResponse) -> bool:
    """A failed answer that is the key's fault (not a run stopped or out of budget mid-retries)."""
    return not response.ok and INTERRUPTED not in (response.error or "")


def key_bucket(key: str) -> str:
    """The ledger partition of ``key``."""
    return key[:KEY_BUCKET_CHARS]


def _sql_literal(value: Any) -> str:
    """A SQL literal for an UPDATE (strings: single quotes doubled; DataFusion has no backslash escapes)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"cannot write {value!r} to the ledger")
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _row_spend(data: dict[str, list[Any]], i: int) -> tuple[int, float]:
    """(tokens, USD) a row has spent; rows written before the cumulative columns fall back to the last answer."""
    tokens = data["spent_tokens"][i]
    if tokens is None:
        tokens = (data["prompt_tokens"][i] or 0) + (data["completion_tokens"][i] or 0)
    usd = data["spent_usd"][i]
    return tokens, usd if usd is not None else (data["cost_usd"][i] or 0.0)


class Ledger:
    """Durable request ledger over one catalogue table (buffered or write-through)."""

    def __init__(self, uri: str, table: catalogue.Table | None = None, *, run_id: str | None = None,
                 backend: str = "", flush_every: int = 32, flush_seconds: float = 5.0,
                 write_through: bool | str = False, max_failures: int | None = 3,
                 storage_options: dict[str, str] | None = None) -> None:
        if write_through not in (True, False, "auto"):
            raise ValueError(f"write_through must be true, false or 'auto', got {write_through!r} "
                             "(setting generation.ledger_write_through)")
        self.uri = uri
        self.table = table or catalogue.table("gold.kd_requests")
        self.run_id = run_id or new_run_id("generate")
        self.backend = backend
        self.flush_every = max(1, flush_every)
        self.flush_seconds = flush_seconds
        self.write_through_mode = write_through
        self.max_failures = max_failures
        self.storage_options = storage_options
        self._entries: dict[str, LedgerEntry] | None = None
        self._before_send: dict[str, LedgerEntry] = {}  # key -> entry as it was before this send
        self._buffer: dict[str, dict[str, Any]] = {}
        self._buffer_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._state_lock = threading.RLock()
        self._last_flush = time.monotonic()
        self._timer: threading.Thread | None = None
        self._stop_timer = threading.Event()
        self._flush_error: BaseException | None = None
        self._schema_checked = False
        self._writer: Any = None  # DeltaTable kept for writes (refreshed incrementally)
        self._bucketed = False  # the table is partitioned by key_bucket (ledgers created before: not)
        self.stats = {"flushes": 0, "rows_written": 0, "flush_seconds": 0.0, "record_seconds": 0.0,
                      "commits": 0, "commit_seconds": 0.0, "marker_commits": 0, "merge_fallbacks": 0}

    @classmethod
    def open(cls, settings: Settings, table_name: str = "gold.kd_requests", **kwargs: Any) -> Ledger:
        """The ledger table of ``table_name`` under the configured lake root."""
        from models.lake_io import table_uri

        config = settings.generation
        kwargs.setdefault("flush_every", config.ledger_flush_every)
        kwargs.setdefault("flush_seconds", config.ledger_flush_seconds)
        kwargs.setdefault("write_through", config.ledger_write_through)
        kwargs.setdefault("max_failures", config.max_attempts_per_key)
        return cls(table_uri(settings, table_name), catalogue.table(table_name), **kwargs)

    @property
    def write_through(self) -> bool:
        """Whether this ledger commits before every send and every answer (``auto`` not resolved yet: no)."""
        return self.write_through_mode is True

    def resolve_write_through(self, paid: bool) -> bool:
        """Settle ``auto``: write-through when the run's models are paid. Returns the mode in force."""
        if self.write_through_mode == "auto":
            self.write_through_mode = bool(paid)
            log.info("ledger %s: %s (generation.ledger_write_through = auto, %s model)", self.table.full_name,
                     "write-through" if paid else "buffered", "a paid" if paid else "no paid")
        return self.write_through

    # ---- reading ---------------------------------------------------------------------------

    def _delta(self) -> Any:
        from deltalake import DeltaTable

        return DeltaTable(self.uri, storage_options=self.storage_options)

    def exists(self) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options)

    def ensure_table(self) -> None:
        """Create the (empty) table from the catalogue schema, or add catalogue columns it lacks."""
        if self._schema_checked:
            return
        from deltalake import DeltaTable

        if not self.exists():
            try:
                DeltaTable.create(self.uri, schema=self.table.arrow_schema(), mode="ignore",
                                  partition_by=list(self.table.partition_by) or None,
                                  name=self.table.full_name, description=self.table.description,
                                  storage_options=self.storage_options)
            except Exception:  # a concurrent creator won the race: fine if the table is there now
                if not self.exists():
                    raise
        self._add_missing_columns()
        self._bucketed = "key_bucket" in self._delta().metadata().partition_columns
        self._schema_checked = True

    def _add_missing_columns(self) -> None:
        """A ledger written before a column was added to the catalogue gets it (null in old rows)."""
        from models.lake_io import add_missing_columns

        added = add_missing_columns(self._delta(), self.table)
        if added:
            log.info("ledger %s: added columns %s", self.table.full_name, added)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole ledger (or some columns) as an Arrow table; empty when it does not exist."""
        import pyarrow as pa

        schema = self.table.arrow_schema()
        if not self.exists():
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        delta = self._delta()
        present = {f.name for f in delta.schema().fields}
        wanted = columns or schema.names
        table = delta.to_pyarrow_table(columns=[c for c in wanted if c in present])
        for name in wanted:  # columns the catalogue has and an older table lacks read as null
            if name not in present:
                table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
        return table.select(wanted)

    def state(self, refresh: bool = False) -> dict[str, LedgerEntry]:
        """Key → entry for every key the ledger holds (cached; ``refresh`` re-reads)."""
        with self._state_lock:
            if self._entries is None or refresh:
                self._entries = self._load()
            return self._entries

    def spent_by_model(self) -> dict[str, Spend]:
        """Calls, tokens and USD recorded per model (what the per-model budgets start from).

        ``sending`` rows (calls in flight when a run died) count at their reserved worst case.
        """
        totals: dict[str, Spend] = {}
        with self._state_lock:
            for entry in self.state().values():
                totals.setdefault(entry.model, Spend()).add(entry.spend())
        return totals

    def spent(self, model: str | None = None) -> Spend:
        """What ``model`` (default: every model) has spent according to the ledger."""
        by_model = self.spent_by_model()
        if model is not None:
            return by_model.get(model, Spend())
        total = Spend()
        for spend in by_model.values():
            total.add(spend)
        return total

    def spend_by_shard(self, model: str, num_shards: int,
                       assign: Callable[[str | None, str], int]) -> list[Spend]:
        """``model``'s spend split over ``num_shards`` by ``assign(doc_id, key) -> shard`` (fresh read)."""
        data = self.read(["key", "model", "doc_id", "calls", "prompt_tokens", "completion_tokens", "cost_usd",
                          "spent_tokens", "spent_usd"]).to_pydict()
        shards = [Spend() for _ in range(num_shards)]
        for i, key in enumerate(data["key"]):
            if data["model"][i] != model:
                continue
            tokens, usd = _row_spend(data, i)
            shards[assign(data["doc_id"][i], key)].add(Spend(data["calls"][i] or 0, tokens, usd))
        return shards

    def _load(self) -> dict[str, LedgerEntry]:
        data = self.read(_STATE_COLUMNS).to_pydict()
        entries: dict[str, LedgerEntry] = {}
        for i, key in enumerate(data["key"]):
            tokens, usd = _row_spend(data, i)
            entry = LedgerEntry(key, data["status"][i], data["attempts"][i] or 0, data["calls"][i] or 0,
                                data["batch_id"][i], data["batch_input_file_id"][i], data["failures"][i] or 0,
                                tokens, usd, data["model"][i] or "")
            if entry.status == ABANDONED and self.max_failures and entry.failures < self.max_failures:
                entry.status = FAILED  # generation.max_attempts_per_key was raised: eligible again
            entries[key] = entry
        return entries

    def counts(self) -> dict[str, int]:
        """Rows per status (fresh read)."""
        statuses = self.read(["status"]).column("status").to_pylist()
        return {status: statuses.count(status) for status in sorted(set(statuses))}

    # ---- rows ------------------------------------------------------------------------------

    def _row(self, request: GenerationRequest, status: str, now: Any, entry: LedgerEntry | None = None,
             **values: Any) -> dict[str, Any]:
        lineage = dict(request.lineage)
        user_turns = [content for role, content in request.messages if role == "user"]
        row: dict[str, Any] = {name: None for name in self.table.column_names}
        row.update(
            key=request.key, status=status, model=request.model, template_id=request.template_id,
            template_hash=request.template_hash, prompt=user_turns[-1] if user_turns else "",
            messages=json.dumps(request.openai_messages(), ensure_ascii=False),
            sampling=json.dumps(request.sampling.as_dict(), sort_keys=True), sample_index=request.sample_index,
            backend=self.backend, model_name=request.model, run_id=self.run_id, created_at=now, updated_at=now,
            lineage=json.dumps(lineage, sort_keys=True, ensure_ascii=False, default=str),
            attempts=0, calls=0, failures=0, prompt_tokens=0, completion_tokens=0, cost_usd=0.0,
            spent_tokens=0, spent_usd=0.0, key_bucket=key_bucket(request.key),
        )
        for name, kind in LINEAGE_COLUMNS.items():
            if lineage.get(name) is not None:
                row[name] = kind(lineage[name])
        if row["seed"] is None and request.sampling.seed is not None:
            row["seed"] = request.sampling.seed
        if entry is not None:  # the counters, as the entry holds them now
            row.update(attempts=entry.attempts, calls=entry.calls, failures=entry.failures,
                       spent_tokens=entry.spent_tokens, spent_usd=entry.spent_usd, batch_id=entry.batch_id,
                       batch_input_file_id=entry.batch_input_file_id)
            row["created_at"] = None  # keep the original insert time (the MERGE does not update it)
        row.update(values)
        return row

    def _entry(self, request: GenerationRequest) -> LedgerEntry:
        state = self.state()
        entry = state.get(request.key)
        if entry is None:
            entry = state[request.key] = LedgerEntry(request.key, PENDING, model=request.model)
        return entry

    # ---- writing ---------------------------------------------------------------------------

    def add_pending(self, requests: Iterable[GenerationRequest]) -> int:
        """Insert a ``pending`` row for every key the ledger does not hold yet (one MERGE)."""
        state = self.state()
        now = utc_now()
        rows = {r.key: self._row(r, PENDING, now) for r in requests if r.key not in state}
        if rows:
            with self._write_lock:
                self._merge(list(rows.values()), insert_only=True)
            with self._state_lock:
                for key, row in rows.items():
                    state[key] = LedgerEntry(key, PENDING, model=row["model"])
        return len(rows)

    def mark_sending(self, items: Sequence[tuple[GenerationRequest, int, float]]) -> None:
        """Note that ``(request, reserved_tokens, reserved_usd)`` items are about to be sent.

        Write-through: one durable commit of ``sending`` rows (one more call and attempt each, the
        reserved worst case added to the key's spend) *before* any of them goes out. Buffered:
        memory only (the answer's row carries the counts).
        """
        now = utc_now()
        rows = []
        with self._state_lock:
            for request, tokens, usd in items:
                entry = self._entry(request)
                self._before_send[request.key] = replace(entry)
                entry.status = SENDING
                entry.calls += 1
                entry.attempts += 1
                entry.spent_tokens += tokens
                entry.spent_usd += usd
                if self.write_through:
                    rows.append(self._row(request, SENDING, now, entry, error=(
                        f"in flight since {now:%Y-%m-%d %H:%M:%S} UTC (run {self.run_id}); counted at its "
                        "reserved worst case until the answer is recorded")))
        if rows:
            self._write_now(rows, marker=True)

    def mark_retry(self, request: GenerationRequest) -> None:
        """One more HTTP attempt of a request in flight (write-through: durable before it is sent)."""
        with self._state_lock:
            entry = self._entry(request)
            entry.calls += 1
            entry.attempts += 1
            row = self._row(request, SENDING, utc_now(), entry) if self.write_through else None
        if row is not None:
            self._write_now([row], marker=True)

    def cancel_sending(self, requests: Iterable[GenerationRequest]) -> None:
        """Undo ``mark_sending`` for requests that were never handed to the backend."""
        now = utc_now()
        rows = []
        with self._state_lock:
            for request in requests:
                before = self._before_send.pop(request.key, None)
                if before is None:
                    continue
                self.state()[request.key] = before
                if self.write_through:
                    rows.append(self._row(request, before.status, now, before))
        if rows:
            self._write_now(rows, marker=True)

    def record(self, request: GenerationRequest, response: GenerationResponse, cost_usd: float,
               calls: int = 1) -> str:
        """The outcome of one send (``calls`` = calls it counted against the cap). Returns the new status.

        Write-through: committed before returning. Buffered: flushed by size, by the timer or by
        ``flush()``.
        """
        started = time.perf_counter()
        with self._state_lock:
            current = self._entry(request)
            before = self._before_send.pop(request.key, None) or replace(current)
            entry = replace(before)
            entry.attempts = before.attempts + response.attempts
            entry.calls = before.calls + calls
            tokens = response.prompt_tokens + response.completion_tokens if response.ok else 0
            entry.spent_tokens = before.spent_tokens + tokens
            entry.spent_usd = before.spent_usd + cost_usd
            entry.failures = before.failures + int(counts_as_failure(response))
            if response.ok:
                entry.status = SUCCEEDED
            elif self.max_failures and entry.failures >= self.max_failures:
                entry.status = ABANDONED
            else:
                entry.status = FAILED
            error = response.error
            if entry.status == ABANDONED:
                error = (f"{error} — abandoned after {entry.failures} failed sends "
                         f"(generation.max_attempts_per_key = {self.max_failures}; raise it to try again)")
            lineage_version = request.lineage.get("model_version")
            row = self._row(
                request, entry.status, utc_now(), entry, response=response.text,
                finish_reason=response.finish_reason, prompt_tokens=response.prompt_tokens,
                completion_tokens=response.completion_tokens, cost_usd=cost_usd, latency_s=response.latency_s,
                error=error, model_version=lineage_version if lineage_version is not None else response.model,
            )
            if current.status == SUCCEEDED and not response.ok:
                entry = current  # a success is final (the MERGE keeps the row too)
            self.state()[request.key] = entry
        self.stats["record_seconds"] += time.perf_counter() - started  # writes are timed by themselves
        if self.write_through:
            self._write_now([row])
        else:
            with self._buffer_lock:
                self._buffer[request.key] = row
                due = (len(self._buffer) >= self.flush_every
                       or time.monotonic() - self._last_flush >= self.flush_seconds)
            if due:
                self.flush()
        return entry.status

    def mark_batch(self, requests: Iterable[GenerationRequest], status: str, *, input_file_id: str,
                   batch_id: str | None = None, calls: int = 0) -> None:
        """Durably note that ``requests`` were uploaded (``submitting``) or submitted in a batch.

        Written immediately (not buffered): this row is what lets a crashed task resume the same
        batch instead of paying for a second one.
        """
        assert status in (SUBMITTING, SUBMITTED), status
        now = utc_now()
        rows = []
        with self._state_lock:
            for request in requests:
                entry = self._entry(request)
                entry.status, entry.batch_id, entry.batch_input_file_id = status, batch_id, input_file_id
                entry.calls += calls
                rows.append(self._row(request, status, now, entry))
        self.flush()
        if rows:
            self._write_now(rows)

    def _write_now(self, rows: list[dict[str, Any]], marker: bool = False) -> None:
        started = time.perf_counter()
        with self._write_lock:  # never concurrently with a background flush
            # Rows of keys the ledger already holds (add_pending ran first): an UPDATE is about twice
            # as fast as a MERGE. Anything else (a missing row, a key already succeeded) takes the MERGE.
            if self._update(rows) != len(rows):
                self._merge(rows)
                self.stats["merge_fallbacks"] += 1
            self.stats["commits"] += 1
            self.stats["marker_commits"] += int(marker)
            self.stats["rows_written"] += len(rows)
            self.stats["commit_seconds"] += time.perf_counter() - started

    def flush(self) -> int:
        """Write the buffered rows now (one MERGE). Returns how many rows were written."""
        with self._write_lock:
            with self._buffer_lock:
                rows, self._buffer = list(self._buffer.values()), {}
                self._last_flush = time.monotonic()
            if not rows:
                return 0
            started = time.perf_counter()
            try:
                self._merge(rows)
            except BaseException:
                with self._buffer_lock:  # keep them for the next attempt (newer rows win)
                    for row in rows:
                        self._buffer.setdefault(row["key"], row)
                raise
            self.stats["flushes"] += 1
            self.stats["rows_written"] += len(rows)
            self.stats["flush_seconds"] += time.perf_counter() - started
            return len(rows)

    def _merge(self, rows: list[dict[str, Any]], insert_only: bool = False) -> None:
        import pyarrow as pa

        self.ensure_table()
        now = utc_now()
        for row in rows:
            if row.get("created_at") is None:
                row["created_at"] = now
        source = pa.Table.from_pylist(rows, schema=self.table.arrow_schema())
        updates = {f"`{c}`": f"s.`{c}`" for c in self.table.column_names
                   if c not in ("key", "created_at", "key_bucket")}

        # The partition column in the join lets the MERGE rewrite only the touched partitions.
        predicate = "t.key_bucket = s.key_bucket AND t.key = s.key" if self._bucketed else "t.key = s.key"

        def merge(delta: Any) -> None:
            merger = delta.merge(source, predicate=predicate, source_alias="s", target_alias="t")
            if not insert_only:
                # A success is final: no later write (a straggler, a second writer) may undo it.
                merger = merger.when_matched_update(updates, predicate=f"t.status <> '{SUCCEEDED}'")
            merger.when_not_matched_insert_all().execute()

        self._commit(merge)

    def _update(self, rows: list[dict[str, Any]]) -> int:
        """UPDATE the existing, not succeeded rows of ``rows`` in one commit; returns rows updated."""
        self.ensure_table()
        keys = [row["key"] for row in rows]
        assignments: dict[str, str] = {}
        for column in self.table.column_names:
            if column in ("key", "created_at", "key_bucket"):
                continue
            if column == "updated_at":
                assignments["`updated_at`"] = "now()"
                continue
            values = [_sql_literal(row.get(column)) for row in rows]
            if len(set(values)) == 1:
                assignments[f"`{column}`"] = values[0]
            else:
                cases = " ".join(f"WHEN {_sql_literal(k)} THEN {v}" for k, v in zip(keys, values, strict=True))
                assignments[f"`{column}`"] = f"CASE `key` {cases} END"
        predicate = f"`key` IN ({', '.join(_sql_literal(k) for k in keys)}) AND `status` <> '{SUCCEEDED}'"
        if self._bucketed:
            buckets = sorted({key_bucket(k) for k in keys})
            predicate = f"`key_bucket` IN ({', '.join(_sql_literal(b) for b in buckets)}) AND {predicate}"
        metrics = self._commit(lambda delta: delta.update(assignments, predicate=predicate))
        return int((metrics or {}).get("num_updated_rows", 0))

    def _commit(self, operation: Callable[[Any], Any]) -> Any:
        """Run a write on the cached table (refreshed incrementally); on a conflict reload and retry."""
        from deltalake.exceptions import CommitFailedError

        self.ensure_table()
        for attempt in range(COMMIT_RETRIES):
            try:
                if self._writer is None:
                    self._writer = self._delta()
                else:
                    self._writer.update_incremental()
                return operation(self._writer)
            except CommitFailedError:  # another writer committed first: re-read and retry
                self._writer = None
                if attempt == COMMIT_RETRIES - 1:
                    raise
                time.sleep(0.05 * 2**attempt)
        return None

    # ---- background flushing ---------------------------------------------------------------

    def start_autoflush(self) -> None:
        """Flush every ``flush_seconds`` from a daemon thread, so a slow stream still lands."""
        if self._timer is not None or self.write_through:
            return
        self._stop_timer.clear()

        def loop() -> None:
            while not self._stop_timer.wait(self.flush_seconds):
                try:
                    self.flush()
                except BaseException as exc:  # surfaced by close()
                    self._flush_error = exc
                    log.exception("ledger flush failed for %s", self.uri)

        self._timer = threading.Thread(target=loop, name="ledger-autoflush", daemon=True)
        self._timer.start()

    def close(self, compact_above_files: int = 64) -> None:
        """Stop the timer, flush what is left, compact small files when there are many."""
        if self._timer is not None:
            self._stop_timer.set()
            self._timer.join(timeout=30)
            self._timer = None
        self.flush()
        if self._flush_error is not None:
            error, self._flush_error = self._flush_error, None
            log.warning("an earlier background flush failed (%s); the final flush succeeded", error)
        if self.exists() and compact_above_files and len(self._delta().file_uris()) > compact_above_files:
            self._delta().optimize.compact()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self.table.full_name} at {self.uri}, run_id={self.run_id})"
