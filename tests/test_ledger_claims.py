"""Write-through claims, caps across writers, commit contention and spills, worst-case retries.

No server: an in-process backend answers, the ledger is the real Delta table (deltalake). The
races are made deterministic where the claim protocol has a window (two ledgers reading the same
snapshot), and real where it does not (8 writer threads on the same keys). The two-process test
through the fault-injecting proxy is ``tests/test_ledger_two_processes.py``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from models.generation.budget import Budget, unlimited
from models.generation.engine import budget_for, is_remote, run_generation
from models.generation.ledger import Ledger
from models.generation.types import GenerationRequest, GenerationResponse
from tests.conftest import make_settings
from tests.llm_fixtures import sample_requests

TEACHER = "gpt-4o-2024-08-06"  # priced in the defaults: $2.50 / $10.00 per 1M tokens
PRICE_IN, PRICE_OUT = 2.50, 10.00


class CountingBackend:
    """Answers every request; counts sends per key across threads (one instance shared by writers)."""

    name = "counting"

    def __init__(self, text: str = "an answer", completion_tokens: int = 5) -> None:
        self.sent: Counter[str] = Counter()
        self.text = text
        self.completion_tokens = completion_tokens
        self._lock = threading.Lock()

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        for request in requests:
            with self._lock:
                self.sent[request.key] += 1
            yield GenerationResponse(request.key, self.text, "stop", prompt_tokens=10,
                                     completion_tokens=self.completion_tokens, model="counting-1")


def _settings(tmp_path: Path, **generation):
    return make_settings(tmp_path, generation={"ledger_write_through": True, **generation})


def _rows(settings) -> dict[str, dict]:
    return {r["key"]: r for r in Ledger.open(settings, "gold.kd_requests").read().to_pylist()}


def worst_case(request: GenerationRequest) -> tuple[int, float]:
    """Worst case of one call, computed here from the rule (UTF-8 bytes + 16 per turn + 16, plus max_tokens)."""
    prompt = sum(len(c.encode("utf-8")) for _, c in request.messages) + 16 * len(request.messages) + 16
    completion = request.sampling.max_tokens
    return prompt + completion, (prompt * PRICE_IN + completion * PRICE_OUT) / 1e6


# ---- claims ---------------------------------------------------------------------------------

def test_two_ledgers_on_one_snapshot_never_both_claim_a_key(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    requests = sample_requests(4, model=TEACHER)
    first, second = (Ledger.open(settings, "gold.kd_requests") for _ in range(2))
    first.add_pending(requests)
    second.state()  # both have read the same version: all four keys pending
    assert all(second.claimable(second.state()[r.key]) for r in requests)
    won, _ = first.claim(requests, unlimited())
    assert [r.key for r, _ in won] == [r.key for r in requests]
    # The second claim's update matches its stale view; delta-rs refuses the commit, and the
    # re-read shows a live claimant holding every key.
    lost, skipped = second.claim(requests, unlimited())
    assert lost == [] and [r.key for r in skipped] == [r.key for r in requests]
    assert second.stats["commit_conflicts"] + second.stats["claim_rereads"] >= 1
    rows = _rows(settings)
    assert {r["status"] for r in rows.values()} == {"sending"} and all(r["calls"] == 1 for r in rows.values())
    assert {r["claim_id"] for r in rows.values()} == {first.claim_id}
    assert {r["claim_run_id"] for r in rows.values()} == {first.run_id}
    assert all(r["lease_expires_at"] is not None for r in rows.values())
    # The claimant closes without answering: its keys are claimable again, and its calls stay counted.
    first.close()
    again, skipped = Ledger.open(settings, "gold.kd_requests").claim(requests, unlimited())
    assert len(again) == 4 and skipped == []
    assert all(r["calls"] == 2 for r in _rows(settings).values())


def _claimant_elsewhere(monkeypatch, settings, identity: str = "another-boot.4026531836.4242.77") -> Ledger:
    """A ledger whose claims read as made by a process on another host (liveness unknown here)."""
    from models.generation import ledger as ledger_module

    with monkeypatch.context() as patch:
        patch.setattr(ledger_module, "process_identity", lambda: identity)
        holder = Ledger.open(settings, "gold.kd_requests")
    ledger_module._LIVE_CLAIMANTS.pop(holder.claim_id)  # not an open ledger of this process
    return holder


def test_an_expired_lease_frees_only_a_claimant_of_unknown_liveness(tmp_path: Path, monkeypatch) -> None:
    import time

    from models.generation.ledger import CLAIM_LOST

    settings = _settings(tmp_path, ledger_lease_s=0.2)
    requests = sample_requests(2, model=TEACHER)
    alive = Ledger.open(settings, "gold.kd_requests")  # this process: provably alive
    alive.add_pending(requests)
    alive.claim(requests[1:], unlimited())
    holder = _claimant_elsewhere(monkeypatch, settings)
    holder.claim(requests[:1], unlimited())
    other = Ledger.open(settings, "gold.kd_requests")
    assert not any(other.claimable(other.state()[r.key]) for r in requests)  # within the leases
    time.sleep(0.3)
    state = other.state(refresh=True)
    assert other.claimable(state[requests[0].key])  # unknown liveness, lease expired
    assert not other.claimable(state[requests[1].key])  # alive on this host: never stolen, lease or not
    taken, skipped = other.claim(requests, unlimited())
    assert [r.key for r, _ in taken] == [requests[0].key] and skipped == requests[1:]
    # The first holder's late answer does not overwrite the new claim (no fallback write): the row
    # stays the new claimant's, both calls stay counted, and the answer is reported lost.
    late = GenerationResponse(requests[0].key, "late", "stop", prompt_tokens=1, completion_tokens=1)
    assert holder.record(requests[0], late, 0.0, calls=1) == CLAIM_LOST
    assert holder.stats["claims_lost"] == 1
    row = _rows(settings)[requests[0].key]
    assert row["status"] == "sending" and row["claim_id"] == other.claim_id and row["calls"] == 2
    holder.close()


def test_a_claim_is_rechecked_against_caps_when_another_writer_committed_meanwhile(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    # Keys in different partitions do not conflict in delta-rs: the cap is what must still hold.
    settings = _settings(tmp_path, teacher_budget={"max_calls": 3})
    pool = sample_requests(40, model=TEACHER)
    mine = [r for r in pool if r.key[0] == pool[0].key[0]][:2]
    theirs = [r for r in pool if r.key[0] != pool[0].key[0]][:2]
    assert len(mine) == len(theirs) == 2
    a, b = Ledger.open(settings, "gold.kd_requests"), Ledger.open(settings, "gold.kd_requests")
    a.add_pending(mine + theirs)
    budget_a, budget_b = budget_for(settings, a), budget_for(settings, b)
    original = Ledger._commit_claims
    raced = []

    def commit_after_the_other(self, accepted, version, status="sending"):
        if self is a and not raced:  # a has read the spend (0 calls) and reserved 2; b claims 2 first
            raced.append(b.claim(theirs, budget_b))
        return original(self, accepted, version, status)

    monkeypatch.setattr(Ledger, "_commit_claims", commit_after_the_other)
    claimed_a, _ = a.claim(mine, budget_a)
    claimed_b = raced[0][0]
    assert len(claimed_b) == 2
    assert len(claimed_a) == 1  # a's first claim of two was given back; the retry fits one under the cap
    spent = Ledger.open(settings, "gold.kd_requests").spent(TEACHER)
    assert spent.calls == 3 <= settings.generation.teacher_budget.max_calls
    assert Ledger.open(settings, "gold.kd_requests").counts() == {"pending": 1, "sending": 3}


def test_eight_writers_on_the_same_keys_send_each_once_and_commit_everything(tmp_path: Path) -> None:
    settings = _settings(tmp_path, ledger_commit_deadline_s=120)
    requests = sample_requests(16, model=TEACHER)
    backend = CountingBackend()
    reports, errors = [], []

    def writer() -> None:
        try:
            ledger = Ledger.open(settings, "gold.kd_requests")
            reports.append((run_generation(requests, backend, ledger, budget_for(settings, ledger)), ledger.stats))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(reports) == 8
    assert dict(backend.sent) == {r.key: 1 for r in requests}  # every key sent exactly once
    assert sum(report.sent for report, _ in reports) == 16
    assert sum(stats["spilled"] for _, stats in reports) == 0  # every answer committed under contention
    assert sum(stats["commit_conflicts"] for _, stats in reports) > 0  # there was contention
    rows = _rows(settings)
    assert len(rows) == 16 and {r["status"] for r in rows.values()} == {"succeeded"}
    assert sum(r["calls"] for r in rows.values()) == 16


# ---- commit failures: spill, then commit on the next start ------------------------------------

def _spilled(tmp_path: Path, monkeypatch):
    """Three answers bought, none committable (injected conflicts): all spilled to one file."""
    from deltalake import DeltaTable
    from deltalake.exceptions import CommitFailedError

    settings = _settings(tmp_path, ledger_commit_deadline_s=0.3)
    requests = sample_requests(3, model=TEACHER)
    backend = CountingBackend()
    original = DeltaTable.update

    def answers_never_commit(self, updates=None, *args, **kwargs):
        if (updates or {}).get("`status`") == "'succeeded'":
            raise CommitFailedError("injected")
        return original(self, updates, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(DeltaTable, "update", answers_never_commit)
        ledger = Ledger.open(settings, "gold.kd_requests")
        first = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert first.succeeded == 3 and first.ledger_spilled == 3  # the run went on; nothing was lost
    spill_dir = Path(settings.runs_dir) / "ledger_spill" / "gold.kd_requests"
    (path,) = spill_dir.glob("*.jsonl")
    return settings, requests, backend, spill_dir, path


def test_an_answer_whose_commit_fails_is_spilled_and_committed_by_the_next_start(tmp_path: Path,
                                                                               monkeypatch) -> None:
    settings, requests, backend, spill_dir, _ = _spilled(tmp_path, monkeypatch)
    assert {r["status"] for r in _rows(settings).values()} == {"sending"}

    ledger = Ledger.open(settings, "gold.kd_requests")
    second = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert second.ledger_spills_recovered == 3 and second.sent == 0 and second.skipped_done == 3
    assert dict(backend.sent) == {r.key: 1 for r in requests}  # not bought again
    rows = _rows(settings)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert all(r["response"] == "an answer" and r["calls"] == 1 for r in rows.values())
    assert list(spill_dir.iterdir()) == []


# ---- retries at the worst case; timed-out attempts possibly billed ---------------------------

class TimeoutOnceBackend:
    """Every request's first attempt times out (reported as possibly billed), then it asks to retry."""

    name = "timeout-once"
    pulls_concurrently = True  # takes the engine's hooks
    concurrency = 1

    def generate(self, requests, *, before_retry=None, possibly_billed=None):
        for request in requests:
            possibly_billed(request)
            if not before_retry(request, 2):
                yield GenerationResponse(request.key, None, None, attempts=1,
                                         error="APITimeoutError: timed out (interrupted: no budget left for retry 2)")
                continue
            yield GenerationResponse(request.key, "late answer", "stop", prompt_tokens=30, completion_tokens=7,
                                     attempts=2)


