"""Run untrusted Python (model-written solutions) in a limited subprocess.

Public API (shared by synthesis validation and the evaluation's tool setting)::

    from models.sandbox import SandboxLimits, run_python
    result = run_python("print(6 * 7)", SandboxLimits(wall_seconds=5))
    result.ok, result.stdout, result.killed_by, result.isolation

**The boundary is bubblewrap** (``bwrap``, Debian's ``bubblewrap``; ``make sandbox-tool``).
Each run gets, from bwrap: new user, PID, network, mount, IPC, UTS (and cgroup) namespaces;
uid/gid 65534 inside with every capability dropped and no_new_privs; no nested user namespaces
(``--disable-userns``, bubblewrap >= 0.8, else without); a root filesystem that holds only the
interpreter's prefixes (venv and base install: binary, stdlib, site-packages) and ``/usr/lib*``
read-only, a fresh ``/proc`` of its own PID namespace, a minimal read-only ``/dev``, and the
run's temp dir as the only writable place; a network namespace with only its own loopback (no
route to the host's localhost, its abstract sockets or anywhere else); a cleared environment
(bwrap itself is started with the scrubbed one, so no process in the sandbox has the caller's
secrets in ``/proc/<pid>/environ``); ``--new-session`` (no terminal injection);
``--die-with-parent``. The interpreter is the namespace's PID 1 (``--as-pid-1``): when it
exits, or bwrap is killed, the kernel kills every process of the run, so nothing outlives it
and no grandchild holds the output pipes. ``isolation="bwrap"``.

A root caller (CI, containers) gets the same: bwrap is started as uid 65534, directly when that
uid can read the interpreter, else after binding the interpreter's directories onto a staging
directory in a private mount namespace of our own (``unshare -m``; the host's mounts are never
touched). Only when neither works does bwrap run as root with ``--cap-drop ALL``
(``isolation="bwrap-root"``: same namespaces, but the code's uid is root outside them and the
kernel applies no ``RLIMIT_NPROC`` to root).

Without bubblewrap ``run_python`` raises :class:`SandboxUnavailable` (it says how to install
it) unless ``allow_weak_isolation`` is set; then the weaker pre-bubblewrap layers run
(``isolation="namespaces-weak"``: ``unshare -n -m`` with the wrapper remounting everything
read-only but the temp dir, where the kernel permits; else ``"hook-only"``). Asking for
``network_isolation``/``filesystem_isolation="audit-hook"`` is such a request too. Weak modes
have no PID namespace (``os.pidfd_open`` + ``signal.pidfd_send_signal`` raise no audit event
and can reach other processes of the caller's uid), no process-count limit, and as root the
child is root.

Limits (all modes unless said):

* **Wall clock** — enforced by the parent, which reads the pipes and reaps the child in its own
  thread (no reader threads) and never waits past the limit: on timeout bwrap (or the weak
  mode's process group) gets SIGKILL (``timed_out=True``, ``killed_by="timeout"``).
* **CPU seconds** — ``RLIMIT_CPU``; the wrapper's SIGXCPU handler exits at the soft limit; code
  that ignores SIGXCPU is killed at the hard limit (one second later). Both are
  ``killed_by="cpu"``: the parent reads the child's own CPU time (``wait4``) to tell a CPU kill
  from any other SIGKILL.
* **Memory** — ``RLIMIT_AS``; Python's ``MemoryError`` is reported as ``killed_by="memory"``
  (exit code 86). ``RLIMIT_FSIZE`` caps any file the code writes, ``RLIMIT_NOFILE`` open files,
  ``RLIMIT_CORE`` = 0.
* **Processes** — ``RLIMIT_NPROC`` = ``max_processes`` (threads count), set inside the run's own
  user namespace, where the kernel counts only that run's tasks (``bwrap`` only).
* **Output** — stdout and stderr are read up to ``max_output_bytes`` each; past that the run is
  killed and the result says ``truncated=True``, ``killed_by="output_limit"``.
* **Setup** — the wrapper reports on a pipe once it is ready to run the code; a run that never
  got there (bwrap or the wrapper failed) is ``killed_by="sandbox_setup"``.

**Defence in depth (always): a PEP 578 audit hook** installed before the user code. It gives
clear errors, but it is not a boundary (PEP 578 says so: code that corrupts interpreter memory
gets past it). It refuses: socket creation/connect/bind/lookups; ``subprocess``, ``os.system``,
``os.exec*``, ``os.fork``, ``os.forkpty``, ``os.posix_spawn*``, ``os.kill*``; raising resource
limits; new sub-interpreters; code-object construction; ``gc`` object introspection; changing
the hook's own functions; imports whose module name or file is not an exact ``str`` (a subclass
could answer the checks with anything); and importing C modules that reach the OS or raw memory
without an audit event — ``ctypes``/``_ctypes`` (a stand-in ``ctypes`` answers
``c_long``/``sizeof``, all sympy needs at import — scipy, which calls ``ctypes.cast`` at
import, does not load), ``_posixsubprocess`` (its ``fork_exec`` raises no event),
``_socket``/``_ssl``, ``_sqlite3``, ``_dbm``/``_gdbm``, ``_posixshmem``/``_multiprocessing``,
``syslog``, ``readline``, the ``_test*`` modules — by module name, last dotted component and the
extension file's name. ``subprocess`` is pre-imported with its ``fork_exec`` replaced. Writes
outside the temp dir are refused (paths resolved by the hook's own ``realpath`` from captured C
functions; ``os.open`` of a directory and ``dir_fd=`` are refused). The hook's state lives in
default arguments holding only immutable objects, with no closure cells, so frames reached
through a refusal's traceback expose nothing that can switch it off. The interpreter runs with
``-I -B``.

Not covered: no seccomp filter (the kernel's whole syscall surface is reachable from inside the
namespaces); the temp dir is on the host's disk (``RLIMIT_FSIZE`` bounds each file, not their
number); no cgroup memory/CPU accounting beyond the rlimits.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

MEMORY_EXIT_CODE = 86
SETUP_EXIT_CODE = 85
CPU_EXIT_CODE = 87

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
    import resource, signal
    for name, value in config["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value[0], value[1]))

    def _cpu_limit_reached(signum, frame):
        # SIGXCPU at the soft limit; a program that ignores it gets SIGKILL at the hard limit
        os.write(2, b"sandbox: CPU time limit reached\n")
        os._exit(CPU_EXIT_CODE)

    signal.signal(signal.SIGXCPU, _cpu_limit_reached)
    if config["audit_hook"]:
        _ctypes_stand_in()
        # Libraries import subprocess at import time (scipy): load it now, with its C fork_exec
        # replaced, and drop _posixsubprocess so importing it again goes through the hook.
        import subprocess

        def _no_fork_exec(*args, **kwargs):
            raise PermissionError("sandbox: starting processes is blocked (_posixsubprocess.fork_exec)")

        subprocess._fork_exec = _no_fork_exec
        sys.modules.pop("_posixsubprocess", None)
        sys.addaudithook(_make_hook(root))
    if config["ready_fd"] is not None:
        os.write(config["ready_fd"], b"ready")
        os.close(config["ready_fd"])


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
    """The audit hook and its helpers keep their state in default arguments holding only
    immutable objects (frozensets, tuples, str, C functions) and have no closure cells: a
    refusal's traceback reaches the hook's frames (``tb_frame.f_locals``), but nothing there
    can be changed (``cell_contents`` would be; function ``__defaults__``/``__code__`` writes
    raise audit events the hook refuses)."""
    import _stat, posix, types
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
    # (event, indices of paths that must stay inside, indices of dir_fd arguments)
    path_rules = (
        ("os.remove", (0,), (1,)), ("os.rmdir", (0,), (1,)), ("os.mkdir", (0,), (2,)),
        ("os.rename", (0, 1), (2, 3)), ("os.replace", (0, 1), (2, 3)), ("os.link", (0, 1), (2, 3)),
        ("os.chmod", (0,), (2,)), ("os.chown", (0,), (3,)), ("os.utime", (0,), (3,)),
        ("os.mkfifo", (0,), (2,)), ("os.mknod", (0,), (3,)), ("os.truncate", (0,), ()),
        ("os.chflags", (0,), ()), ("os.setxattr", (0,), ()), ("os.removexattr", (0,), ()),
        ("shutil.copyfile", (1,), ()), ("shutil.copymode", (1,), ()), ("shutil.copystat", (1,), ()),
        ("shutil.copytree", (1,), ()), ("shutil.move", (0, 1), ()), ("shutil.rmtree", (0,), (1,)),
        ("shutil.chown", (0,), ()), ("shutil.make_archive", (0,), ()), ("shutil.unpack_archive", (1,), ()),
    )
    path_events = frozenset(rule[0] for rule in path_rules)
    # writing these on the hook's own functions would change what they do
    guarded_function_attrs = frozenset({"__code__", "__defaults__", "__kwdefaults__"})

    def text(path, type_=type, str_=str, bytes_=bytes):
        if type_(path) is str_:
            return path
        if type_(path) is bytes_:
            return path.decode("utf-8", "surrogateescape")
        return None  # path-like objects could answer differently on a second __fspath__ call

    def real(path, lstat=posix.lstat, readlink=posix.readlink, getcwd=posix.getcwd, S_ISLNK=_stat.S_ISLNK,
             OSError_=OSError, PermissionError_=PermissionError, reversed_=reversed):
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

    def allowed(path, root=root, inside=root + "/", text=text, real=real, type_=type, int_=int, len_=len):
        if type_(path) is int_:
            return True  # an already open descriptor
        path = text(path)
        if path is None:
            return False
        resolved = real(path)
        return resolved == root or resolved[:len_(inside)] == inside or resolved == "/dev/null"

    def refuse(what, path=None, str_=str, PermissionError_=PermissionError):
        raise PermissionError_("sandbox: " + what + " is blocked" + ("" if path is None else ": " + str_(path)))

    def hook(event, args, deny=deny, deny_imports=deny_imports, path_rules=path_rules, path_events=path_events,
             guarded_function_attrs=guarded_function_attrs, function_type=types.FunctionType,
             text=text, real=real, allowed=allowed, refuse=refuse, stat=posix.stat, S_ISDIR=_stat.S_ISDIR,
             write_flags=posix.O_WRONLY | posix.O_RDWR | posix.O_APPEND | posix.O_CREAT | posix.O_TRUNC,
             str_=str, int_=int, type_=type, len_=len, ImportError_=ImportError, OSError_=OSError,
             own_functions=frozenset()):
        if event in deny:
            refuse(event)
        if event == "import":
            name = args[0]
            file = args[1] if len_(args) > 1 else None
            # only exact str: a str subclass can answer the checks below with anything it likes
            if type_(name) is not str_ or (file is not None and type_(file) is not str_):
                raise ImportError_("sandbox: import with a non-str module name or file is blocked")
            base = file.rpartition("/")[2].partition(".")[0] if file is not None and ".so" in file else ""
            if (name in deny_imports or name.rpartition(".")[2] in deny_imports
                    or name.partition(".")[0] in deny_imports or base in deny_imports):
                raise ImportError_("sandbox: import of " + (base or name) + " is blocked")
        elif event == "object.__setattr__" or event == "object.__delattr__":  # `= None` is a delete
            if type_(args[0]) is function_type and args[0] in own_functions and args[1] in guarded_function_attrs:
                refuse("changing the sandbox hook (" + str_(args[1]) + ")")
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
        elif event in path_events:
            for rule_event, indices, fd_indices in path_rules:
                if rule_event != event:
                    continue
                for index in fd_indices:
                    if index < len_(args) and args[index] is not None and args[index] != -1:
                        refuse(event + " with dir_fd")
                for index in indices:
                    if index < len_(args) and args[index] is not None and not allowed(args[index]):
                        refuse(event + " outside the sandbox directory", args[index])

    # set before the hook is installed (a tuple: immutable, unlike __kwdefaults__)
    hook.__defaults__ = (*hook.__defaults__[:-1], frozenset({text, real, allowed, refuse, hook}))
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
'''.replace("MEMORY_EXIT_CODE", str(MEMORY_EXIT_CODE)).replace("SETUP_EXIT_CODE", str(SETUP_EXIT_CODE)) \
    .replace("CPU_EXIT_CODE", str(CPU_EXIT_CODE))


SANDBOX_UID = 65534  # "nobody": the uid (and gid) the code runs as inside the sandbox
INSTALL_HINT = ("install bubblewrap: `make sandbox-tool` (as root it runs "
                "`apt-get install -y bubblewrap`; elsewhere ask for the Debian/Ubuntu package `bubblewrap`)")
Isolation = Literal["bwrap", "bwrap-root", "namespaces-weak", "hook-only"]


class SandboxUnavailable(RuntimeError):
    """The OS boundary (bubblewrap) cannot run here and weaker isolation was not allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run (defaults suit a short math program).

    The boundary is bubblewrap (see the module docstring). Without it a run raises
    :class:`SandboxUnavailable` unless ``allow_weak_isolation`` is set; then
    ``network_isolation`` / ``filesystem_isolation`` pick the weaker layers: ``auto`` uses the
    ``unshare`` namespace where the kernel allows it and falls back to the audit hook;
    ``netns`` / ``mount`` require it (``RuntimeError`` where not permitted); ``audit-hook``
    skips it (asking for ``audit-hook`` is itself a request for the weak mode).
    ``max_processes``: processes and threads of the run (``RLIMIT_NPROC`` inside the run's own
    user namespace, so only its own tasks count; bubblewrap modes only).
    """

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 16 << 20
    max_open_files: int = 256
    network_isolation: Literal["auto", "netns", "audit-hook"] = "auto"
    filesystem_isolation: Literal["auto", "mount", "audit-hook"] = "auto"
    max_processes: int = 32
    allow_weak_isolation: bool = False


@dataclass(frozen=True)
class SandboxResult:
    """What happened. ``killed_by``: None | timeout | cpu | memory | output_limit | signal:NAME |
    sandbox_setup (the sandbox could not be prepared; the code did not run).

    ``isolation``: which boundary ran — ``bwrap`` (bubblewrap, the sandbox uid is unprivileged
    outside too), ``bwrap-root`` (bubblewrap started by root whose interpreter only root can
    read: the same namespaces and no capabilities, but the code's uid maps to root outside, so
    the kernel does not apply ``max_processes``), ``namespaces-weak`` (``unshare`` network/mount
    namespaces plus the audit hook), ``hook-only``. ``network_isolation``: netns | audit-hook;
    ``filesystem_isolation``: mount-ro | audit-hook."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    killed_by: str | None
    truncated: bool
    wall_s: float
    network_isolation: str
    filesystem_isolation: str = "audit-hook"
    isolation: str = "hook-only"
    cpu_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_by is None and not self.truncated


