"""Run untrusted Python (model-written solutions) in a limited subprocess.

Public API (shared by synthesis validation and the evaluation's tool setting)::

    from models.sandbox import SandboxLimits, run_python
    result = run_python("print(6 * 7)", SandboxLimits(wall_seconds=5))
    result.ok, result.stdout, result.killed_by, result.filesystem_isolation

Two layers. The **kernel layer** (namespaces, rlimits) is the boundary; the **in-process
layer** (a PEP 578 audit hook) gives clear errors and covers hosts without namespaces, but
audit hooks are not a security boundary (PEP 578 says so): code that corrupts interpreter
memory (e.g. crafted bytecode in a ``.pyc``) can get past them. Read this before
trusting the module with hostile code:

* **Wall clock** — the child runs in its own session; on timeout the whole process group gets
  SIGKILL (``timed_out=True``, ``killed_by="timeout"``). Enforced by the parent: reliable.
* **CPU seconds** — ``RLIMIT_CPU`` (SIGXCPU at the limit, SIGKILL one second later):
  ``killed_by="cpu"``. Kernel-enforced.
* **Memory** — ``RLIMIT_AS`` caps the address space; Python raises ``MemoryError``, which the
  wrapper reports as ``killed_by="memory"`` (exit code 86). Kernel-enforced. ``RLIMIT_FSIZE``
  caps any file the code writes, ``RLIMIT_NOFILE`` open files, ``RLIMIT_CORE`` = 0.
* **Output** — stdout and stderr are read up to ``max_output_bytes`` each; past that the
  process group is killed and the result says ``truncated=True``, ``killed_by="output_limit"``.
* **Files (kernel)** — where the kernel allows namespaces (root, or unprivileged user
  namespaces: ``unshare -r``), the child gets a private mount namespace in which every mount is
  remounted read-only except the fresh temporary directory it runs in (a bind mount of itself)
  and device nodes such as ``/dev/null`` (``filesystem_isolation="mount-ro"``). A process
  that escapes the hook still cannot write anywhere else. The wrapper fails closed (exit 85)
  if a real filesystem cannot be made read-only.
* **Network (kernel)** — in the same ``unshare`` call, a fresh network namespace with no
  interfaces up, so not even localhost is reachable (``network_isolation="netns"``).
* **In-process (always)** — an audit hook, installed before the user code, refuses: socket
  creation/connect/bind/lookups; ``subprocess``, ``os.system``, ``os.exec*``, ``os.fork``,
  ``os.forkpty``, ``os.posix_spawn*``, ``os.kill*``; raising resource limits; new
  sub-interpreters (they would run without the hook); code-object construction; ``gc`` object
  introspection; and importing C modules that reach the OS or raw memory without an audit
  event — ``ctypes``/``_ctypes`` (pointers and foreign calls raise no events; a stand-in
  ``ctypes`` answers ``c_long``/``sizeof``, all sympy needs at import — scipy, which calls
  ``ctypes.cast`` at import, does not load), ``_posixsubprocess`` (its ``fork_exec`` bypasses
  ``subprocess.Popen``'s event), ``_socket``/``_ssl``, ``_sqlite3`` (``connect``/``ATTACH`` write
  files from C), ``_dbm``/``_gdbm``, ``_posixshmem``/``_multiprocessing``, ``syslog``,
  ``readline``, the ``_test*`` modules — checked by module name, by last dotted component and by
  the extension file's name, so loading the ``.so`` under another name fails too.
  ``subprocess`` is pre-imported with its ``fork_exec`` replaced, so libraries that import it
  (sympy) still load.
  Writes outside the temporary directory (``open``/``os.open`` for writing, remove, rename,
  mkdir, chmod, link/symlink — relative symlink targets are resolved from the link's directory
  — ``shutil.*``, ``sqlite3.connect``) are refused; paths are resolved by the hook's own
  ``realpath`` built from captured C functions (monkeypatching ``os.path`` changes nothing);
  ``os.open`` of a directory and any ``dir_fd=`` argument are refused, since the hook cannot
  see what a directory descriptor points at. Reading is not restricted (imports need the
  interpreter's files).
* **Environment** — scrubbed to a few variables; the interpreter runs with ``-I`` (isolated:
  no ``PYTHON*`` variables, no user site, script directory not on ``sys.path``) and ``-B``.

Not covered: no PID namespace (``unshare -f`` turns the interpreter into PID 1, which ignores
``SIGXCPU`` and loses the exit signal), so the hook alone stops ``os.kill``; without root the
child runs as the caller's user. For hostile code at scale run each job in a container or VM
sandbox (gVisor, Firecracker, nsjail): the Kubernetes GPU backend's pods are that boundary.
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
SETUP_EXIT_CODE = 85

# Runs in the child before the user code. Kept as source text (passed with -c) so the child
# imports nothing from this repository. Everything the hook uses is a closure variable bound
# before the user code runs (no global or builtin lookups, see tests), and ``_sandbox`` is
# deleted afterwards: user code can neither reach the hook's state nor monkeypatch what it calls.
_WRAPPER = r'''
import os, sys


def _sandbox(root, payload):
    import json
    config = json.loads(payload)
    root = os.path.realpath(root)
    if config["mount_ro"]:
        # never remount the caller's filesystems: only inside a mount namespace of our own
        if os.readlink("/proc/self/ns/mnt") == config["parent_mount_ns"]:
            raise RuntimeError("mount_ro outside a private mount namespace (run under unshare -m)")
        _read_only_mounts(root)
        os.chdir(root)  # the old cwd is the directory under the new bind mount: read-only
        for name in [m for m in sys.modules if m == "_ctypes" or m == "ctypes" or m.startswith("ctypes.")]:
            del sys.modules[name]  # used for mount(2); the code gets the stand-in below
    _ctypes_stand_in()
    import resource
    for name, value in config["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value[0], value[1]))
    # Libraries import subprocess at import time (scipy): load it now, with its C fork_exec
    # replaced, and drop _posixsubprocess so importing it again goes through the hook.
    import subprocess

    def _no_fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: starting processes is blocked (_posixsubprocess.fork_exec)")

    subprocess._fork_exec = _no_fork_exec
    sys.modules.pop("_posixsubprocess", None)
    sys.addaudithook(_make_hook(root))


def _ctypes_stand_in():
    """``ctypes`` reaches raw memory and C functions without audit events, so the real one is
    blocked; this stand-in answers what math libraries ask at import (sympy:
    ``from ctypes import c_long, sizeof``) and refuses everything else."""
    import struct, types
    shim = types.ModuleType("ctypes", "sandbox stand-in for ctypes: sizes of C types only")
    codes = {"c_bool": "?", "c_char": "c", "c_byte": "b", "c_ubyte": "B", "c_short": "h", "c_ushort": "H",
             "c_int": "i", "c_uint": "I", "c_long": "l", "c_ulong": "L", "c_longlong": "q",
             "c_ulonglong": "Q", "c_size_t": "N", "c_ssize_t": "n", "c_float": "f", "c_double": "d",
             "c_void_p": "P", "c_char_p": "P", "c_wchar_p": "P"}
    for name, code in codes.items():
        setattr(shim, name, type(name, (), {"_type_": code, "__module__": "ctypes"}))

    def sizeof(obj):
        code = getattr(obj, "_type_", None)
        if not isinstance(code, str):
            raise TypeError("sandbox ctypes stand-in: sizeof() knows only the c_* types")
        return struct.calcsize(code)

    def __getattr__(name):
        raise AttributeError(f"sandbox: ctypes.{name} is not available (native code and raw memory are blocked)")

    shim.sizeof, shim.__getattr__ = sizeof, __getattr__
    sys.modules["ctypes"] = shim


def _read_only_mounts(root):
    """In a fresh mount namespace: keep ``root`` writable (bind mount of itself) and remount
    every other mount read-only, keeping the flags the kernel locks (nosuid, nodev, ...)."""
    import ctypes, re
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
    MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
    # Pseudo filesystems: a refused remount there is tolerated (their writable files are
    # kernel interfaces, not storage), anywhere else it aborts the run.
    pseudo = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "securityfs", "debugfs", "tracefs",
              "bpf", "pstore", "fusectl", "configfs", "binfmt_misc", "hugetlbfs", "efivarfs", "autofs", "nsfs"}

    def mount(source, target, flags):
        if libc.mount(source, target, None, flags, None) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), os.fsdecode(target))

    mount(None, b"/", MS_REC | MS_PRIVATE)
    mount(os.fsencode(root), os.fsencode(root), MS_BIND)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        lines = handle.read().splitlines()
    for line in lines:
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        fstype = fields[fields.index("-") + 1]
        if point == root:
            continue
        try:
            flags = os.statvfs(point).f_flag
        except OSError:
            continue  # shadowed or gone
        if flags & os.ST_RDONLY:
            continue
        keep = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        keep |= (MS_NOATIME if flags & os.ST_NOATIME else 0) | (MS_NODIRATIME if flags & os.ST_NODIRATIME else 0)
        keep |= MS_RELATIME if flags & os.ST_RELATIME else 0
        try:
            mount(None, os.fsencode(point), MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            if fstype not in pseudo:
                raise


def _make_hook(root):
    import _stat, posix
    lstat, stat, readlink, getcwd = posix.lstat, posix.stat, posix.readlink, posix.getcwd
    S_ISLNK, S_ISDIR = _stat.S_ISLNK, _stat.S_ISDIR
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_APPEND | posix.O_CREAT | posix.O_TRUNC
    str_, bytes_, int_, type_, reversed_, len_ = str, bytes, int, type, reversed, len
    PermissionError_, ImportError_, OSError_ = PermissionError, ImportError, OSError
    deny = frozenset({
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
        "socket.sethostname", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "os.fork", "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "resource.setrlimit",
        "resource.prlimit", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.cdata/buffer",
        "ctypes.call_function", "ctypes.PyObj_FromPtr", "ctypes.string_at", "ctypes.wstring_at",
        "cpython.PyInterpreterState_New", "code.__new__", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "os.chroot", "sqlite3.enable_load_extension", "sqlite3.load_extension",
    })
    deny_imports = frozenset({
        "ctypes", "_ctypes", "_posixsubprocess", "_socket", "_ssl", "_sqlite3", "_dbm", "_gdbm", "_posixshmem",
        "_multiprocessing", "_xxsubinterpreters", "_xxinterpchannels", "_testcapi", "_testinternalcapi",
        "_testmultiphase", "_testsinglephase", "_testbuffer", "_testimportmultiple", "_testclinic",
        "_ctypes_test", "xxlimited", "xxlimited_35", "xxsubtype", "syslog", "nis", "readline", "_tkinter",
        "_curses", "_curses_panel",
    })
    # event -> (indices of paths that must stay inside, indices of dir_fd arguments)
    paths = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.replace": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
        "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)), "os.truncate": ((0,), ()),
        "os.chflags": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "shutil.copyfile": ((1,), ()), "shutil.copymode": ((1,), ()), "shutil.copystat": ((1,), ()),
        "shutil.copytree": ((1,), ()), "shutil.move": ((0, 1), ()), "shutil.rmtree": ((0,), (1,)),
        "shutil.chown": ((0,), ()), "shutil.make_archive": ((0,), ()), "shutil.unpack_archive": ((1,), ()),
    }
    inside = root + "/"

    def text(path):
        if type_(path) is str_:
            return path
        if type_(path) is bytes_:
            return path.decode("utf-8", "surrogateescape")
        return None  # path-like objects could answer differently on a second __fspath__ call

    def real(path):
        # os.path.realpath, rebuilt from captured C functions
        if path[:1] != "/":
            path = getcwd() + "/" + path
        pending = path.split("/")[::-1]
        parts = []
        hops = 0
        while pending:
            name = pending.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                if parts:
                    parts.pop()
                continue
            candidate = "/" + "/".join(parts + [name])
            try:
                is_link = S_ISLNK(lstat(candidate).st_mode)
            except OSError_:
                is_link = False
            if not is_link:
                parts.append(name)
                continue
            hops += 1
            if hops > 40:
                raise PermissionError_("sandbox: too many levels of symbolic links")
            target = readlink(candidate)
            if target[:1] == "/":
                parts = []
            pending.extend(reversed_(target.split("/")))
        return "/" + "/".join(parts)

    def allowed(path):
        if type_(path) is int_:
            return True  # an already open descriptor
        path = text(path)
        if path is None:
            return False
        resolved = real(path)
        return resolved == root or resolved[:len_(inside)] == inside or resolved == "/dev/null"

    def refuse(what, path=None):
        raise PermissionError_("sandbox: " + what + " is blocked" + ("" if path is None else ": " + str_(path)))

    def hook(event, args):
        if event in deny:
            refuse(event)
        if event == "import":
            name = args[0] if type_(args[0]) is str_ else ""
            file = args[1] if len_(args) > 1 and type_(args[1]) is str_ else ""
            base = file.rpartition("/")[2].partition(".")[0] if ".so" in file else ""
            if (name in deny_imports or name.rpartition(".")[2] in deny_imports
                    or name.partition(".")[0] in deny_imports or base in deny_imports):
                raise ImportError_("sandbox: import of " + (base or name) + " is blocked")
        elif event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if mode is None:  # os.open: may hand out a directory descriptor for dir_fd= tricks
                name = text(path)
                if name is None:
                    refuse("os.open of a path-like object (pass a str)")
                try:
                    is_dir = S_ISDIR(stat(real(name)).st_mode)
                except OSError_:
                    is_dir = False
                if is_dir:
                    refuse("os.open of a directory (dir_fd cannot be checked)", name)
            writing = False
            if mode is not None:
                for c in str_(mode):
                    if c == "w" or c == "a" or c == "x" or c == "+":
                        writing = True
            if type_(flags) is int_ and flags & write_flags:
                writing = True
            if writing and not allowed(path):
                refuse("writing outside the sandbox directory", path)
        elif event == "ctypes.dlopen":
            if args and args[0] is not None:
                refuse("loading native libraries with ctypes")
        elif event == "os.symlink":
            source, target = args[0], args[1]
            if len_(args) > 2 and args[2] is not None and args[2] != -1:
                refuse(event + " with dir_fd")
            if not allowed(target):
                refuse(event + " outside the sandbox directory", target)
            source, target = text(source), text(target)
            if source is None:
                refuse(event + " of a path-like target (pass a str)")
            if source[:1] != "/":  # a relative target is relative to the link's directory
                source = real(target).rpartition("/")[0] + "/" + source
            if not allowed(source):
                refuse(event + " pointing outside the sandbox directory", source)
        elif event == "sqlite3.connect":
            # unreachable while _sqlite3 is blocked (ATTACH would bypass any path check anyway)
            name = text(args[0])
            if name is not None and name[:5] == "file:":
                name = name[5:].partition("?")[0]
            if name != ":memory:" and name != "" and not allowed(name):
                refuse(event + " outside the sandbox directory", args[0])
        elif event in paths:
            indices, fd_indices = paths[event]
            for index in fd_indices:
                if index < len_(args) and args[index] is not None and args[index] != -1:
                    refuse(event + " with dir_fd")
            for index in indices:
                if index < len_(args) and args[index] is not None and not allowed(args[index]):
                    refuse(event + " outside the sandbox directory", args[index])

    return hook


try:
    _sandbox(sys.argv[1], sys.argv[2])
except BaseException as _exc:
    sys.stderr.write(f"sandbox: setup failed: {_exc!r}\n")
    sys.stderr.flush()
    os._exit(SETUP_EXIT_CODE)
del _sandbox, _ctypes_stand_in, _read_only_mounts, _make_hook
_path = sys.argv[3]
sys.argv = [_path]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
try:
    exec(_code, {"__name__": "__main__", "__file__": _path, "__builtins__": __builtins__})
except MemoryError:
    sys.stderr.write("sandbox: MemoryError (memory limit reached)\n")
    sys.stderr.flush()
    os._exit(MEMORY_EXIT_CODE)
'''.replace("MEMORY_EXIT_CODE", str(MEMORY_EXIT_CODE)).replace("SETUP_EXIT_CODE", str(SETUP_EXIT_CODE))


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run (defaults suit a short math program).

    ``network_isolation`` / ``filesystem_isolation``: ``auto`` uses the namespace where the
    kernel allows it and falls back to the audit hook; ``netns`` / ``mount`` require it (a
    ``RuntimeError`` where it is not permitted); ``audit-hook`` skips it.
    """

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 16 << 20
    max_open_files: int = 256
    network_isolation: Literal["auto", "netns", "audit-hook"] = "auto"
    filesystem_isolation: Literal["auto", "mount", "audit-hook"] = "auto"


