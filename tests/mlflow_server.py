"""A real ``mlflow server`` for integration tests (import the fixture into a test module).

One server per test session: SQLite backend store, a local artifact folder served through the
server (``--serve-artifacts --artifacts-destination``, so runs get ``mlflow-artifacts:/`` URIs and
every artifact byte goes over HTTP), bound to loopback on a free port of this stage's range
(18500–18519), one worker. The default host check (``--allowed-hosts``: localhost and private
IPs) is left on. Tests that share it use their own model names, so their order never matters.

Usage::

    from tests.mlflow_server import mlflow_server  # noqa: F401
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fault_proxy import free_port

SERVER_PORTS = (18500, 18519)
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class MlflowServer:
    url: str                 # tracking URI for clients: http://127.0.0.1:PORT
    backend_store_uri: str
    artifacts_destination: Path
    log_path: Path


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} not healthy after {START_TIMEOUT_S:.0f}s: "
                       f"{log_path.read_text()[-2000:]}")


def start_mlflow_server(root: Path) -> tuple[MlflowServer, subprocess.Popen]:
    """Start ``mlflow server`` with its state under ``root``; returns once ``/health`` answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port(*SERVER_PORTS)
    backend = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = root / "artifacts"
    log_path = root / "mlflow-server.log"
    command = [str(Path(sys.executable).with_name("mlflow")), "server",
               "--backend-store-uri", backend,
               "--serve-artifacts", "--artifacts-destination", str(artifacts),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log_path)
    except Exception:
        stop_mlflow_server(process)
        raise
    return MlflowServer(url, backend, artifacts, log_path), process


def stop_mlflow_server(process: subprocess.Popen) -> None:
    """Stop the server's process group (uvicorn/gunicorn workers included)."""
    if process.poll() is not None:
        return
    with_group = os.getpgid(process.pid)
    os.killpg(with_group, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(with_group, signal.SIGKILL)
        process.wait(timeout=15)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running ``mlflow server`` (SQLite + served local artifacts) for the whole session."""
    try:
        server, process = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    except RuntimeError as exc:
        pytest.fail(f"could not start mlflow server: {exc}")
    try:
        yield server
    finally:
        stop_mlflow_server(process)
