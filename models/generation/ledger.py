"""The request ledger: one Delta row per request key, the memory that makes generation exactly-once.

Keyed by ``GenerationRequest.key`` (a hash of model, template id + hash, rendered prompt, sampling
and sample index). Status moves ``pending → [sending →] succeeded | failed | abandoned`` for online
backends and ``pending → submitting → submitted → succeeded | failed`` for the Batch API. A run
reads the ledger first and never sends a key that succeeded or was abandoned, nor (online) a key
held by a submitted, unfinished batch (``run_generation(cancel_batches=...)`` cancels those first).
A Batch API run claims its keys (``submitting``, the same conditional commit as an online claim)
before it uploads them: it skips keys a live online run holds, and a second Batch run started on
the same keys skips them too (then resumes the first one's stored batch).

Two durability modes (``generation.ledger_write_through``; always write-through for a model with a
non-zero price, a remote endpoint or an API key in use, whatever the setting — a loopback gateway
such as a LiteLLM proxy can front a paid API; ``false`` is then overridden with a warning):

* **write-through** — a key is *claimed* before it is sent: one conditional UPDATE per group of
  requests dispatched together sets ``sending``, ``calls``/``attempts`` + 1, the reserved worst
  case added to ``spent_tokens``/``spent_usd``, the claimant (``claim_run_id``, ``claim_id``) and a
  lease (``lease_expires_at``, ``generation.ledger_lease_s``). The UPDATE runs on the snapshot the
  claim decision was read from and matches each key only in the status and counts read there;
  delta-rs refuses the commit when another writer changed those rows' files meanwhile (a commit
  conflict), and the claim is re-decided on a fresh read. So two processes never both claim a key:
  only claimed keys are sent. Spend is summed from the durable rows at every claim (every run's
  reservations included) and checked again whenever another writer committed between the read and
  the claim, so the caps hold across processes (see ``claim``). The claimant id names its process
  by boot id, PID-namespace inode, pid and start time (``process_identity``). A ``sending`` key is
  taken over only from a claimant *provably dead* — same boot and PID namespace, and its pid gone
  or reused (another start time) — or, when its liveness cannot be known (another host or
  namespace), after its lease expired; a claimant provably alive on this host is never taken over.
  The lease (``generation.ledger_lease_s``) is renewed every lease/3 while the run holds keys (one
  conditional UPDATE for all of them, conflict-tolerant: ``start_heartbeat``), must be at least the
  request timeout, and a request is not sent when less than its timeout is left. An answer whose
  claim was taken over meanwhile is not written and is reported lost (``claims_lost``), not
  succeeded. A lost call stays counted. Every retry is one more claimed call at the worst case,
  committed before it goes out (and renews the lease); every answer is committed before the
  engine lets its worker slot send again. A SIGKILL therefore loses nothing that was paid for:
  each answered key is recorded (never re-sent) and each call in flight is still counted on
  reopen; those keys — at most ``concurrency`` — are the only ones a rerun may send a second time.
  Cost: two small commits per request — UPDATEs that rewrite one of the 16 ``key_bucket``
  partitions (``make bench-synthesis`` reports them) — plus one lease renewal per lease/3.
* **buffered** (free local models, mass synthesis) — no claims; answers are MERGEd every
  ``flush_every`` rows or ``flush_seconds`` seconds (a background timer flushes while no answer
  arrives). A killed process loses at most the unflushed buffer: those keys are still pending or
  failed and are simply sent again; no key recorded as succeeded is ever sent again. One writer
  per key set (shards send disjoint keys).

Either way a succeeded row is never overwritten, so two writers cannot turn a success back into a
failure, and a key has exactly one row. A commit that conflicts is retried with exponential
backoff and jitter up to ``generation.ledger_commit_deadline_s``; an answer that still cannot be
committed is *spilled* to a local file (``<runs_dir>/ledger_spill/<table>/``) and committed by the
next run's start instead of being bought again — line by line: a damaged line (a crash mid-append)
is quarantined to a ``.bad`` file with a warning naming it, and a ``.committing-`` file left by a
recoverer that died is taken over. Text that UTF-8 cannot hold (a lone surrogate in a reply) is
stored with U+FFFD in its place and the row flagged (``flags``).

A key whose sends failed ``max_failures`` times (``generation.max_attempts_per_key``; a 4xx such
as "context too long" fails every time) becomes ``abandoned`` and is never sent again, so its shard
can complete. A send cut short by the run itself (stopped, budget exhausted before a retry, a batch
that expired) does not count. Raising the setting makes abandoned keys with fewer failures
eligible again.

Spend: ``calls`` counts every HTTP attempt (retries included), ``spent_tokens``/``spent_usd`` are
cumulative over all calls of the key (an attempt that timed out at its worst case: it may have
been billed). ``spent_by_model`` sums them per model (caps are per model); ``spend_by_shard``
splits one model's spend by shard (see ``models/generation/budget.py``).

Written with the ``deltalake`` package (no JVM), location and schema from the catalogue
(``gold.kd_requests`` for teacher KD, ``gold.synthetic_requests`` for mass synthesis) through
``models.lake_io.table_uri``. The ledger is the one table that deliberately does not follow
lake_io's "stage per shard, commit once" rule: its durability *during* a run is the point (a
staged file would be lost with a killed shard, and its keys paid twice).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.lineage import new_run_id, utc_now
from jzlake.uris import delta_table
from models.generation.budget import Budget, Reservation, Spend
from models.generation.types import LINEAGE_COLUMNS, GenerationRequest, GenerationResponse

if TYPE_CHECKING:
    import pyarrow as pa

    from jzlake.settings import Settings

log = logging.getLogger("jzlake.generation.ledger")

PENDING, SENDING, SUBMITTING, SUBMITTED = "pending", "sending", "submitting", "submitted"
SUCCEEDED, FAILED, ABANDONED = "succeeded", "failed", "abandoned"
STATUSES = (PENDING, SENDING, SUBMITTING, SUBMITTED, SUCCEEDED, FAILED, ABANDONED)
DONE = (SUCCEEDED, ABANDONED)  # never sent again
DEAD, ALIVE, UNKNOWN = "dead", "alive", "unknown"  # what a claim's holder is known to be
# ``record``'s outcome when this run's claim was taken over before its answer could be written
CLAIM_LOST = "claim_lost"
IN_BATCH = (SUBMITTING, SUBMITTED)  # held by a Batch API batch: not sent online
KEY_BUCKET_CHARS = 1  # partitions by the key's first hex digit: 16 partitions
COMMIT_BACKOFF_S = (0.02, 2.0)  # first and largest step of the commit retries' backoff
# A failed response whose error carries this was cut short by the run (stopped, budget), not by
# the key: it does not count towards ``max_failures``. Backends append it to such errors.
INTERRUPTED = "(interrupted: "
SANITISED_SURROGATES = "sanitised_surrogates"
_SURROGATE = re.compile("[\ud800-\udfff]")
_STATE_COLUMNS = ["key", "status", "model", "attempts", "calls", "failures", "batch_id", "batch_input_file_id",
                  "prompt_tokens", "completion_tokens", "cost_usd", "spent_tokens", "spent_usd", "claim_id",
                  "lease_expires_at"]
_HOST = socket.gethostname()
# Ledgers of this process that may hold claims (a claim of this pid whose ledger is gone is dead).
_LIVE_CLAIMANTS: weakref.WeakValueDictionary[str, Ledger] = weakref.WeakValueDictionary()
_RECOVERY_LOCK = threading.Lock()  # one spill recovery at a time in this process
SPILL_QUIET_S = 60.0  # a spill file of a writer whose liveness is unknown is recovered after this quiet time


class LedgerCommitError(RuntimeError):
    """A ledger commit kept conflicting past ``generation.ledger_commit_deadline_s``."""


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
    claim_id: str | None = None
    lease_expires_at: datetime | None = None

    def spend(self) -> Spend:
        return Spend(self.calls, self.spent_tokens, self.spent_usd)


def counts_as_failure(response: GenerationResponse) -> bool:
    """A failed answer that is the key's fault (not a run stopped or out of budget mid-retries)."""
    return not response.ok and INTERRUPTED not in (response.error or "")


