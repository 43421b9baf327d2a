"""End-to-end plumbing of ``jzlake distil`` and ``jzlake synthesize`` against a real local
``transformers serve`` (the tiny model): requests, ledger, tables, lineage, reruns, shards.

The tiny model writes garbage, so these tests check the plumbing, not sample quality (parsing
is tested on hand-written replies in ``test_parsing.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jzlake.settings import Settings
from models import lake_io
from models.distil import distil
from models.generation.local_server import LocalServer
from models.generation.parsing import REJECTION_REASONS
from models.generation.prompt_library import PROMPTS_DIR
from models.synthesize import shard_of, synthesize
from tests.conftest import make_settings
from tests.fault_proxy import FaultProxy, free_port
from tests.llm_fixtures import llm_server, tiny_model_dir  # noqa: F401
from tests.test_excerpts import real_texts

pytestmark = [pytest.mark.llm, pytest.mark.slow]

N_DOCS = 6
PROXY_PORTS = (18440, 18449)  # this stage's own range: the shared proxy range is busy in parallel runs


@pytest.fixture
def counting_proxy(llm_server: LocalServer) -> Iterator[FaultProxy]:  # noqa: F811
    """A fault-free proxy that counts, per ledger key, the requests that reached the server."""
    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS)) as proxy:
        yield proxy
MAX_NEW_TOKENS = 12


def write_corpus(settings: Settings, n: int = N_DOCS) -> dict[str, str]:
    """``gold.corpus`` with ``n`` real sample documents from different sources (deltalake, no JVM)."""
    by_source: dict[str, list[str]] = {}
    for source, text in real_texts():
        if len(text) > 400:
            by_source.setdefault(source, []).append(text)
    rows = []
    for i in range(n):
        source = sorted(by_source)[i % len(by_source)]
        text = by_source[source][i]
        rows.append({"doc_id": f"{source}:{hashlib.sha256(text.encode()).hexdigest()[:12]}", "source": source,
                     "text": text, "quality_score": 0.5, "math_density": 0.1, "n_words": len(text.split()),
                     "run_id": "test-corpus"})
    lake_io.merge_rows(settings, "gold.corpus", rows)
    return {r["doc_id"]: r["text"] for r in rows}


def lake_settings(tmp_path: Path, proxy: FaultProxy, server: LocalServer, **extra: Any) -> Settings:
    generation = {"base_url": proxy.url, "served_models": {"tiny-llama": server.served_model},
                  "concurrency": 4, "ledger_flush_every": 4, **extra.pop("generation", {})}
    sampling = {"max_tokens": MAX_NEW_TOKENS}
    return make_settings(
        tmp_path, generation=generation,
        prompts={"tool_fraction": 0.5, "min_excerpt_chars": 100},
        distil={"cot_sampling": sampling, "tool_sampling": {**sampling, "temperature": 0.1, "top_p": 0.95},
                **extra.pop("distil", {})},
        synthesis={"cot_sampling": sampling, "tool_sampling": {**sampling, "temperature": 0.1, "top_p": 0.95},
                   **extra.pop("synthesis", {})},
        sandbox={"wall_seconds": 20}, **extra)


def versions(settings: Settings, *names: str) -> dict[str, int | None]:
    return {name: lake_io.current_version(settings, name) for name in names}


def rows(settings: Settings, name: str) -> list[dict[str, Any]]:
    return lake_io.read_table_at(settings, name)[0].to_pylist()


def test_distil_end_to_end_and_rerun_changes_nothing(tmp_path: Path, counting_proxy: FaultProxy,
                                                     llm_server: LocalServer) -> None:  # noqa: F811
    settings = lake_settings(tmp_path, counting_proxy, llm_server)
    corpus = write_corpus(settings)
    first = distil(settings, environ={})  # no API key → the local model answers, and says so

    assert first["teacher"] == "tiny-llama" and first["teacher_is_local"] and "LOCAL" in first["note"]
    corpus_version = lake_io.current_version(settings, "gold.corpus")
    assert first["input_table"] == "gold.corpus" and first["input_version"] == corpus_version
    assert first["documents"] == N_DOCS and first["requests"] >= N_DOCS
    assert first["sent"] == first["succeeded"] == first["requests"] and first["failed"] == first["not_sent"] == 0
    assert first["accepted"] + first["rejected"] == first["requests"]
    assert sum(first["rejected_by_reason"].values()) == first["rejected"]
    assert first["tokens"] == first["prompt_tokens"] + first["completion_tokens"] > 0
    assert sum(counting_proxy.arrived.values()) == first["requests"]

    kd = rows(settings, "gold.kd_dataset") + rows(settings, "gold.kd_rejected")
    ledger = {r["key"]: r for r in rows(settings, "gold.kd_requests")}
    assert len(kd) == len(ledger) == first["requests"]
    kinds = {r["kind"] for r in kd}
    assert kinds == {"cot", "tool"}  # tool_fraction 0.5 over 6 documents
    for row in kd:
        assert row["request_key"] in ledger and ledger[row["request_key"]]["status"] == "succeeded"
        text = corpus[row["doc_id"]]
        excerpt = text[row["excerpt_start"]:row["excerpt_end"]]
        assert excerpt.strip() and excerpt.strip() in json.loads(ledger[row["request_key"]]["messages"])[-1]["content"]
        assert len(excerpt) <= (2000 if row["kind"] == "tool" else 1000)
        template = (PROMPTS_DIR / f"{row['template_id']}.md").read_bytes()
        assert row["template_hash"] == hashlib.sha256(template).hexdigest()
        assert row["model_name"] == "tiny-llama" and row["model_uri"] == llm_server.served_model
        assert json.loads(row["sampling"])["max_tokens"] == MAX_NEW_TOKENS
        assert row["seed"] == settings.prompts.seed and row["input_version"] == corpus_version
        assert row["reason"] if "reason" in row else row["text"].startswith("## Question\n")
    # the tiny model's 12 tokens are blank lines or noise: rejected with a known reason, not accepted
    assert first["rejected"] > 0 and set(first["rejected_by_reason"]) <= set(REJECTION_REASONS)
    assert all(r["detail"] for r in kd if r.get("reason"))

    before = versions(settings, "gold.kd_requests", "gold.kd_dataset", "gold.kd_rejected")
    arrived = dict(counting_proxy.arrived)
    second = distil(settings, environ={})
    assert second["sent"] == 0 and second["skipped_done"] == first["requests"]
    assert second["written"] == {"gold.kd_dataset": 0, "gold.kd_rejected": 0}
    assert (second["accepted"], second["rejected_by_reason"]) == (first["accepted"], first["rejected_by_reason"])
    assert versions(settings, "gold.kd_requests", "gold.kd_dataset", "gold.kd_rejected") == before
    assert dict(counting_proxy.arrived) == arrived  # the server saw nothing new


def test_distil_budget_stop_reconciles_and_resumes(tmp_path: Path, counting_proxy: FaultProxy,
                                                   llm_server: LocalServer) -> None:  # noqa: F811
    settings = lake_settings(tmp_path, counting_proxy, llm_server,
                             generation={"teacher_budget": {"max_calls": 2}}, distil={"max_documents": 4})
    write_corpus(settings)
    capped = distil(settings, environ={})
    assert capped["sent"] == 2 and capped["budget_exhausted"] and "2/2 calls" in capped["message"]
    assert capped["not_sent"] == capped["requests"] - 2
    assert capped["accepted"] + capped["rejected"] + capped["failed"] + capped["not_sent"] == capped["requests"]

    raised = settings.model_copy(update={"generation": settings.generation.model_copy(
        update={"teacher_budget": settings.generation.teacher_budget.model_copy(update={"max_calls": 100})})})
    resumed = distil(raised, environ={})
    assert resumed["skipped_done"] == 2 and resumed["sent"] == capped["requests"] - 2
    assert resumed["not_sent"] == 0 and resumed["accepted"] + resumed["rejected"] == resumed["requests"]
    assert max(counting_proxy.arrived.values()) == 1  # no key was ever sent twice


def test_synthesize_shards_resume_and_commit_once(tmp_path: Path, counting_proxy: FaultProxy,
                                                  llm_server: LocalServer, tiny_model_dir: Path) -> None:  # noqa: F811
    settings = lake_settings(tmp_path, counting_proxy, llm_server,
                             synthesis={"model": str(tiny_model_dir), "num_shards": 3})
    corpus = write_corpus(settings)
    shard0 = synthesize(settings, shard_index=0)
    assert shard0["shards_run"] == [0] and shard0["commit"] == {"committed": False, "waiting_for_shards": 2}
    assert lake_io.current_version(settings, "gold.synthetic_raw") is None
    sizes = [sum(1 for d in corpus if shard_of(d, 3) == s) for s in range(3)]
    assert all(sizes) and shard0["documents"] == sizes[0]

    rest = synthesize(settings)
    assert rest["run_id"] == shard0["run_id"]  # content-addressed: same inputs → same run
    assert rest["shards_skipped_done"] == [0] and rest["shards_run"] == [1, 2]
    assert rest["documents"] == sizes[1] + sizes[2]
    assert rest["commit"]["committed"] and rest["commit"]["inserted"] == shard0["requests"] + rest["requests"]
    raw = rows(settings, "gold.synthetic_raw")
    assert len(raw) == shard0["requests"] + rest["requests"]
    assert {r["shard_index"] for r in raw} == {0, 1, 2}
    assert all(shard_of(r["doc_id"], 3) == r["shard_index"] and r["num_shards"] == 3 for r in raw)
    assert all(r["model_name"] == "jiuzhang-synthesizer" and r["model_uri"].startswith("file://") for r in raw)
    corpus_version = lake_io.current_version(settings, "gold.corpus")
    assert all(r["model_version"] and r["input_version"] == corpus_version for r in raw)
    by_kind = {r["kind"]: json.loads(r["sampling"]) for r in raw}
    assert by_kind["cot"]["temperature"] == 1.0 and by_kind["tool"] == {
        **by_kind["tool"], "temperature": 0.1, "top_p": 0.95}

    version = lake_io.current_version(settings, "gold.synthetic_raw")
    arrived = dict(counting_proxy.arrived)
    again = synthesize(settings)
    assert again["shards_run"] == [] and again["shards_skipped_done"] == [0, 1, 2]
    assert again["commit"]["committed"] is False and lake_io.current_version(settings, "gold.synthetic_raw") == version
    assert dict(counting_proxy.arrived) == arrived


def test_real_prompts_for_all_nine_templates_survive_a_killed_engine(tmp_path: Path,
                                                                    llm_server: LocalServer) -> None:  # noqa: F811
    """The kill/resume path on real prompt-library requests: ``plan_requests`` over real sample
    documents with every stage and the tool template, written to the engine's request file and
    sent by ``python -m models.generation.engine``, SIGKILLed mid-run, resumed in-process."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from jzlake.settings import PromptSettings, SamplingSettings
    from models.generation.backends import make_backend
    from models.generation.engine import budget_for, read_requests, run_generation, write_requests
    from models.generation.ledger import Ledger
    from models.generation.pipeline import SourceDocument, plan_requests
    from models.generation.prompt_library import COT_TEMPLATE_IDS, TOOL_TEMPLATE_ID, load_templates
    from tests.conftest import REPO

    texts = [(s, t) for s, t in real_texts() if len(t) > 2500]
    if len(texts) < 2:
        pytest.skip("embedded sample missing")
    docs = [SourceDocument(f"{s}:{i}", s, t) for i, (s, t) in enumerate([texts[0], texts[len(texts) // 2]])]
    sampling = SamplingSettings(max_tokens=4)
    plan = plan_requests(docs, model="tiny-llama", templates=load_templates(), cot_sampling=sampling,
                         tool_sampling=sampling.model_copy(update={"temperature": 0.1, "top_p": 0.95}),
                         prompts=PromptSettings(stage_selection="all", tool_fraction=1.0, min_excerpt_chars=100),
                         lineage={"input_table": "gold.corpus", "input_version": 0})
    assert {p.template.id for p in plan.requests} == {*COT_TEMPLATE_IDS, TOOL_TEMPLATE_ID}
    assert len(plan.requests) == 18 and not plan.skipped
    texts_by_id = {d.doc_id: d.text for d in docs}
    for planned in plan.requests:
        request, template = planned.request, planned.template
        prompt = request.messages[-1][1]
        lineage = request.lineage
        excerpt = texts_by_id[lineage["doc_id"]][lineage["excerpt_start"]:lineage["excerpt_end"]]
        assert excerpt == planned.excerpt.text and excerpt.strip() in prompt
        assert len(excerpt) <= template.excerpt_chars and "{{excerpt}}" not in prompt
        assert request.template_id == template.id
        assert request.template_hash == hashlib.sha256((PROMPTS_DIR / f"{template.id}.md").read_bytes()).hexdigest()
        assert lineage["stage"] == template.stage and lineage["kind"] == template.kind
        assert template.title in prompt  # the stage's own wording reached the prompt
    requests = [p.request for p in plan.requests]
    requests_file = tmp_path / "requests.jsonl"
    write_requests(requests_file, requests)
    reread = read_requests(requests_file)
    assert [r.key for r in reread] == [r.key for r in requests]
    assert [r.lineage for r in reread] == [r.lineage for r in requests]

    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS), delay_s=0.2) as proxy:
        settings = make_settings(tmp_path, generation={
            "base_url": proxy.url, "served_models": {"tiny-llama": llm_server.served_model},
            "api_key_env": None, "concurrency": 2, "ledger_flush_every": 2, "ledger_flush_seconds": 0.5})
        command = [sys.executable, "-m", "models.generation.engine", "--requests", str(requests_file),
                   "--lake-root", settings.lake_root, "--base-url", proxy.url, "--served-model",
                   f"tiny-llama={llm_server.served_model}", "--concurrency", "2", "--flush-every", "2"]
        env = {**os.environ, "JZLAKE__GENERATION__API_KEY_ENV": ""}

        def succeeded() -> set[str]:
            if lake_io.current_version(settings, "gold.kd_requests") is None:
                return set()
            ledger_rows = Ledger.open(settings, "gold.kd_requests").read(["key", "status"]).to_pylist()
            return {r["key"] for r in ledger_rows if r["status"] == "succeeded"}

        with open(tmp_path / "engine.log", "wb") as log:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 120
                while len(succeeded()) < 4:
                    assert process.poll() is None, (tmp_path / "engine.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "the engine recorded nothing in 120 s"
                    time.sleep(0.05)
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
            finally:
                if process.poll() is None:
                    process.kill()
        done_at_kill = succeeded()
        assert 4 <= len(done_at_kill) < len(requests), "the kill must land mid-run"
        time.sleep(1.0)  # what the dead client handed to the proxy still reaches the server

        ledger = Ledger.open(settings, "gold.kd_requests")
        report = run_generation(reread, make_backend(settings), ledger, budget_for(settings, ledger))
        assert report.skipped_done == len(done_at_kill) and report.failed == 0
        assert all(proxy.forwarded[key] == 1 for key in done_at_kill)  # never paid twice
    rows = {r["key"]: r for r in Ledger.open(settings, "gold.kd_requests").read().to_pylist()}
    assert set(rows) == {r.key for r in requests} and {r["status"] for r in rows.values()} == {"succeeded"}
    for request in requests:
        row = rows[request.key]
        assert (row["template_id"], row["template_hash"]) == (request.template_id, request.template_hash)
        assert row["doc_id"] == request.lineage["doc_id"]
        assert json.loads(row["lineage"])["stage"] == request.lineage["stage"]
        assert json.loads(row["messages"])[-1]["content"] == request.messages[-1][1]


def test_cli_distil_prints_the_summary_last(tmp_path: Path, counting_proxy: FaultProxy,
                                            llm_server: LocalServer,  # noqa: F811
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from jzlake.cli import main

    settings = lake_settings(tmp_path, counting_proxy, llm_server)
    write_corpus(settings, 2)
    code = main(["distil", "--lake-root", settings.lake_root, "--max-documents", "2", "--max-new-tokens", "8",
                 "--base-url", counting_proxy.url, "--teacher", "local"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and last["stage"] == "distil" and last["teacher"] == "tiny-llama"
    assert last["requests"] == last["sent"] == last["accepted"] + last["rejected"] > 0
    assert {"skipped_done", "rejected_by_reason", "tokens", "cost_usd"} <= set(last)
