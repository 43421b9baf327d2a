"""The request ledger: one Delta row per request key, the memory that makes generation exactly-once.

Keyed by ``GenerationRequest.key`` (a hash of model, template id + hash, rendered prompt, sampling
and sample index). Status moves ``pending → succeeded | failed`` for online backends and
``pending → submitting → submitted → succeeded | failed`` for the Batch API. A run reads the
ledger first and never sends a key that already succeeded.

Durability: results are buffered and MERGEd on ``key`` every ``flush_every`` rows or
``flush_seconds`` seconds (a background timer flushes even while no new answer arrives). A
killed process therefore loses at most the unflushed buffer; those keys are still pending or
failed and are simply sent again, and no key recorded as succeeded is ever sent again. The
MERGE never overwrites a succeeded row, so two writers cannot turn a success back into a
failure, and a key has exactly one row.

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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.lineage import new_run_id, utc_now
from models.generation.budget import Spend
from models.generation.types import LINEAGE_COLUMNS, GenerationRequest, GenerationResponse

if TYPE_CHECKING:
    import pyarrow as pa

    from jzlake.settings import Settings

log = logging.getLogger("jzlake.generation.ledger")

PENDING, SUBMITTING, SUBMITTED, SUCCEEDED, FAILED = "pending", "submitting", "submitted", "succeeded", "failed"
STATUSES = (PENDING, SUBMITTING, SUBMITTED, SUCCEEDED, FAILED)
COMMIT_RETRIES = 6
_STATE_COLUMNS = ["key", "status", "attempts", "calls", "batch_id", "batch_input_file_id",
                  "prompt_tokens", "completion_tokens", "cost_usd"]


@dataclass
class LedgerEntry:
    """What a run needs to know about a key before sending it."""

    key: str
    status: str
    attempts: int = 0
    calls: int = 0
    batch_id: str | None = None
    batch_input_file_id: str | None = None


class Ledger:
    """Buffered, durable request ledger over one catalogue table."""

    def __init__(self, uri: str, table: catalogue.Table | None = None, *, run_id: str | None = None,
                 backend: str = "", flush_every: int = 32, flush_seconds: float = 5.0,
                 storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.table = table or catalogue.table("gold.kd_requests")
        self.run_id = run_id or new_run_id("generate")
        self.backend = backend
        self.flush_every = max(1, flush_every)
        self.flush_seconds = flush_seconds
        self.storage_options = storage_options
        self._entries: dict[str, LedgerEntry] | None = None
        self._spent = Spend()
        self._buffer: dict[str, dict[str, Any]] = {}
        self._buffer_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._timer: threading.Thread | None = None
        self._stop_timer = threading.Event()
        self._flush_error: BaseException | None = None
        self.stats = {"flushes": 0, "rows_written": 0, "flush_seconds": 0.0, "record_seconds": 0.0}

    @classmethod
    def open(cls, settings: Settings, table_name: str = "gold.kd_requests", **kwargs: Any) -> Ledger:
        """The ledger table of ``table_name`` under the configured lake root."""
        from models.lake_io import table_uri

        kwargs.setdefault("flush_every", settings.generation.ledger_flush_every)
        kwargs.setdefault("flush_seconds", settings.generation.ledger_flush_seconds)
        return cls(table_uri(settings, table_name), catalogue.table(table_name), **kwargs)

    # ---- reading ---------------------------------------------------------------------------

    def _delta(self) -> Any:
        from deltalake import DeltaTable

        return DeltaTable(self.uri, storage_options=self.storage_options)

    def exists(self) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options)

    def ensure_table(self) -> None:
        """Create the (empty) table from the catalogue schema if it does not exist yet."""
        if self.exists():
            return
        from deltalake import DeltaTable

        try:
            DeltaTable.create(self.uri, schema=self.table.arrow_schema(), mode="ignore",
                              name=self.table.full_name, description=self.table.description,
                              storage_options=self.storage_options)
        except Exception:  # a concurrent creator won the race: fine if the table is there now
            if not self.exists():
                raise

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole ledger (or some columns) as an Arrow table; empty when it does not exist."""
        import pyarrow as pa

        if not self.exists():
            schema = self.table.arrow_schema()
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        return self._delta().to_pyarrow_table(columns=columns)

    def state(self, refresh: bool = False) -> dict[str, LedgerEntry]:
        """Key → entry for every key the ledger holds (cached; ``refresh`` re-reads)."""
        if self._entries is None or refresh:
            self._entries, self._spent = self._load()
        return self._entries

    def spent(self) -> Spend:
        """Calls, tokens and USD the ledger has recorded (what the budget starts from)."""
        self.state()
        return Spend(self._spent.calls, self._spent.tokens, self._spent.usd)

    def _load(self) -> tuple[dict[str, LedgerEntry], Spend]:
        data = self.read(_STATE_COLUMNS).to_pydict()
        entries: dict[str, LedgerEntry] = {}
        spend = Spend()
        for i, key in enumerate(data["key"]):
            entries[key] = LedgerEntry(key, data["status"][i], data["attempts"][i] or 0, data["calls"][i] or 0,
                                       data["batch_id"][i], data["batch_input_file_id"][i])
            spend.calls += data["calls"][i] or 0
            spend.tokens += (data["prompt_tokens"][i] or 0) + (data["completion_tokens"][i] or 0)
            spend.usd += data["cost_usd"][i] or 0.0
        return entries, spend

    def counts(self) -> dict[str, int]:
        """Rows per status (fresh read)."""
        statuses = self.read(["status"]).column("status").to_pylist()
        return {status: statuses.count(status) for status in sorted(set(statuses))}

    # ---- rows ------------------------------------------------------------------------------

    def _row(self, request: GenerationRequest, status: str, now: Any, **values: Any) -> dict[str, Any]:
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
            attempts=0, calls=0, prompt_tokens=0, completion_tokens=0, cost_usd=0.0,
        )
        for name, kind in LINEAGE_COLUMNS.items():
            if lineage.get(name) is not None:
                row[name] = kind(lineage[name])
        if row["seed"] is None and request.sampling.seed is not None:
            row["seed"] = request.sampling.seed
        row.update(values)
        return row

    def _entry(self, key: str) -> LedgerEntry | None:
        return self.state().get(key)

    # ---- writing ---------------------------------------------------------------------------

    def add_pending(self, requests: Iterable[GenerationRequest]) -> int:
        """Insert a ``pending`` row for every key the ledger does not hold yet (one MERGE)."""
        state = self.state()
        now = utc_now()
        rows = {r.key: self._row(r, PENDING, now) for r in requests if r.key not in state}
        if rows:
            with self._write_lock:
                self._merge(list(rows.values()), insert_only=True)
            for key in rows:
                state[key] = LedgerEntry(key, PENDING)
        return len(rows)

    def record(self, request: GenerationRequest, response: GenerationResponse, cost_usd: float,
               calls: int = 1) -> None:
        """Buffer the outcome of one call; flushed by size, by the timer, or by ``flush()``."""
        started = time.perf_counter()
        entry = self._entry(request.key) or LedgerEntry(request.key, PENDING)
        entry.attempts += response.attempts
        entry.calls += calls
        entry.status = SUCCEEDED if response.ok else FAILED
        lineage_version = request.lineage.get("model_version")
        row = self._row(
            request, entry.status, utc_now(), response=response.text, finish_reason=response.finish_reason,
            prompt_tokens=response.prompt_tokens, completion_tokens=response.completion_tokens,
            cost_usd=cost_usd, latency_s=response.latency_s, error=response.error,
            attempts=entry.attempts, calls=entry.calls, batch_id=entry.batch_id,
            batch_input_file_id=entry.batch_input_file_id,
            model_version=lineage_version if lineage_version is not None else response.model,
        )
        row["created_at"] = None  # keep the original insert time (the MERGE does not update it)
        self.state()[request.key] = entry
        with self._buffer_lock:
            self._buffer[request.key] = row
            due = (len(self._buffer) >= self.flush_every
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
        self.stats["record_seconds"] += time.perf_counter() - started
        if due:
            self.flush()

    def mark_batch(self, requests: Iterable[GenerationRequest], status: str, *, input_file_id: str,
                   batch_id: str | None = None, calls: int = 0) -> None:
        """Durably note that ``requests`` were uploaded (``submitting``) or submitted in a batch.

        Written immediately (not buffered): this row is what lets a crashed task resume the same
        batch instead of paying for a second one.
        """
        assert status in (SUBMITTING, SUBMITTED), status
        now = utc_now()
        rows = []
        for request in requests:
            entry = self._entry(request.key) or LedgerEntry(request.key, PENDING)
            entry.status, entry.batch_id, entry.batch_input_file_id = status, batch_id, input_file_id
            entry.calls += calls
            row = self._row(request, status, now, batch_id=batch_id, batch_input_file_id=input_file_id,
                            attempts=entry.attempts, calls=entry.calls)
            row["created_at"] = None
            rows.append(row)
            self.state()[request.key] = entry
        self.flush()
        if rows:
            with self._write_lock:  # never concurrently with a background flush
                self._merge(rows)

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
        from deltalake.exceptions import CommitFailedError

        self.ensure_table()
        now = utc_now()
        for row in rows:
            if row.get("created_at") is None:
                row["created_at"] = now
        source = pa.Table.from_pylist(rows, schema=self.table.arrow_schema())
        updates = {f"`{c}`": f"s.`{c}`" for c in self.table.column_names if c not in ("key", "created_at")}
        for attempt in range(COMMIT_RETRIES):
            try:
                merger = self._delta().merge(source, predicate="t.key = s.key", source_alias="s",
                                             target_alias="t")
                if not insert_only:
                    # A success is final: no later write (a straggler, a second writer) may undo it.
                    merger = merger.when_matched_update(updates, predicate=f"t.status <> '{SUCCEEDED}'")
                merger.when_not_matched_insert_all().execute()
                return
            except CommitFailedError:  # another writer committed first: re-read and retry
                if attempt == COMMIT_RETRIES - 1:
                    raise
                time.sleep(0.05 * 2**attempt)

    # ---- background flushing ---------------------------------------------------------------

    def start_autoflush(self) -> None:
        """Flush every ``flush_seconds`` from a daemon thread, so a slow stream still lands."""
        if self._timer is not None:
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
