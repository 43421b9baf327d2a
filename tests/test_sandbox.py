"""The code sandbox: each limit is hit by a real program and reported in the result."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from models.sandbox import SandboxLimits, SandboxResult, isolation_available, network_isolation_available, run_python

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=10)
# the pre-bubblewrap layers, opted into explicitly
WEAK = SandboxLimits(cpu_seconds=2, wall_seconds=10, allow_weak_isolation=True)
HOOK_ONLY = SandboxLimits(cpu_seconds=2, wall_seconds=10, network_isolation="audit-hook",
                          filesystem_isolation="audit-hook", allow_weak_isolation=True)

if isolation_available() is None:
    pytest.skip("bubblewrap cannot run here: `make sandbox-tool`", allow_module_level=True)


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
    result = run_python(code, SandboxLimits(wall_seconds=10, network_isolation=isolation,  # type: ignore[arg-type]
                                            allow_weak_isolation=isolation == "audit-hook"))
    assert not result.ok and "ImportError: sandbox: import of _socket is blocked" in result.stderr
    assert len(accepted) == 1  # only the sanity connection
    assert result.network_isolation == ("netns" if isolation == "auto" else "audit-hook")
    assert result.isolation == (isolation_available() if isolation == "auto" else "namespaces-weak")


def test_network_namespace_alone_has_no_route(listener: tuple[int, list[object]]) -> None:
    """Weak mode: where unshare is allowed, the namespace alone leaves no route, not even to localhost
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
    assert result.exit_code == 1 and "sandbox:" in result.stderr and "blocked" in result.stderr


# Each program tries to create TARGET (a path outside the sandbox directory) a different way;
# every one of them worked against the first version of the hook or is a known bypass.
ESCAPES = {
    # fork_exec from the C module: no subprocess.Popen audit event
    "posixsubprocess": "import _posixsubprocess\n_posixsubprocess.fork_exec(['/bin/sh', '-c', 'echo x > TARGET'])",
    "posixsubprocess_via_imp": ("import importlib.util, _imp\n"
                                "_imp.create_dynamic(importlib.util.find_spec('_posixsubprocess'))"),
    "posixsubprocess_renamed": (
        "import glob, importlib.util, sys\n"
        "so = [f for p in sys.path for f in glob.glob(p + '/_posixsubprocess*.so')][0]\n"
        "spec = importlib.util.spec_from_file_location('innocent._posixsubprocess', so)\n"
        "importlib.util.module_from_spec(spec).fork_exec(['/bin/sh', '-c', 'echo x > TARGET'])"),
    "subprocess_fork_exec": "import subprocess\nsubprocess._fork_exec(['/bin/sh', '-c', 'echo x > TARGET'])",
    # sqlite writes from C (no open event); ATTACH would bypass a path check on connect
    "sqlite_connect": "import sqlite3\nsqlite3.connect('TARGET').execute('create table t (a)')",
    "sqlite_attach": "import sqlite3\nsqlite3.connect(':memory:').execute(\"attach 'TARGET' as x\")",
    "posix_spawn": "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'echo x > TARGET'], {})",
    "fork_then_exec": "import os\nif os.fork() == 0:\n    os.execv('/bin/sh', ['sh', '-c', 'echo x > TARGET'])",
    "execv": "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo x > TARGET'])",
    "os_open": "import os\nos.write(os.open('TARGET', os.O_WRONLY | os.O_CREAT), b'x')",
    "dir_fd": ("import os\nfd = os.open(os.path.dirname('TARGET'), os.O_RDONLY)\n"
               "os.close(os.open(os.path.basename('TARGET'), os.O_WRONLY | os.O_CREAT, dir_fd=fd))"),
    "shutil_copy": "import shutil\nopen('a', 'w').write('x')\nshutil.copyfile('a', 'TARGET')",
    "symlink_relative": ("import os\nos.makedirs('a/b')\nos.chdir('a/b')\n"
                         "os.symlink('../' * 40 + 'TARGET'.lstrip('/'), os.path.abspath('../../link'))\n"
                         "open('../../link', 'w').write('x')"),
    "patched_realpath": ("import os, posixpath\nposixpath.realpath = os.path.realpath = "
                         "lambda p, **k: os.getcwd() + '/x'\nopen('TARGET', 'w').write('x')"),
    "ctypes": "import ctypes\nctypes.CDLL(None).system(b'echo x > TARGET')",
    "ctypes_reimported": ("import sys\ndel sys.modules['ctypes']\nimport ctypes\n"
                          "ctypes.CDLL(None).system(b'echo x > TARGET')"),
    "gc_introspection": "import gc\nprint(len(gc.get_objects()))",
    "subinterpreter": "import _xxsubinterpreters as s\ns.run_string(s.create(), \"open('TARGET', 'w')\")",
    "code_object": "f = lambda: 0\nf.__code__ = f.__code__.replace(co_consts=(1,))",
}


