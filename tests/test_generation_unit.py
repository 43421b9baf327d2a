"""Generation engine without a server: budget, retries policy, secrets, ledger exactly-once, backends."""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from models.generation.backends import make_backend, resolve_api_key
from models.generation.backends.openai_backend import backoff_delay, parse_retry_after, redact
from models.generation.budget import Budget, BudgetConfigError, prompt_token_bound
from models.generation.engine import budget_for, dedupe, run_generation
from models.generation.ledger import Ledger
from models.generation.types import GenerationRequest, GenerationResponse, SamplingParams
from tests.conftest import make_settings
from tests.llm_fixtures import sample_requests, tiny_model_dir  # noqa: F401


class EchoBackend:
    """In-process stand-in for a server: answers every request, counts what it was sent."""

    name = "echo"

    def __init__(self, fail_keys: Iterable[str] = (), delay_s: float = 0.0) -> None:
        self.sent: Counter[str] = Counter()
        self.fail_keys = set(fail_keys)
        self.delay_s = delay_s

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        for request in requests:  # lazily, like the real online backends
            self.sent[request.key] += 1
            time.sleep(self.delay_s)
            if request.key in self.fail_keys:
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
