"""Hostile programs against the OS boundary (bubblewrap): one per class of escape a security
review made work against the earlier sandbox (issue 10, items 1-7).

Each program tries its trick and then uses whatever it gained to connect to a loopback listener
this test opens, signal this test process and a bystander process, write outside its temp dir,
read a secret from this process's environment, and leave a detached process behind. Each runs
twice: through ``run_python`` (audit hook on) and with the audit hook switched off, so the
kernel boundary alone is what stops it. After every run: nothing connected, nothing signalled,
nothing written, the secret never printed, no process left, no reader thread left, the wall
limit held, and a normal evaluation still works. The last test repeats the checks with the
caller unprivileged (uid 65534), where the machine allows it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from models.sandbox import SandboxLimits, SandboxResult, _bwrap_launch, _spawn, isolation_available, run_python

if isolation_available() is None:
    pytest.skip(f"bubblewrap cannot run here ({_bwrap_launch(sys.executable)[1]}): `make sandbox-tool`",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
LIMITS = SandboxLimits(cpu_seconds=3, wall_seconds=4, max_processes=16)
WALL_SLACK = 2.5  # killing the namespace and reaping, on a loaded 2-core machine

# Runs after each program's own trick: uses whatever the trick gained. Placeholders are filled
# per run; every attempt reports and goes on (one refusal must not hide the next attempt).
AFTERMATH = r'''
import os, signal, sys, time
def attempt(name, action):
    try:
        print("RESULT", name, action())
    except BaseException as exc:
        print("REFUSED", name, type(exc).__name__, exc)
def connect():
    import socket
    s = socket.socket(); s.settimeout(1)
    return s.connect_ex(("127.0.0.1", PORT))
def write():
    with open("TARGET", "w") as handle:
        handle.write("escaped")
    return "wrote"
def read_secrets():
    found = []
    for pid in ["self", "1", str(os.getppid()), "PARENT_PID"] + [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            found.append(open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace"))
        except OSError as exc:
            found.append(f"{pid}:{exc.errno}")
    return " | ".join(found)
def signal_parent():
    out = []
    for pid in (PARENT_PID, BYSTANDER_PID):
        try:
            os.kill(pid, signal.SIGUSR1 if pid == PARENT_PID else signal.SIGKILL)
            out.append("killed")
        except OSError as exc:
            out.append(exc.errno)
        try:
            fd = os.pidfd_open(pid)
            signal.pidfd_send_signal(fd, signal.SIGUSR1 if pid == PARENT_PID else signal.SIGKILL)
            out.append("pidfd-sent")
        except OSError as exc:
            out.append(exc.errno)
    return out
def leave_behind():
    pid = os.fork()
    if pid == 0:
        os.setsid()
        open("/proc/self/comm", "w").write("TOKEN")
        time.sleep(60)  # holds stdout/stderr
        os._exit(0)
    return pid
attempt("connect", connect)
attempt("write", write)
attempt("secrets", read_secrets)
attempt("signal", signal_parent)
attempt("leave_behind", leave_behind)
'''

HOSTILE = {
    # 1. a str subclass as the module name: the hook recognised only exact str
    "str_subclass_create_dynamic": r'''
import _imp, importlib.util
class Name(str):
    """Equal to nothing, contains nothing, splits into harmless parts: C code still sees the text."""
    def __eq__(self, other):
        return False
    def __ne__(self, other):
        return True
    def __hash__(self):
        return 0
    def __contains__(self, part):
        return False
    def partition(self, sep):
        return ("innocent", "", "")
    def rpartition(self, sep):
        return ("", "", "innocent")
for module in ("_posixsubprocess", "_socket", "_ctypes"):
    try:
        spec = importlib.util.find_spec(module)
        spec.name, spec.origin = Name(spec.name), Name(spec.origin)
        _imp.create_dynamic(spec)
        print("LOADED", module)
    except Exception as exc:
        print("REFUSED load", module, type(exc).__name__, exc)
''',
    # 2. the hook's own state through a refusal's traceback: rebind cells, clear containers,
    # replace defaults and code of every function found in the hook's frames
    "hook_state_from_traceback": r'''
import types
frames = []
try:
    open("TARGET", "w")
except Exception as exc:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals is not globals():  # not this program's own frame
            frames.append(tb.tb_frame)
        tb = tb.tb_next
tampered = 0
replacement = (lambda *a, **k: None).__code__
for frame in frames:
    for value in list(frame.f_locals.values()):
        if isinstance(value, types.FunctionType):
            for cell in value.__closure__ or ():
                try:
                    cell.cell_contents = None; tampered += 1
                except Exception:
                    pass
            for attr, new in (("__defaults__", None), ("__kwdefaults__", None), ("__code__", replacement)):
                try:
                    setattr(value, attr, new); tampered += 1
                except Exception:
                    pass
        for method in ("clear",):
            if isinstance(value, (dict, set, list)):
                getattr(value, method)(); tampered += 1
print("FRAMES", len(frames), "TAMPERED", tampered)
''',
    # 3. _posixsubprocess.fork_exec raises no audit event: start a child with it
    "posixsubprocess_fork_exec": r'''
import subprocess, sys
try:
    import _posixsubprocess
    subprocess._fork_exec = _posixsubprocess.fork_exec
    print("LOADED _posixsubprocess")
except Exception as exc:
    print("REFUSED load", type(exc).__name__, exc)
try:
    child = subprocess.run([sys.executable, "-c", "open('TARGET', 'w').write('x')"], capture_output=True, text=True)
    print("CHILD", child.returncode, child.stderr[-200:])
except Exception as exc:
    print("REFUSED spawn", type(exc).__name__, exc)
''',
    # 4. as (root-mapped) child: enter other namespaces, make a new user namespace, remount rw
    "namespaces_and_remount": r'''
import os
try:
    __import__("sys").modules.pop("ctypes", None)  # the hook's stand-in, if any
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET = 0x10000000, 0x00020000, 0x40000000
    MS_REMOUNT, MS_BIND = 32, 4096
    for pid in os.listdir("/proc"):
        for ns in ("net", "mnt", "user", "pid"):
            try:
                fd = os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY)
            except OSError:
                continue
            print("SETNS", pid, ns, libc.setns(fd, 0), ctypes.get_errno())
    print("UNSHARE_USER", libc.unshare(CLONE_NEWUSER), ctypes.get_errno())
    print("UNSHARE_NS", libc.unshare(CLONE_NEWNS | CLONE_NEWNET), ctypes.get_errno())
    for point in (b"/", b"/usr/lib", os.path.dirname(os.getcwd()).encode()):
        print("REMOUNT_RW", point, libc.mount(None, point, None, MS_REMOUNT | MS_BIND, None), ctypes.get_errno())
    print("CAPEFF", [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")])
except Exception as exc:
    print("REFUSED ctypes", type(exc).__name__, exc)
''',
    # 5. pidfd_open(getppid()) + pidfd_send_signal: no audit event for either
    "pidfd_signal_parent": r'''
import os, signal
for pid in (os.getppid(), PARENT_PID, BYSTANDER_PID):
    try:
        fd = os.pidfd_open(pid)
        signal.pidfd_send_signal(fd, signal.SIGUSR1 if pid == PARENT_PID else signal.SIGTERM)
        print("SENT", pid)
    except OSError as exc:
        print("REFUSED pidfd", pid, exc.errno)
''',
    # 6. the parent's secrets from /proc/<ppid>/environ (covered by AFTERMATH's read_secrets)
    "proc_environ_secret": r'''
import os
print("PPID", os.getppid(), "PID", os.getpid())
''',
    # 7a. a detached grandchild keeps the output pipes open after the program exits
    "detached_grandchild_holds_pipes": r'''
import os, time
pid = os.fork()
if pid == 0:
    os.setsid()
    open("/proc/self/comm", "w").write("TOKEN")
    while True:
        time.sleep(0.1)
print("PARENT EXITS")
''',
    # 7b. a fork bomb: every process forks forever
    "fork_bomb": r'''
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
''',
    # 7c. a thread bomb (threads are not refused by the hook; the process count limit is the stop)
    "thread_bomb": r'''
import threading, time
started = 0
try:
    while True:
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        started += 1
except RuntimeError as exc:
    print("THREADS", started, exc)
''',
    # 7d. ignores SIGXCPU and spins: killed at the hard CPU limit, must be reported as cpu
    "ignores_sigxcpu": r'''
import signal
signal.signal(signal.SIGXCPU, signal.SIG_IGN)
while True:
    pass
''',
}


@dataclass
class Scene:
    """What a hostile program aims at, set up in this (the parent) process."""

    port: int
    accepted: list[socket.socket]
    target: Path
    secret: str
    token: str
    bystander: subprocess.Popen[bytes]
    signals: list[int]

    def program(self, name: str, parent_pid: str | None = None) -> str:
        code = HOSTILE[name] + ("" if name in ("fork_bomb", "thread_bomb", "ignores_sigxcpu") else AFTERMATH)
        return (code.replace("TARGET", str(self.target)).replace("PORT", str(self.port))
                .replace("PARENT_PID", parent_pid or str(os.getpid()))
                .replace("BYSTANDER_PID", str(self.bystander.pid)).replace("TOKEN", self.token))


@pytest.fixture
def scene(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scene]:
    # a directory anyone may write to: an escaped write (as root or as uid 65534) would land
    outside = Path(tempfile.mkdtemp(prefix="jz-escape-target-"))
    outside.chmod(0o777)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    secret = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    signals: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: signals.append(signum))
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        # sanity: the listener is reachable from here
        socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=2).close()
        deadline = time.monotonic() + 2
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(accepted) == 1
        accepted.clear()
        yield Scene(server.getsockname()[1], accepted, outside / "escaped.txt", secret,
                    f"jz{uuid.uuid4().hex[:13]}", bystander, signals)
    finally:
        shutil.rmtree(outside, ignore_errors=True)
        signal.signal(signal.SIGUSR1, previous)
        bystander.kill()
        bystander.wait()
        stop.set()
        thread.join()
        server.close()


def leftover_processes(token: str) -> list[str]:
    """Processes named ``token`` (their comm) or with it on their command line."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if (Path(f"/proc/{pid}/comm").read_text().strip() == token
                    or token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()):
                found.append(pid)
        except OSError:
            continue
    return found


