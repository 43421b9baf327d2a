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


# ------------------------------------------------------------------ second review (S1-S7)

def kernel_only(code: str, limits: SandboxLimits = LIMITS) -> SandboxResult:
    """The OS boundary alone, as if the audit hook had been bypassed (cffi, numpy raw memory)."""
    launch, _ = _bwrap_launch(sys.executable)
    assert launch is not None
    return _spawn(code, limits, launch, audit_hook=False)


# Raw syscalls through ctypes (the hook is off): each prints NAME RESULT ERRNO.
SYSCALL_SURVEY = r'''
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
NR = NUMBERS
def call(name, *args):
    ctypes.set_errno(0)
    result = libc.syscall(L(NR[name]), *[L(a) if isinstance(a, int) else a for a in args])
    print("SYSCALL", name, result, ctypes.get_errno() if result < 0 else 0)
    return result
buf = ctypes.create_string_buffer(256)
call("keyctl", 0, -3, 0)                       # KEYCTL_GET_KEYRING_ID of the session keyring
call("add_key", ctypes.c_char_p(b"user"), ctypes.c_char_p(b"jz"), ctypes.c_char_p(b"x"), 1, -3)
call("request_key", ctypes.c_char_p(b"user"), ctypes.c_char_p(b"jz"), None, -3)
call("io_uring_setup", 4, buf)
call("userfaultfd", 0)
call("ptrace", 0, 0, 0, 0)                    # PTRACE_TRACEME
call("process_vm_readv", os.getpid(), 0, 0, 0, 0, 0)
call("bpf", 0, 0, 0)
call("perf_event_open", 0, 0, -1, -1, 0)
call("mount", None, ctypes.c_char_p(b"/"), None, 32 | 4096, None)
call("unshare", 0x10000000)                    # CLONE_NEWUSER
call("setns", 0, 0)
call("personality", 0x0040000)                 # ADDR_NO_RANDOMIZE
call("clone", 0x10000000 | 17, 0, 0, 0, 0)     # CLONE_NEWUSER | SIGCHLD
call("open_by_handle_at", -100, 0, 0)
call("socket", 2, 1, 0)                        # AF_INET
call("socket", 16, 3, 0)                       # AF_NETLINK
call("socketpair", 10, 1, 0, buf)              # AF_INET6
call("personality", 0xFFFFFFFF)                # query: allowed
call("socket", 1, 1, 0)                        # AF_UNIX: allowed
print("STATUS", [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")])
import threading
t = threading.Thread(target=print, args=("THREAD OK",)); t.start(); t.join()   # clone3 -> clone fallback
pid = os.fork()                                                            # plain fork still works
if pid == 0:
    os._exit(3)
print("FORK", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
'''


def survey_program() -> str:
    import platform

    from models.sandbox import _SYSCALLS

    return SYSCALL_SURVEY.replace("NUMBERS", repr(_SYSCALLS[platform.machine()]))


def test_seccomp_filter_refuses_the_dangerous_syscalls_with_the_hook_bypassed(scene: Scene) -> None:
    """S1: the audit hook is not the boundary (cffi, numpy ``__array_interface__``): with it off,
    the kernel's seccomp filter refuses keyrings, io_uring, userfaultfd, ptrace, BPF, perf,
    mounts, namespaces, non-unix sockets; ordinary threads, forks and unix sockets still work."""
    threads = threading.active_count()
    result = kernel_only(survey_program() + scene.program("proc_environ_secret"))
    calls = {}
    for line in result.stdout.splitlines():
        if line.startswith("SYSCALL"):
            _, name, value, errno = line.split()
            calls.setdefault(name, []).append((int(value), int(errno)))
    eperm, eafnosupport = 1, 97
    for name in ("keyctl", "add_key", "request_key", "io_uring_setup", "userfaultfd", "ptrace", "process_vm_readv",
                 "bpf", "perf_event_open", "mount", "unshare", "setns", "clone", "open_by_handle_at"):
        assert calls[name][0] == (-1, eperm), (name, result.stdout)
    assert calls["personality"][0] == (-1, eperm) and calls["personality"][1][0] >= 0, result.stdout
    assert calls["socket"][:2] == [(-1, eafnosupport)] * 2 and calls["socket"][2][0] >= 0, result.stdout
    assert calls["socketpair"] == [(-1, eafnosupport)], result.stdout
    assert "STATUS ['2']" in result.stdout and "THREAD OK" in result.stdout and "FORK 3" in result.stdout, result
    assert_contained(scene, result, LIMITS, threads)