@dataclass(frozen=True)
class _Launch:
    """How one run is started: the command prefix and what it gives."""

    prefix: tuple[str, ...]
    isolation: Isolation
    network_isolation: str
    filesystem_isolation: str
    mount_ro: bool = False  # the wrapper remounts read-only itself (namespaces-weak)
    owner_uid: int | None = None  # root caller dropping to this uid: it owns the temp dir
    popen_drop: bool = False  # drop to owner_uid when starting the prefix (else the prefix drops)
    pass_fds: tuple[int, ...] = ()

    @property
    def process_limit(self) -> bool:
        return self.isolation == "bwrap"


# ---------------------------------------------------------------- bubblewrap (the boundary)

@lru_cache(maxsize=8)
def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """Directories the interpreter needs (prefixes: binary, stdlib, site-packages), outermost first."""
    if python == sys.executable:
        dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        real_exe = os.path.realpath(sys.executable)
    else:
        probe = subprocess.run([python, "-I", "-c", "import json, os, sys; print(json.dumps([sys.prefix, "
                                "sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, "
                                "os.path.realpath(sys.executable)]))"],
                               capture_output=True, text=True, timeout=30, check=True)
        *prefixes, real_exe = json.loads(probe.stdout)
        dirs = set(prefixes)
    dirs.add(os.path.dirname(os.path.dirname(real_exe)))  # .../bin/python -> ...
    dirs = {os.path.realpath(d) for d in dirs} | dirs  # a venv path and where it really is
    # outer directories first: a prefix nested in another is bound once, by its parent
    ordered = sorted(dirs, key=len)
    return tuple(d for i, d in enumerate(ordered)
                 if os.path.isdir(d) and not any(d.startswith(p.rstrip("/") + "/") for p in ordered[:i]))


