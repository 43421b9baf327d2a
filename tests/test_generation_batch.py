"""The Batch API path against a local stand-in of the Files + Batches endpoints.

The stand-in (``tests/batch_api_standin.py``) executes each batch against the real local
``transformers serve``. Covered: submit → poll → collect by ``custom_id``; resume of a stored
batch id after a crash while polling; the two narrower crash windows (after upload, after
create); failed lines re-sent in a new batch; the call cap applied before submission.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.generation.backends import make_backend
from models.generation.engine import budget_for, run_batch_generation
from models.generation.ledger import Ledger
from tests.batch_api_standin import BatchApiStandIn
from tests.conftest import make_settings
from tests.fault_proxy import free_port
from tests.llm_fixtures import PROXY_PORTS, llm_server, sample_requests, tiny_model_dir  # noqa: F401

pytestmark = pytest.mark.llm


class SimulatedCrash(Exception):
    pass


def _setup(tmp_path: Path, standin: BatchApiStandIn, served: str, **generation):
    settings = make_settings(tmp_path, generation={
        "backend": "openai-batch", "base_url": standin.url, "served_models": {"tiny-llama": served},
        "api_key_env": None, "batch_poll_interval_s": 0.2, "max_retries": 2, **generation})
    return settings


def _run(settings, requests, standin: BatchApiStandIn | None = None, **kwargs):
    backend = make_backend(settings)
    ledger = Ledger.open(settings, "gold.kd_requests", backend=backend.name)
    kwargs.setdefault("timeout_s", 90.0)  # a stuck batch fails the test instead of hanging it
    try:
        return run_batch_generation(requests, backend, ledger, budget_for(settings, ledger, backend.name),
                                    **kwargs)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nstand-in log:\n" + "\n".join(standin.log if standin else [])) from exc


def _rows(settings) -> dict[str, dict]:
    return {r["key"]: r for r in Ledger.open(settings, "gold.kd_requests").read().to_pylist()}


def test_batch_submit_crash_while_polling_then_resume_same_batch(tmp_path: Path, llm_server) -> None:  # noqa: F811
    requests = sample_requests(6, max_tokens=6)
    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS), start_delay_s=0.5) as standin:
        settings = _setup(tmp_path, standin, llm_server.served_model)
        submitted = _run(settings, requests, standin, wait=False)  # the task "dies" right after submitting
        assert submitted.batches_created == 1 and submitted.sent == 6 and len(submitted.batches) == 1
        batch_id = submitted.batches[0]
        rows = _rows(settings)
        assert {r["status"] for r in rows.values()} == {"submitted"}
        assert {r["batch_id"] for r in rows.values()} == {batch_id}  # stored before any poll
        assert all(r["calls"] == 1 for r in rows.values())
        # The deferrable step: one poll, a JSON-ready state an Airflow trigger can hand back.
        state = json.loads(json.dumps(make_backend(settings).poll(batch_id).as_dict()))
        assert state["batch_id"] == batch_id and state["input_file_id"] == rows[requests[0].key]["batch_input_file_id"]
        assert state["status"] in ("validating", "in_progress", "finalizing", "completed")

        resumed = _run(settings, requests, standin)
        assert resumed.batches == [batch_id] and resumed.batches_resumed == 1 and resumed.batches_created == 0
        assert resumed.succeeded == 6 and resumed.sent == 0
        assert standin.batches_created == 1 and standin.files_uploaded == 1
        assert set(standin.executed.values()) == {1}  # each request ran once on the server
        rows = _rows(settings)
        assert {r["status"] for r in rows.values()} == {"succeeded"}
        assert all(r["completion_tokens"] > 0 and r["calls"] == 1 for r in rows.values())
        assert {r["batch_id"] for r in rows.values()} == {batch_id}

        again = _run(settings, requests, standin)  # everything done: nothing uploaded, nothing polled
        assert again.skipped_done == 6 and again.batches == [] and standin.batches_created == 1


def test_batch_crash_after_create_before_ledger_write_adopts_the_batch(
        tmp_path: Path, llm_server, monkeypatch) -> None:  # noqa: F811
    requests = sample_requests(4, max_tokens=4, offset=10)
    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS)) as standin:
        settings = _setup(tmp_path, standin, llm_server.served_model)
        original = Ledger.mark_batch

        def crash_on_submitted(self, requests, status, **kwargs):
            if status == "submitted":
                raise SimulatedCrash("killed between batches.create and the ledger write")
            return original(self, requests, status, **kwargs)

        monkeypatch.setattr(Ledger, "mark_batch", crash_on_submitted)
        with pytest.raises(SimulatedCrash):
            _run(settings, requests, standin)
        monkeypatch.setattr(Ledger, "mark_batch", original)
        assert {r["status"] for r in _rows(settings).values()} == {"submitting"}
        assert standin.batches_created == 1

        resumed = _run(settings, requests, standin)
        assert resumed.batches_resumed == 1 and resumed.batches_created == 0 and resumed.succeeded == 4
        assert standin.batches_created == 1 and standin.files_uploaded == 1


def test_batch_crash_after_upload_creates_exactly_one_batch(tmp_path: Path, llm_server, monkeypatch) -> None:  # noqa: F811
    from models.generation.backends.openai_batch import OpenAIBatchBackend

    requests = sample_requests(3, max_tokens=4, offset=20)
    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS)) as standin:
        settings = _setup(tmp_path, standin, llm_server.served_model)

        def crash(self, input_file_id, metadata=None):
            raise SimulatedCrash("killed after the upload, before batches.create")

        with monkeypatch.context() as patch:
            patch.setattr(OpenAIBatchBackend, "create", crash)
            with pytest.raises(SimulatedCrash):
                _run(settings, requests, standin)
        assert standin.files_uploaded == 1 and standin.batches_created == 0
        resumed = _run(settings, requests, standin)
        assert resumed.batches_created == 1 and resumed.succeeded == 3
        assert standin.files_uploaded == 1 and standin.batches_created == 1


def test_failed_batch_lines_are_resubmitted_and_call_cap_applies(tmp_path: Path, llm_server) -> None:  # noqa: F811
    requests = sample_requests(5, max_tokens=4, offset=30)
    broken = requests[1].key
    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS), fail_custom_ids={broken}) as standin:
        settings = _setup(tmp_path, standin, llm_server.served_model, teacher_budget={"max_calls": 4})
        first = _run(settings, requests, standin)
        assert first.sent == 4 and first.not_sent_budget == 1 and first.budget_exhausted
        assert first.message.startswith("budget exhausted: 4/4 calls")
        assert first.succeeded == 3 and first.failed == 1
        rows = _rows(settings)
        assert rows[broken]["status"] == "failed" and "HTTP 500" in rows[broken]["error"]
        assert sorted(r["status"] for r in rows.values()) == ["failed", "pending", "succeeded", "succeeded",
                                                              "succeeded"]
    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS)) as standin:
        settings = _setup(tmp_path, standin, llm_server.served_model, teacher_budget={"max_calls": 10})
        second = _run(settings, requests, standin)
        assert second.skipped_done == 3 and second.sent == 2 and second.succeeded == 2
        assert standin.batches_created == 1 and set(standin.executed) == {broken, requests[4].key}
        rows = _rows(settings)
        assert {r["status"] for r in rows.values()} == {"succeeded"} and rows[broken]["calls"] == 2