@dataclass(frozen=True)
class SandboxResult:
    """What happened. ``killed_by``: None | timeout | cpu | memory | output_limit | signal:NAME |
    sandbox_setup (the namespace could not be prepared; the code did not run).

    ``network_isolation``: netns | audit-hook; ``filesystem_isolation``: mount-ro | audit-hook
    (which layers this run had, see the module docstring)."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    killed_by: str | None
    truncated: bool
    wall_s: float
    network_isolation: str
    filesystem_isolation: str = "audit-hook"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_by is None and not self.truncated


def _unshare_candidates(flags: tuple[str, ...]) -> list[tuple[str, ...]]:
    unshare = shutil.which("unshare")
    if not unshare:
        return []
    candidates = [(unshare, *flags)] if os.geteuid() == 0 else []
    candidates.append((unshare, "-r", *flags))  # unprivileged user namespace, where allowed
    return candidates


@lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...] | None:
    """The ``unshare`` command that gives a child an empty network namespace here, or None."""
    for prefix in _unshare_candidates(("-n",)):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return None


@lru_cache(maxsize=4)
def _namespace_prefix(network: bool, filesystem: bool) -> tuple[str, ...] | None:
    """The ``unshare`` prefix giving the requested namespaces, probed once per process by
    running the real wrapper (so a mount setup the kernel refuses is found here, not per run)."""
    if not filesystem:
        return _netns_prefix() if network else None
    for prefix in _unshare_candidates(("-n", "-m") if network else ("-m",)):
        try:
            probe = _spawn("print('ok')", SandboxLimits(wall_seconds=20), prefix, mount_ro=True)
        except OSError:
            continue
        if probe.exit_code == 0 and probe.stdout == "ok\n":
            return prefix
    return None


def network_isolation_available() -> bool:
    """Whether runs get a private network namespace (else only the audit hook blocks sockets)."""
    return _netns_prefix() is not None


def filesystem_isolation_available() -> bool:
    """Whether runs get a read-only mount namespace (else only the audit hook blocks writes)."""
    return _namespace_prefix(False, True) is not None


def _mount_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return None


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


def _choose_layers(limits: SandboxLimits) -> tuple[tuple[str, ...], bool, bool]:
    """(unshare prefix, network namespace?, read-only mount namespace?) for ``limits``."""
    want_net = limits.network_isolation in ("auto", "netns")
    want_fs = limits.filesystem_isolation in ("auto", "mount")
    # Both, else each alone (the one explicitly required first), else none.
    options = [(want_net, want_fs)]
    if want_net and want_fs:
        options += [(False, True), (True, False)] if limits.filesystem_isolation == "mount" else \
            [(True, False), (False, True)]
    for net, fs in options:
        if not (net or fs):
            continue
        prefix = _namespace_prefix(net, fs)
        if prefix is not None:
            break
    else:
        prefix, net, fs = None, False, False
    if limits.network_isolation == "netns" and not net:
        raise RuntimeError("network namespace requested but `unshare -n` is not permitted here; "
                           "run as root, enable user namespaces, or use network_isolation='auto'")
    if limits.filesystem_isolation == "mount" and not fs:
        raise RuntimeError("read-only mount namespace requested but `unshare -m` (and remounting read-only) "
                           "is not permitted here; run as root, enable user namespaces, or use "
                           "filesystem_isolation='auto'")
    return prefix or (), net, fs


def run_python(code: str, limits: SandboxLimits | None = None, *, python: str | None = None,
               stdin: str | None = None) -> SandboxResult:
    """Run ``code`` as a Python program under ``limits`` (see module docstring); never raises
    for anything the code does — failures come back in the result."""
    limits = limits or SandboxLimits()
    prefix, net, fs = _choose_layers(limits)
    return _spawn(code, limits, prefix, mount_ro=fs, python=python, stdin=stdin,
                  network_isolation="netns" if net else "audit-hook")


def _spawn(code: str, limits: SandboxLimits, prefix: tuple[str, ...], *, mount_ro: bool,
           python: str | None = None, stdin: str | None = None,
           network_isolation: str = "audit-hook") -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="jzsandbox-")
    try:
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(code)
        payload = json.dumps({"rlimits": _rlimits(limits), "mount_ro": mount_ro,
                              "parent_mount_ns": _mount_namespace() if mount_ro else None})
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
            wall_s=round(wall, 4), network_isolation=network_isolation,
            filesystem_isolation="mount-ro" if mount_ro else "audit-hook",
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _killed_by(code: int | None, timed_out: bool, truncated: bool, stderr: str) -> str | None:
    if timed_out:
        return "timeout"
    if truncated:
        return "output_limit"
    if code == SETUP_EXIT_CODE and "sandbox: setup failed" in stderr:
        return "sandbox_setup"
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
