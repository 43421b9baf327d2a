"""A real OpenAI-compatible server on this machine: ``transformers serve <model> --continuous-batching``.

Used by the tests (fixture in ``tests/llm_fixtures.py``), the demo, the benchmark and the
Makefile (``make llm-up`` / ``make llm-down``). The server is pinned to one model directory
(the tiny model by default) and answers to that path as its model name, so callers map their
logical model name to ``LocalServer.served_model`` (``generation.served_models``).

Notes on ``transformers serve`` (5.x) that shape this module:

* readiness = ``GET /health`` 200 and ``GET /v1/models`` listing the model (the pinned model is
  loaded before the port opens);
* the continuous-batching KV cache is sized from GPU memory by default; on CPU we give it a
  small explicit size (``--cb-num-blocks``, ``--cb-max-batch-tokens``) or the first request
  spends many seconds allocating;
* with continuous batching, temperature/top-p are taken from the *first* request and shared by
  all later ones (per-request ``max_tokens`` and ``seed`` still apply) — fine for tests and the
  demo, and the reason real deployments use vLLM's server or the ``vllm`` backend.

CLI: ``python -m models.generation.local_server up|down|status [--port N] [--model-dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PORT = 18300
STATE_DIR = REPO / "var" / "llm"


class ServerStartError(RuntimeError):
    """The server exited or never became ready; the message carries its log tail."""


def transformers_cli() -> list[str]:
    """The ``transformers`` CLI of the running interpreter's environment."""
    script = Path(sys.executable).parent / "transformers"
    return [str(script)] if script.exists() else [sys.executable, "-m", "transformers.cli.transformers"]


def serve_command(model_dir: str | Path, port: int, *, host: str = "127.0.0.1", continuous_batching: bool = True,
                  device: str = "cpu", cb_num_blocks: int | None = 64, cb_max_batch_tokens: int | None = 1024,
                  extra_args: Sequence[str] = ()) -> list[str]:
    """The ``transformers serve`` command line (checked against ``transformers serve --help``)."""
    command = [*transformers_cli(), "serve", str(model_dir), "--host", host, "--port", str(port),
               "--device", device, "--log-level", "warning"]
    if continuous_batching:
        command.append("--continuous-batching")
        if cb_num_blocks:
            command += ["--cb-num-blocks", str(cb_num_blocks)]
        if cb_max_batch_tokens:
            command += ["--cb-max-batch-tokens", str(cb_max_batch_tokens)]
    return command + list(extra_args)


@dataclass
class LocalServer:
    """A started server process (or one found through its state file)."""

    model_dir: str
    port: int
    host: str = "127.0.0.1"
    pid: int | None = None
    log_path: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def served_model(self) -> str:
        """The model name the server answers to (its pinned model path)."""
        return self.model_dir

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate the server's process group (it was started in its own session), then kill."""
        if self.pid is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.alive():
                if self.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=0.2)
                else:
                    time.sleep(0.2)
            if not self.alive():
                break
        self.pid = None

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def as_dict(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "port": self.port, "host": self.host, "pid": self.pid,
                "log_path": self.log_path, "base_url": self.base_url}


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


def is_ready(root_url: str, model: str | None = None) -> bool:
    """``/health`` answers 200 and ``/v1/models`` lists ``model`` (when given)."""
    status, _ = _get_json(f"{root_url}/health")
    if status != 200:
        return False
    status, body = _get_json(f"{root_url}/v1/models")
    if status != 200 or not isinstance(body, dict):
        return False
    return model is None or any(item.get("id") == model for item in body.get("data", []))


def _die_with_parent() -> None:
    # Linux: SIGKILL the server when the process that started it dies (a killed test run must
    # not leave a server behind). Not SIGTERM: a busy server's graceful shutdown waits for its
    # in-flight generations, and nobody is left to read them. Runs in the child between fork and exec.
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_server(model_dir: str | Path, port: int = DEFAULT_PORT, *, host: str = "127.0.0.1",
                 continuous_batching: bool = True, device: str = "cpu", threads: int = 2,
                 log_path: str | Path | None = None, ready_timeout_s: float = 240.0,
                 extra_args: Sequence[str] = (), die_with_parent: bool = True) -> LocalServer:
    """Start ``transformers serve`` and block until it is ready (or raise with its log tail).

    ``die_with_parent`` (Linux) stops the server when the calling process dies; ``up`` turns
    it off for the detached server of ``make llm-up``.
    """
    model_dir = str(Path(model_dir).resolve())
    if not (Path(model_dir) / "config.json").exists():
        raise ServerStartError(f"{model_dir} holds no model (config.json missing); build the tiny model "
                               "with `python -m models.tiny` or point --model-dir at a saved model")
    if is_ready(f"http://{host}:{port}"):
        raise ServerStartError(f"port {port} already serves a model; stop it (`make llm-down`) or pick another port")
    log_file = Path(log_path) if log_path else STATE_DIR / f"server-{port}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    command = serve_command(model_dir, port, host=host, continuous_batching=continuous_batching, device=device,
                            extra_args=extra_args)
    with open(log_file, "ab") as log:
        preexec = _die_with_parent if die_with_parent and sys.platform.startswith("linux") else None
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True,  # own process group: stop() ends all of it
                                   preexec_fn=preexec)
    server = LocalServer(model_dir=model_dir, port=port, host=host, pid=process.pid, log_path=str(log_file),
                         process=process)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"transformers serve exited with code {process.returncode}:\n{server.log_tail()}")
        if is_ready(server.root_url, server.served_model):
            return server
        time.sleep(0.5)
    server.stop()
    raise ServerStartError(f"transformers serve not ready on port {port} after {ready_timeout_s}s:\n"
                           f"{server.log_tail()}")


# ---- state files for `make llm-up` / `make llm-down` ------------------------------------------

def _state_file(port: int) -> Path:
    return STATE_DIR / f"server-{port}.json"


def up(model_dir: str | Path, port: int, **kwargs: Any) -> LocalServer:
    """Start a detached server and remember it in ``var/llm/server-<port>.json``."""
    existing = status(port)
    if existing is not None and existing.alive() and is_ready(existing.root_url):
        return existing
    server = start_server(model_dir, port, die_with_parent=False, **kwargs)
    _state_file(port).write_text(json.dumps(server.as_dict(), indent=2))
    return server


def status(port: int) -> LocalServer | None:
    path = _state_file(port)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return LocalServer(model_dir=data["model_dir"], port=data["port"], host=data["host"], pid=data["pid"],
                       log_path=data.get("log_path"))


def down(port: int) -> bool:
    """Stop the server ``up`` started on ``port``; True when one was running."""
    server = status(port)
    if server is None:
        return False
    was_alive = server.alive()
    server.stop()
    _state_file(port).unlink(missing_ok=True)
    return was_alive


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.generation.local_server",
                                     description="start/stop the local transformers-serve LLM server")
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--model-dir", help="model directory (default: the tiny model, built if missing)")
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.action == "down":
        print(json.dumps({"port": args.port, "stopped": down(args.port)}))
        return 0
    if args.action == "status":
        server = status(args.port)
        alive = server is not None and server.alive() and is_ready(server.root_url)
        print(json.dumps({"port": args.port, "running": alive, **(server.as_dict() if server else {})}))
        return 0 if alive else 1
    model_dir = args.model_dir
    if not model_dir:
        from jzlake.settings import load_settings
        from models.tiny import ensure_tiny_model

        model_dir = str(ensure_tiny_model(load_settings(args.config)))
    server = up(model_dir, args.port, device=args.device, threads=args.threads)
    print(json.dumps({**server.as_dict(), "served_model": server.served_model}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