def assert_contained(scene: Scene, result: SandboxResult, limits: SandboxLimits, threads_before: int) -> None:
    """The boundary's promises, whatever the program did."""
    output = result.stdout + result.stderr
    assert scene.accepted == [], "a connection reached the parent's loopback listener"
    assert scene.signals == [], "the parent was signalled"
    assert scene.bystander.poll() is None, "another process was signalled"
    assert list(scene.target.parent.iterdir()) == [], "wrote outside the temp dir"
    assert scene.secret not in output, "the parent's secret was read"
    assert result.wall_s <= limits.wall_seconds + WALL_SLACK, f"wall limit overrun: {result.wall_s}"
    time.sleep(0.2)  # the namespace's processes are killed as its init exits
    assert leftover_processes(scene.token) == [], "a process outlived the run"
    assert threading.active_count() == threads_before, "the run left threads behind"
    after = run_python("print(6 * 7)", SandboxLimits(wall_seconds=10))
    assert after.ok and after.stdout == "42\n", after


def run_hostile(scene: Scene, name: str, hook: bool, limits: SandboxLimits = LIMITS) -> SandboxResult:
    code = scene.program(name)
    if hook:
        return run_python(code, limits)
    launch, _ = _bwrap_launch(sys.executable)
    assert launch is not None
    return _spawn(code, limits, launch, audit_hook=False)


