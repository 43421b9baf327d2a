"""Run untrusted Python (model-written solutions) in a limited subprocess.

Public API (shared by synthesis validation and the evaluation's tool setting)::

    from models.sandbox import SandboxLimits, run_python
    result = run_python("print(6 * 7)", SandboxLimits(wall_seconds=5))
    result.ok, result.stdout, result.killed_by

What is enforced, and how strongly — read this before trusting it with hostile code:

* **Wall clock** — the child runs in its own session; on timeout the whole process group gets
  SIGKILL (``timed_out=True``, ``killed_by="timeout"``). Enforced by the parent: reliable.
* **CPU seconds** — ``RLIMIT_CPU`` (SIGXCPU at the limit, SIGKILL one second later):
  ``killed_by="cpu"``. Kernel-enforced.
* **Memory** — ``RLIMIT_AS`` caps the address space; Python raises ``MemoryError``, which the
  wrapper reports as ``killed_by="memory"`` (exit code 86). Kernel-enforced. ``RLIMIT_FSIZE``
  caps any file the code writes, ``RLIMIT_NOFILE`` open files, ``RLIMIT_CORE`` = 0.
* **Output** — stdout and stderr are read up to ``max_output_bytes`` each; past that the
  process group is killed and the result says ``truncated=True``, ``killed_by="output_limit"``.
* **Network** — when the kernel allows it (root, or unprivileged user namespaces), the child
  runs under ``unshare -n``: a fresh network namespace with no interfaces up, so not even
  localhost is reachable (``network_isolation="netns"``). Always, in addition, a PEP 578 audit
  hook installed before the user code raises ``PermissionError`` on socket creation, connect,
  bind and name lookups (``"audit-hook"`` when it is the only layer).
* **Processes** — the audit hook also refuses ``subprocess``, ``os.system``, ``os.exec*``,
  ``os.fork``, ``os.posix_spawn``, ``ctypes`` library loading and raising resource limits, so
  the code cannot start a helper that is free of the hook.
* **Files** — the code runs in a fresh temporary directory (its ``cwd``, ``HOME`` and
  ``TMPDIR``), deleted afterwards. Writes elsewhere (``open`` for writing, remove, rename,
  mkdir, chmod, …) are refused by the audit hook: *blocked*, not merely contained. Reading is
  not restricted (imports need the interpreter's files).
* **Environment** — scrubbed to a few variables; the interpreter runs with ``-I`` (isolated:
  no ``PYTHON*`` variables, no user site, script directory not on ``sys.path``) and ``-B``.

Limits of this design: audit hooks are not a security boundary (PEP 578 says so) — code that
reaches raw memory through a C extension could remove them — and without a network namespace
the network block is only the hook. Without root the child runs as the caller's user. For
hostile code at scale run each job in a container or VM sandbox (gVisor, Firecracker, nsjail):
the Kubernetes GPU backend's pods are that boundary; this module is the in-process layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Literal

MEMORY_EXIT_CODE = 86

# Runs in the child before the user code. Kept as source text (passed with -c) so the child
# imports nothing from this repository.
_WRAPPER = r'''
import os, resource, sys
_root, _limits, _path = sys.argv[1], __import__("json").loads(sys.argv[2]), sys.argv[3]
for _name, _value in _limits["rlimits"].items():
    resource.setrlimit(getattr(resource, _name), (_value[0], _value[1]))
_root = os.path.realpath(_root)
_ALLOWED = (_root + os.sep, "/dev/null")
_DENY = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "resource.setrlimit", "resource.prlimit",
    "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "os.chroot", "os.setuid", "os.setgid",
}
_PATH_EVENTS = {
    "os.remove": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,),
    "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,),
    "os.utime": (0,), "os.chflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,),
    "os.unlink": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

def _allowed(path):
    if isinstance(path, int):
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real == _root or real.startswith(_ALLOWED[0]) or real in _ALLOWED[1:]

def _hook(event, args):
    if event in _DENY:
        raise PermissionError(f"sandbox: {event} is blocked")
    if event == "ctypes.dlopen" and args and args[0] is not None:
        raise PermissionError("sandbox: loading native libraries with ctypes is blocked")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and not _allowed(path):
            raise PermissionError(f"sandbox: writing outside the sandbox directory is blocked: {path}")
    elif event in _PATH_EVENTS:
        for index in _PATH_EVENTS[event]:
            if index < len(args) and args[index] is not None and not _allowed(args[index]):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory is blocked")

sys.addaudithook(_hook)
del _name, _value
sys.argv = [_path]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
try:
    exec(_code, {"__name__": "__main__", "__file__": _path, "__builtins__": __builtins__})
except MemoryError:
    sys.stderr.write("sandbox: MemoryError (memory limit reached)\n")
    sys.stderr.flush()
    os._exit(MEMORY_EXIT_CODE)
'''.replace("MEMORY_EXIT_CODE", str(MEMORY_EXIT_CODE))


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run (defaults suit a short math program)."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 16 << 20
    max_open_files: int = 256
    network_isolation: Literal["auto", "netns", "audit-hook"] = "auto"


@dataclass(frozen=True)
class SandboxResult:
    """What happened. ``killed_by``: None | timeout | cpu | memory | output_limit | signal:NAME."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    killed_by: str | None
    truncated: bool
    wall_s: float
    network_isolation: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_by is None and not self.truncated


@lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...] | None:
    """The ``unshare`` command that gives a child an empty network namespace here, or None."""
    unshare = shutil.which("unshare")
    if not unshare:
        return None
    candidates = [(unshare, "-n")] if os.geteuid() == 0 else []
    candidates.append((unshare, "-r", "-n"))  # unprivileged user namespace, where allowed
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return None


def network_isolation_available() -> bool:
    """Whether runs get a private network namespace (else only the audit hook blocks sockets)."""
    return _netns_prefix() is not None


def _rlimits(limits: SandboxLimits) -> dict[str, tuple[int, int]]:
    return {
        "RLIMIT_CPU": (limits.cpu_seconds, limits.cpu_seconds + 1),
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
        "RLIMIT_NOFILE": (limits.max_open_files, limits.max_open_files),
        "RLIMIT_CORE": (0, 0),
    }


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "HOME": workdir, "TMPDIR": workdir, "PYTHONIOENCODING": "utf-8",
        # One thread per BLAS pool: numpy/sympy otherwise reserve address space per core.
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


class _CappedReader(threading.Thread):
    """Drain one pipe into memory up to ``cap`` bytes; flag overflow (the caller kills)."""

    def __init__(self, stream: IO[bytes], cap: int, on_overflow: threading.Event) -> None:
        super().__init__(daemon=True)
        self.stream, self.cap, self.on_overflow = stream, cap, on_overflow
        self.data = bytearray()
        self.overflow = False

    def run(self) -> None:
        while chunk := self.stream.read1(65536):
            room = self.cap - len(self.data)
            if len(chunk) > room:
                self.data += chunk[:max(room, 0)]
                self.overflow = True
                self.on_overflow.set()
                break
            self.data += chunk
        self.stream.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_python(code: str, limits: SandboxLimits | None = None, *, python: str | None = None,
               stdin: str | None = None) -> SandboxResult:
    """Run ``code`` as a Python program under ``limits`` (see module docstring); never raises
    for anything the code does — failures come back in the result."""
    limits = limits or SandboxLimits()
    prefix: tuple[str, ...] = ()
    isolation = "audit-hook"
    if limits.network_isolation in ("auto", "netns"):
        found = _netns_prefix()
        if found:
            prefix, isolation = found, "netns"
        elif limits.network_isolation == "netns":
            raise RuntimeError("network namespace requested but `unshare -n` is not permitted here; "
                               "run as root, enable user namespaces, or use network_isolation='auto'")
    workdir = tempfile.mkdtemp(prefix="jzsandbox-")
    try:
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(code)
        payload = json.dumps({"rlimits": _rlimits(limits)})
        argv = [*prefix, python or sys.executable, "-I", "-B", "-c", _WRAPPER, workdir, payload, script]
        started = time.monotonic()
        proc = subprocess.Popen(
            argv, cwd=workdir, env=_child_env(workdir), start_new_session=True,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        overflow = threading.Event()
        readers = [_CappedReader(proc.stdout, limits.max_output_bytes, overflow),  # type: ignore[arg-type]
                   _CappedReader(proc.stderr, limits.max_output_bytes, overflow)]  # type: ignore[arg-type]
        for reader in readers:
            reader.start()
        if stdin is not None and proc.stdin:
            try:
                proc.stdin.write(stdin.encode("utf-8"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
        timed_out = False
        deadline = started + limits.wall_seconds
        while proc.poll() is None:
            if overflow.is_set():
                _kill_group(proc)
                break
            if time.monotonic() >= deadline:
                timed_out = True
                _kill_group(proc)
                break
            overflow.wait(0.02)
        proc.wait()
        _kill_group(proc)  # stray members of the group, if any survived the hook
        for reader in readers:
            reader.join(timeout=5)
        wall = time.monotonic() - started
        truncated = any(r.overflow for r in readers)
        stdout = readers[0].data.decode("utf-8", errors="replace")
        stderr = readers[1].data.decode("utf-8", errors="replace")
        return SandboxResult(
            stdout=stdout, stderr=stderr, exit_code=proc.returncode, timed_out=timed_out,
            killed_by=_killed_by(proc.returncode, timed_out, truncated, stderr), truncated=truncated,
            wall_s=round(wall, 4), network_isolation=isolation,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _killed_by(code: int | None, timed_out: bool, truncated: bool, stderr: str) -> str | None:
    if timed_out:
        return "timeout"
    if truncated:
        return "output_limit"
    if code == MEMORY_EXIT_CODE or (code not in (0, None) and "MemoryError" in stderr):
        return "memory"
    if code is not None and code < 0:
        sig = -code
        if sig == signal.SIGXCPU:
            return "cpu"
        if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and "alloc" in stderr.lower():
            return "memory"
        try:
            return f"signal:{signal.Signals(sig).name}"
        except ValueError:
            return f"signal:{sig}"
    return None
