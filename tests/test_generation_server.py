"""Generation against a real local server (``transformers serve`` over the tiny model).

Done-criteria: a killed (write-through) run resumes without paying twice; a 5-call cap stops at 5
and the cap counts every retry; 429/500/timeouts/lost answers from a fault-injecting proxy are
retried and nothing is lost; a key the server always rejects is abandoned, not re-sent forever.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.generation.backends import make_backend
from models.generation.engine import budget_for, run_generation, write_requests
from models.generation.ledger import Ledger
from tests.conftest import REPO, make_settings
from tests.fault_proxy import FaultProxy, FaultSchedule, free_port
from tests.llm_fixtures import PROXY_PORTS, counting_proxy, llm_server, sample_requests, tiny_model_dir  # noqa: F401

pytestmark = pytest.mark.llm


def _settings(tmp_path: Path, base_url: str, served: str, **generation):
    config = {"base_url": base_url, "served_models": {"tiny-llama": served}, "api_key_env": None,
              "concurrency": 4, "request_timeout_s": 30.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.5,
              "ledger_flush_every": 4, "ledger_flush_seconds": 0.5, **generation}
    return make_settings(tmp_path, generation=config)


def _succeeded_keys(settings) -> set[str]:
    rows = Ledger.open(settings, "gold.kd_requests").read(["key", "status"]).to_pylist()
    return {r["key"] for r in rows if r["status"] == "succeeded"}


def _ledger_rows(settings) -> dict[str, dict]:
    return {r["key"]: r for r in Ledger.open(settings, "gold.kd_requests").read().to_pylist()}


@pytest.mark.slow
def test_killed_write_through_run_never_pays_twice(tmp_path: Path, llm_server) -> None:  # noqa: F811
    requests = sample_requests(30, max_tokens=8)
    requests_file = tmp_path / "requests.jsonl"
    write_requests(requests_file, requests)
    concurrency = 3
    # Latency at the proxy keeps the run long enough to kill it in the middle.
    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS), delay_s=0.15) as proxy:
        settings = _settings(tmp_path, proxy.url, llm_server.served_model, concurrency=concurrency,
                             ledger_write_through=True)
        command = [sys.executable, "-m", "models.generation.engine", "--requests", str(requests_file),
                   "--lake-root", settings.lake_root, "--base-url", proxy.url, "--served-model",
                   f"tiny-llama={llm_server.served_model}", "--concurrency", str(concurrency),
                   "--write-through", "true"]
        env = {**os.environ, "JZLAKE__GENERATION__API_KEY_ENV": ""}
        log = open(tmp_path / "engine.log", "wb")  # noqa: SIM115 (closed below)
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while len(_succeeded_keys(settings)) < 8:
                assert process.poll() is None, (tmp_path / "engine.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the engine recorded nothing in 120 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)  # no chance to flush or clean up: the hard case
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
        assert process.returncode == -signal.SIGKILL
        time.sleep(1.0)  # requests the dead client had already handed to the proxy still reach the server
        at_kill = _ledger_rows(settings)
        done_at_kill = {k for k, r in at_kill.items() if r["status"] == "succeeded"}
        in_flight = {k for k, r in at_kill.items() if r["status"] == "sending"}
        assert 8 <= len(done_at_kill) < len(requests), "the kill must land mid-run"
        assert len(in_flight) <= concurrency
        arrived_at_kill = sum(proxy.arrived.values())
        forwarded_at_kill = sum(proxy.forwarded.values())
        # Everything the server answered is in the ledger as succeeded, or was still in flight.
        answered = {k for k, n in proxy.succeeded_upstream.items() if n}
        assert answered <= done_at_kill | in_flight
        # Every call the server saw is counted (in-flight ones at their reserved worst case), and
        # nothing more than the calls dispatched: at most one window beyond what arrived.
        spent = Ledger.open(settings, "gold.kd_requests").spent("tiny-llama")
        assert arrived_at_kill <= spent.calls <= arrived_at_kill + concurrency
        assert spent.tokens >= sum(r["prompt_tokens"] + r["completion_tokens"] for r in at_kill.values())

        ledger = Ledger.open(settings, "gold.kd_requests")
        report = run_generation(requests, make_backend(settings), ledger, budget_for(settings, ledger))

        assert report.write_through and report.skipped_done == len(done_at_kill)
        assert report.sent == len(requests) - len(done_at_kill) and report.failed == 0
        rows = Ledger.open(settings, "gold.kd_requests").read().to_pylist()
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)) == len(requests)  # one row per key
        assert {r["status"] for r in rows} == {"succeeded"} and all(r["response"] is not None for r in rows)
        # A key answered and recorded before the kill was never forwarded again; only requests in
        # flight at the kill (at most `concurrency`) may have reached the server twice.
        assert all(proxy.forwarded[key] == 1 for key in done_at_kill)
        resent = {r.key for r in requests if proxy.forwarded[r.key] > 1}
        assert resent <= in_flight and len(resent) <= concurrency
        assert all(proxy.forwarded[key] <= 1 for key in answered - in_flight)
        assert sum(proxy.forwarded.values()) == forwarded_at_kill + report.sent
        # The ledger's call count covers every request the server ever saw.
        assert sum(r["calls"] for r in rows) >= sum(proxy.arrived.values())


def test_call_cap_of_five_stops_at_five(tmp_path: Path, counting_proxy, llm_server) -> None:  # noqa: F811
    settings = _settings(tmp_path, counting_proxy.url, llm_server.served_model,
                         teacher_budget={"max_calls": 5})
    requests = sample_requests(12, max_tokens=4)
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation(requests, make_backend(settings), ledger, budget_for(settings, ledger))
    assert report.sent == 5 and report.succeeded == 5 and report.not_sent_budget == 7
    assert report.message.startswith("budget exhausted: 5/5 calls used (cap generation.teacher_budget.max_calls)")
    assert sum(counting_proxy.forwarded.values()) == 5  # the server saw exactly five calls
    assert Ledger.open(settings, "gold.kd_requests").counts() == {"pending": 7, "succeeded": 5}
    # The JSON summary of the CLI carries the same message.
    assert json.loads(json.dumps(report.as_dict()))["budget_exhausted"] is True


def test_faults_are_retried_and_nothing_is_lost(tmp_path: Path, llm_server) -> None:  # noqa: F811
    requests = sample_requests(16, max_tokens=6)
    rejected = requests[-1].key
    schedule = FaultSchedule(
        seed=11, script=["429", "500", "timeout", "lost", "429"],
        rates={"429": 0.1, "500": 0.1, "timeout": 0.05, "lost": 0.05},
        per_key={rejected: ["400"]}, retry_after="1", hang_s=4.0, max_faults_per_key=2)
    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS), schedule) as proxy:
        settings = _settings(tmp_path, proxy.url, llm_server.served_model, request_timeout_s=2.0, max_retries=4)
        ledger = Ledger.open(settings, "gold.kd_requests")
        first = run_generation(requests, make_backend(settings), ledger, budget_for(settings, ledger))

        assert {"429", "500", "timeout", "lost", "400"} <= set(proxy.faults)
        assert first.succeeded == len(requests) - 1 and first.failed == 1  # only the 400 is final
        assert first.retried >= 5 and first.attempts > len(requests)
        rows = {r["key"]: r for r in Ledger.open(settings, "gold.kd_requests").read().to_pylist()}
        assert rows[rejected]["status"] == "failed" and "HTTP 400" in rows[rejected]["error"]
        assert rows[rejected]["attempts"] == 1  # a 400 is not retried
        for key, faults in proxy.faults_by_key.items():
            if key != rejected:
                assert rows[key]["status"] == "succeeded"
                assert rows[key]["attempts"] == sum(faults.values()) + 1
        # Every HTTP attempt is a call against the cap: the ledger counts exactly what reached the proxy.
        assert all(rows[r.key]["calls"] == rows[r.key]["attempts"] == proxy.arrived[r.key] for r in requests)
        assert first.attempts == sum(proxy.arrived.values()) == Ledger.open(settings, "gold.kd_requests").spent().calls
        # Retry-After was honoured: the retry after a 429 came at least a second later.
        for key, faults in proxy.faults_by_key.items():
            if faults["429"]:
                events = proxy.events_for(key)
                for before, after in itertools.pairwise(events):
                    if before.kind == "429":
                        assert after.at - before.at >= 0.95

        ledger = Ledger.open(settings, "gold.kd_requests")
        second = run_generation(requests, make_backend(settings), ledger, budget_for(settings, ledger))
        assert second.sent == 1 and second.succeeded == 1 and second.skipped_done == len(requests) - 1
    rows = Ledger.open(settings, "gold.kd_requests").read().to_pylist()
    assert len(rows) == len({r["key"] for r in rows}) == len(requests)
    assert {r["status"] for r in rows} == {"succeeded"}


def test_call_cap_counts_every_retry_sent(tmp_path: Path, llm_server) -> None:  # noqa: F811
    requests = sample_requests(4, max_tokens=4)
    # Every first attempt gets a 500: four calls for the first tries, then room for two retries.
    schedule = FaultSchedule(script=["500"] * 4, max_faults_per_key=1)
    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS), schedule) as proxy:
        settings = _settings(tmp_path, proxy.url, llm_server.served_model, teacher_budget={"max_calls": 6})
        ledger = Ledger.open(settings, "gold.kd_requests")
        report = run_generation(requests, make_backend(settings), ledger, budget_for(settings, ledger))
        assert sum(proxy.arrived.values()) == 6  # the cap held over retries
        assert report.sent == 4 and report.succeeded == 2 and report.failed == 2 and report.attempts == 6
        assert report.budget_exhausted and report.message.startswith("budget exhausted: 6/6 calls used")
        rows = _ledger_rows(settings)
        assert sum(r["calls"] for r in rows.values()) == 6
        assert all(r["calls"] == r["attempts"] == proxy.arrived[k] for k, r in rows.items())
        cut = [r for r in rows.values() if r["status"] == "failed"]
        assert all("interrupted: no budget left for retry 2" in r["error"] and r["failures"] == 0 for r in cut)

        raised = _settings(tmp_path, proxy.url, llm_server.served_model, teacher_budget={"max_calls": 8})
        ledger = Ledger.open(raised, "gold.kd_requests")
        again = run_generation(requests, make_backend(raised), ledger, budget_for(raised, ledger))
        assert again.sent == again.succeeded == 2 and sum(proxy.arrived.values()) == 8
    assert Ledger.open(raised, "gold.kd_requests").counts() == {"succeeded": 4}


def test_a_key_rejected_every_time_is_abandoned(tmp_path: Path, llm_server) -> None:  # noqa: F811
    requests = sample_requests(3, max_tokens=4)
    bad = requests[0].key
    schedule = FaultSchedule(per_key={bad: ["400"] * 10})  # e.g. a prompt over the context length
    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS), schedule) as proxy:
        settings = _settings(tmp_path, proxy.url, llm_server.served_model, max_attempts_per_key=3)
        reports = []
        for _ in range(4):
            ledger = Ledger.open(settings, "gold.kd_requests")
            reports.append(run_generation(requests, make_backend(settings), ledger, budget_for(settings, ledger)))
    assert [(r.sent, r.failed, r.abandoned) for r in reports] == [(3, 1, 0), (1, 1, 0), (1, 0, 1), (0, 0, 0)]
    assert reports[-1].skipped_abandoned == 1 and proxy.arrived[bad] == 3  # never sent again
    row = _ledger_rows(settings)[bad]
    assert row["status"] == "abandoned" and row["failures"] == 3 and "HTTP 400" in row["error"]


def test_api_key_never_reaches_the_ledger(tmp_path: Path, llm_server) -> None:  # noqa: F811
    secret = "sk-test-Kq93vN-never-store-me"
    requests = sample_requests(3, max_tokens=4)
    schedule = FaultSchedule(per_key={requests[0].key: ["401"]})  # the server echoes the key back
    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS), schedule) as proxy:
        settings = _settings(tmp_path, proxy.url, llm_server.served_model, api_key_env="JZ_TEST_KEY")
        backend = make_backend(settings, environ={"JZ_TEST_KEY": secret})
        ledger = Ledger.open(settings, "gold.kd_requests")
        report = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert proxy.auth_headers == {f"Bearer {secret}"}  # it was sent, as it must be
    assert report.failed == 1 and report.succeeded == 2
    table = Ledger.open(settings, "gold.kd_requests").read()
    dump = json.dumps(table.to_pylist(), default=str)
    assert secret not in dump and "Incorrect API key provided" in dump
