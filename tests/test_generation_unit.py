"""Generation engine without a server: budget, retries policy, secrets, ledger exactly-once, backends."""

from __future__ import annotations

import email.utils
import gc
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from models.generation.backends import make_backend, resolve_api_key
from models.generation.backends.openai_backend import backoff_delay, parse_retry_after, redact
from models.generation.budget import Budget, BudgetConfigError, prompt_token_bound, shard_allowances
from models.generation.engine import ShardScope, budget_for, dedupe, run_generation
from models.generation.ledger import Ledger
from models.generation.types import GenerationRequest, GenerationResponse, SamplingParams
from models.synthesize import shard_of
from tests.conftest import make_settings
from tests.llm_fixtures import sample_requests, tiny_model_dir  # noqa: F401

TEACHER = "gpt-4o-2024-08-06"  # priced in the defaults: a paid model (write-through under ``auto``)


class EchoBackend:
    """In-process stand-in for a server: answers every request, counts what it was sent."""

    name = "echo"

    def __init__(self, fail_keys: Iterable[str] = (), delay_s: float = 0.0, fail_when=None) -> None:
        self.sent: Counter[str] = Counter()
        self.fail_keys = set(fail_keys)
        self.fail_when = fail_when
        self.delay_s = delay_s

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        for request in requests:  # lazily, like the real online backends
            self.sent[request.key] += 1
            time.sleep(self.delay_s)
            if request.key in self.fail_keys or (self.fail_when is not None and self.fail_when(request)):
                yield GenerationResponse(request.key, None, None, error="HTTP 400: nope (not retryable)")
                continue
            prompt = request.messages[-1][1]
            yield GenerationResponse(request.key, f"answer to {prompt[:20]}", "stop",
                                     prompt_tokens=len(prompt) // 4, completion_tokens=5, latency_s=0.01,
                                     model="echo-1")


def _ledger(tmp_path: Path, **kwargs) -> Ledger:
    settings = make_settings(tmp_path)
    return Ledger.open(settings, "gold.kd_requests", backend="echo", **kwargs)


# ---- settings ---------------------------------------------------------------------------------