HOOK_MODES = pytest.mark.parametrize("hook", [True, False], ids=["with-hook", "kernel-only"])


@HOOK_MODES
def test_str_subclass_module_names(scene: Scene, hook: bool) -> None:
    threads = threading.active_count()
    result = run_hostile(scene, "str_subclass_create_dynamic", hook)
    if hook:
        assert "LOADED" not in result.stdout, result.stdout
        assert result.stdout.count("non-str module name") == 3, result.stdout
    assert_contained(scene, result, LIMITS, threads)


@HOOK_MODES
def test_hook_state_reached_from_a_traceback_cannot_switch_it_off(scene: Scene, hook: bool) -> None:
    threads = threading.active_count()
    result = run_hostile(scene, "hook_state_from_traceback", hook)
    if hook:
        frames = int(result.stdout.split("FRAMES ")[1].split()[0])
        assert frames >= 2, result.stdout  # the hook's frames were reachable ...
        assert "TAMPERED 0" in result.stdout  # ... but nothing in them could be changed
        assert "REFUSED write PermissionError sandbox: writing outside" in result.stdout, result.stdout
        assert "REFUSED connect ImportError sandbox: import of _socket is blocked" in result.stdout
    assert_contained(scene, result, LIMITS, threads)


@HOOK_MODES
def test_posixsubprocess_fork_exec(scene: Scene, hook: bool) -> None:
    threads = threading.active_count()
    result = run_hostile(scene, "posixsubprocess_fork_exec", hook)
    if hook:
        assert "REFUSED load ImportError sandbox: import of _posixsubprocess is blocked" in result.stdout
        assert "REFUSED spawn" in result.stdout, result.stdout
    else:  # the child ran, inside the same boundary: the target's directory does not exist there
        assert "CHILD 1" in result.stdout and "No such file or directory" in result.stdout, result.stdout
    assert_contained(scene, result, LIMITS, threads)


