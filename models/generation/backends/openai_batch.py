"""``openai-batch`` backend: the OpenAI Batch API (Files + Batches), half price, results within 24 h.

The steps are separate functions so an Airflow task can submit, *defer* while a trigger or
sensor calls ``poll`` (one HTTP call, returns a serialisable ``BatchState``), then collect:

1. ``upload(requests)`` — one JSONL line per request, ``custom_id`` = the ledger key;
2. ``create(input_file_id)`` — start the batch; the engine stores the batch id in the ledger
   (status ``submitted``) *before* any polling, so a crashed task resumes the same batch;
3. ``poll(batch_id)`` — once; ``wait`` is the blocking helper that loops on it;
4. ``results(state, requests)`` — download the output and error files and map every line back
   to its request by ``custom_id``; keys missing from both files come back as failures.

``find_batch_for_file`` closes the last crash window (after ``create`` returned, before the
ledger write): the input file id is stored first (status ``submitting``), and a resumed run
looks the batch up by it instead of creating a second one.

The ledger-aware flow lives in ``models.generation.engine.run_batch_generation``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import SecretStr

from models.generation.backends.openai_backend import chat_body, redact
from models.generation.ledger import INTERRUPTED
from models.generation.types import GenerationRequest, GenerationResponse

log = logging.getLogger("jzlake.generation.openai_batch")

ENDPOINT = "/v1/chat/completions"
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
# Lines a batch did not run because of the batch (not the request): not the key's failure.
BATCH_LINE_CODES_NOT_KEYS_FAULT = frozenset({"batch_expired", "batch_cancelled"})


@dataclass
class BatchState:
    """One poll's answer, JSON-serialisable (XCom, trigger events)."""

    batch_id: str
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "terminal": self.terminal}


