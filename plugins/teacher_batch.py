"""Deferrable teacher distillation over the OpenAI Batch API (Airflow 3).

A Batch API batch takes minutes to 24 hours. Blocking a worker slot on it (``jzlake distil``
without flags polls until done) wastes the slot; instead:

1. ``TeacherBatchOperator.execute`` runs ``distil(batch_mode="no-wait")``: submits what is not
   done, or resumes the batches the ledger already stores (their ids are written before any poll,
   so a retried task never submits twice), and polls each batch once;
2. while any batch is still running it **defers** to ``BatchStatusTrigger``, which polls the
   batches from the triggerer's event loop (each poll is one HTTP call, run in a thread) and
   fires one ``TriggerEvent`` when all of them are terminal (or polling keeps failing);
3. ``execute_complete`` runs ``distil(batch_mode="collect")``: finished batches go into the
   ledger, then the usual parse/validate/write into ``gold.kd_dataset`` / ``gold.kd_rejected``.
   The summary (the CLI's JSON line) is the task's return value (XCom).

The trigger's serialised kwargs (stored in the metadata DB) hold batch ids, the settings file
path and non-secret overrides only: the API key is resolved inside the triggerer, from
``generation.api_key_env`` or the ``generation.api_key_conn_id`` Airflow connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from jzlake.settings import Settings

SECRET_KEYS = frozenset({"api_key", "apikey", "password", "secret", "token", "access_token", "auth_token"})


def _check_no_secrets(overrides: Mapping[str, Any], path: str = "") -> None:
    """Trigger kwargs land in the metadata DB: refuse anything that looks like a credential
    (a key named like one, or a value shaped like an API key)."""
    from models.generation.backends.openai_backend import redact

    for key, value in overrides.items():
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, Mapping):
            _check_no_secrets(value, where)
            continue
        name = str(key).lower()
        looks_secret = name in SECRET_KEYS or name.endswith(("_api_key", "_password", "_secret"))
        if looks_secret or (isinstance(value, str) and redact(value) != value):
            raise ValueError(f"override {where} looks like a credential; trigger kwargs are stored in the Airflow "
                             "database — name an environment variable (generation.api_key_env) or a connection "
                             "(generation.api_key_conn_id) instead")


def load_task_settings(config: str | None, overrides: Mapping[str, Any] | None) -> Settings:
    """The settings a task or trigger uses: the YAML file (or the defaults) plus overrides."""
    from jzlake.settings import load_settings

    return load_settings(config, overrides=dict(overrides or {}))


class BatchStatusTrigger(BaseTrigger):
    """Poll Batch API batches until all are terminal; one event with every batch's final state.

    Event payload: ``{"status": "done", "batch_ids": [...], "batches": [BatchState.as_dict(), ...]}``
    or, after ``max_poll_errors`` consecutive failed polls, ``{"status": "error", "message": ...}``
    (the batch ids are in the ledger: clearing the task resumes them, nothing is resubmitted).
    """

    def __init__(self, batch_ids: Sequence[str], *, config: str | None = None,
                 overrides: Mapping[str, Any] | None = None, poll_interval_s: float | None = None,
                 max_poll_errors: int = 5) -> None:
        super().__init__()
        if not batch_ids:
            raise ValueError("BatchStatusTrigger needs at least one batch id")
        overrides = dict(overrides or {})
        _check_no_secrets(overrides)
        self.batch_ids = list(batch_ids)
        self.config = config
        self.overrides = overrides
        self.poll_interval_s = poll_interval_s
        self.max_poll_errors = max_poll_errors

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"batch_ids": list(self.batch_ids), "config": self.config, "overrides": dict(self.overrides),
                 "poll_interval_s": self.poll_interval_s, "max_poll_errors": self.max_poll_errors})

    def _backend(self) -> Any:
        from models.generation.backends import make_backend

        settings = load_task_settings(self.config, self.overrides)
        return make_backend(settings, "openai-batch"), settings.generation.batch_poll_interval_s

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from models.generation.backends.openai_backend import redact

        backend, configured_interval = await asyncio.to_thread(self._backend)
        interval = configured_interval if self.poll_interval_s is None else self.poll_interval_s
        pending = list(self.batch_ids)
        states: dict[str, dict[str, Any]] = {}
        errors = 0
        while pending:
            for batch_id in list(pending):
                try:
                    state = await asyncio.to_thread(backend.poll, batch_id)  # sync SDK call off the loop
                except Exception as exc:  # network, 5xx: retried up to max_poll_errors in a row
                    errors += 1
                    self.log.warning("polling batch %s failed (%d in a row): %s", batch_id, errors,
                                     redact(str(exc))[:500])
                    if errors >= self.max_poll_errors:
                        yield TriggerEvent({"status": "error", "batch_ids": list(self.batch_ids),
                                            "message": redact(f"{type(exc).__name__}: {exc}")[:2000]})
                        return
                    continue
                errors = 0
                states[batch_id] = state.as_dict()
                if state.terminal:
                    pending.remove(batch_id)
                    self.log.info("batch %s is %s (%d/%d done, %d failed)", batch_id, state.status,
                                  state.completed, state.total, state.failed)
            if pending:
                await asyncio.sleep(interval)
        yield TriggerEvent({"status": "done", "batch_ids": list(self.batch_ids),
                            "batches": [states[b] for b in self.batch_ids]})


class TeacherBatchOperator(BaseOperator):
    """``jzlake distil`` on the Batch API without holding a worker slot while the batch runs.

    ``config``: settings YAML (default: ``JZLAKE_CONFIG`` / packaged defaults); ``overrides``:
    settings overrides (non-secret; e.g. ``{"generation": {"backend": "openai-batch"}}`` is
    applied automatically). Returns the distil summary.
    """

    template_fields = ("config",)
    MAX_ROUNDS = 4  # submit/collect rounds in one worker slot before giving up with a clear error

    def __init__(self, *, config: str | None = None, overrides: Mapping[str, Any] | None = None,
                 poll_interval_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        overrides = dict(overrides or {})
        _check_no_secrets(overrides)
        self.config = config
        self.overrides = overrides
        self.poll_interval_s = poll_interval_s

    def _settings(self) -> Settings:
        from jzlake.settings import deep_merge

        return load_task_settings(self.config, deep_merge(self.overrides, {"generation": {"backend": "openai-batch"}}))

    def _distil(self, mode: str, run_id: str) -> dict[str, Any]:
        from models.distil import distil

        return distil(self._settings(), run_id, batch_mode=mode)  # type: ignore[arg-type]

    def execute(self, context: Any) -> dict[str, Any]:
        from jzlake.lineage import new_run_id

        return self._drive("no-wait", new_run_id("distil"))

    def execute_complete(self, context: Any, event: dict[str, Any], run_id: str) -> dict[str, Any]:
        """Resumed by the trigger: collect finished batches (defer again if one still runs)."""
        if event.get("status") != "done":
            raise RuntimeError(f"polling Batch API batches {event.get('batch_ids')} failed: {event.get('message')}; "
                               "their ids are stored in the ledger — clear this task to resume them "
                               "(nothing is resubmitted)")
        return self._drive("collect", run_id)

    def _drive(self, mode: str, run_id: str) -> dict[str, Any]:
        for _ in range(self.MAX_ROUNDS):
            summary = self._distil(mode, run_id)
            running = [b["batch_id"] for b in summary.get("batches", []) if not b["terminal"]]
            if running:
                self.log.info("deferring on %d running batch(es): %s", len(running), running)
                self.defer(trigger=BatchStatusTrigger(running, config=self.config, overrides=self.overrides,
                                                      poll_interval_s=self.poll_interval_s),
                           method_name="execute_complete", kwargs={"run_id": run_id})
            if not summary.get("awaiting_batch"):
                return summary
            # finished but not collected yet (→ collect), or uploaded without a batch (→ resume)
            mode = "collect" if mode == "no-wait" else "no-wait"
        raise RuntimeError(f"distil run {run_id}: keys still await a Batch API batch after {self.MAX_ROUNDS} "
                           "submit/collect rounds; see the ledger rows with status submitting/submitted")
