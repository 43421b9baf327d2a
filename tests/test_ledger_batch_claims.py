"""Batch API runs claim keys before uploading: no key is both sent online and put in a batch, and
two Batch runs on the same keys create one batch.

The stand-in of the Files + Batches API (``tests/batch_api_standin.py``) keeps every batch in
``validating`` for a minute here, so no line runs and no model server is needed; the tests read
its upload / create counters and the real Delta ledger, then cancel the batches.
"""

from __future__ import annotations

import threading
from pathlib import Path

from models.generation.backends import make_backend
from models.generation.budget import unlimited
from models.generation.engine import budget_for, run_batch_generation
from models.generation.ledger import Ledger
from tests.batch_api_standin import BatchApiStandIn
from tests.conftest import make_settings
from tests.fault_proxy import free_port
from tests.llm_fixtures import PROXY_PORTS, sample_requests

NOWHERE = "http://127.0.0.1:9"  # the stand-in's upstream: never called while batches validate


def _settings(tmp_path: Path, standin: BatchApiStandIn):
    return make_settings(tmp_path, generation={"backend": "openai-batch", "base_url": standin.url,
                                               "served_models": {"tiny-llama": "tiny"}, "api_key_env": None,
                                               "max_retries": 0})


def _rows(settings) -> dict[str, dict]:
    return {r["key"]: r for r in Ledger.open(settings, "gold.kd_requests").read().to_pylist()}


def _batch_run(settings, requests, run_id: str):
    backend = make_backend(settings)
    ledger = Ledger.open(settings, "gold.kd_requests", run_id=run_id, backend=backend.name)
    return run_batch_generation(requests, backend, ledger, budget_for(settings, ledger, backend.name), wait=False)


def test_a_batch_run_skips_keys_a_live_online_run_has_claimed(tmp_path: Path) -> None:
    requests = sample_requests(5, max_tokens=4)
    with BatchApiStandIn(NOWHERE, free_port(*PROXY_PORTS), start_delay_s=60) as standin:
        settings = _settings(tmp_path, standin)
        online = Ledger.open(settings, "gold.kd_requests", run_id="online-run", write_through=True)
        online.add_pending(requests)
        claimed, _ = online.claim(requests[:3], unlimited())  # a live online run is about to send these
        assert len(claimed) == 3
        report = _batch_run(settings, requests, "batch-run")
        try:
            assert report.sent == 2 and report.skipped_claimed == 3 and report.batches_created == 1
            assert standin.files_uploaded == 1
            rows = _rows(settings)
            for request in requests[:3]:  # the online claim is untouched
                row = rows[request.key]
                assert (row["status"], row["claim_run_id"], row["calls"]) == ("sending", "online-run", 1)
                assert row["batch_id"] is None
            assert {rows[r.key]["status"] for r in requests[3:]} == {"submitted"}
            assert {rows[r.key]["claim_run_id"] for r in requests[3:]} == {"batch-run"}
            # ... and the online run's answers land: its claim still holds
            assert online.stats["claims_lost"] == 0
        finally:
            for batch_id in report.batches:
                make_backend(settings).cancel(batch_id)


def test_two_batch_runs_started_together_create_one_batch(tmp_path: Path) -> None:
    requests = sample_requests(4, max_tokens=4)
    with BatchApiStandIn(NOWHERE, free_port(*PROXY_PORTS), start_delay_s=60) as standin:
        settings = _settings(tmp_path, standin)
        Ledger.open(settings, "gold.kd_requests").add_pending(requests)
        barrier, reports, errors = threading.Barrier(2), [], []

        def run(i: int) -> None:
            try:
                barrier.wait()
                reports.append(_batch_run(settings, requests, f"batch-{i}"))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        try:
            assert not errors, errors
            assert standin.files_uploaded == 1 and standin.batches_created == 1
            assert sorted(r.sent for r in reports) == [0, 4]
            assert sorted(r.skipped_claimed for r in reports) == [0, 4]
            rows = _rows(settings)
            assert {r["status"] for r in rows.values()} == {"submitted"}
            assert len({r["batch_id"] for r in rows.values()}) == 1
            assert all(r["calls"] == 1 for r in rows.values())
            # A third run later resumes the stored batch instead of submitting again.
            later = _batch_run(settings, requests, "batch-later")
            assert later.sent == 0 and later.batches_resumed == 1 and standin.batches_created == 1
        finally:
            for batch_id in {b for r in reports for b in r.batches}:
                make_backend(settings).cancel(batch_id)