class OpenAIBatchBackend:
    """Files + Batches API client (real OpenAI, or any server implementing those endpoints)."""

    name = "openai-batch"

    def __init__(self, base_url: str, api_key: SecretStr | str | None = None, *,
                 served_models: Mapping[str, str] | None = None, max_tokens_param: str = "max_tokens",
                 timeout_s: float = 120.0, max_retries: int = 6, poll_interval_s: float = 60.0,
                 completion_window: str = "24h", max_requests_per_batch: int = 50_000) -> None:
        self.base_url = base_url
        self._api_key = api_key if isinstance(api_key, SecretStr) or api_key is None else SecretStr(api_key)
        self.served_models = dict(served_models or {})
        self.max_tokens_param = max_tokens_param
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.poll_interval_s = poll_interval_s
        self.completion_window = completion_window
        self.max_requests_per_batch = max_requests_per_batch
        self._client_obj: Any = None

    def __repr__(self) -> str:
        key = "set (redacted)" if self._api_key is not None else "none"
        return f"OpenAIBatchBackend(base_url={self.base_url!r}, api_key={key})"

    @property
    def client(self) -> Any:
        # Control-plane calls (upload, create, poll) may use the SDK's own retries: they are
        # idempotent reads or guarded by the ledger (create is looked up by file id on resume).
        if self._client_obj is None:
            from openai import OpenAI

            key = self._api_key.get_secret_value() if self._api_key is not None else "no-key-needed"
            self._client_obj = OpenAI(base_url=self.base_url, api_key=key, max_retries=self.max_retries,
                                      timeout=self.timeout_s)
        return self._client_obj

    # ---- submit ------------------------------------------------------------------------------

    def batch_lines(self, requests: Iterable[GenerationRequest]) -> bytes:
        """The JSONL input file: one ``{"custom_id", "method", "url", "body"}`` line per request."""
        lines = [json.dumps({"custom_id": r.key, "method": "POST", "url": ENDPOINT,
                             "body": chat_body(r, self.served_models, self.max_tokens_param)},
                            ensure_ascii=False, sort_keys=True)
                 for r in requests]
        return ("\n".join(lines) + "\n").encode("utf-8")

    def upload(self, requests: Iterable[GenerationRequest]) -> str:
        """Upload the batch input file; returns its file id."""
        data = self.batch_lines(requests)
        uploaded = self.client.files.create(file=("jzlake-batch.jsonl", data, "application/jsonl"),
                                            purpose="batch")
        return uploaded.id

    def create(self, input_file_id: str, metadata: Mapping[str, str] | None = None) -> str:
        """Start a batch over an uploaded file; returns the batch id."""
        batch = self.client.batches.create(input_file_id=input_file_id, endpoint=ENDPOINT,
                                           completion_window=self.completion_window,
                                           metadata=dict(metadata or {}) or None)
        log.info("created batch %s over file %s", batch.id, input_file_id)
        return batch.id

    def cancel(self, batch_id: str) -> str:
        """Ask the server to cancel a batch (lines already finished stay in its output); returns the status."""
        batch = self.client.batches.cancel(batch_id)
        log.info("cancelling batch %s (%s)", batch_id, batch.status)
        return batch.status

    def find_batch_for_file(self, input_file_id: str) -> str | None:
        """The batch already created over ``input_file_id`` (crash between create and ledger write)."""
        for batch in self.client.batches.list(limit=100):  # auto-paginates, newest first
            if batch.input_file_id == input_file_id:
                return batch.id
        return None

    # ---- poll ------------------------------------------------------------------------------

    def poll(self, batch_id: str) -> BatchState:
        """One status check (what an Airflow trigger/sensor calls between deferrals)."""
        batch = self.client.batches.retrieve(batch_id)
        counts = batch.request_counts
        errors = [f"{e.code}: {e.message}" for e in (batch.errors.data or [])] if batch.errors else []
        return BatchState(batch_id=batch.id, status=batch.status, input_file_id=batch.input_file_id,
                          output_file_id=batch.output_file_id, error_file_id=batch.error_file_id,
                          total=counts.total if counts else 0, completed=counts.completed if counts else 0,
                          failed=counts.failed if counts else 0, errors=errors)

    def wait(self, batch_id: str, poll_interval_s: float | None = None, timeout_s: float | None = None,
             sleep: Callable[[float], None] = time.sleep) -> BatchState:
        """Poll until the batch is terminal (blocking helper for CLIs and tests)."""
        interval = self.poll_interval_s if poll_interval_s is None else poll_interval_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            state = self.poll(batch_id)
            if state.terminal:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {state.status} after {timeout_s}s "
                                   f"({state.completed}/{state.total} done); rerun to keep waiting — "
                                   "the batch id is in the ledger, nothing is resubmitted")
            sleep(interval)

    # ---- collect -----------------------------------------------------------------------------

    def _file_lines(self, file_id: str | None) -> Iterator[dict[str, Any]]:
        if not file_id:
            return
        content = self.client.files.content(file_id)
        for line in content.text.splitlines():
            if line.strip():
                yield json.loads(line)

    def results(self, state: BatchState,
                requests: Mapping[str, GenerationRequest]) -> Iterator[GenerationResponse]:
        """Every request of a terminal batch as a response (success or failure), by ``custom_id``."""
        if not state.terminal:
            raise ValueError(f"batch {state.batch_id} is {state.status}; poll until it is terminal")
        seen: set[str] = set()
        for line in [*self._file_lines(state.output_file_id), *self._file_lines(state.error_file_id)]:
            key = line.get("custom_id")
            if key not in requests or key in seen:
                log.warning("batch %s returned an unknown or repeated custom_id %r; ignored",
                            state.batch_id, key)
                continue
            seen.add(key)
            yield self._response(key, line)
        reason = "; ".join(state.errors) or f"batch ended {state.status}"
        # A batch that expired, was cancelled or failed as a whole did not fail these keys.
        note = f" {INTERRUPTED}batch {state.status})" if state.status != "completed" else ""
        for key in requests:
            if key not in seen:
                yield GenerationResponse(key=key, text=None, finish_reason=None,
                                         error=f"missing from batch {state.batch_id} output ({reason}){note}")

    def _response(self, key: str, line: dict[str, Any]) -> GenerationResponse:
        response = line.get("response") or {}
        body = response.get("body") or {}
        status = response.get("status_code")
        if line.get("error") or status != 200:
            detail = line.get("error") or body.get("error") or body
            code = detail.get("code") if isinstance(detail, dict) else None
            note = f" {INTERRUPTED}{code})" if code in BATCH_LINE_CODES_NOT_KEYS_FAULT else ""
            return GenerationResponse(key=key, text=None, finish_reason=None,
                                      error=redact(f"batch line failed (HTTP {status}): {detail}",
                                                   self._api_key)[:1900] + note)
        choice = (body.get("choices") or [{}])[0]
        usage = body.get("usage") or {}
        return GenerationResponse(
            key=key, text=(choice.get("message") or {}).get("content") or "",
            finish_reason=choice.get("finish_reason"), prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0), model=body.get("model"))

    # ---- Backend protocol (no ledger: submit, wait, collect) --------------------------------

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        """Submit everything as one or more batches and yield the results when they finish.

        Without a ledger a crash here loses the batch ids; jobs use ``run_batch_generation``.
        """
        pending = list(requests)
        for start in range(0, len(pending), self.max_requests_per_batch):
            chunk = pending[start:start + self.max_requests_per_batch]
            batch_id = self.create(self.upload(chunk))
            yield from self.results(self.wait(batch_id), {r.key: r for r in chunk})