def _system_binds() -> list[str]:
    """Shared libraries and the loader: ``/usr/lib*`` read-only, ``/lib*`` as on the host
    (symlinks on merged-/usr systems), the loader cache; no ``/usr/bin``, no ``/etc`` beyond that."""
    args: list[str] = []
    for path in ("/usr/lib", "/usr/lib64", "/usr/lib32"):
        args += ["--ro-bind-try", path, path]
    for path in ("/lib", "/lib64", "/lib32"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        else:
            args += ["--ro-bind-try", path, path]
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        args += ["--ro-bind-try", path, path]
    return args


def _bwrap_prefix(bwrap: str, python: str, *, disable_userns: bool, root_in_namespace: bool,
                  sources: dict[str, str] | None = None) -> tuple[str, ...]:
    """The ``bwrap`` command line up to (not including) the interpreter; the temp dir is added
    per run. ``root_in_namespace``: the caller is root and stays the namespace owner.
    ``sources``: where to bind each interpreter directory from (a staged copy of the path)."""
    args = [bwrap, "--unshare-all", "--unshare-user"]  # user, pid, net, ipc, uts, cgroup, mount
    if disable_userns:
        args.append("--disable-userns")  # no nested user namespace to regain capabilities in
    args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
             "--die-with-parent", "--new-session", "--as-pid-1", "--clearenv"]
    if root_in_namespace:
        args += ["--cap-drop", "ALL"]  # bwrap started by root keeps capabilities otherwise
    for directory in _interpreter_dirs(python):
        args += ["--ro-bind", (sources or {}).get(directory, directory), directory]
    args += _system_binds()
    # a fresh /proc for the new PID namespace; a minimal /dev (null, zero, urandom, ...), read-only
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    return tuple(args)