def test_generation_settings_defaults_hold_references_not_keys(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    generation = settings.generation
    assert generation.teacher_budget.max_calls == 9300  # the paper's total teacher calls
    assert generation.prices["gpt-4o-2024-08-06"].output_per_1m > 0
    fields = set(type(generation).model_fields)
    assert {"api_key_env", "api_key_conn_id"} <= fields and "api_key" not in fields


def test_api_key_from_environment_is_secret_and_never_in_reprs(tmp_path: Path) -> None:
    secret = "sk-test-Zq81xY0-unit-secret"
    settings = make_settings(tmp_path, generation={"api_key_env": "JZ_TEST_KEY"})
    key = resolve_api_key(settings, environ={"JZ_TEST_KEY": secret})
    assert key is not None and key.get_secret_value() == secret
    assert secret not in repr(key) and secret not in str(key)
    backend = make_backend(settings, "openai", environ={"JZ_TEST_KEY": secret})
    batch = make_backend(settings, "openai-batch", environ={"JZ_TEST_KEY": secret})
    assert secret not in repr(backend) and "redacted" in repr(backend)
    assert secret not in repr(batch)
    assert secret not in repr(settings) and secret not in settings.model_dump_json()
    assert resolve_api_key(settings, environ={}) is None


def test_redact_scrubs_the_key_and_key_shaped_strings() -> None:
    from pydantic import SecretStr

    text = "Incorrect API key provided: Bearer sk-abc123SECRET; also sk-proj-xyz7890 and mysecretvalue"
    cleaned = redact(text, SecretStr("mysecretvalue"))
    assert "sk-abc123SECRET" not in cleaned and "sk-proj-xyz7890" not in cleaned
    assert "mysecretvalue" not in cleaned and "Incorrect API key provided" in cleaned


# ---- retry policy ------------------------------------------------------------------------------

def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after({"Retry-After": date}, now=now) <= 31
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_backoff_is_exponential_with_bounded_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(1, 10):
        step = min(8.0, 0.5 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays)
        assert len(set(delays)) > 1  # jittered, so a herd of retries spreads out


# ---- budget -------------------------------------------------------------------------------------

def _request(i: int, model: str = "gpt-4o-2024-08-06", max_tokens: int = 100) -> GenerationRequest:
    return GenerationRequest(model, (("user", f"problem {i}"),), SamplingParams(max_tokens=max_tokens),
                             "tpl", "h0")


def test_call_cap_refuses_the_sixth_with_a_clear_message() -> None:
    budget = Budget(max_calls=5, label="generation.teacher_budget")
    granted = [budget.reserve(_request(i)) for i in range(7)]
    assert sum(g is not None for g in granted) == 5 and granted[5] is None
    assert budget.exhausted is not None
    assert budget.exhausted.startswith("budget exhausted: 5/5 calls")
    assert "generation.teacher_budget.max_calls" in budget.exhausted


def test_concurrent_reservations_cannot_overshoot_token_cap() -> None:
    request = _request(0, max_tokens=100)
    bound = prompt_token_bound(request) + 100
    budget = Budget(max_tokens=bound * 10 + bound // 2)
    granted: list = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(5):
            reservation = budget.reserve(request)
            if reservation is not None:
                with lock:
                    granted.append(reservation)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 10  # exactly what fits, whatever the interleaving
    for reservation in granted:  # settling with real (smaller) usage never exceeds the cap
        budget.settle(reservation, 20, 60)
    assert budget.spent.tokens == 10 * 80 <= budget.max_tokens
    assert "tokens" in (budget.exhausted or "")


def test_usd_cost_comes_from_the_price_table(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, generation={"teacher_budget": {"max_usd": 0.01}})
    budget = budget_for(settings, _ledger(tmp_path))
    # 1000 in + 500 out at $2.50 / $10.00 per 1M tokens
    assert budget.cost("gpt-4o-2024-08-06", 1000, 500) == pytest.approx(0.0025 + 0.005)
    assert budget.price("gpt-4o-mini-2024-07-18") == settings.generation.prices["gpt-4o-mini"]  # prefix
    with pytest.raises(BudgetConfigError, match="no entry for \\['mystery-model'\\]"):
        budget.check_models({"mystery-model"})
    batch_budget = budget_for(settings, _ledger(tmp_path), "openai-batch")
    assert batch_budget.cost("gpt-4o-2024-08-06", 1000, 500) == pytest.approx(0.00375)  # half price


def test_prompt_token_bound_bounds_the_real_tokenizer(tiny_model_dir: Path) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for request in sample_requests(20):
        ids = tokenizer.apply_chat_template(request.openai_messages(), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert len(ids) <= prompt_token_bound(request)


# ---- ledger + engine (in-process backend) -----------------------------------------------------

def test_rerun_skips_succeeded_keys_and_keeps_one_row_per_key(tmp_path: Path) -> None:
    requests = sample_requests(12)
    backend = EchoBackend()
    first = run_generation(requests + requests[:3], backend, _ledger(tmp_path, flush_every=5), Budget())
    assert (first.requested, first.unique, first.duplicates_in_input) == (15, 12, 3)
    assert first.sent == first.succeeded == 12
    second = run_generation(requests, backend, _ledger(tmp_path), Budget())
    assert second.skipped_done == 12 and second.sent == 0
    assert set(backend.sent.values()) == {1}  # no key was ever sent twice
    rows = _ledger(tmp_path).read()
    keys = rows.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 12
    assert set(rows.column("status").to_pylist()) == {"succeeded"}
    by_key = {r["key"]: r for r in rows.to_pylist()}
    request = requests[4]
    row = by_key[request.key]
    assert row["doc_id"] == request.lineage["doc_id"] and row["excerpt_end"] == request.lineage["excerpt_end"]
    assert row["template_id"] == "test-grade-school" and row["seed"] == request.sampling.seed
    assert row["model_version"] == "echo-1" and row["run_id"] == first.run_id
    assert row["calls"] == 1 and row["attempts"] == 1 and row["prompt"] in request.messages[-1][1]


def test_failed_keys_are_retried_next_run_and_success_is_final(tmp_path: Path) -> None:
    requests = sample_requests(6)
    bad = requests[2].key
    first = run_generation(requests, EchoBackend(fail_keys={bad}), _ledger(tmp_path), Budget())
    assert (first.succeeded, first.failed) == (5, 1) and first.errors == {"HTTP 400": 1}
    backend = EchoBackend()
    second = run_generation(requests, backend, _ledger(tmp_path), Budget())
    assert second.sent == 1 and dict(backend.sent) == {bad: 1}
    row = next(r for r in _ledger(tmp_path).read().to_pylist() if r["key"] == bad)
    assert row["status"] == "succeeded" and row["calls"] == 2 and row["attempts"] == 2 and row["error"] is None
    # A late failure for a succeeded key (a straggler, a second writer) cannot undo the success.
    late = _ledger(tmp_path)
    late.state()
    late.record(requests[0], GenerationResponse(requests[0].key, None, None, error="late"), 0.0)
    late.flush()
    assert _ledger(tmp_path).counts() == {"succeeded": 6}


def test_call_cap_is_cumulative_over_the_ledger(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, generation={"teacher_budget": {"max_calls": 5}})
    requests = sample_requests(9)
    backend = EchoBackend()
    ledger = Ledger.open(settings, "gold.kd_requests")
    first = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert (first.sent, first.not_sent_budget, first.budget_exhausted) == (5, 4, True)
    assert first.message.startswith("budget exhausted: 5/5 calls used (cap generation.teacher_budget.max_calls)")
    assert "4 requests not sent" in first.message
    ledger = Ledger.open(settings, "gold.kd_requests")
    second = run_generation(requests, backend, ledger, budget_for(settings, ledger))
    assert second.sent == 0 and second.skipped_done == 5 and second.not_sent_budget == 4
    assert sum(backend.sent.values()) == 5
    assert Ledger.open(settings, "gold.kd_requests").counts() == {"pending": 4, "succeeded": 5}


def test_background_flush_lands_results_while_the_stream_is_slow(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, flush_every=1000, flush_seconds=0.2)
    request = sample_requests(1)[0]
    ledger.add_pending([request])
    ledger.start_autoflush()
    ledger.record(request, GenerationResponse(request.key, "x", "stop", 1, 1), 0.0)
    deadline = time.monotonic() + 5
    while _ledger(tmp_path).counts().get("succeeded") != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ledger(tmp_path).counts() == {"succeeded": 1}
    ledger.close()


def test_dedupe_keeps_first_and_counts_repeats() -> None:
    a, b = _request(1), _request(2)
    unique, repeats = dedupe([a, b, a, a])
    assert unique == [a, b] and repeats == 2
    assert _request(1).key == a.key and _request(1, max_tokens=101).key != a.key


# ---- write-through, per-model caps, shards, abandoned keys ------------------------------------

class ProbeBackend(EchoBackend):
    """Checks the ledger on disk at every pull: the request is already ``sending`` (counted) and
    every earlier answer is already committed — what a SIGKILL at that moment would leave."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.checked = 0

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        answered: list[str] = []
        for response in super().generate(self._probe(requests, answered)):
            answered.append(response.key)
            yield response

    def _probe(self, requests: Iterable[GenerationRequest], answered: list[str]) -> Iterator[GenerationRequest]:
        for request in requests:
            rows = {r["key"]: r for r in Ledger(self.uri).read(["key", "status", "calls", "spent_tokens"]).to_pylist()}
            assert rows[request.key]["status"] == "sending" and rows[request.key]["calls"] == 1
            assert rows[request.key]["spent_tokens"] >= prompt_token_bound(request)  # the reserved worst case
            assert all(rows[key]["status"] == "succeeded" for key in answered)
            self.checked += 1
            yield request


def test_write_through_marks_before_each_send_and_commits_each_answer(tmp_path: Path) -> None:
    requests = sample_requests(5, model=TEACHER)
    ledger = _ledger(tmp_path, flush_every=1000, flush_seconds=600)  # buffering would hide everything
    assert ledger.write_through_mode == "auto"
    backend = ProbeBackend(ledger.uri)
    report = run_generation(requests, backend, ledger, budget_for(make_settings(tmp_path), ledger))
    assert report.write_through and backend.checked == 5 and report.succeeded == 5
    assert report.ledger_commits == 10  # one marker + one answer per request (a serial backend)
    rows = _ledger(tmp_path).read().to_pylist()
    assert {r["status"] for r in rows} == {"succeeded"} and all(r["calls"] == r["attempts"] == 1 for r in rows)
    # cumulative spend = the answer's real tokens once the reservation is settled
    assert all(r["spent_tokens"] == r["prompt_tokens"] + r["completion_tokens"] for r in rows)


def test_write_through_auto_follows_the_price_table(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    for model, paid in ((TEACHER, True), ("tiny-llama", False), ("unpriced-local", False)):
        ledger = Ledger.open(settings, "gold.kd_requests")
        report = run_generation(sample_requests(2, model=model), EchoBackend(), ledger, budget_for(settings, ledger))
        assert report.write_through is paid, model
    forced = make_settings(tmp_path / "forced", generation={"ledger_write_through": True})
    ledger = Ledger.open(forced, "gold.kd_requests")
    assert run_generation(sample_requests(2), EchoBackend(), ledger, budget_for(forced, ledger)).write_through


def test_calls_in_flight_at_a_crash_count_as_spent_on_reopen(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, generation={"ledger_write_through": True, "teacher_budget": {"max_calls": 4}})
    requests = sample_requests(3, model=TEACHER)
    crashed = Ledger.open(settings, "gold.kd_requests")
    crashed.state()
    crashed.add_pending(requests)
    budget = budget_for(settings, crashed)
    reservations = [budget.reserve(r) for r in requests[:2]]
    crashed.mark_sending([(r, res.tokens, res.usd) for r, res in zip(requests[:2], reservations, strict=True)])
    # While the claimant lives, its keys are not claimable by another run.
    alive = Ledger.open(settings, "gold.kd_requests")
    assert not any(alive.claimable(alive.state()[r.key]) for r in requests[:2])
    assert alive.claimable(alive.state()[requests[2].key])
    # ... and the process dies here: no answer recorded, no close()
    del crashed
    gc.collect()
    reopened = Ledger.open(settings, "gold.kd_requests")
    spent = reopened.spent(TEACHER)
    assert spent.calls == 2 and spent.tokens == sum(res.tokens for res in reservations)
    assert reopened.counts() == {"pending": 1, "sending": 2}
    backend = EchoBackend()
    report = run_generation(requests, backend, reopened, budget_for(settings, reopened))
    # the two lost calls still count: 2 + 2 re-sends = the cap of 4, the third key waits
    assert report.sent == 2 and report.not_sent_budget == 1 and report.budget_exhausted
    rows = {r["key"]: r for r in _ledger(tmp_path).read().to_pylist()}
    for request, reservation in zip(requests[:2], reservations, strict=True):
        row = rows[request.key]
        assert row["status"] == "succeeded" and row["calls"] == row["attempts"] == 2
        assert row["spent_tokens"] == reservation.tokens + row["prompt_tokens"] + row["completion_tokens"]


def test_caps_apply_to_the_model_being_run(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, generation={"teacher_budget": {"max_calls": 5}})
    backend = EchoBackend()
    ledger = Ledger.open(settings, "gold.kd_requests")
    local = run_generation(sample_requests(5), backend, ledger, budget_for(settings, ledger))  # the demo model
    assert local.sent == 5 and not local.budget_exhausted
    ledger = Ledger.open(settings, "gold.kd_requests")
    teacher = run_generation(sample_requests(7, model=TEACHER, offset=5), backend, ledger,
                             budget_for(settings, ledger))
    assert teacher.sent == 5 and teacher.not_sent_budget == 2  # the demo's calls did not eat the teacher's cap
    assert teacher.message.startswith("budget exhausted: 5/5 calls used (cap generation.teacher_budget.max_calls)")
    assert f"for {TEACHER}" in teacher.message
    spent = Ledger.open(settings, "gold.kd_requests").spent_by_model()
    assert (spent["tiny-llama"].calls, spent[TEACHER].calls) == (5, 5)


def test_shard_allowances_split_the_cap_whatever_was_spent_before() -> None:
    assert shard_allowances([0, 0, 0], 7) == [3, 2, 2]
    assert shard_allowances([0, 0], 100) == [50, 50]
    assert shard_allowances([60, 0, 0], 90) == [60, 15, 15]  # uneven old spend: the others absorb it
    assert shard_allowances([95, 0], 90) == [95, 0]  # over the cap already: nobody sends
    assert shard_allowances([0.5, 0.0, 0.0], 1.0, integer=False) == [0.5, 0.25, 0.25]
    assert shard_allowances([3, 4], None) == [None, None]
    rng = random.Random(3)
    for _ in range(500):
        n, cap = rng.randint(1, 6), rng.randint(0, 60)
        spends = [rng.randint(0, 25) for _ in range(n)]
        allowances = shard_allowances(spends, cap)
        assert sum(allowances) == max(cap, sum(spends))  # the whole cap is handed out, never more
        # any shard growing within its allowance leaves everyone's allowance unchanged: shards that
        # start (or restart) later compute the same split
        grown = [s + rng.randint(0, a - s) for s, a in zip(spends, allowances, strict=True)]
        assert shard_allowances(grown, cap) == allowances


def test_parallel_shards_together_stay_within_the_cap(tmp_path: Path) -> None:
    cap, num_shards, model = 7, 3, "jiuzhang-synthesizer"
    settings = make_settings(tmp_path, generation={"synthesis_budget": {"max_calls": cap}})
    requests = sample_requests(40, model=model)
    shards = {i: [r for r in requests if shard_of(r.lineage["doc_id"], num_shards) == i] for i in range(num_shards)}
    assert all(len(part) >= cap for part in shards.values())  # each shard alone could spend the whole cap
    backend = EchoBackend()

    def open_shard(index: int) -> tuple[Ledger, Budget]:
        ledger = Ledger.open(settings, "gold.synthetic_requests")
        scope = ShardScope(index, num_shards, model, lambda doc_id, key: shard_of(doc_id or key, num_shards))
        return ledger, budget_for(settings, ledger, shard=scope)

    # Like Airflow .expand: every shard reads the ledger before any of them has spent anything.
    opened = [open_shard(i) for i in range(num_shards)]
    reports: list = []
    threads = [threading.Thread(target=lambda i=i: reports.append(
        run_generation(shards[i], backend, *opened[i]))) for i in range(num_shards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.sent for r in reports) == cap == sum(backend.sent.values())
    assert all(r.budget_exhausted and "shard" in r.message for r in reports)
    for _ in range(2):  # restarted shards (a retried task) get no fresh allowance
        for index in range(num_shards):
            run_generation(shards[index], backend, *open_shard(index))
    assert sum(backend.sent.values()) == cap
    assert Ledger.open(settings, "gold.synthetic_requests").spent(model).calls == cap


def test_uneven_earlier_spend_still_keeps_shards_within_the_cap(tmp_path: Path) -> None:
    cap, num_shards, model = 9, 3, "jiuzhang-synthesizer"
    settings = make_settings(tmp_path, generation={"synthesis_budget": {"max_calls": cap}})
    requests = sample_requests(40, model=model)
    shards = {i: [r for r in requests if shard_of(r.lineage["doc_id"], num_shards) == i] for i in range(num_shards)}
    backend = EchoBackend()
    ledger = Ledger.open(settings, "gold.synthetic_requests")  # an unsharded run spent 5 on shard 0's documents
    run_generation(shards[0][:5], backend, ledger, budget_for(settings, ledger))
    opened = {}
    for index in (1, 2, 0):  # all started before any of them sends
        ledger = Ledger.open(settings, "gold.synthetic_requests")
        scope = ShardScope(index, num_shards, model, lambda doc_id, key: shard_of(doc_id or key, num_shards))
        opened[index] = (ledger, budget_for(settings, ledger, shard=scope))
    assert {i: b.max_calls for i, (_, b) in opened.items()} == {0: 5, 1: 2, 2: 2}
    for index, (ledger, budget) in opened.items():
        run_generation(shards[index], backend, ledger, budget)
    assert sum(backend.sent.values()) == cap  # 5 + 2 + 2: shard 0 had spent past its share of 3


def test_a_key_that_always_fails_is_abandoned_after_max_attempts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, generation={"max_attempts_per_key": 3})
    requests = sample_requests(4)
    bad = requests[1].key
    backend = EchoBackend(fail_keys={bad})
    reports = [run_generation(requests, backend, Ledger.open(settings, "gold.kd_requests"), Budget())
               for _ in range(4)]
    assert [(r.sent, r.failed, r.abandoned) for r in reports] == [(4, 1, 0), (1, 1, 0), (1, 0, 1), (0, 0, 0)]
    assert reports[3].skipped_abandoned == 1 and reports[3].skipped_done == 3
    assert backend.sent[bad] == 3
    row = next(r for r in _ledger(tmp_path).read().to_pylist() if r["key"] == bad)
    assert row["status"] == "abandoned" and row["failures"] == 3 and "abandoned after 3 failed sends" in row["error"]
    # raising the setting makes it eligible again
    raised = make_settings(tmp_path, generation={"max_attempts_per_key": 4})
    again = run_generation(requests, backend, Ledger.open(raised, "gold.kd_requests"), Budget())
    assert again.sent == 1 and again.abandoned == 1 and backend.sent[bad] == 4


def test_synthesize_shard_completes_when_a_key_is_abandoned(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    from models import lake_io
    from models import synthesize as synth
    from tests.test_excerpts import real_texts

    texts = [(source, text) for source, text in real_texts() if len(text) > 400][:4]
    if len(texts) < 4:
        pytest.skip("embedded sample missing")
    settings = make_settings(tmp_path, generation={"max_attempts_per_key": 2},
                             prompts={"tool_fraction": 0.0, "min_excerpt_chars": 100},
                             synthesis={"model": "jiuzhang-synthesizer", "num_shards": 1,
                                        "cot_sampling": {"max_tokens": 16}})
    docs = [{"doc_id": f"{source}:{hashlib.sha256(text.encode()).hexdigest()[:12]}", "source": source,
             "text": text, "quality_score": 0.5, "math_density": 0.1, "n_words": len(text.split()),
             "run_id": "test-corpus"} for source, text in texts]
    lake_io.merge_rows(settings, "gold.corpus", docs)
    broken = docs[0]["doc_id"]  # its request always fails, like a prompt over the context length
    backend = EchoBackend(fail_when=lambda request: request.lineage["doc_id"] == broken)
    monkeypatch.setattr("models.generation.backends.make_backend", lambda *args, **kwargs: backend)

    first = synth.synthesize(settings)
    assert first["shards_incomplete"] == [0] and first["failed"] == 1 and not first["commit"]["committed"]
    second = synth.synthesize(settings)
    assert second["sent"] == 1 and second["failed"] == 0 and second["shards_incomplete"] == []
    assert second["rejected_by_reason"]["abandoned"] == 1 and second["commit"]["committed"]
    assert second["accepted"] + second["rejected"] == second["requests"]
    third = synth.synthesize(settings)
    assert third["shards_skipped_done"] == [0] and sum(backend.sent.values()) == len(docs) + 1


def test_a_ledger_written_before_the_new_columns_still_counts_and_takes_writes(tmp_path: Path) -> None:
    import pyarrow as pa
    from deltalake import DeltaTable

    settings = make_settings(tmp_path)
    ledger = Ledger.open(settings, "gold.kd_requests")
    new_columns = {"failures", "spent_tokens", "spent_usd", "key_bucket"}
    old_schema = pa.schema([f for f in ledger.table.arrow_schema() if f.name not in new_columns])
    old, fresh = sample_requests(2)
    DeltaTable.create(ledger.uri, schema=old_schema)  # unpartitioned, as ledgers were created before
    row = {name: None for name in old_schema.names} | {
        "key": old.key, "status": "succeeded", "model": "tiny-llama", "response": "x", "calls": 2, "attempts": 3,
        "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.5}
    DeltaTable(ledger.uri).merge(pa.Table.from_pylist([row], schema=old_schema), "t.key = s.key", "s", "t") \
        .when_not_matched_insert_all().execute()

    spent = ledger.spent("tiny-llama")  # falls back to the last answer's tokens and cost
    assert (spent.calls, spent.tokens, spent.usd) == (2, 15, 0.5)
    report = run_generation([old, fresh], EchoBackend(), ledger, budget_for(settings, ledger))
    assert report.skipped_done == 1 and report.succeeded == 1
    rows = {r["key"]: r for r in _ledger(tmp_path).read().to_pylist()}
    assert new_columns <= set(rows[fresh.key]) and rows[fresh.key]["spent_tokens"] > 0
    assert rows[old.key]["spent_tokens"] is None and rows[fresh.key]["key_bucket"] == fresh.key[0]


# ---- backends ----------------------------------------------------------------------------------

def test_make_backend_builds_every_backend_and_rejects_unknown(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, generation={"concurrency": 3, "vllm": {"tensor_parallel_size": 2}})
    assert make_backend(settings, "openai").concurrency == 3
    assert make_backend(settings, "openai-batch").name == "openai-batch"
    assert make_backend(settings, "vllm").engine_kwargs("m")["tensor_parallel_size"] == 2
    assert make_backend(settings, "transformers").name == "transformers"
    with pytest.raises(ValueError, match="unknown generation backend 'nope'"):
        make_backend(settings, "nope")


def test_vllm_backend_imports_without_vllm_and_says_how_to_get_it(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here; this test covers CPU installs")
    from models.generation.backends.vllm_backend import VllmBackend, VllmUnavailableError

    backend = make_backend(make_settings(tmp_path), "vllm")
    assert isinstance(backend, VllmBackend)
    assert list(backend.generate([])) == []  # nothing to do needs no vllm
    with pytest.raises(VllmUnavailableError, match=r"jiuzhang-lake\[gpu\]"):
        list(backend.generate(sample_requests(1)))


def test_transformers_backend_generates_in_process(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    settings = make_settings(tmp_path, generation={"served_models": {"tiny-llama": str(tiny_model_dir)},
                                                   "transformers_batch_size": 2})
    backend = make_backend(settings, "transformers", device="cpu")
    requests = sample_requests(3, max_tokens=6)
    report = run_generation(requests, backend, _ledger(tmp_path), Budget())
    assert report.succeeded == 3 and report.completion_tokens <= 18
    rows = {r["key"]: r for r in _ledger(tmp_path).read().to_pylist()}
    assert all(rows[r.key]["finish_reason"] in ("stop", "length") for r in requests)
    assert all(0 < rows[r.key]["prompt_tokens"] <= prompt_token_bound(r) for r in requests)
    again = {r.key: r.text for r in backend.generate(requests)}  # same seeds, same batches: same text
    assert again == {k: rows[k]["response"] for k in again}


def test_sandbox_settings_reach_the_limits_including_the_weak_mode_opt_in() -> None:
    from jzlake.settings import SandboxSettings
    from models.generation.pipeline import sandbox_limits

    strict = sandbox_limits(SandboxSettings())
    weak = sandbox_limits(SandboxSettings(allow_weak_isolation=True, memory_mb=64))
    assert strict.allow_weak_isolation is False
    assert weak.allow_weak_isolation is True and weak.memory_bytes == 64 << 20
