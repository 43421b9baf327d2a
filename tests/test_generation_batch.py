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


# ---- deferral: `jzlake distil --no-wait` / `--collect`, the Airflow trigger and operator -------------

def _corpus(settings, n: int = 2) -> None:
    """``gold.corpus`` with ``n`` real sample documents (deltalake, no JVM)."""
    from models import lake_io
    from tests.test_excerpts import real_texts

    texts = [(s, t) for s, t in real_texts() if len(t) > 1500][:n]
    if len(texts) < n:
        pytest.skip("embedded sample missing")
    lake_io.merge_rows(settings, "gold.corpus", [
        {"doc_id": f"{s}:{i}", "source": s, "text": t, "quality_score": 0.5, "math_density": 0.1,
         "n_words": len(t.split()), "run_id": "test-corpus"} for i, (s, t) in enumerate(texts)])


def _first_events(trigger, limit: int = 5) -> list:
    import asyncio

    async def drain() -> list:
        events = []
        async for event in trigger.run():
            events.append(event)
            if len(events) >= limit:
                break
        return events

    return asyncio.run(asyncio.wait_for(drain(), timeout=120))


def test_distil_no_wait_defers_to_the_trigger_then_collects(tmp_path: Path, llm_server,  # noqa: F811
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    from jzlake.cli import main
    from models import lake_io
    from plugins.teacher_batch import BatchStatusTrigger, TeacherBatchOperator

    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS), start_delay_s=2.0) as standin:
        settings = make_settings(tmp_path)
        _corpus(settings)
        cli = ["distil", "--lake-root", settings.lake_root, "--backend", "openai-batch", "--base-url", standin.url,
               "--teacher", "local", "--max-new-tokens", "4"]
        # 1. submit and return at once: the summary names the batch and its (running) status
        assert main([*cli, "--no-wait"]) == 0
        submitted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert submitted["batch_mode"] == "no-wait" and len(submitted["batches"]) == 1
        batch = submitted["batches"][0]
        assert not batch["terminal"] and batch["status"] in ("validating", "in_progress")
        assert batch["requests"] == submitted["requests"] == submitted["sent"] == submitted["awaiting_batch"] > 0
        assert submitted["not_sent"] == submitted["requests"] and submitted["accepted"] == submitted["rejected"] == 0
        assert lake_io.current_version(settings, "gold.kd_dataset") in (None, 0)  # nothing parsed yet

        # 2. the operator resumes the same batch (nothing resubmitted) and defers to the trigger
        operator = TeacherBatchOperator(
            task_id="distil_batch", poll_interval_s=0.2,
            overrides={"lake": {"root": settings.lake_root, "runs_dir": str(tmp_path / "runs")},
                       "generation": {"base_url": standin.url},
                       "distil": {"teacher": "local", "cot_sampling": {"max_tokens": 4},
                                  "tool_sampling": {"max_tokens": 4}}})
        with pytest.raises(TaskDeferred) as deferred:
            operator.execute({})
        trigger = deferred.value.trigger
        assert isinstance(trigger, BatchStatusTrigger) and trigger.batch_ids == [batch["batch_id"]]
        assert deferred.value.method_name == "execute_complete"
        assert standin.batches_created == 1 and standin.files_uploaded == 1

        # 3. the trigger, as the triggerer would run it: rebuilt from its serialised kwargs
        classpath, kwargs = trigger.serialize()
        assert classpath == "plugins.teacher_batch.BatchStatusTrigger"
        assert "sk-" not in json.dumps(kwargs) and json.loads(json.dumps(kwargs)) == kwargs
        events = _first_events(BatchStatusTrigger(**kwargs))
        assert len(events) == 1 and events[0].payload["status"] == "done"
        final = events[0].payload["batches"][0]
        assert final["status"] == "completed" and final["completed"] == final["total"] == batch["requests"]

        # 4. resumed: collect, parse, write — every key answered once, by the one batch
        summary = operator.execute_complete({}, events[0].payload, **deferred.value.kwargs)
        assert summary["batch_mode"] == "collect" and summary["batches"][0]["collected"]
        assert summary["awaiting_batch"] == 0 and summary["not_sent"] == summary["failed"] == 0
        assert summary["accepted"] + summary["rejected"] == summary["requests"] == batch["requests"]
        assert set(standin.executed.values()) == {1} and standin.batches_created == 1
        ledger = _rows(settings)
        assert {r["status"] for r in ledger.values()} == {"succeeded"}
        assert {r["batch_id"] for r in ledger.values()} == {batch["batch_id"]}
        written = [*lake_io.read_table_at(settings, "gold.kd_rejected")[0].to_pylist(),
                   *(lake_io.read_table_at(settings, "gold.kd_dataset")[0].to_pylist()
                     if lake_io.current_version(settings, "gold.kd_dataset") is not None else [])]
        assert sorted(r["request_key"] for r in written) == sorted(ledger)

        # 5. `--collect` again: nothing left to collect, nothing submitted, nothing written
        assert main([*cli, "--collect"]) == 0
        again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert again["batches"] == [] and again["skipped_done"] == again["requests"]
        assert again["written"] == {"gold.kd_dataset": 0, "gold.kd_rejected": 0}
        assert standin.batches_created == 1