def key_bucket(key: str) -> str:
    """The ledger partition of ``key``."""
    return key[:KEY_BUCKET_CHARS]


def sanitise_text(value: str) -> tuple[str, bool]:
    """``value`` with every lone surrogate (which UTF-8 cannot encode) replaced by U+FFFD; and whether any was."""
    cleaned, count = _SURROGATE.subn("\ufffd", value)
    return cleaned, count > 0


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def process_start_ticks(pid: int) -> str:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks since boot); "" when unreadable.

    The command name (field 2) may hold spaces and parentheses: fields are counted after its last ``)``.
    """
    fields = _read_text(f"/proc/{pid}/stat").rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


_BOOT_ID = _read_text("/proc/sys/kernel/random/boot_id")
_OWN_IDENTITY: dict[int, str] = {}  # pid -> identity (recomputed in a forked child)


def process_identity() -> str:
    """``<boot id>.<pid namespace inode>.<pid>.<start ticks>``: names this process on this booted host.

    Pids are compared only when boot id and PID namespace match (a container on the same node, even
    with the same hostname, has another namespace); the start time tells a reused pid from the
    original. A part that cannot be read (no ``/proc``) is left empty, and then nothing is provable.
    """
    pid = os.getpid()
    identity = _OWN_IDENTITY.get(pid)
    if identity is None:
        identity = _OWN_IDENTITY[pid] = ".".join((_BOOT_ID, _pid_namespace(), str(pid), process_start_ticks(pid)))
    return identity


def _provable(identity: str) -> bool:
    parts = identity.split(".")
    return len(parts) == 4 and all(parts) and parts[2].isdigit()


def process_state(identity: str | None) -> str:
    """``dead``, ``alive`` or ``unknown`` for a ``process_identity`` written by some process.

    ``dead`` only when it ran on this boot of this host, in this PID namespace, and its pid is gone
    or now belongs to a process started at another time (pid reuse); ``alive`` when that pid still
    has its start time; anything else (another host or namespace, an identity without these parts,
    a pid whose start time cannot be read) is ``unknown``: the lease decides.
    """
    own = process_identity()
    if not identity or not _provable(identity) or not _provable(own):
        return UNKNOWN
    boot, namespace, pid_text, started = identity.split(".")
    if [boot, namespace] != own.split(".")[:2]:
        return UNKNOWN
    pid = int(pid_text)
    now_started = process_start_ticks(pid)
    if now_started:
        return ALIVE if now_started == started else DEAD
    try:  # stat unreadable (``hidepid``): only a missing pid is proof
        os.kill(pid, 0)
    except ProcessLookupError:
        return DEAD
    except OSError:
        return UNKNOWN
    return UNKNOWN


def claimant_id(run_id: str) -> str:
    """``<run id>@<host>#<random>#<process identity>``: unique per ledger object, names its process."""
    return f"{run_id}@{_HOST}#{uuid.uuid4().hex[:8]}#{process_identity()}"


def claimant_state(claim_id: str | None) -> str:
    """Whether a claim's holder is ``dead``, ``alive`` or ``unknown`` (then only its lease decides).

    A claim of this process is alive while its ledger object is open (a closed or dropped ledger's
    claims are dead); a claim with no holder (a row written before claims existed) is dead; a claim
    of another process is judged by ``process_state`` — a pid check alone would call a live process
    in another PID namespace dead. Claims written before identities were recorded are ``unknown``.
    """
    if not claim_id:
        return DEAD
    if claim_id in _LIVE_CLAIMANTS:
        return ALIVE
    identity = claim_id.rpartition("#")[2] if "@" in claim_id else ""
    own = process_identity()
    if identity == own and _provable(own):
        return DEAD  # ours, and no open ledger of this process holds it
    return process_state(identity)


def claimant_alive(claim_id: str | None) -> bool:
    """Whether the claimant may still be running: ``False`` only when provably dead."""
    return claimant_state(claim_id) != DEAD


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
    if isinstance(value, datetime):
        return f"CAST('{value.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%f')}Z' AS TIMESTAMP)"
    return "'" + str(value).replace("'", "''") + "'"


