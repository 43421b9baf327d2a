"""The code sandbox: each limit is hit by a real program and reported in the result."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from models.sandbox import SandboxLimits, network_isolation_available, run_python

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=10)


def test_normal_run_with_stdin_and_a_private_cwd() -> None:
    result = run_python("import os, sys\nprint(6 * 7)\nprint(sys.stdin.read().upper())\nprint(os.getcwd())",
                        FAST, stdin="hello")
    assert result.ok and result.exit_code == 0 and result.killed_by is None
    lines = result.stdout.splitlines()
    assert lines[:2] == ["42", "HELLO"]
    assert Path(lines[2]).name.startswith("jzsandbox-") and not Path(lines[2]).exists()  # removed after


def test_exception_is_a_failed_result_not_a_raise() -> None:
    result = run_python("raise ValueError('boom')", FAST)
    assert not result.ok and result.exit_code == 1 and "ValueError: boom" in result.stderr


def test_busy_loop_hits_the_cpu_limit() -> None:
    result = run_python("while True:\n    pass", SandboxLimits(cpu_seconds=1, wall_seconds=30))
    assert result.killed_by == "cpu" and not result.timed_out and not result.ok


def test_sleeping_loop_hits_the_wall_clock_and_the_group_is_killed() -> None:
    result = run_python("import time\nprint('start', flush=True)\nwhile True:\n    time.sleep(1)",
                        SandboxLimits(cpu_seconds=5, wall_seconds=1))
    assert result.timed_out and result.killed_by == "timeout" and result.stdout == "start\n"
    assert 0.9 < result.wall_s < 5


def test_memory_bomb_is_stopped() -> None:
    result = run_python("x = bytearray(8 * 1024 ** 3)\nprint('allocated')",
                        SandboxLimits(memory_bytes=512 << 20, wall_seconds=20))
    assert result.killed_by == "memory" and "allocated" not in result.stdout


def test_huge_output_is_truncated_and_stopped() -> None:
    result = run_python("while True:\n    print('x' * 1000)", SandboxLimits(max_output_bytes=10_000))
    assert result.truncated and result.killed_by == "output_limit"
    assert len(result.stdout) == 10_000 and not result.ok


@pytest.fixture
def listener() -> object:
    """A real TCP server on 127.0.0.1 (project port range) that records any connection."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for port in range(18430, 18440):
        try:
            server.bind(("127.0.0.1", port))
            break
        except OSError:
            continue
    server.listen(5)
    server.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("isolation", ["auto", "audit-hook"])
def test_network_is_blocked(listener: tuple[int, list[object]], isolation: str) -> None:
    port, accepted = listener
    # sanity: the server is reachable from outside the sandbox
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    code = ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
            f"print(s.connect_ex(('127.0.0.1', {port})))")
    result = run_python(code, SandboxLimits(wall_seconds=10, network_isolation=isolation))  # type: ignore[arg-type]
    assert not result.ok and "PermissionError: sandbox: socket" in result.stderr
    assert len(accepted) == 1  # only the sanity connection
    expected = "netns" if isolation == "auto" and network_isolation_available() else "audit-hook"
    assert result.network_isolation == expected


def test_network_namespace_alone_has_no_route(listener: tuple[int, list[object]]) -> None:
    """Where unshare is allowed, the namespace alone leaves no route, not even to localhost
    (checked with a plain interpreter in the namespace, without the audit hook)."""
    if not network_isolation_available():
        pytest.skip("no network namespace here (needs root or user namespaces)")
    from models.sandbox import _netns_prefix

    port, accepted = listener
    probe = ("import socket; s = socket.socket(); s.settimeout(2); "
             f"print(s.connect_ex(('127.0.0.1', {port})))")
    out = subprocess.run([*_netns_prefix(), sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() not in ("", "0") and accepted == []


def test_writes_outside_the_sandbox_are_blocked_inside_allowed(tmp_path: Path) -> None:
    target = tmp_path / "escape.txt"
    code = (f"open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n"
            f"open({str(target)!r}, 'w').write('escaped')")
    result = run_python(code, FAST)
    assert result.stdout == "ok\n" and "writing outside the sandbox directory is blocked" in result.stderr
    assert not target.exists()
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    removed = run_python(f"import os\nos.remove({str(victim)!r})", FAST)
    assert "blocked" in removed.stderr and victim.read_text() == "precious"


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.system('true')",
    "import os\nos.fork()",
    "import ctypes\nctypes.CDLL('libc.so.6')",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
])
def test_escape_hatches_are_refused(code: str) -> None:
    result = run_python(code, FAST)
    assert result.exit_code == 1 and "PermissionError: sandbox:" in result.stderr


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    result = run_python("import os\nprint(sorted(os.environ))", FAST)
    assert result.ok and "OPENAI_API_KEY" not in result.stdout