def run_in_mode(code: str, mode: str) -> SandboxResult:
    """``bwrap``: the default path; the weak modes as a caller that opted into them gets them."""
    from models.sandbox import _spawn, _weak_launch

    if mode == "bwrap":
        return run_python(code, FAST)
    limits = WEAK if mode == "namespaces-weak" else HOOK_ONLY
    launch = _weak_launch(limits)
    assert launch.isolation == mode or (mode == "namespaces-weak" and not network_isolation_available())
    return _spawn(code, limits, launch)


@pytest.mark.parametrize("mode", ["bwrap", "namespaces-weak", "hook-only"])
@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_low_level_escapes_are_refused(name: str, mode: str, tmp_path: Path) -> None:
    if name == "posixsubprocess_renamed" and "_posixsubprocess" in sys.builtin_module_names:
        pytest.skip("this interpreter has _posixsubprocess built in: no .so to load under another name")
    target = tmp_path / "escaped.txt"
    result = run_in_mode(ESCAPES[name].replace("TARGET", str(target)), mode)
    assert result.exit_code == 1, result.stderr
    if not (mode == "bwrap" and "FileNotFoundError" in result.stderr):  # bwrap: the path is not even there
        assert "sandbox:" in result.stderr, result.stderr
        assert ("blocked" in result.stderr or "not available" in result.stderr), result.stderr
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_hook_reads_no_global_or_builtin_names() -> None:
    """User code could rebind a global or builtin the hook calls (``__main__`` is the wrapper's
    module); the hook and its helpers must work from closure variables only."""
    import dis

    from models.sandbox import _WRAPPER

    module = compile(_WRAPPER, "<wrapper>", "exec")
    make_hook = next(c for c in module.co_consts if getattr(c, "co_name", "") == "_make_hook")
    nested = [c for c in make_hook.co_consts if hasattr(c, "co_code")]
    assert {c.co_name for c in nested} >= {"hook", "real", "allowed", "text", "refuse"}
    for code in nested:
        names = [i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")]
        assert names == [], f"{code.co_name} reads {names}"
        # no closure cells: a cell's contents can be rebound from a frame reached via a traceback
        assert code.co_freevars == () and code.co_cellvars == (), code.co_name


def test_normal_solution_code_still_runs() -> None:
    code = ("from fractions import Fraction\nimport itertools, math, statistics, decimal\n"
            "print(Fraction(1, 3) + Fraction(1, 6), math.comb(10, 3), statistics.mean([1, 2, 3]))\n"
            "print(sum(1 for p in itertools.permutations(range(5)) if p[0] < p[-1]))\n"
            "import os, pathlib\nos.makedirs('work/sub')\nopen('work/sub/n.txt', 'w').write('7')\n"
            "os.rename('work/sub/n.txt', 'work/n.txt')\nprint(open('work/n.txt').read())")
    result = run_python(code, FAST)
    assert result.ok, result.stderr
    assert result.stdout.splitlines() == ["1/2 120 2", "60", "7"]


def test_sympy_and_numpy_solutions_run() -> None:
    pytest.importorskip("sympy")
    pytest.importorskip("numpy")
    code = ("import sympy as sp, numpy as np\nx = sp.symbols('x')\n"
            "print(sorted(sp.solve(x**2 - 5*x + 6, x)), sp.divisor_count(2**10 * 3**5))\n"
            "print(int(round(np.linalg.det(np.diag([2.0, 3.0, 4.0])))))")
    result = run_python(code, SandboxLimits(cpu_seconds=10, wall_seconds=30))
    assert result.ok, result.stderr
    assert result.stdout.splitlines() == ["[2, 3] 66", "24"]


def test_read_only_mount_namespace_stops_a_process_without_the_hook(tmp_path: Path) -> None:
    """The kernel layer alone: the wrapper's mount setup, then plain writes (no audit hook)."""
    from models.sandbox import _WRAPPER, _namespace_prefix, filesystem_isolation_available

    if not filesystem_isolation_available():
        pytest.skip("no mount namespace here (needs root or user namespaces)")
    workdir = tmp_path / "sandbox"
    workdir.mkdir()
    outside = tmp_path / "outside.txt"
    definitions = _WRAPPER.split("\ntry:\n    _sandbox(")[0]
    probe = (definitions + "\nimport sys\nroot = sys.argv[1]\n_read_only_mounts(root)\nos.chdir(root)\n"
             "open('inside.txt', 'w').write('ok')\nopen('/dev/null', 'w').write('ok')\n"
             "try:\n    open(sys.argv[2], 'w')\nexcept OSError as exc:\n    print('refused', exc.errno)\n")
    out = subprocess.run([*_namespace_prefix(False, True), sys.executable, "-I", "-c", probe, str(workdir),
                          str(outside)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused 30" and not outside.exists()  # EROFS
    assert (workdir / "inside.txt").read_text() == "ok"
    result = run_in_mode("print('hi')", "namespaces-weak")
    assert result.ok and result.filesystem_isolation == "mount-ro" and result.isolation == "namespaces-weak"


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    result = run_python("import os\nprint(sorted(os.environ))", FAST)
    assert result.ok and "OPENAI_API_KEY" not in result.stdout


def test_without_bwrap_or_unshare_it_fails_closed_unless_weak_isolation_is_allowed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import models.sandbox as sandbox

    def clear() -> None:
        sandbox._BWRAP_LAUNCHES.clear()
        sandbox._netns_prefix.cache_clear()
        sandbox._namespace_prefix.cache_clear()

    clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)  # no bwrap, no unshare binary
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install -y bubblewrap"):
            run_python("print(1)", FAST)
        with pytest.raises(ValueError, match="allow_weak_isolation"):
            run_python("print(1)", SandboxLimits(network_isolation="audit-hook"))
        result = run_python(f"print('hi')\nopen({str(tmp_path / 'x')!r}, 'w')", WEAK)
        assert result.stdout == "hi\n" and "writing outside the sandbox directory is blocked" in result.stderr
        assert (result.network_isolation, result.filesystem_isolation) == ("audit-hook", "audit-hook")
        assert result.isolation == "hook-only"
        with pytest.raises(RuntimeError, match="read-only mount namespace requested"):
            run_python("print(1)", SandboxLimits(filesystem_isolation="mount", allow_weak_isolation=True))
        with pytest.raises(RuntimeError, match="network namespace requested"):
            run_python("print(1)", SandboxLimits(network_isolation="netns", allow_weak_isolation=True))
    finally:
        monkeypatch.undo()
        clear()


def test_mount_setup_refuses_to_run_outside_its_own_namespace() -> None:
    """The read-only remount must never touch the caller's mounts (fail closed, code not run)."""
    from models.sandbox import _Launch, _spawn

    result = _spawn("print('ran')", FAST, _Launch((), "namespaces-weak", "audit-hook", "mount-ro", mount_ro=True))
    assert result.exit_code == 85 and result.killed_by == "sandbox_setup" and result.stdout == ""
    assert "outside a private mount namespace" in result.stderr