def test_trigger_reports_polling_errors_and_refuses_secrets(tmp_path: Path, llm_server) -> None:  # noqa: F811
    from plugins.teacher_batch import BatchStatusTrigger

    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS)) as standin:
        trigger = BatchStatusTrigger(["batch_never_created"], poll_interval_s=0.05, max_poll_errors=2,
                                     overrides={"generation": {"base_url": standin.url, "max_retries": 0}})
        events = _first_events(trigger)
    assert len(events) == 1 and events[0].payload["status"] == "error"
    assert "batch_never_created" in events[0].payload["batch_ids"] and events[0].payload["message"]
    with pytest.raises(ValueError, match="credential"):
        BatchStatusTrigger(["b"], overrides={"generation": {"api_key": "sk-live-0123456789abcdefghij"}})


def test_no_wait_needs_the_batch_backend(tmp_path: Path) -> None:
    from models.distil import distil

    settings = make_settings(tmp_path, generation={"backend": "openai"}, distil={"teacher": "configured"})
    _corpus(settings)
    with pytest.raises(ValueError, match="openai-batch"):
        distil(settings, batch_mode="no-wait", environ={})


# ---- whole-batch endings: expired, failed; an unfinished batch and the online backend ----------

def test_expired_batch_lines_are_not_the_keys_fault_and_are_resubmitted(tmp_path: Path, llm_server) -> None:  # noqa: F811
    requests = sample_requests(4, max_tokens=4, offset=60)
    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS), concurrency=1, expire_batches=1,
                         expire_after=2) as standin:
        settings = _setup(tmp_path, standin, llm_server.served_model, max_attempts_per_key=1)
        first = _run(settings, requests, standin)
        assert first.batches_created == 1 and first.succeeded == 2 and first.failed == 2
        assert standin.batches[first.batches[0]]["status"] == "expired"
        rows = _rows(settings)
        expired = {k for k, r in rows.items() if r["status"] == "failed"}
        assert len(expired) == 2 and all("batch_expired" in rows[k]["error"] for k in expired)
        # Not the keys' fault: even with max_attempts_per_key = 1 they are not abandoned.
        assert all(rows[k]["failures"] == 0 for k in expired)

        second = _run(settings, requests, standin)
        assert second.batches_created == 1 and second.sent == 2 and second.succeeded == 2
        assert second.skipped_done == 2
        rows = _rows(settings)
        assert {r["status"] for r in rows.values()} == {"succeeded"}
        assert all(rows[k]["calls"] == 2 for k in expired)  # one call per batch that held the key
        assert set(standin.executed.values()) == {1}  # nothing ran twice on the server


def test_a_batch_that_fails_as_a_whole_is_resubmitted(tmp_path: Path, llm_server) -> None:  # noqa: F811
    requests = sample_requests(3, max_tokens=4, offset=70)
    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS), fail_batches=1) as standin:
        settings = _setup(tmp_path, standin, llm_server.served_model, max_attempts_per_key=1)
        first = _run(settings, requests, standin)
        assert first.batches_created == 1 and first.failed == 3 and first.succeeded == 0
        assert standin.batches[first.batches[0]]["status"] == "failed" and not standin.executed
        rows = _rows(settings)
        assert {r["status"] for r in rows.values()} == {"failed"}
        assert all("the batch failed validation" in r["error"] and r["failures"] == 0 for r in rows.values())

        second = _run(settings, requests, standin)
        assert second.batches_created == 1 and second.succeeded == 3
        assert standin.batches_created == 2 and set(standin.executed.values()) == {1}
        assert {r["status"] for r in _rows(settings).values()} == {"succeeded"}


def test_keys_in_an_unfinished_batch_go_online_only_after_the_batch_is_cancelled(
        tmp_path: Path, llm_server) -> None:  # noqa: F811
    from models.generation.engine import run_generation
    from tests.fault_proxy import FaultProxy

    requests = sample_requests(3, max_tokens=4, offset=80)
    with BatchApiStandIn(llm_server.root_url, free_port(*PROXY_PORTS), start_delay_s=8.0) as standin, \
            FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS)) as proxy:
        batch_settings = _setup(tmp_path, standin, llm_server.served_model)
        submitted = _run(batch_settings, requests, standin, wait=False)
        assert submitted.batches_created == 1
        online = make_settings(tmp_path, generation={
            "backend": "openai", "base_url": proxy.url, "served_models": {"tiny-llama": llm_server.served_model},
            "api_key_env": None})

        def go_online(**kwargs):
            ledger = Ledger.open(online, "gold.kd_requests")
            return run_generation(requests, make_backend(online), ledger, budget_for(online, ledger), **kwargs)

        held = go_online()
        assert held.skipped_in_batch == 3 and held.sent == 0 and sum(proxy.arrived.values()) == 0
        assert any("--cancel-batch" in w for w in held.warnings)
        assert {r["status"] for r in _rows(online).values()} == {"submitted"}

        switched = go_online(cancel_batches=make_backend(batch_settings))
        assert switched.batches_cancelled == 1 and switched.sent == 3 and switched.succeeded == 3
        assert standin.batches[submitted.batches[0]]["status"] == "cancelled" and not standin.executed
        assert {r.key: proxy.forwarded[r.key] for r in requests} == {r.key: 1 for r in requests}
        rows = _rows(online)
        assert {r["status"] for r in rows.values()} == {"succeeded"}
        assert all(r["calls"] == 2 and r["failures"] == 0 for r in rows.values())  # batch call + online call