def _row_spend(data: dict[str, list[Any]], i: int) -> tuple[int, float]:
    """(tokens, USD) a row has spent; rows written before the cumulative columns fall back to the last answer."""
    tokens = data["spent_tokens"][i]
    if tokens is None:
        tokens = (data["prompt_tokens"][i] or 0) + (data["completion_tokens"][i] or 0)
    usd = data["spent_usd"][i]
    return tokens, usd if usd is not None else (data["cost_usd"][i] or 0.0)


def _backoff(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with equal jitter (attempt starts at 1)."""
    step = min(COMMIT_BACKOFF_S[1], COMMIT_BACKOFF_S[0] * 2 ** (attempt - 1))
    return step / 2 + rng.uniform(0, step / 2)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"__datetime__": value.isoformat()}
    return str(value)


def _json_restore(row: dict[str, Any]) -> dict[str, Any]:
    return {k: datetime.fromisoformat(v["__datetime__"]) if isinstance(v, dict) and "__datetime__" in v else v
            for k, v in row.items()}


class Ledger:
    """Durable request ledger over one catalogue table (buffered or write-through)."""

    def __init__(self, uri: str, table: catalogue.Table | None = None, *, run_id: str | None = None,
                 backend: str = "", flush_every: int = 32, flush_seconds: float = 5.0,
                 write_through: bool | str = False, max_failures: int | None = 3,
                 storage_options: dict[str, str] | None = None, lease_s: float = 900.0,
                 commit_deadline_s: float = 60.0, spill_dir: str | Path | None = None) -> None:
        if write_through not in (True, False, "auto"):
            raise ValueError(f"write_through must be true, false or 'auto', got {write_through!r} "
                             "(setting generation.ledger_write_through)")
        self.uri = uri
        self.table = table or catalogue.table("gold.kd_requests")
        self.run_id = run_id or new_run_id("generate")
        self.claim_id = claimant_id(self.run_id)
        self.backend = backend
        self.flush_every = max(1, flush_every)
        self.flush_seconds = flush_seconds
        self.write_through_mode = write_through
        self.max_failures = max_failures
        self.storage_options = storage_options
        self.lease_s = lease_s
        self.commit_deadline_s = commit_deadline_s
        if spill_dir is None and "://" not in uri:
            spill_dir = Path(uri).parent / "_ledger_spill" / Path(uri).name
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._entries: dict[str, LedgerEntry] | None = None
        self._before_send: dict[str, LedgerEntry] = {}  # key -> entry as it was before this send
        self._buffer: dict[str, dict[str, Any]] = {}
        self._buffer_lock = threading.Lock()
        self._write_lock = threading.RLock()  # every use of the writer (claims, commits, flushes)
        self._state_lock = threading.RLock()
        self._rng = random.Random()
        self._last_flush = time.monotonic()
        self._timer: threading.Thread | None = None
        self._stop_timer = threading.Event()
        self._flush_error: BaseException | None = None
        self._schema_checked = False
        self._writer: Any = None  # DeltaTable kept for writes (refreshed incrementally)
        self._known_version: int | None = None  # the version the in-memory state is exact at
        self._bucketed = False  # the table is partitioned by key_bucket (ledgers created before: not)
        self.override_warning: str | None = None  # set when a paid model overrode write_through = false
        self._held: set[str] = set()  # keys this run holds by a durable claim, not yet answered / submitted
        self._heartbeat: threading.Thread | None = None
        self._stop_heartbeat = threading.Event()
        _LIVE_CLAIMANTS[self.claim_id] = self
        self.stats = {"flushes": 0, "rows_written": 0, "flush_seconds": 0.0, "record_seconds": 0.0,
                      "commits": 0, "commit_seconds": 0.0, "marker_commits": 0, "commit_conflicts": 0,
                      "claim_rereads": 0, "spilled": 0, "spills_recovered": 0, "claims_lost": 0,
                      "spill_lines_quarantined": 0, "lease_renewals": 0, "lease_renewal_conflicts": 0}

    @classmethod
    def open(cls, settings: Settings, table_name: str = "gold.kd_requests", **kwargs: Any) -> Ledger:
        """The ledger table of ``table_name`` under the configured lake root."""
        from models.lake_io import table_uri

        config = settings.generation
        kwargs.setdefault("flush_every", config.ledger_flush_every)
        kwargs.setdefault("flush_seconds", config.ledger_flush_seconds)
        kwargs.setdefault("write_through", config.ledger_write_through)
        kwargs.setdefault("max_failures", config.max_attempts_per_key)
        kwargs.setdefault("lease_s", config.ledger_lease_s)
        kwargs.setdefault("commit_deadline_s", config.ledger_commit_deadline_s)
        kwargs.setdefault("spill_dir", Path(settings.runs_dir) / "ledger_spill" / table_name)
        return cls(table_uri(settings, table_name), catalogue.table(table_name), **kwargs)

    @property
    def write_through(self) -> bool:
        """Whether this ledger commits before every send and every answer (``auto`` not resolved yet: no)."""
        return self.write_through_mode is True

    def resolve_write_through(self, paid: bool, remote: bool = False) -> bool:
        """Settle the mode: a paid (priced) model, a remote endpoint or an API key in use is always
        written through, whatever ``generation.ledger_write_through`` says (a loopback gateway such
        as a LiteLLM proxy can front a paid teacher); ``false`` then logs a warning (kept in
        ``override_warning``). Otherwise ``auto`` is buffered. Returns the mode in force."""
        self.override_warning = None
        if (paid or remote) and self.write_through_mode is not True:
            reason = "a priced (paid) model" if paid else "a remote endpoint or an API key"
            if self.write_through_mode is False:
                self.override_warning = (
                    f"ledger {self.table.full_name}: written through because {reason} is in use — "
                    "generation.ledger_write_through = false is overridden (a buffered ledger could pay twice "
                    "for answers lost in a crash)")
                log.warning(self.override_warning)
            else:
                log.info("ledger %s: write-through (generation.ledger_write_through = auto, %s)",
                         self.table.full_name, reason)
            self.write_through_mode = True
        elif self.write_through_mode == "auto":
            self.write_through_mode = False
            log.info("ledger %s: buffered (generation.ledger_write_through = auto, no paid model, local endpoint)",
                     self.table.full_name)
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

    def read(self, columns: list[str] | None = None, delta: Any = None) -> pa.Table:
        """The whole ledger (or some columns) as an Arrow table; empty when it does not exist.

        ``delta``: read that (pinned) snapshot instead of the latest version.
        """
        import pyarrow as pa

        schema = self.table.arrow_schema()
        if delta is None:
            if not self.exists():
                if columns:
                    schema = pa.schema([schema.field(c) for c in columns])
                return schema.empty_table()
            delta = self._delta()
        present = {f.name for f in delta.schema().fields}
        wanted = columns or schema.names
        table = delta_table(delta, [c for c in wanted if c in present])
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

        ``sending`` rows (calls in flight, or lost when a run died) count at their reserved worst case.
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

    def _load(self, delta: Any = None) -> dict[str, LedgerEntry]:
        data = self.read(_STATE_COLUMNS, delta).to_pydict()
        entries: dict[str, LedgerEntry] = {}
        for i, key in enumerate(data["key"]):
            tokens, usd = _row_spend(data, i)
            entry = LedgerEntry(key, data["status"][i], data["attempts"][i] or 0, data["calls"][i] or 0,
                                data["batch_id"][i], data["batch_input_file_id"][i], data["failures"][i] or 0,
                                tokens, usd, data["model"][i] or "", data["claim_id"][i],
                                data["lease_expires_at"][i])
            if entry.status == ABANDONED and self.max_failures and entry.failures < self.max_failures:
                entry.status = FAILED  # generation.max_attempts_per_key was raised: eligible again
            entries[key] = entry
        return entries

    def counts(self) -> dict[str, int]:
        """Rows per status (fresh read)."""
        statuses = self.read(["status"]).column("status").to_pylist()
        return {status: statuses.count(status) for status in sorted(set(statuses))}

    def claimable(self, entry: LedgerEntry | None, now: datetime | None = None,
                  takeover: tuple[str, ...] = (SENDING,)) -> bool:
        """Whether this run may claim (and send) this key now.

        A key another run holds (status in ``takeover``: ``sending``, and for the Batch API also
        ``submitting``) is taken over only from a claimant that is provably dead, or whose lease
        expired when its liveness cannot be known (another host or PID namespace). A claimant
        provably alive on this host keeps its keys whatever its lease says (it may be stopped or
        swapping, and would still send).
        """
        if entry is None or entry.status in (PENDING, FAILED):
            return True
        if entry.status not in takeover or entry.claim_id == self.claim_id:
            return False  # done, in a batch, or already ours
        holder = claimant_state(entry.claim_id)
        if holder != UNKNOWN:
            return holder == DEAD
        return entry.lease_expires_at is not None and entry.lease_expires_at <= (now or utc_now())

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
                       batch_input_file_id=entry.batch_input_file_id, claim_id=entry.claim_id,
                       lease_expires_at=entry.lease_expires_at)
            row["claim_run_id"] = entry.claim_id.partition("@")[0] if entry.claim_id else None
            row["created_at"] = None  # keep the original insert time (the MERGE does not update it)
        row.update(values)
        # A reply (or prompt) with a lone surrogate cannot be written as UTF-8: store it sanitised, flagged.
        sanitised = []
        for name, value in row.items():
            if isinstance(value, str):
                row[name], changed = sanitise_text(value)
                if changed:
                    sanitised.append(name)
        if sanitised:
            row["flags"] = f"{SANITISED_SURROGATES}:{','.join(sanitised)}"
            log.warning("key %s: lone surrogates in %s replaced by U+FFFD (row flagged %r)", request.key[:12],
                        sanitised, row["flags"])
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
                    state.setdefault(key, LedgerEntry(key, PENDING, model=row["model"]))
        return len(rows)

    def _refresh(self) -> int:
        """Bring the writer to the latest version; re-read the state when another writer committed."""
        self.ensure_table()
        if self._writer is None:
            self._writer = self._delta()
        else:
            self._writer.update_incremental()
        version = self._writer.version()
        if version != self._known_version:
            entries = self._load(self._writer)
            with self._state_lock:
                self._entries = entries
            self._known_version = version
            self.stats["claim_rereads"] += 1
        return version

    def _sync_budget(self, budget: Budget, models: Iterable[str]) -> None:
        if budget.scope:  # a shard's account counts its own partition only (one writer per shard)
            return
        totals = self.spent_by_model()
        for model in set(models):
            budget.sync_spent(model, totals.get(model, Spend()))

    def claim(self, requests: Sequence[GenerationRequest], budget: Budget | None, *, status: str = SENDING
              ) -> tuple[list[tuple[GenerationRequest, Reservation | None]], list[GenerationRequest]]:
        """Reserve the worst case of ``requests`` in ``budget`` and claim them for this run.

        Returns the claimed requests with their reservations (in order, up to the first the budget
        refuses) and the requests skipped because another live run holds them, they were finished
        meanwhile or a batch holds them. Buffered online runs: the claim is memory only.

        ``status``: ``sending`` (online) or ``submitting`` (a Batch API run, always durable: it
        claims before uploading, so no online run or second Batch run sends the same keys). With
        ``budget=None`` nothing is reserved or counted (a Batch run taking over an uploaded file).

        Durable claims, every attempt: (1) read the latest version (spend from durable rows,
        every run's reservations included, synced into ``budget``); (2) reserve; (3) one
        conditional UPDATE on that same snapshot — a conflicting concurrent commit makes delta-rs
        refuse it, and we go back to (1) after a backoff; (4) if other commits landed between (1)
        and ours, re-read and, when a cap is now exceeded, give the claim back and go to (1).
        Each claim is so checked against every claim committed before it: the caps hold across
        processes.
        """
        from deltalake.exceptions import CommitFailedError

        assert status in (SENDING, SUBMITTING), status
        if not self.write_through and status == SENDING:
            assert budget is not None
            accepted: list[tuple[GenerationRequest, Reservation | None]] = []
            for request in requests:
                reservation = budget.reserve(request)
                if reservation is None:
                    break
                accepted.append((request, reservation))
            self.mark_sending([(r, res.tokens, res.usd) for r, res in accepted if res is not None])
            return accepted, []
        takeover = (SENDING,) if status == SENDING else (SENDING, SUBMITTING)
        # Online claims sync the caps from every run's durable spend; a Batch run keeps the budget it
        # was seeded with (its batches in flight are reserved there, not in the rows).
        sync = budget is not None and status == SENDING
        deadline = time.monotonic() + self.commit_deadline_s
        models = {r.model for r in requests}
        attempt = 0
        while True:
            attempt += 1
            with self._write_lock:
                version = self._refresh()
                if sync:
                    self._sync_budget(budget, models)
                now = utc_now()
                state = self.state()
                skipped = [r for r in requests if not self.claimable(state.get(r.key), now, takeover)]
                accepted = []
                for request in requests:
                    if not self.claimable(state.get(request.key), now, takeover):
                        continue
                    reservation = None
                    if budget is not None:
                        reservation = budget.reserve(request)
                        if reservation is None:
                            break
                    accepted.append((request, reservation))
                if not accepted:
                    return [], skipped
                try:
                    self._commit_claims(accepted, version, status)
                except CommitFailedError as exc:
                    self._release(budget, accepted)
                    self._writer, self._known_version = None, None
                    self.stats["commit_conflicts"] += 1
                    if time.monotonic() > deadline:
                        raise LedgerCommitError(
                            f"could not claim {len(accepted)} keys in {self.table.full_name} within "
                            f"{self.commit_deadline_s}s of commit conflicts (generation.ledger_commit_deadline_s); "
                            f"nothing was sent: {exc}") from exc
                else:
                    if self._writer.version() == version + 1 or not sync:
                        self._known_version = version + 1 if self._writer.version() == version + 1 else None
                        return accepted, skipped  # ours was the only commit: the state is exact
                    self._refresh()  # others committed in between: is a cap now exceeded?
                    self._sync_budget(budget, models)
                    over = next((m for m in (budget.over_cap(m) for m in models) if m), None)
                    if over is None:
                        return accepted, skipped
                    log.info("claim given back (%s); retrying", over)
                    self.cancel_sending([r for r, _ in accepted])
                    self._release(budget, accepted)
                    if time.monotonic() > deadline:  # other runs keep taking the rest of the cap
                        budget.exhausted = budget.exhausted or over
                        return [], skipped
            time.sleep(_backoff(attempt, self._rng))

    @staticmethod
    def _release(budget: Budget | None, accepted: Sequence[tuple[GenerationRequest, Reservation | None]]) -> None:
        for _, reservation in accepted:
            if budget is not None and reservation is not None:
                budget.release(reservation)

    def _claimed_entry(self, entry: LedgerEntry, reservation: Reservation | None, status: str,
                       lease: datetime) -> LedgerEntry:
        """``entry`` as this run's claim: an online send counts a call, an attempt and its worst case;
        a batch counts the call it will be (its tokens are settled when collected); a takeover counts nothing."""
        claimed = replace(entry, status=status, claim_id=self.claim_id, lease_expires_at=lease)
        if reservation is not None:
            claimed.calls += 1
            if status == SENDING:
                claimed.attempts += 1
                claimed.spent_tokens += reservation.tokens
                claimed.spent_usd += reservation.usd
        return claimed

    def _commit_claims(self, accepted: Sequence[tuple[GenerationRequest, Reservation | None]], version: int,
                       status: str = SENDING) -> None:
        """The conditional UPDATE of a claim, on the snapshot ``version`` the decision was read from."""
        now = utc_now()
        lease = now + timedelta(seconds=self.lease_s)
        rows, conditions = [], {}
        what = ("in flight" if status == SENDING else "being submitted to the Batch API")
        with self._state_lock:
            for request, reservation in accepted:
                entry = self._entry(request)
                conditions[request.key] = self._as_read(entry)
                self._before_send[request.key] = replace(entry)
                claimed = self._claimed_entry(entry, reservation, status, lease)
                rows.append(self._row(request, status, now, claimed, error=(
                    f"{what} since {now:%Y-%m-%d %H:%M:%S} UTC (run {self.run_id}); counted at its "
                    "reserved worst case until the answer is recorded")))
        started = time.perf_counter()
        try:
            updated = self._update(rows, conditions, writer=self._writer)
        except BaseException:
            with self._state_lock:
                for request, _ in accepted:
                    self._before_send.pop(request.key, None)
            raise
        if updated != len(rows):  # same snapshot, same predicate: only a bug gets here
            raise RuntimeError(f"ledger {self.table.full_name}: a claim of {len(rows)} keys updated {updated} rows "
                               f"at version {version}; the ledger state was read from another snapshot")
        with self._state_lock:
            for request, reservation in accepted:
                self.state()[request.key] = self._claimed_entry(self._before_send[request.key], reservation,
                                                                status, lease)
                self._held.add(request.key)
        self._count_commit(started, len(rows), marker=True)

    @staticmethod
    def _as_read(entry: LedgerEntry) -> str:
        """The row as a claim read it: the claim matches only if nobody changed it since."""
        claim = f"`claim_id` = {_sql_literal(entry.claim_id)}" if entry.claim_id else "`claim_id` IS NULL"
        return (f"`status` = {_sql_literal(entry.status)} AND coalesce(`calls`, 0) = {entry.calls} "
                f"AND coalesce(`attempts`, 0) = {entry.attempts} AND {claim}")

    def mark_sending(self, items: Sequence[tuple[GenerationRequest, int, float]]) -> None:
        """Buffered: note in memory that ``(request, reserved_tokens, reserved_usd)`` items are sent
        (the answer's row carries the counts). Write-through runs claim instead (``claim``)."""
        if self.write_through:  # a claim without a budget (tests of a crash right after it)
            with self._write_lock:
                self._commit_claims([(r, Reservation(r.key, r.model, 1, t, u, t, u)) for r, t, u in items],
                                    self._refresh())
                self._known_version = None
            return
        with self._state_lock:
            for request, tokens, usd in items:
                entry = self._entry(request)
                self._before_send[request.key] = replace(entry)
                entry.status = SENDING
                entry.calls += 1
                entry.attempts += 1
                entry.spent_tokens += tokens
                entry.spent_usd += usd

    def claim_retry(self, request: GenerationRequest, reservation: Reservation, budget: Budget) -> bool:
        """Reserve and note one more attempt of a request in flight; ``False`` when a cap refuses.

        Write-through: the same protocol as ``claim`` — spend re-read from the durable rows, the
        retry committed (before it is sent) on that snapshot, and re-checked when other writers
        committed in between (then the retry is not sent; its answer's record sets the real counts).
        """
        from deltalake.exceptions import CommitFailedError

        if not self.write_through:
            if not budget.reserve_retry(reservation):
                return False
            self.mark_retry(request, reservation.call_tokens, reservation.call_usd)
            return True
        deadline = time.monotonic() + self.commit_deadline_s
        attempt = 0
        while True:
            attempt += 1
            with self._write_lock:
                version = self._refresh()
                self._sync_budget(budget, [request.model])
                if not budget.reserve_retry(reservation):
                    return False
                row = self._retry_row(request, reservation)
                try:
                    started = time.perf_counter()
                    updated = self._update([row], {request.key: f"`claim_id` = {_sql_literal(self.claim_id)}"},
                                           writer=self._writer)
                    self._count_commit(started, 1, marker=True)
                except CommitFailedError:
                    budget.undo_retry(reservation)
                    self._undo_retry_row(request, reservation)
                    self._writer, self._known_version = None, None
                    self.stats["commit_conflicts"] += 1
                    if time.monotonic() > deadline:
                        return False  # not sent: the answer so far is recorded as interrupted
                else:
                    if updated != 1:  # our claim is gone (lease expired, another run took the key)
                        self.stats["claims_lost"] += 1
                        return False
                    if self._writer.version() == version + 1:
                        self._known_version = version + 1
                        return True
                    self._refresh()
                    self._sync_budget(budget, [request.model])
                    return budget.over_cap(request.model) is None
            time.sleep(_backoff(attempt, self._rng))

    def _retry_row(self, request: GenerationRequest, reservation: Reservation) -> dict[str, Any]:
        with self._state_lock:
            entry = self._entry(request)
            entry.calls += 1
            entry.attempts += 1
            entry.spent_tokens += reservation.call_tokens
            entry.spent_usd += reservation.call_usd
            entry.lease_expires_at = utc_now() + timedelta(seconds=self.lease_s)
            return self._row(request, SENDING, utc_now(), entry)

    def _undo_retry_row(self, request: GenerationRequest, reservation: Reservation) -> None:
        with self._state_lock:
            entry = self._entry(request)
            entry.calls -= 1
            entry.attempts -= 1
            entry.spent_tokens -= reservation.call_tokens
            entry.spent_usd -= reservation.call_usd

    def mark_retry(self, request: GenerationRequest, tokens: int = 0, usd: float = 0.0) -> None:
        """Buffered: one more HTTP attempt of a request in flight, at its worst case (memory only)."""
        with self._state_lock:
            entry = self._entry(request)
            entry.calls += 1
            entry.attempts += 1
            entry.spent_tokens += tokens
            entry.spent_usd += usd
            row = self._row(request, SENDING, utc_now(), entry) if self.write_through else None
        if row is not None:
            self._write_now([row], marker=True, held=True)

    def cancel_sending(self, requests: Iterable[GenerationRequest]) -> None:
        """Undo a claim (or ``mark_sending``) for requests that were never handed to the backend."""
        now = utc_now()
        rows = []
        with self._state_lock:
            for request in requests:
                before = self._before_send.pop(request.key, None)
                if before is None:
                    continue
                self.state()[request.key] = before
                if self.write_through or request.key in self._held:  # a durable claim: undo it durably
                    rows.append(self._row(request, before.status, now, before))
                self._held.discard(request.key)
        if rows:
            self._write_now(rows, marker=True, held=True)

    def record(self, request: GenerationRequest, response: GenerationResponse, cost_usd: float,
               calls: int = 1, charged_tokens: int | None = None) -> str:
        """The outcome of one send (``calls`` = calls it counted against the cap). Returns the new status.

        ``cost_usd``/``charged_tokens``: what the send is charged (default tokens: the answer's;
        the engine adds the worst case of timed-out attempts). Write-through: committed before
        returning (spilled to disk when the commit cannot be made). Buffered: flushed by size, by
        the timer or by ``flush()``.
        """
        started = time.perf_counter()
        with self._state_lock:
            current = self._entry(request)
            before = self._before_send.pop(request.key, None) or replace(current)
            entry = replace(before)
            entry.attempts = before.attempts + response.attempts
            entry.calls = before.calls + calls
            if charged_tokens is None:
                charged_tokens = response.prompt_tokens + response.completion_tokens if response.ok else 0
            entry.spent_tokens = before.spent_tokens + charged_tokens
            entry.spent_usd = before.spent_usd + cost_usd
            entry.failures = before.failures + int(counts_as_failure(response))
            if self.write_through and current.claim_id == self.claim_id:
                entry.claim_id, entry.lease_expires_at = self.claim_id, None  # done: the lease ends
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
            written = self._write_now([row], held=True, spill=True)
            with self._state_lock:
                self._held.discard(request.key)
                if not written:  # another run took the key over (its lease expired): not ours to report
                    self.state()[request.key] = replace(current, claim_id=None)
                    self._known_version = None
            if not written:
                return CLAIM_LOST
        else:
            with self._buffer_lock:
                self._buffer[request.key] = row
                due = (len(self._buffer) >= self.flush_every
                       or time.monotonic() - self._last_flush >= self.flush_seconds)
            if due:
                self.flush()
        return entry.status

    def mark_batch(self, requests: Iterable[GenerationRequest], status: str, *, input_file_id: str,
                   batch_id: str | None = None, calls: int = 0) -> int:
        """Durably note that ``requests`` (claimed ``submitting`` by this run) were uploaded
        (``submitting`` + file id) or submitted in a batch (``submitted`` + batch id).

        Written immediately (not buffered), and only where this run's claim still holds: this row
        is what lets a crashed task resume the same batch instead of paying for a second one.
        Returns the rows written (fewer: another run took keys over after this run's lease).
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
                self._before_send.pop(request.key, None)  # uploaded: no longer undone by cancel_sending
                if status == SUBMITTED:
                    self._held.discard(request.key)  # the batch holds them now; the lease has done its job
        self.flush()
        return self._write_now(rows, held=True) if rows else 0

    def _count_commit(self, started: float, rows: int, marker: bool = False) -> None:
        self.stats["commits"] += 1
        self.stats["marker_commits"] += int(marker)
        self.stats["rows_written"] += rows
        self.stats["commit_seconds"] += time.perf_counter() - started

    def _write_now(self, rows: list[dict[str, Any]], marker: bool = False, held: bool = False,
                   spill: bool = False) -> int:
        """UPDATE the rows of keys the ledger holds (add_pending ran first); returns rows updated (or spilled).

        ``held``: only rows this ledger still claims (a claim lost to an expired lease is not
        overwritten: the new claimant's reservation stays counted). ``spill``: a commit that cannot
        be made within the deadline goes to the spill file instead of raising.
        """
        started = time.perf_counter()
        conditions = {row["key"]: f"`claim_id` = {_sql_literal(self.claim_id)}" for row in rows} if held else None
        with self._write_lock:  # never concurrently with a background flush
            try:
                updated = self._update(rows, conditions)
            except Exception as exc:
                if not spill or self.spill_dir is None:
                    raise
                self._spill(rows, exc)
                return len(rows)  # kept: committed by the next start
            if updated != len(rows):
                self.stats["claims_lost"] += len(rows) - updated
                log.warning("ledger %s: %d of %d rows not written — the key succeeded meanwhile or another "
                            "run re-claimed it after this run's lease (generation.ledger_lease_s) expired",
                            self.table.full_name, len(rows) - updated, len(rows))
            self._count_commit(started, len(rows), marker)
            return updated

    # ---- spill: answers whose commit failed ------------------------------------------------

    def _spill(self, rows: list[dict[str, Any]], error: BaseException) -> None:
        """Keep paid answers that could not be committed in a local file (committed on the next start)."""
        assert self.spill_dir is not None
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"{self.claim_id.replace('/', '_').replace('#', '-')}.jsonl"
        with path.open("a", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.stats["spilled"] += len(rows)
        log.warning("ledger %s: commit failed (%s: %s); %d answers spilled to %s, committed by the next run's "
                    "start", self.table.full_name, type(error).__name__, str(error)[:200], len(rows), path)

    def recover_spills(self) -> int:
        """Commit answers earlier runs spilled (where their claims still hold; a success is final).

        Each spill file is renamed to ``<name>.committing-<process identity>`` first (one recoverer
        per file); a ``.committing-`` file left by a recoverer that died is taken over. A line that
        is not a whole ledger row (a crash mid-append, a damaged file) is moved to ``<name>.bad``
        with a warning naming it; the other lines are committed. Files of a claimant (or recoverer)
        provably alive are left alone; of one whose liveness is unknown, until they have been quiet
        for ``SPILL_QUIET_S``. Returns the unique keys recovered.
        """
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return 0
        keys: set[str] = set()
        own = process_identity()
        with _RECOVERY_LOCK:  # in this process, a ``.committing-<own>`` file is nobody's work in progress
            for path in sorted(self.spill_dir.glob("*.jsonl")):
                owner = self._spill_owner(path)
                if owner != self.claim_id and not self._spill_free(path, claimant_state(owner)):
                    continue  # a live run's spill: it still holds those keys
                keys |= self._take_and_commit(path, path.name, own)
            for path in sorted(self.spill_dir.glob("*.committing-*")):
                base, _, identity = path.name.rpartition(".committing-")
                state = DEAD if identity == own else process_state(identity)
                if self._spill_free(path, state):
                    keys |= self._take_and_commit(path, base, own)
        if keys:
            self.stats["spills_recovered"] += len(keys)
            with self._state_lock:
                self._entries = None
            self._known_version = None
        return len(keys)

    @staticmethod
    def _spill_free(path: Path, state: str) -> bool:
        """Whether a spill file may be committed by this run (its writer is not, or no longer, at work)."""
        if state == UNKNOWN:
            try:
                return time.time() - path.stat().st_mtime > SPILL_QUIET_S
            except FileNotFoundError:
                return False
        return state == DEAD

    def _take_and_commit(self, path: Path, base: str, own: str) -> set[str]:
        taken = path.with_name(f"{base}.committing-{own}")
        try:
            if path != taken:
                path.rename(taken)  # one recoverer per file
        except FileNotFoundError:
            return set()  # another recoverer took it
        rows, bad = self._read_spill(taken)
        if bad:
            quarantine = taken.with_name(f"{base.removesuffix('.jsonl')}.bad")
            with quarantine.open("a", encoding="utf-8") as out:
                out.writelines(line + "\n" for line in bad)
            self.stats["spill_lines_quarantined"] += len(bad)
            log.warning("ledger %s: %d damaged lines of spill file %s (not a whole ledger row: a crash "
                        "mid-append?) moved to %s; their keys are sent again unless another run recorded them",
                        self.table.full_name, len(bad), base, quarantine)
        latest = {row["key"]: row for row in rows}  # the last answer spilled per key
        if latest:
            with self._write_lock:
                self._merge(list(latest.values()), held_only=True)
        taken.unlink()
        log.info("ledger %s: committed %d spilled answers from %s", self.table.full_name, len(latest), base)
        return set(latest)

    def _read_spill(self, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
        """The whole rows of a spill file and the lines that are not (undecodable, cut, wrong types)."""
        import pyarrow as pa

        schema = self.table.arrow_schema()
        rows, bad = [], []
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = _json_restore(json.loads(line))
                if not (isinstance(row.get("key"), str) and row.get("status") in STATUSES):
                    raise ValueError("no key or status")
                pa.Table.from_pylist([row], schema=schema)  # every value fits its column
            except (ValueError, TypeError, AttributeError, pa.ArrowException):
                bad.append(line)
                continue
            rows.append(row)
        return rows, bad

    def _spill_owner(self, path: Path) -> str | None:
        """The claim id of a spill file's writer (from its first whole row)."""
        try:
            rows, _ = self._read_spill(path)
        except FileNotFoundError:
            return None
        return rows[0].get("claim_id") if rows else None

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

    def _merge(self, rows: list[dict[str, Any]], insert_only: bool = False, held_only: bool = False) -> None:
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
        # A success is final: no later write (a straggler, a second writer) may undo it.
        matched = f"t.status <> '{SUCCEEDED}'"
        if held_only:  # a spilled answer lands only where its claim still holds
            matched += " AND coalesce(t.claim_id, '') = coalesce(s.claim_id, '')"

        def merge(delta: Any) -> None:
            merger = delta.merge(source, predicate=predicate, source_alias="s", target_alias="t")
            if not insert_only:
                merger = merger.when_matched_update(updates, predicate=matched)
            merger.when_not_matched_insert_all().execute()

        self._commit(merge)

    def _update(self, rows: list[dict[str, Any]], conditions: dict[str, str] | None = None,
                writer: Any = None) -> int:
        """UPDATE the existing, not succeeded rows of ``rows`` in one commit; returns rows updated.

        ``conditions``: key → an extra SQL condition the row must meet. ``writer``: run on that
        snapshot as it is (a claim), not retried; default: the latest version, retried on conflicts.
        """
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
        if conditions:
            predicate += " AND (" + " OR ".join(f"(`key` = {_sql_literal(k)} AND {conditions[k]})" for k in keys) + ")"
        if self._bucketed:
            buckets = sorted({key_bucket(k) for k in keys})
            predicate = f"`key_bucket` IN ({', '.join(_sql_literal(b) for b in buckets)}) AND {predicate}"
        if writer is not None:
            metrics = writer.update(assignments, predicate=predicate)
        else:
            metrics = self._commit(lambda delta: delta.update(assignments, predicate=predicate))
        return int((metrics or {}).get("num_updated_rows", 0))

    def _commit(self, operation: Callable[[Any], Any]) -> Any:
        """Run a write on the latest version; on a conflict reload and retry (backoff with jitter)
        until ``commit_deadline_s`` has passed, then raise."""
        from deltalake.exceptions import CommitFailedError

        self.ensure_table()
        deadline = time.monotonic() + self.commit_deadline_s
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._writer is None:
                    self._writer = self._delta()
                else:
                    self._writer.update_incremental()
                before = self._writer.version()
                result = operation(self._writer)
                after = self._writer.version()
                # The state stays exact only while every commit since it was read is ours.
                if self._known_version is not None and (before != self._known_version or after > before + 1):
                    self._known_version = None
                elif self._known_version is not None:
                    self._known_version = after
                return result
            except CommitFailedError:  # another writer committed first: re-read and retry
                self._writer = None
                self._known_version = None
                self.stats["commit_conflicts"] += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(_backoff(attempt, self._rng))

    # ---- leases: renewed while this run holds keys -------------------------------------------

    def lease_remaining(self, key: str) -> float | None:
        """Seconds left on this run's lease of ``key`` (``None``: not a durable claim of this run)."""
        with self._state_lock:
            entry = (self._entries or {}).get(key)
            if entry is None or entry.claim_id != self.claim_id or entry.lease_expires_at is None:
                return None
            return (entry.lease_expires_at - utc_now()).total_seconds()

    def renew_leases(self, attempts: int = 3) -> int:
        """Extend the lease of every key this run holds: one conditional UPDATE for all of them.

        Conflict-tolerant: on a commit conflict it retries ``attempts`` times with a short backoff,
        then gives up until the next heartbeat (the lease still has two thirds left). Uses its own
        table object, so it never waits for (or blocks) the claims and answers. Returns rows renewed.
        """
        from deltalake.exceptions import CommitFailedError

        with self._state_lock:
            held = sorted(self._held)
        if not held:
            return 0
        lease = utc_now() + timedelta(seconds=self.lease_s)
        predicate = (f"`claim_id` = {_sql_literal(self.claim_id)} "
                     f"AND `status` IN ({_sql_literal(SENDING)}, {_sql_literal(SUBMITTING)})")
        if self._bucketed:
            buckets = sorted({key_bucket(k) for k in held})
            predicate = f"`key_bucket` IN ({', '.join(_sql_literal(b) for b in buckets)}) AND {predicate}"
        for attempt in range(1, attempts + 1):
            try:
                metrics = self._delta().update({"`lease_expires_at`": _sql_literal(lease)}, predicate=predicate)
            except CommitFailedError:
                self.stats["lease_renewal_conflicts"] += 1
                time.sleep(_backoff(attempt, self._rng))
                continue
            with self._state_lock:
                for key in held:
                    entry = (self._entries or {}).get(key)
                    if entry is not None and entry.claim_id == self.claim_id:
                        entry.lease_expires_at = lease
            self.stats["lease_renewals"] += 1
            return int((metrics or {}).get("num_updated_rows", 0))
        log.info("ledger %s: lease renewal conflicted %d times; next try in %.0fs", self.table.full_name,
                 attempts, self.lease_s / 3)
        return 0

    def start_heartbeat(self) -> None:
        """Renew this run's leases every ``lease_s / 3`` from a daemon thread (stopped by ``close``).

        A claimant alive but slow (a long request, retries, a big batch upload) keeps its keys; a
        renewal conflicts with other writers at most once per interval.
        """
        if self._heartbeat is not None:
            return
        stop, interval, owner = self._stop_heartbeat, self.lease_s / 3, weakref.ref(self)
        stop.clear()

        def loop() -> None:  # holds the ledger weakly: a dropped ledger's claims must read as dead
            while not stop.wait(interval):
                ledger = owner()
                if ledger is None:
                    return
                try:
                    ledger.renew_leases()
                except Exception as exc:  # the next beat tries again; the lease still has time left
                    log.warning("ledger %s: lease renewal failed (%s: %s)", ledger.table.full_name,
                                type(exc).__name__, str(exc)[:200])
                del ledger

        self._heartbeat = threading.Thread(target=loop, name="ledger-heartbeat", daemon=True)
        self._heartbeat.start()

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
        """Stop the timer, flush what is left, compact small files when there are many; claims end."""
        if self._timer is not None:
            self._stop_timer.set()
            self._timer.join(timeout=30)
            self._timer = None
        if self._heartbeat is not None:
            self._stop_heartbeat.set()
            self._heartbeat.join(timeout=30)
            self._heartbeat = None
        self.flush()
        _LIVE_CLAIMANTS.pop(self.claim_id, None)  # a ``sending`` row of ours is now claimable
        if self._flush_error is not None:
            error, self._flush_error = self._flush_error, None
            log.warning("an earlier background flush failed (%s); the final flush succeeded", error)
        if self.exists() and compact_above_files and len(self._delta().file_uris()) > compact_above_files:
            try:
                self._delta().optimize.compact()
            except Exception as exc:  # a concurrent writer: compaction can wait for the next run
                log.info("ledger compaction skipped (%s)", exc)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self.table.full_name} at {self.uri}, run_id={self.run_id})"