def _bwrap_run_args(prefix: tuple[str, ...], workdir: str, env: dict[str, str]) -> list[str]:
    args = list(prefix)
    for key, value in env.items():
        args += ["--setenv", key, value]
    # the temp dir is the only writable place; the root (bwrap's tmpfs) is then made read-only
    return [*args, "--bind", workdir, workdir, "--chdir", workdir, "--remount-ro", "/"]


# Root caller, interpreter only root can reach (e.g. pyenv under /root): in a private mount
# namespace of our own (the host's mounts are untouched), bind each interpreter directory onto
# an empty world-reachable stage directory, then drop to the sandbox uid and start bwrap, which
# binds the stage back to the original path.
_STAGE_SCRIPT = 'while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 85; shift 2; done; shift; exec "$@"'


@lru_cache(maxsize=1)
def _stage_root() -> str:
    stage = tempfile.mkdtemp(prefix="jzsandbox-stage-")
    os.chmod(stage, 0o755)
    atexit.register(shutil.rmtree, stage, True)
    return stage


def _staged_drop_prefix(python: str) -> tuple[tuple[str, ...], dict[str, str]] | None:
    tools = [shutil.which(name) for name in ("unshare", "sh", "mount", "setpriv")]
    if not all(tools):
        return None
    unshare, sh, _, setpriv = tools
    stage = _stage_root()
    sources: dict[str, str] = {}
    binds: list[str] = []
    for index, directory in enumerate(_interpreter_dirs(python)):
        staged = os.path.join(stage, str(index))
        os.makedirs(staged, mode=0o755, exist_ok=True)
        sources[directory] = staged
        binds += [directory, staged]
    prefix = (unshare, "--mount", "--propagation", "private", "--", sh, "-c", _STAGE_SCRIPT, "stage", *binds,
              "--", setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--")
    return prefix, sources  # type: ignore[return-value]


@lru_cache(maxsize=4)
def _bwrap_launch(python: str) -> tuple[_Launch | None, str]:
    """The bubblewrap setup that works here (probed once per interpreter by running the real
    wrapper), or None and why not. A root caller first drops to the sandbox uid (so the code is
    unprivileged outside the namespaces too, and ``RLIMIT_NPROC`` applies: the kernel skips it
    for uid 0): directly, else through a staged interpreter; only then bwrap as root."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return None, "`bwrap` is not on PATH"
    candidates: list[_Launch] = []
    for disable_userns in (True, False):  # --disable-userns needs bubblewrap >= 0.8
        if os.geteuid() != 0:
            candidates.append(_Launch(_bwrap_prefix(bwrap, python, disable_userns=disable_userns,
                                                    root_in_namespace=False), "bwrap", "netns", "mount-ro"))
            continue
        plain = _bwrap_prefix(bwrap, python, disable_userns=disable_userns, root_in_namespace=False)
        candidates.append(_Launch(plain, "bwrap", "netns", "mount-ro", owner_uid=SANDBOX_UID, popen_drop=True))
        staged = _staged_drop_prefix(python)
        if staged is not None:
            stage_prefix, sources = staged
            candidates.append(_Launch(
                (*stage_prefix, *_bwrap_prefix(bwrap, python, disable_userns=disable_userns,
                                               root_in_namespace=False, sources=sources)),
                "bwrap", "netns", "mount-ro", owner_uid=SANDBOX_UID))
        candidates.append(_Launch(_bwrap_prefix(bwrap, python, disable_userns=disable_userns,
                                                root_in_namespace=True), "bwrap-root", "netns", "mount-ro"))
    reasons = []
    for launch in candidates:
        try:
            probe = _spawn("print('ok')", SandboxLimits(wall_seconds=30), launch, python=python)
        except OSError as exc:
            reasons.append(f"{exc}")
            continue
        if probe.exit_code == 0 and probe.stdout == "ok\n":
            return launch, ""
        reasons.append(probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit {probe.exit_code}")
    return None, "; ".join(dict.fromkeys(reasons))


def isolation_available(python: str | None = None) -> Isolation | None:
    """The bubblewrap mode runs get here (``bwrap`` / ``bwrap-root``), or None without it."""
    launch, _ = _bwrap_launch(python or sys.executable)
    return launch.isolation if launch else None


# ---------------------------------------------------------------- weak modes (opt-in)

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
        launch = _Launch(prefix, "namespaces-weak", "netns" if network else "audit-hook", "mount-ro",
                         mount_ro=True)
        try:
            probe = _spawn("print('ok')", SandboxLimits(wall_seconds=20), launch)
        except OSError:
            continue
        if probe.exit_code == 0 and probe.stdout == "ok\n":
            return prefix
    return None


def network_isolation_available() -> bool:
    """Whether weak-mode runs get a private network namespace (``unshare -n``)."""
    return _netns_prefix() is not None


def filesystem_isolation_available() -> bool:
    """Whether weak-mode runs get a read-only mount namespace (``unshare -m``)."""
    return _namespace_prefix(False, True) is not None


def _weak_launch(limits: SandboxLimits) -> _Launch:
    """``unshare`` namespaces where permitted plus the audit hook (the pre-bubblewrap layers)."""
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
    return _Launch(prefix or (), "namespaces-weak" if (net or fs) else "hook-only",
                   "netns" if net else "audit-hook", "mount-ro" if fs else "audit-hook", mount_ro=fs)


_PROBE_LOCK = threading.Lock()


def _choose_launch(limits: SandboxLimits, python: str) -> _Launch:
    weak_requested = "audit-hook" in (limits.network_isolation, limits.filesystem_isolation)
    if weak_requested and not limits.allow_weak_isolation:
        raise ValueError("network_isolation/filesystem_isolation='audit-hook' skips the OS boundary; "
                         "set allow_weak_isolation=True (settings: sandbox.allow_weak_isolation) to allow it")
    if not weak_requested:
        with _PROBE_LOCK:  # concurrent first runs (synthesis workers) probe once
            launch, why = _bwrap_launch(python)
        if launch is not None:
            return launch
        if not limits.allow_weak_isolation:
            raise SandboxUnavailable(
                f"the code sandbox needs bubblewrap and it cannot run here ({why}); {INSTALL_HINT}. "
                "To accept the weaker unshare/audit-hook isolation instead, set "
                "sandbox.allow_weak_isolation: true (SandboxLimits(allow_weak_isolation=True))")
    return _weak_launch(limits)


# ---------------------------------------------------------------- running one program

def _rlimits(limits: SandboxLimits, process_limit: bool) -> dict[str, tuple[int, int]]:
    rlimits = {
        "RLIMIT_CPU": (limits.cpu_seconds, limits.cpu_seconds + 1),
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
        "RLIMIT_NOFILE": (limits.max_open_files, limits.max_open_files),
        "RLIMIT_CORE": (0, 0),
    }
    if process_limit:  # only in a user namespace of its own: elsewhere it counts all the caller's processes
        rlimits["RLIMIT_NPROC"] = (limits.max_processes, limits.max_processes)
    return rlimits


def _mount_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return None


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "HOME": workdir, "TMPDIR": workdir, "PYTHONIOENCODING": "utf-8",
        # One thread per BLAS pool: numpy/sympy otherwise reserve address space per core.
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


def run_python(code: str, limits: SandboxLimits | None = None, *, python: str | None = None,
               stdin: str | None = None) -> SandboxResult:
    """Run ``code`` as a Python program under ``limits`` (see module docstring); never raises
    for anything the code does — failures come back in the result. Raises
    :class:`SandboxUnavailable` when bubblewrap cannot run and weak isolation is not allowed."""
    limits = limits or SandboxLimits()
    python = python or sys.executable
    return _spawn(code, limits, _choose_launch(limits, python), python=python, stdin=stdin)


@dataclass
class _Outcome:
    stdout: bytes
    stderr: bytes
    ready: bool
    status: int | None  # os.wait4 status
    cpu_s: float
    timed_out: bool
    truncated: bool


def _spawn(code: str, limits: SandboxLimits, launch: _Launch, *, python: str | None = None,
           stdin: str | None = None, audit_hook: bool = True) -> SandboxResult:
    """Start one run. ``audit_hook=False`` (tests only) leaves the code with the OS boundary alone."""
    workdir = tempfile.mkdtemp(prefix="jzsandbox-")
    ready_read, ready_write = os.pipe()
    try:
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(code)
        if launch.owner_uid is not None:
            for path in (workdir, script):
                os.chown(path, launch.owner_uid, launch.owner_uid)
        payload = json.dumps({"rlimits": _rlimits(limits, launch.process_limit), "mount_ro": launch.mount_ro,
                              "parent_mount_ns": _mount_namespace() if launch.mount_ro else None,
                              "audit_hook": audit_hook, "ready_fd": ready_write})
        env = _child_env(workdir)
        prefix = list(launch.prefix)
        if launch.isolation in ("bwrap", "bwrap-root"):
            prefix = _bwrap_run_args(launch.prefix, workdir, env)
        argv = [*prefix, python or sys.executable, "-I", "-B", "-c", _WRAPPER, workdir, payload, script]
        drop = {"user": launch.owner_uid, "group": launch.owner_uid, "extra_groups": []} if launch.popen_drop else {}
        started = time.monotonic()
        # bwrap itself gets the scrubbed environment too (nothing to read from /proc/<pid>/environ)
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, start_new_session=True, pass_fds=(ready_write, *launch.pass_fds),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **drop,  # type: ignore[arg-type]
        )
        os.close(ready_write)
        ready_write = -1
        outcome = _communicate(proc, None if stdin is None else stdin.encode("utf-8"), ready_read,
                               limits.max_output_bytes, started + limits.wall_seconds)
        wall = time.monotonic() - started
        exit_code = _exit_code(outcome.status, launch)
        proc.returncode = exit_code  # reaped by _communicate
        stdout = outcome.stdout.decode("utf-8", errors="replace")
        stderr = outcome.stderr.decode("utf-8", errors="replace")
        return SandboxResult(
            stdout=stdout, stderr=stderr, exit_code=exit_code, timed_out=outcome.timed_out,
            killed_by=_killed_by(exit_code, outcome, limits.cpu_seconds, stderr), truncated=outcome.truncated,
            wall_s=round(wall, 4), network_isolation=launch.network_isolation,
            filesystem_isolation=launch.filesystem_isolation, isolation=launch.isolation,
            cpu_s=round(outcome.cpu_s, 3),
        )
    finally:
        for fd in (ready_read, ready_write):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    # bwrap: killing it kills the namespace's init (--die-with-parent), and with it every process
    # of the run; weak modes: the process group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _communicate(proc: subprocess.Popen[bytes], stdin: bytes | None, ready_fd: int, cap: int,
                 deadline: float) -> _Outcome:
    """Feed stdin, read stdout/stderr up to ``cap`` each, reap the child with its rusage, all in
    this thread (no reader threads to leak). Never waits past ``deadline`` (plus the kill): a
    process still holding the pipes after the child exited does not keep the run open."""
    assert proc.stdout is not None and proc.stderr is not None
    selector = selectors.DefaultSelector()
    stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers: dict[int, bytearray] = {stdout_fd: bytearray(), stderr_fd: bytearray()}
    ready = bytearray()
    for fd in (*buffers, ready_fd):
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pending_stdin = memoryview(stdin or b"")
    stdin_fd = -1
    if proc.stdin is not None:
        if stdin:
            stdin_fd = proc.stdin.fileno()
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    try:
        exit_fd = os.pidfd_open(proc.pid)
        selector.register(exit_fd, selectors.EVENT_READ)
    except (AttributeError, OSError):  # no pidfd (old kernel): poll for the exit instead
        exit_fd = -1
    status: int | None = None
    cpu = 0.0
    timed_out = truncated = False
    drain_until = deadline

    def reap(flags: int) -> None:
        nonlocal status, cpu
        pid, wait_status, usage = os.wait4(proc.pid, flags)
        if pid:
            status, cpu = wait_status, usage.ru_utime + usage.ru_stime

    try:
        while True:
            reading = [fd for fd in buffers if fd in selector.get_map()]
            if status is not None and not reading:
                break
            now = time.monotonic()
            if now >= drain_until:
                if status is None:
                    timed_out = True
                break
            wait = drain_until - now if exit_fd >= 0 or status is not None else min(0.02, drain_until - now)
            for key, _ in selector.select(wait):
                fd = key.fd
                if fd == exit_fd:
                    selector.unregister(exit_fd)
                    reap(0)
                elif fd == stdin_fd:
                    try:
                        sent = os.write(fd, pending_stdin[:65536])
                    except BlockingIOError:
                        sent = 0
                    except BrokenPipeError:  # the code stopped reading: the rest is dropped
                        sent = len(pending_stdin)
                    pending_stdin = pending_stdin[sent:]
                    if not pending_stdin:
                        selector.unregister(fd)
                        proc.stdin.close()  # type: ignore[union-attr]
                else:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        selector.unregister(fd)
                        continue
                    if fd == ready_fd:
                        ready += chunk
                        continue
                    room = cap - len(buffers[fd])
                    buffers[fd] += chunk[:max(room, 0)]
                    if len(chunk) > room:
                        truncated = True
                        selector.unregister(fd)
            if truncated:
                break
            if exit_fd < 0 and status is None:
                reap(os.WNOHANG)
            if status is not None and drain_until == deadline:
                # the child is gone: stray holders of the pipes get a short grace, then the kill
                _kill_group(proc.pid)
                drain_until = min(deadline, time.monotonic() + 1.0)
    finally:
        if status is None:
            _kill_group(proc.pid)
            reap(0)
        _kill_group(proc.pid)  # stray members of the group, if any survived
        selector.close()
        if exit_fd >= 0:
            os.close(exit_fd)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    return _Outcome(bytes(buffers[stdout_fd]), bytes(buffers[stderr_fd]), ready == b"ready", status, cpu,
                    timed_out, truncated)


def _exit_code(status: int | None, launch: _Launch) -> int | None:
    if status is None:
        return None
    code = os.waitstatus_to_exitcode(status)
    if launch.isolation in ("bwrap", "bwrap-root") and code > 128 and (code - 128) in _SIGNALS:
        return -(code - 128)  # bwrap reports the code's death by signal N as exit 128+N
    return code


_SIGNALS = frozenset(int(s) for s in signal.Signals)


def _killed_by(code: int | None, outcome: _Outcome, cpu_limit: int, stderr: str) -> str | None:
    if outcome.timed_out:
        return "timeout"
    if outcome.truncated:
        return "output_limit"
    if not outcome.ready:
        return "sandbox_setup"  # the wrapper never got to the code (bwrap or the wrapper failed)
    # CPU: the wrapper's SIGXCPU handler exits 87; a program that replaced the handler dies of
    # SIGKILL at the hard limit, told apart from other kills by its own CPU time (wait4; the
    # code is PID 1 of its namespace, so bwrap reaps it and the time reaches us).
    if code == CPU_EXIT_CODE and "sandbox: CPU time limit reached" in stderr:
        return "cpu"
    if code in (-signal.SIGKILL, -signal.SIGXCPU) and outcome.cpu_s >= cpu_limit * 0.9:
        return "cpu"
    if code == MEMORY_EXIT_CODE or (code not in (0, None) and "MemoryError" in stderr):
        return "memory"
    if code is not None and code < 0:
        sig = -code
        if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and "alloc" in stderr.lower():
            return "memory"
        try:
            return f"signal:{signal.Signals(sig).name}"
        except ValueError:
            return f"signal:{sig}"
    return None