def test_a_retry_reserves_the_worst_case_and_a_timeout_is_charged_at_it(tmp_path: Path) -> None:
    request = sample_requests(1, model=TEACHER, max_tokens=64)[0]
    tokens, usd = worst_case(request)
    # Room for one worst case, not two: the retry is refused on tokens, the timed-out attempt is charged.
    settings = _settings(tmp_path / "capped", teacher_budget={"max_tokens": tokens + tokens // 2})
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation([request], TimeoutOnceBackend(), ledger, budget_for(settings, ledger))
    assert report.failed == 1 and report.possibly_billed == 1 and report.budget_exhausted
    assert "max_tokens" in report.message
    row = _rows(settings)[request.key]
    assert row["status"] == "failed" and row["failures"] == 0 and row["calls"] == 1
    assert row["spent_tokens"] == tokens and row["spent_usd"] == pytest.approx(usd)

    settings = _settings(tmp_path / "open")
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation([request], TimeoutOnceBackend(), ledger, budget_for(settings, ledger))
    assert report.succeeded == 1 and report.possibly_billed == 1
    row = _rows(settings)[request.key]
    assert row["calls"] == row["attempts"] == 2
    # the timed-out attempt at its worst case + the answer's real tokens
    assert row["spent_tokens"] == tokens + 37
    assert row["spent_usd"] == pytest.approx(usd + (30 * PRICE_IN + 7 * PRICE_OUT) / 1e6)


# ---- caps through run_generation and the real ledger ------------------------------------------

def test_usd_cap_stops_the_run_and_the_ledger_stays_under_it(tmp_path: Path) -> None:
    requests = sample_requests(12, model=TEACHER, max_tokens=400)
    worst = [worst_case(r)[1] for r in requests]
    cap = sum(worst[:3]) * 1.01  # three worst cases fit; each answer costs most of one
    settings = _settings(tmp_path, teacher_budget={"max_calls": None, "max_usd": cap})
    backend = CountingBackend(completion_tokens=350)
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert report.budget_exhausted and "(cap generation.teacher_budget.max_usd)" in report.message
    assert 3 <= report.sent < len(requests) and report.not_sent_budget == len(requests) - report.sent
    spent = Ledger.open(settings, "gold.kd_requests").spent(TEACHER)
    assert spent.usd <= cap
    # The first request not sent would not have fit at its worst case.
    assert spent.usd + worst[report.sent] > cap
    assert spent.usd == pytest.approx(report.sent * (10 * PRICE_IN + 350 * PRICE_OUT) / 1e6)

    raised = _settings(tmp_path, teacher_budget={"max_calls": None, "max_usd": 1.0})
    ledger = Ledger.open(raised, "gold.kd_requests")
    again = run_generation(requests, backend, ledger, budget_for(raised, ledger))
    assert again.skipped_done == report.sent and again.sent == len(requests) - report.sent
    assert set(backend.sent.values()) == {1}


def test_token_cap_stops_the_run_and_the_ledger_stays_under_it(tmp_path: Path) -> None:
    requests = sample_requests(10, model=TEACHER, max_tokens=300)
    worst = [worst_case(r)[0] for r in requests]
    cap = worst[0] + worst[1] + 100
    settings = _settings(tmp_path, teacher_budget={"max_calls": None, "max_tokens": cap})
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation(requests, CountingBackend(completion_tokens=250), ledger, budget_for(settings, ledger))
    assert report.budget_exhausted and "(cap generation.teacher_budget.max_tokens)" in report.message
    assert 2 <= report.sent < len(requests)
    spent = Ledger.open(settings, "gold.kd_requests").spent(TEACHER)
    assert spent.tokens == 260 * report.sent <= cap  # the answers' real tokens (10 + 250 each)
    assert spent.tokens + worst[report.sent] > cap
    assert Ledger.open(settings, "gold.kd_requests").counts() == {"pending": len(requests) - report.sent,
                                                                  "succeeded": report.sent}


# ---- lone surrogates --------------------------------------------------------------------------

@pytest.mark.parametrize("write_through", [True, False])
def test_a_reply_with_a_lone_surrogate_is_stored_sanitised_and_flagged(tmp_path: Path, write_through: bool) -> None:
    settings = make_settings(tmp_path, generation={"ledger_write_through": write_through})
    requests = sample_requests(3)
    backend = CountingBackend(text="x = 2 \ud835 so \\boxed{2}")  # half of a surrogate pair
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert report.succeeded == 3 and report.write_through is write_through
    rows = _rows(settings)
    assert {r["response"] for r in rows.values()} == {"x = 2 \ufffd so \\boxed{2}"}
    assert {r["flags"] for r in rows.values()} == {"sanitised_surrogates:response"}


# ---- when the ledger is written through ------------------------------------------------------

def test_remote_endpoints_and_api_keys_are_always_written_through(tmp_path: Path) -> None:
    assert not is_remote("http://127.0.0.1:18300/v1") and not is_remote("http://localhost:8000/v1")
    assert not is_remote("http://[::1]:8000/v1") and not is_remote("http://127.8.0.1/v1")
    assert is_remote("https://api.openai.com/v1") and is_remote("http://10.0.0.7:8000/v1")

    class Remote(CountingBackend):
        base_url = "https://llm.example.org/v1"

    class Keyed(CountingBackend):
        base_url = "http://127.0.0.1:18300/v1"
        api_key_in_use = True

    settings = make_settings(tmp_path, generation={"ledger_write_through": False})
    for backend, model in ((Remote(), "unpriced-remote-model"), (Keyed(), "tiny-llama")):
        ledger = Ledger.open(settings, "gold.kd_requests")
        report = run_generation(sample_requests(2, model=model), backend, ledger, budget_for(settings, ledger))
        assert report.write_through, type(backend).__name__
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation(sample_requests(2, model="another-unpriced", offset=5), Remote(), ledger,
                            budget_for(settings, ledger))
    assert any("generation.prices.another-unpriced" in w for w in report.warnings)
    local = CountingBackend()  # no endpoint, free model, configured false: buffered
    ledger = Ledger.open(settings, "gold.kd_requests")
    assert not run_generation(sample_requests(2, offset=9), local, ledger, budget_for(settings, ledger)).write_through
    assert Budget.from_settings(settings.generation.teacher_budget, settings.generation.prices).is_paid(
        settings.generation.teacher_model)  # the configured teacher ships with a price


# ---- who holds a claim: boot id + PID namespace + pid + start time ---------------------------

def _identity_parts() -> tuple[str, str]:
    import os

    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return boot, str(os.stat("/proc/self/ns/pid").st_ino)


def _start_ticks(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


def _unused_pid() -> int:
    pid = 4_000_000
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="needs Linux /proc")
def test_a_claimant_in_another_pid_namespace_is_not_provably_dead(tmp_path: Path) -> None:
    import socket
    from datetime import timedelta

    from jzlake.lineage import utc_now
    from models.generation.ledger import LedgerEntry

    boot, namespace = _identity_parts()
    pid = _unused_pid()  # no such pid here; in the claimant's own namespace it is alive
    claim = f"run-A@{socket.gethostname()}#{pid}#0123abcd#{boot}.{int(namespace) + 1}.{pid}.12345"
    ledger = Ledger.open(_settings(tmp_path))
    live = LedgerEntry("k", "sending", calls=1, claim_id=claim, lease_expires_at=utc_now() + timedelta(hours=1))
    assert not ledger.claimable(live)  # same hostname, other namespace: only the lease decides
    assert ledger.claimable(LedgerEntry("k", "sending", calls=1, claim_id=claim,
                                        lease_expires_at=utc_now() - timedelta(seconds=1)))
    # The same pid in *this* namespace, gone: provably dead, lease or not.
    here = f"run-A@{socket.gethostname()}#0123abcd#{boot}.{namespace}.{pid}.12345"
    assert ledger.claimable(LedgerEntry("k", "sending", calls=1, claim_id=here,
                                        lease_expires_at=utc_now() + timedelta(hours=1)))


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="needs Linux /proc")
def test_pid_reuse_is_told_apart_by_the_start_time() -> None:
    import subprocess
    import sys

    from models.generation.ledger import claimant_state, process_identity

    boot, namespace = _identity_parts()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = _start_ticks(child.pid)
        assert claimant_state(f"r@h#x#{boot}.{namespace}.{child.pid}.{started}") == "alive"
        # the same pid, another start time: the claimant died and its pid was reused
        assert claimant_state(f"r@h#x#{boot}.{namespace}.{child.pid}.{int(started) - 1}") == "dead"
        assert claimant_state(f"r@h#x#another-boot.{namespace}.{child.pid}.{started}") == "unknown"
    finally:
        child.kill()
        child.wait()
    assert claimant_state(f"r@h#x#{boot}.{namespace}.{child.pid}.{started}") == "dead"
    assert process_identity().startswith(f"{boot}.{namespace}.")
    assert claimant_state("run@host#123#abcd") == "unknown"  # a claim written before identities: the lease decides


# Holds a claim on every key of a ledger, then sleeps (run as a separate OS process).
CLAIMANT = """
import pathlib, sys, time
from models.generation.budget import unlimited
from models.generation.ledger import Ledger
from tests.conftest import make_settings
from tests.llm_fixtures import sample_requests
settings = make_settings(pathlib.Path(sys.argv[1]),
                         generation={"ledger_write_through": True, "ledger_lease_s": float(sys.argv[2])})
ledger = Ledger.open(settings, "gold.kd_requests")
requests = sample_requests(3, model="gpt-4o-2024-08-06")
ledger.add_pending(requests)
taken, _ = ledger.claim(requests, unlimited())
print(len(taken), flush=True)
time.sleep(float(sys.argv[3]))
"""


def _claim_in_process(settings, prefix: tuple[str, ...] = ()) -> int:
    """How many of the claimant's keys a fresh process (optionally under ``prefix``) can claim."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import pathlib, sys; from models.generation.budget import unlimited;"
            "from models.generation.ledger import Ledger;"
            "from tests.conftest import make_settings; from tests.llm_fixtures import sample_requests;"
            "s = make_settings(pathlib.Path(sys.argv[1]), generation={'ledger_write_through': True});"
            "print(len(Ledger.open(s, 'gold.kd_requests').claim(sample_requests(3, model='gpt-4o-2024-08-06'),"
            " unlimited())[0]))")
    done = subprocess.run([*prefix, sys.executable, "-c", code, str(Path(settings.lake_root).parent)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def _start_claimant(tmp_path: Path, lease_s: float, hold_s: float):
    import subprocess
    import sys

    from tests.conftest import REPO

    claimant = subprocess.Popen([sys.executable, "-c", CLAIMANT, str(tmp_path), str(lease_s), str(hold_s)],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert claimant.stdout.readline().strip() == "3"
    return claimant


def test_a_stopped_claimant_alive_on_this_host_keeps_its_keys_past_its_lease(tmp_path: Path) -> None:
    import os
    import signal
    import time

    settings = _settings(tmp_path)
    claimant = _start_claimant(tmp_path, lease_s=1.0, hold_s=60)
    try:
        os.kill(claimant.pid, signal.SIGSTOP)  # a frozen cgroup, a swap storm: alive, renews nothing
        time.sleep(1.5)
        rows = _rows(settings)
        assert all(r["lease_expires_at"] is not None for r in rows.values())
        assert _claim_in_process(settings) == 0  # lease expired, but the claimant provably lives
    finally:
        claimant.kill()
        claimant.wait()
    assert _claim_in_process(settings) == 3  # now it is provably dead


def _can_unshare_pid() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs unshare --pid (root or user namespaces)")
def test_a_live_claim_is_not_stolen_from_another_pid_namespace(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    claimant = _start_claimant(tmp_path, lease_s=900, hold_s=60)
    try:
        # Same host, same hostname, another PID namespace: os.kill(pid, 0) fails there.
        assert _claim_in_process(settings, ("unshare", "--pid", "--fork", "--mount-proc")) == 0
    finally:
        claimant.kill()
        claimant.wait()


# ---- leases: renewed while in flight, never shorter than a request ----------------------------

class SlowBackend(CountingBackend):
    """Takes ``delay_s`` per request and says its request timeout; ``during(request)`` runs mid-request."""

    def __init__(self, delay_s: float, timeout_s: float, during=None) -> None:
        super().__init__()
        self.delay_s, self.timeout_s, self.during = delay_s, timeout_s, during

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        import time

        for request in requests:
            time.sleep(self.delay_s)
            if self.during is not None:
                self.during(request)
            yield from super().generate([request])


def test_the_lease_is_renewed_while_a_request_is_in_flight(tmp_path: Path) -> None:
    settings = _settings(tmp_path, ledger_lease_s=1.5)
    request = sample_requests(1, model=TEACHER)[0]
    seen = []
    backend = SlowBackend(delay_s=2.5, timeout_s=1.0, during=lambda r: seen.append(_rows(settings)[r.key]))
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation([request], backend, ledger, budget_for(settings, ledger))
    assert report.succeeded == 1 and ledger.stats["lease_renewals"] >= 2
    row = seen[0]  # 2.5 s after the claim, with a 1.5 s lease: still held, because it was renewed
    assert row["status"] == "sending" and row["claim_id"] == ledger.claim_id
    assert row["lease_expires_at"] > row["updated_at"]
    other = Ledger.open(settings, "gold.kd_requests")
    assert _rows(settings)[request.key]["status"] == "succeeded" and other.spent(TEACHER).calls == 1


def test_a_lease_shorter_than_the_request_timeout_sends_nothing(tmp_path: Path) -> None:
    settings = _settings(tmp_path, ledger_lease_s=3)
    backend = SlowBackend(delay_s=0, timeout_s=120)
    ledger = Ledger.open(settings, "gold.kd_requests")
    with pytest.raises(ValueError, match="ledger_lease_s"):
        run_generation(sample_requests(2, model=TEACHER), backend, ledger, budget_for(settings, ledger))
    assert backend.sent == {} and Ledger.open(settings, "gold.kd_requests").counts() == {"pending": 2}


def test_a_claimed_request_whose_lease_cannot_cover_its_timeout_is_not_sent(tmp_path: Path, monkeypatch) -> None:
    settings = _settings(tmp_path)
    requests = sample_requests(2, model=TEACHER)
    renewals = []
    # the heartbeat has been failing: 5 s left of the lease, a renewal that does not land
    monkeypatch.setattr(Ledger, "lease_remaining", lambda self, key: 5.0)
    monkeypatch.setattr(Ledger, "renew_leases", lambda self, attempts=3: renewals.append(1) or 0)
    backend = SlowBackend(delay_s=0, timeout_s=30)
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert backend.sent == {} and report.sent == 0 and report.not_sent_lease == 2 and report.not_sent_budget == 0
    assert len(renewals) == 2  # one renewal tried per request before refusing it
    rows = _rows(settings)  # the claims were given back: nothing counted, claimable at once
    assert {(r["status"], r["calls"]) for r in rows.values()} == {("pending", 0)}


def test_an_answer_whose_claim_was_taken_over_is_reported_lost_not_succeeded(tmp_path: Path,
                                                                            monkeypatch) -> None:
    from deltalake import DeltaTable

    settings = _settings(tmp_path)
    requests = sample_requests(2, model=TEACHER)
    thieves = []

    def lease_expires_and_another_host_claims(request: GenerationRequest) -> None:
        if request.key != requests[0].key:
            return
        DeltaTable(Ledger.open(settings).uri).update(  # as if the heartbeat had failed for a whole lease
            {"lease_expires_at": "CAST('2000-01-01T00:00:00Z' AS TIMESTAMP)"}, predicate=f"key = '{request.key}'")
        thief = _claimant_elsewhere(monkeypatch, settings, "other-boot.1.2.3")
        thieves.append(thief)
        # the run's own process is alive here, so make its claim read as from another host too
        monkeypatch.setattr("models.generation.ledger.claimant_state", lambda claim_id: "unknown")
        assert len(thief.claim([request], unlimited())[0]) == 1

    ledger = _claimant_elsewhere(monkeypatch, settings, "run-boot.1.2.3")
    backend = SlowBackend(delay_s=0, timeout_s=1.0, during=lease_expires_and_another_host_claims)
    report = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert report.claims_lost == 1 and report.succeeded == 1 and report.sent == 2
    assert any("claims_lost" in w for w in report.warnings)
    rows = _rows(settings)
    assert rows[requests[0].key]["claim_id"] == thieves[0].claim_id and rows[requests[0].key]["status"] == "sending"
    assert rows[requests[1].key]["status"] == "succeeded"


# ---- spill files: damaged lines quarantined, leftovers of dead recoverers taken over -----------

def _restart(settings, requests, backend):
    ledger = Ledger.open(settings, "gold.kd_requests")
    return run_generation(requests, backend, ledger, budget_for(settings, ledger))


def test_a_spill_with_a_cut_last_line_and_a_garbage_first_line_recovers_the_rest(tmp_path: Path, monkeypatch,
                                                                                  caplog) -> None:
    settings, requests, backend, spill_dir, path = _spilled(tmp_path, monkeypatch)
    lines = path.read_text().splitlines()
    cut = lines[-1][:-40]
    path.write_text("{garbage\n" + "\n".join(lines[:-1]) + "\n" + cut)  # crash mid-append, damaged head
    with caplog.at_level("WARNING", logger="jzlake.generation.ledger"):
        report = _restart(settings, requests, backend)
    assert report.ledger_spills_recovered == 2 and report.sent == 1  # the cut answer is bought again
    (bad,) = spill_dir.glob("*.bad")
    assert bad.read_text().splitlines() == ["{garbage", cut]
    assert any(bad.name in message for message in caplog.messages)
    assert sorted(backend.sent.values()) == [1, 1, 2]
    assert [p.suffix for p in spill_dir.iterdir()] == [".bad"]  # nothing left half-committed
    again = _restart(settings, requests, backend)  # a second start has nothing to do
    assert again.sent == 0 and again.ledger_spills_recovered == 0
    assert {r["status"] for r in _rows(settings).values()} == {"succeeded"}


def test_copies_of_a_spill_count_each_key_once(tmp_path: Path, monkeypatch) -> None:
    import shutil

    settings, requests, backend, spill_dir, path = _spilled(tmp_path, monkeypatch)
    shutil.copy(path, path.with_name("copy-" + path.name))
    report = _restart(settings, requests, backend)
    assert report.ledger_spills_recovered == 3 and report.sent == 0 and list(spill_dir.iterdir()) == []


def test_a_committing_file_left_by_a_dead_recoverer_is_taken_over(tmp_path: Path, monkeypatch) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    settings, requests, backend, spill_dir, path = _spilled(tmp_path, monkeypatch)
    dead = subprocess.run([sys.executable, "-c", "from models.generation.ledger import process_identity as p; "
                           "print(p())"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    path.rename(path.with_name(f"{path.name}.committing-{dead}"))  # renamed, then the recoverer died
    report = _restart(settings, requests, backend)
    assert report.ledger_spills_recovered == 3 and report.sent == 0 and list(spill_dir.iterdir()) == []
    assert dict(backend.sent) == {r.key: 1 for r in requests}


# ---- a priced model is always written through -------------------------------------------------

def test_a_priced_model_behind_a_loopback_gateway_is_written_through_whatever_the_setting(tmp_path: Path) -> None:
    class LoopbackGateway(CountingBackend):  # e.g. a LiteLLM proxy on localhost fronting a paid API
        base_url = "http://127.0.0.1:4000/v1"

    settings = make_settings(tmp_path, generation={"ledger_write_through": False})
    ledger = Ledger.open(settings, "gold.kd_requests")
    report = run_generation(sample_requests(2, model=TEACHER), LoopbackGateway(), ledger, budget_for(settings, ledger))
    assert report.write_through and report.ledger_commits >= 4  # a claim and an answer per key, at least
    assert any("ledger_write_through = false is overridden" in w for w in report.warnings)
