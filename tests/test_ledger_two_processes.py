"""Two OS processes run the same keys against one ledger, through the fault-injecting proxy.

Each process is the engine's CLI (``python -m models.generation.engine``, write-through), started
together behind a barrier so their claims interleave. The proxy counts what reached the server per
key: every key must be sent exactly once across both processes, the proxy's count must equal the
ledger's, and the call cap must hold for the two together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.generation.engine import write_requests
from models.generation.ledger import Ledger
from tests.conftest import REPO, make_settings
from tests.fault_proxy import FaultProxy, free_port
from tests.llm_fixtures import PROXY_PORTS, llm_server, sample_requests, tiny_model_dir  # noqa: F401

pytestmark = [pytest.mark.llm, pytest.mark.slow]

# Imports first, then wait for the go file: both processes claim at the same moment.
RUNNER = """
import pathlib, sys, time
from models.generation import engine
go = pathlib.Path(sys.argv[1])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
sys.exit(engine.main(sys.argv[2:]))
"""


def _run_two(tmp_path: Path, proxy: FaultProxy, served: str, requests, max_calls: int) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = make_settings(tmp_path)
    requests_file = tmp_path / "requests.jsonl"
    write_requests(requests_file, requests)
    go = tmp_path / "go"
    cli = ["--requests", str(requests_file), "--lake-root", settings.lake_root, "--base-url", proxy.url,
           "--served-model", f"tiny-llama={served}", "--concurrency", "2", "--write-through", "true",
           "--max-calls", str(max_calls)]
    env = {**os.environ, "JZLAKE__GENERATION__API_KEY_ENV": "", "JZLAKE__LAKE__RUNS_DIR": str(tmp_path / "runs")}
    logs = [open(tmp_path / f"engine-{i}.err", "wb") for i in range(2)]  # noqa: SIM115 (closed below)
    processes = [subprocess.Popen([sys.executable, "-c", RUNNER, str(go), *cli], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=log) for log in logs]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == b"ready"
        go.touch()
        outputs = [process.communicate(timeout=240)[0].decode() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for log in logs:
            log.close()
    reports = []
    for i, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        tail = (tmp_path / f"engine-{i}.err").read_text()[-3000:]
        assert process.returncode == 0, tail
        reports.append(json.loads(output.strip().splitlines()[-1]))
    return reports


def _rows(tmp_path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in Ledger.open(make_settings(tmp_path), "gold.kd_requests").read().to_pylist()}


def test_two_processes_send_every_key_once_within_one_cap(tmp_path: Path, llm_server) -> None:  # noqa: F811
    requests = sample_requests(6, max_tokens=4)
    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS), delay_s=0.3) as proxy:
        reports = _run_two(tmp_path / "six", proxy, llm_server.served_model, requests, max_calls=6)
        rows = _rows(tmp_path / "six")
        assert {k: proxy.forwarded[k] for k in rows} == {r.key: 1 for r in requests}  # each key sent once
        assert sum(proxy.arrived.values()) == 6 == sum(r["calls"] for r in rows.values())  # proxy == ledger
        assert sum(r["sent"] for r in reports) == 6 and all(r["write_through"] for r in reports)
        assert {r["status"] for r in rows.values()} == {"succeeded"}
        assert all(r["sent"] + r["skipped_claimed"] + r["skipped_done"] >= 1 for r in reports)

    more = sample_requests(8, max_tokens=4, offset=40)
    with FaultProxy(llm_server.root_url, free_port(*PROXY_PORTS), delay_s=0.3) as proxy:
        reports = _run_two(tmp_path / "capped", proxy, llm_server.served_model, more, max_calls=5)
        rows = _rows(tmp_path / "capped")
        # The cap of 5 holds for both processes together, and no key reached the server twice.
        assert sum(proxy.arrived.values()) == 5 == sum(r["calls"] for r in rows.values())
        assert set(proxy.forwarded.values()) == {1}
        assert sum(r["sent"] for r in reports) == 5
        statuses = [r["status"] for r in rows.values()]
        assert statuses.count("succeeded") == 5 and statuses.count("pending") == 3
        assert any(r["budget_exhausted"] for r in reports)
