"""Fixtures for tests that need a real LLM server (import them into a test module).

``llm_server`` starts ``transformers serve --continuous-batching`` over the tiny local model once
per test session and stops it at the end; ``counting_proxy`` puts a fault-free, request-counting
proxy in front of it (fresh counters per test). Ports come from this project's generation range
(18310–18339). Kept out of ``conftest.py`` on purpose: only LLM tests pay for the server.

Usage::

    from tests.llm_fixtures import counting_proxy, llm_server, tiny_model_dir  # noqa: F401
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from pathlib import Path

import pytest

from jzlake.settings import load_settings
from models.generation.local_server import LocalServer, ServerStartError, start_server
from tests.fault_proxy import FaultProxy, free_port

SERVER_PORTS = (18310, 18319)
PROXY_PORTS = (18320, 18339)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny local model (built on first use by ``models.tiny``)."""
    from models.tiny import ensure_tiny_model

    return ensure_tiny_model(load_settings(environ={}))


_SERVER: LocalServer | None = None


@pytest.fixture(scope="session")
def llm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalServer:
    """A real ``transformers serve`` over the tiny model, one for the whole session.

    Each test module imports this fixture (so pytest sees one definition per module); the
    server itself is a process-wide singleton, stopped at interpreter exit (and, should the
    test process be killed, by the server's parent-death signal).
    """
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        log_path = tmp_path_factory.getbasetemp() / "llm-server.log"
        try:
            _SERVER = start_server(tiny_model_dir, free_port(*SERVER_PORTS), log_path=log_path, threads=1)
        except ServerStartError as exc:
            pytest.fail(f"could not start the local LLM server: {exc}")
        atexit.register(_SERVER.stop)
    return _SERVER


@pytest.fixture
def counting_proxy(llm_server: LocalServer) -> Iterator[FaultProxy]:
    """A fault-free proxy that counts, per ledger key, the requests that reached the server."""
    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS)) as proxy:
        yield proxy


SAMPLE_QUESTIONS = Path(__file__).resolve().parents[1] / "data" / "sample" / "benchmarks" / "gsm8k" / \
    "train.head600.jsonl"


def sample_requests(n: int, model: str = "tiny-llama", max_tokens: int = 8, offset: int = 0) -> list:
    """``n`` teacher-style requests built from real sample text (GSM8K train questions)."""
    import json

    from models.generation.types import GenerationRequest, SamplingParams

    lines = SAMPLE_QUESTIONS.read_text(encoding="utf-8").splitlines()[offset:offset + n]
    if len(lines) < n:
        pytest.skip(f"{SAMPLE_QUESTIONS} has fewer than {offset + n} lines")
    requests = []
    for number, line in enumerate(lines, offset):
        question = json.loads(line)["question"]
        requests.append(GenerationRequest(
            model=model,
            messages=(("system", "You write new grade-school math problems."),
                      ("user", f"Excerpt:\n{question}\n\nWrite a new problem inspired by the excerpt, "
                               "then solve it step by step and end with \\boxed{answer}.")),
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=number),
            template_id="test-grade-school", template_hash="t0",
            lineage={"doc_id": f"gsm8k-train-{number}", "excerpt_start": 0, "excerpt_end": len(question)}))
    return requests