def test_cffi_is_refused_by_the_hook() -> None:
    pytest.importorskip("cffi")
    result = run_python("import cffi\nffi = cffi.FFI()\nprint(ffi.dlopen(None))", LIMITS)
    assert result.exit_code == 1 and "import of cffi is blocked" in result.stderr, result
    result = run_python("import _cffi_backend", LIMITS)
    assert result.exit_code == 1 and "import of _cffi_backend is blocked" in result.stderr, result


def test_seccomp_syscall_numbers_match_libseccomp() -> None:
    """The hand-written tables against libseccomp's own (where libseccomp.so.2 is installed)."""
    import ctypes
    import ctypes.util

    from models.sandbox import _AUDIT_ARCH, _SYSCALLS, seccomp_filter

    name = ctypes.util.find_library("seccomp")
    if name is None:
        pytest.skip("libseccomp is not installed (Debian libseccomp2)")
    lib = ctypes.CDLL(name)
    lib.seccomp_syscall_resolve_name_arch.argtypes = (ctypes.c_uint32, ctypes.c_char_p)
    for machine, table in _SYSCALLS.items():
        for call, number in table.items():
            expected = lib.seccomp_syscall_resolve_name_arch(_AUDIT_ARCH[machine], call.encode())
            assert expected == number, (machine, call, number, expected)
        assert len(seccomp_filter(machine)) % 8 == 0
    with pytest.raises(RuntimeError, match="no seccomp filter for architecture"):
        seccomp_filter("riscv64")


KEYRING_CALLER = r'''
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from models.sandbox import SandboxLimits, _bwrap_launch, _spawn, run_python
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
KEYCTL, ADD_KEY = int(sys.argv[2]), int(sys.argv[3])
def keyctl(*args):
    return libc.syscall(L(KEYCTL), *[L(a) if isinstance(a, int) else a for a in args])
def search(description):
    return keyctl(10, -3, ctypes.c_char_p(b"user"), ctypes.c_char_p(description), 0)  # KEYCTL_SEARCH
# this (unsandboxed) caller gets a session keyring of its own, as under systemd/docker/pam_keyinit
assert keyctl(1, None) > 0, ctypes.get_errno()                                      # JOIN_SESSION_KEYRING
canary = sys.argv[4].encode()
assert libc.syscall(L(ADD_KEY), ctypes.c_char_p(b"user"), ctypes.c_char_p(b"jztest-canary"),
                    ctypes.c_char_p(canary), L(len(canary)), L(-3)) > 0
launch, _ = _bwrap_launch(sys.executable)
limits = SandboxLimits(wall_seconds=20, cpu_seconds=5)
runs = [_spawn(sys.argv[5], limits, launch, audit_hook=False) for _ in range(2)]
print(json.dumps({"runs": [r.stdout + r.stderr for r in runs], "canary_still_here": search(b"jztest-canary") > 0,
                  "planted": search(b"jztest-planted")}))
'''

KEYRING_HOSTILE = r'''
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
def keyctl(*args):
    ctypes.set_errno(0)
    return libc.syscall(L(KEYCTL), *[L(a) if isinstance(a, int) else a for a in args])
found = keyctl(10, -3, ctypes.c_char_p(b"user"), ctypes.c_char_p(b"jztest-canary"), 0)
print("SEARCH", found, ctypes.get_errno())
buf = ctypes.create_string_buffer(256)
for key in (found, -3):
    print("READ", key, keyctl(11, key, buf, 256), buf.raw.rstrip(b"\0"))
print("SESSION", keyctl(0, -3, 0), ctypes.get_errno())
planted = libc.syscall(L(ADD_KEY), ctypes.c_char_p(b"user"), ctypes.c_char_p(b"jztest-planted"),
                       ctypes.c_char_p(b"x"), L(1), L(-3))
print("ADD", planted, ctypes.get_errno())
try:
    print("PROC_KEYS", open("/proc/keys").read())
except OSError as exc:
    print("PROC_KEYS refused", exc.errno)
'''


