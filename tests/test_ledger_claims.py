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


def test_an_expired_lease_makes_a_live_claimants_key_claimable(tmp_path: Path) -> None:
    settings = _settings(tmp_path, ledger_lease_s=0.2)
    requests = sample_requests(2, model=TEACHER)
    holder = Ledger.open(settings, "gold.kd_requests")
    holder.add_pending(requests)
    holder.claim(requests, unlimited())
    other = Ledger.open(settings, "gold.kd_requests")
    assert not other.claimable(other.state()[requests[0].key])
    import time

    time.sleep(0.3)
    assert other.claimable(other.state(refresh=True)[requests[0].key])
    taken, _ = other.claim(requests[:1], unlimited())
    assert len(taken) == 1
    # The first holder's late answer does not overwrite the new claim (no fallback write): the row
    # stays the new claimant's, and both calls stay counted.
    late = GenerationResponse(requests[0].key, "late", "stop", prompt_tokens=1, completion_tokens=1)
    holder.record(requests[0], late, 0.0, calls=1)
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

    def commit_after_the_other(self, accepted, version):
        if self is a and not raced:  # a has read the spend (0 calls) and reserved 2; b claims 2 first
            raced.append(b.claim(theirs, budget_b))
        return original(self, accepted, version)

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

def test_an_answer_whose_commit_fails_is_spilled_and_committed_by_the_next_start(tmp_path: Path,
                                                                               monkeypatch) -> None:
    from deltalake import DeltaTable
    from deltalake.exceptions import CommitFailedError

    settings = _settings(tmp_path, ledger_commit_deadline_s=0.3)
    requests = sample_requests(3, model=TEACHER)
    backend = CountingBackend()
    original = DeltaTable.update

    def answers_never_commit(self, updates=None, *args, **kwargs):
        if (updates or {}).get("`status`") == "'succeeded'":
            raise CommitFailedError("injected: a concurrent transaction won every time")
        return original(self, updates, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(DeltaTable, "update", answers_never_commit)
        ledger = Ledger.open(settings, "gold.kd_requests")
        first = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert first.succeeded == 3 and first.ledger_spilled == 3  # the run went on; nothing was lost
    assert {r["status"] for r in _rows(settings).values()} == {"sending"}
    spill_dir = Path(settings.runs_dir) / "ledger_spill" / "gold.kd_requests"
    assert len(list(spill_dir.glob("*.jsonl"))) == 1

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