@HOOK_MODES
def test_no_capabilities_no_namespace_entry_no_remount(scene: Scene, hook: bool) -> None:
    threads = threading.active_count()
    result = run_hostile(scene, "namespaces_and_remount", hook)
    if hook:
        assert "REFUSED ctypes" in result.stdout, result.stdout
    else:
        lines = result.stdout.splitlines()
        assert "CAPEFF ['0000000000000000']" in lines, result.stdout
        # only the sandbox's own namespaces are visible, and even those cannot be entered
        setns = [line for line in lines if line.startswith("SETNS")]
        assert setns and all(" -1 " in line for line in setns), result.stdout
        assert [line for line in lines if line.startswith("UNSHARE")] and \
            all(" -1 " in line for line in lines if line.startswith("UNSHARE")), result.stdout
        remounts = [line for line in lines if line.startswith("REMOUNT_RW")]
        assert len(remounts) == 3 and all(" -1 1" in line for line in remounts), result.stdout  # EPERM
    assert_contained(scene, result, LIMITS, threads)


@HOOK_MODES
def test_pidfd_signals_reach_neither_the_parent_nor_other_processes(scene: Scene, hook: bool) -> None:
    threads = threading.active_count()
    result = run_hostile(scene, "pidfd_signal_parent", hook)
    # getppid() is 0 inside the PID namespace (the code is its init); host pids do not exist there
    assert "SENT" not in result.stdout, result.stdout
    assert f"REFUSED pidfd {os.getpid()} 3" in result.stdout, result.stdout  # ESRCH
    assert_contained(scene, result, LIMITS, threads)


@HOOK_MODES
def test_parent_environment_secrets_are_unreadable(scene: Scene, hook: bool) -> None:
    threads = threading.active_count()
    result = run_hostile(scene, "proc_environ_secret", hook)
    assert "PPID 0 PID 1" in result.stdout, result.stdout
    assert "OPENAI_API_KEY" not in result.stdout and f"{os.getpid()}:2" in result.stdout  # ENOENT
    assert_contained(scene, result, LIMITS, threads)


@HOOK_MODES
def test_detached_grandchild_does_not_hold_the_run_open(scene: Scene, hook: bool) -> None:
    threads = threading.active_count()
    result = run_hostile(scene, "detached_grandchild_holds_pipes", hook)
    if hook:
        assert "sandbox: os.fork is blocked" in result.stderr, result.stderr
    else:
        assert "PARENT EXITS" in result.stdout and not result.timed_out, result
        assert result.wall_s < 2.5, result.wall_s  # ends with the program, not at the wall limit
    assert_contained(scene, result, LIMITS, threads)


def needs_process_limit() -> None:
    if isolation_available() != "bwrap":
        pytest.skip("bwrap-root: the sandbox uid maps to root outside, and the kernel applies no "
                    "RLIMIT_NPROC to root (make the interpreter readable by uid 65534)")


def test_weak_mode_still_ends_on_time_when_a_grandchild_holds_the_pipes(scene: Scene) -> None:
    """Without a PID namespace (allow_weak_isolation, hook off as if bypassed) the escaped
    grandchild survives — the documented weakness — but the run itself ends at once, with the
    grandchild's pipes abandoned and no reader thread left behind."""
    from models.sandbox import _weak_launch

    threads = threading.active_count()
    weak = SandboxLimits(cpu_seconds=3, wall_seconds=4, allow_weak_isolation=True)
    code = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {scene.token!r}])\n"
            "print('PARENT EXITS')\n")
    result = _spawn(code, weak, _weak_launch(weak), audit_hook=False)
    try:
        assert "PARENT EXITS" in result.stdout and not result.timed_out, result
        assert leftover_processes(scene.token), "the grandchild should have held the pipes"
        assert result.wall_s < 2.5 and threading.active_count() == threads, result
    finally:
        for pid in leftover_processes(scene.token):
            os.kill(int(pid), signal.SIGKILL)


def test_fork_bomb_is_contained_and_the_run_ends_at_its_wall_limit(scene: Scene) -> None:
    """Kernel-only (the hook refuses fork outright): the process count limit holds the bomb,
    the wall limit ends it, and the PID namespace takes every process with it."""
    needs_process_limit()
    threads = threading.active_count()
    result = run_hostile(scene, "fork_bomb", hook=False)
    assert result.timed_out and result.killed_by == "timeout", result
    assert_contained(scene, result, LIMITS, threads)


@HOOK_MODES
def test_thread_bomb_stops_at_the_process_count_limit(scene: Scene, hook: bool) -> None:
    needs_process_limit()
    threads = threading.active_count()
    result = run_hostile(scene, "thread_bomb", hook)
    started = int(result.stdout.split("THREADS ")[1].split()[0])
    assert 0 < started < LIMITS.max_processes, result.stdout
    assert_contained(scene, result, LIMITS, threads)