def test_callers_session_keyring_is_neither_readable_nor_writable() -> None:
    """S2: a caller with a session keyring of its own (systemd, docker, pam_keyinit): the
    sandboxed code (hook off) cannot find or read its canary key, and two runs leave no key
    behind for each other or the caller."""
    import platform

    from models.sandbox import _SYSCALLS

    numbers = _SYSCALLS[platform.machine()]
    canary = f"jz-keyring-canary-{uuid.uuid4().hex}"
    hostile = KEYRING_HOSTILE.replace("KEYCTL", str(numbers["keyctl"])).replace("ADD_KEY", str(numbers["add_key"]))
    out = subprocess.run([sys.executable, "-I", "-c", KEYRING_CALLER, str(REPO), str(numbers["keyctl"]),
                          str(numbers["add_key"]), canary, hostile], capture_output=True, text=True, timeout=120)
    if out.returncode != 0 and "AssertionError" in out.stderr:
        pytest.skip(f"this kernel/container does not give the test process a session keyring: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["canary_still_here"] and report["planted"] == -1, report
    for output in report["runs"]:
        assert canary not in output and "jztest-canary" not in output, output
        assert "SEARCH -1 1" in output and "ADD -1 1" in output, output  # EPERM from the filter


CGROUP_HOG = r'''
import os, time
kids = []
for i in range(6):
    pid = os.fork()
    if pid == 0:
        block = bytearray(HALF)
        for j in range(0, len(block), 4096):
            block[j] = 1
        time.sleep(3)
        os._exit(0)
    kids.append(pid)
print("FORKED", len(kids), flush=True)
statuses = [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]
print("STATUSES", statuses)
'''


def test_memory_bound_is_per_run_under_a_cgroup() -> None:
    """S3: six forked children each touching memory/2 must not get 3x the limit together.
    Where cgroup v2 is not writable the result says the bound is per process."""
    from models.sandbox import _cgroup_base

    limits = SandboxLimits(cpu_seconds=20, wall_seconds=60, memory_bytes=256 << 20, max_processes=16)
    if _cgroup_base() is None:
        result = run_python("print(1)", limits)
        assert result.ok and result.memory_bound == "per-process"
        pytest.skip("cgroup v2 with memory+pids delegated is not available here: RLIMIT_AS per process")
    result = kernel_only(CGROUP_HOG.replace("HALF", str(128 << 20)), limits)
    assert result.memory_bound == "cgroup", result
    assert result.killed_by == "memory", result
    statuses = [int(s) for s in result.stdout.split("STATUSES [")[1].split("]")[0].split(",")] \
        if "STATUSES" in result.stdout else []
    assert statuses.count(0) <= 2, result.stdout  # at most limit / (memory/2) children finished


def test_bwrap_root_is_weak_and_failed_probes_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """S4: without setpriv (and an interpreter uid 65534 cannot read) the only bubblewrap left is
    ``bwrap-root``: that needs allow_weak_isolation. A failed probe is not kept: once the tool is
    back, the next run gets the full sandbox."""
    import models.sandbox as sandbox

    real_which = shutil.which
    sandbox._BWRAP_LAUNCHES.clear()
    try:
        monkeypatch.setattr(sandbox.shutil, "which", lambda name, *a, **k: None if name == "bwrap" else
                            real_which(name, *a, **k))
        with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
            run_python("print(1)", LIMITS)
        monkeypatch.setattr(sandbox.shutil, "which", real_which)
        assert run_python("print(1)", LIMITS).ok  # no cached failure
        if os.geteuid() == 0:
            sandbox._BWRAP_LAUNCHES.clear()
            monkeypatch.setattr(sandbox.shutil, "which", lambda name, *a, **k: None if name == "setpriv" else
                                real_which(name, *a, **k))
            if isolation_available() == "bwrap":
                pytest.skip("uid 65534 can read this interpreter: bwrap drops without setpriv")
            assert isolation_available() == "bwrap-root"
            with pytest.raises(sandbox.SandboxUnavailable, match="bwrap-root"):
                run_python("print(1)", LIMITS)
            weak = run_python("print(1)", SandboxLimits(wall_seconds=10, allow_weak_isolation=True))
            assert weak.ok and weak.isolation == "bwrap-root", weak
    finally:
        monkeypatch.undo()
        sandbox._BWRAP_LAUNCHES.clear()


DISK_FILL = r'''
import os
print("MOUNT", [l.split()[-1] for l in open("/proc/self/mountinfo") if l.split()[4] == os.getcwd()])
total = 0
try:
    with open("fill", "wb") as handle:
        while True:
            handle.write(b"\0" * (1 << 20)); handle.flush(); total += 1 << 20
except OSError as exc:
    print("ERRNO", exc.errno, "TOTAL", total)
'''


def test_disk_writes_fill_a_small_tmpfs_not_the_host_disk() -> None:
    """S5: the run's only writable place is a tmpfs of max_disk_bytes: writing past it fails
    inside (ENOSPC), and nothing of the run exists on the host's disk, during or after."""
    before = set(os.listdir(tempfile.gettempdir()))
    limits = SandboxLimits(wall_seconds=20, max_disk_bytes=4 << 20, max_file_bytes=64 << 20)
    result = run_python(DISK_FILL, limits)
    assert "ERRNO 28" in result.stdout, result  # ENOSPC
    total = int(result.stdout.split("TOTAL ")[1].split()[0])
    assert total <= 4 << 20
    assert "size=4096k" in result.stdout, result.stdout
    assert {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("jzsandbox-")} == set()


def test_stale_work_dirs_of_dead_callers_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S5: a caller SIGKILLed mid-run leaves its ``jzsandbox-<pid>-<pidns>-*`` dirs (weak-mode
    work dirs, the stage dir); the next process sweeps those of dead pids of its own PID
    namespace and keeps the rest."""
    import models.sandbox as sandbox

    gone = subprocess.Popen(["true"])
    gone.wait()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = os.stat("/proc/self/ns/pid").st_ino
    stale = tmp_path / f"jzsandbox-{gone.pid}-{namespace}-abc"
    stale_stage = tmp_path / f"jzsandbox-stage-{gone.pid}-{namespace}-abc"
    live = tmp_path / f"jzsandbox-{os.getpid()}-{namespace}-abc"
    other_namespace = tmp_path / f"jzsandbox-{gone.pid}-{namespace + 1}-abc"  # its owner's liveness is unknown
    for path in (stale, stale_stage, live, other_namespace):
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "blob").write_bytes(b"x" * 1024)
    monkeypatch.setattr(sandbox, "_SWEPT", set())
    assert run_python("print(1)", LIMITS).ok
    assert not stale.exists() and not stale_stage.exists() and live.exists() and other_namespace.exists()


@pytest.mark.parametrize(("code", "forged"), [
    ("import sys\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)", "memory"),
    ("import os, sys\nsys.stderr.write('sandbox: CPU time limit reached\\n'); sys.stderr.flush()\nos._exit(87)", "cpu"),
    ("import sys\nsys.exit(137)", "signal:SIGKILL"),
    ("import os\nos._exit(137)", "signal:SIGKILL"),
])
def test_killed_by_cannot_be_forged_by_the_code(code: str, forged: str) -> None:
    """S6: what the code prints or the exit status it picks does not decide ``killed_by``:
    fake CPU/memory messages are ordinary failures, statuses 128-255 are refused by the kernel
    (SIGSYS), so bwrap's 128+N always means a real signal."""
    for run in (lambda c: run_python(c, LIMITS), kernel_only):
        result = run(code)
        assert not result.ok
        assert result.killed_by != forged, result
        if "137" in code:
            assert result.exit_code == -signal.SIGSYS and result.killed_by == "signal:SIGSYS", result
        else:
            assert result.killed_by is None and result.exit_code in (1, 87), result


def test_bubblewrap_runs_put_nothing_on_the_host_disk_and_chown_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """S7: the old work dir was chowned to uid 65534 before main.py was written, and ``os.chown``
    follows symlinks (a host process of that uid could race it). Now a bubblewrap run makes no
    host directory and changes no owner: the program arrives through a memfd into its tmpfs."""
    import models.sandbox as sandbox

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"host file operation during a bubblewrap run: {args}")

    sandbox._bwrap_launch(sys.executable)  # probe first (the stage dir is made once, by root)
    monkeypatch.setattr(sandbox.os, "chown", refuse)
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", refuse)
    result = run_python("import os\nprint(open(__file__).read().startswith('import os'), os.getuid())", LIMITS)
    assert result.ok and result.stdout == "True 65534\n", result