@HOOK_MODES
def test_program_ignoring_sigxcpu_is_reported_as_cpu(scene: Scene, hook: bool) -> None:
    threads = threading.active_count()
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=30)  # 2 CPU seconds can take long on a busy machine
    result = run_hostile(scene, "ignores_sigxcpu", hook, limits)
    assert result.killed_by == "cpu" and not result.timed_out, result
    assert result.cpu_s >= 1.0
    assert_contained(scene, result, limits, threads)


def test_every_result_names_its_isolation_mode() -> None:
    result = run_python("print(1)", SandboxLimits(wall_seconds=10))
    assert result.isolation == isolation_available() and result.isolation in ("bwrap", "bwrap-root")
    assert (result.network_isolation, result.filesystem_isolation) == ("netns", "mount-ro")
    weak = run_python("print(1)", SandboxLimits(wall_seconds=10, network_isolation="audit-hook",
                                               filesystem_isolation="audit-hook", allow_weak_isolation=True))
    assert weak.ok and weak.isolation == "hook-only"


# ------------------------------------------------------------------ as an unprivileged caller

NOBODY = 65534
# The whole check from an unprivileged process: its own sandbox runs, reported as JSON.
NOBODY_RUNNER = r'''
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from models.sandbox import SandboxLimits, _bwrap_launch, isolation_available, run_python
signals = []
signal.signal(signal.SIGUSR1, lambda *a: signals.append(1))
if isolation_available() is None:
    print(json.dumps({"skip": _bwrap_launch(sys.executable)[1]}))
    sys.exit(0)
limits = SandboxLimits(cpu_seconds=3, wall_seconds=4, max_processes=16)
results = {}
for name, code in json.loads(sys.argv[2]).items():
    r = run_python(code.replace("PARENT_PID", str(os.getpid())), limits)
    results[name] = {"stdout": r.stdout, "stderr": r.stderr, "wall_s": r.wall_s, "isolation": r.isolation,
                     "killed_by": r.killed_by}
after = run_python("print(6 * 7)", SandboxLimits(wall_seconds=10))
print(json.dumps({"uid": os.getuid(), "results": results, "signals": signals, "after": after.stdout}))
'''


def _world_readable_python() -> str | None:
    """An interpreter uid 65534 can run (the venv's may live under /root)."""
    for candidate in (shutil.which("python3.11"), shutil.which("python3"), "/usr/bin/python3"):
        if candidate and os.path.exists(candidate):
            probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                    candidate, "-I", "-c", "import sys; assert sys.version_info >= (3, 11)"],
                                   capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


def test_same_containment_when_the_caller_is_unprivileged(scene: Scene) -> None:
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: the tests above ran as this user")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to run the check as uid 65534")
    python = _world_readable_python()
    if python is None:
        pytest.skip("no Python >= 3.11 that uid 65534 can run")
    threads = threading.active_count()
    names = ["str_subclass_create_dynamic", "hook_state_from_traceback", "posixsubprocess_fork_exec",
             "pidfd_signal_parent", "proc_environ_secret", "thread_bomb"]
    programs = {name: scene.program(name, parent_pid="PARENT_PID") for name in names}
    env = {"PATH": os.environ["PATH"], "OPENAI_API_KEY": scene.secret}
    out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-I",
                          "-c", NOBODY_RUNNER, str(REPO), json.dumps(programs)],
                         capture_output=True, text=True, env=env, cwd="/", timeout=240)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    if "skip" in report:
        pytest.skip(f"unprivileged bubblewrap is not possible here (user namespaces disabled?): {report['skip']}")
    assert report["uid"] == NOBODY and report["signals"] == [] and report["after"] == "42\n"
    for name, result in report["results"].items():
        assert result["isolation"] == "bwrap", (name, result)
        output = result["stdout"] + result["stderr"]
        assert scene.secret not in output and "LOADED" not in output and "SENT" not in output, (name, output)
        assert "TAMPERED 0" in output or name != "hook_state_from_traceback"
        assert result["wall_s"] <= LIMITS.wall_seconds + WALL_SLACK, (name, result)
    started = int(report["results"]["thread_bomb"]["stdout"].split("THREADS ")[1].split()[0])
    assert 0 < started < LIMITS.max_processes
    assert scene.accepted == [] and scene.signals == [] and scene.bystander.poll() is None
    assert list(scene.target.parent.iterdir()) == [] and leftover_processes(scene.token) == []
    assert threading.active_count() == threads
