"""Run untrusted Python (model-written solutions) in a limited subprocess.

Public API (shared by synthesis validation and the evaluation's tool setting)::

    from models.sandbox import SandboxLimits, run_python
    result = run_python("print(6 * 7)", SandboxLimits(wall_seconds=5))
    result.ok, result.stdout, result.killed_by, result.isolation, result.memory_bound

**The boundary is bubblewrap plus a seccomp filter** (``bwrap``, Debian's ``bubblewrap``;
``make sandbox-tool``). Each run gets, from bwrap: new user, PID, network, mount, IPC, UTS (and
cgroup) namespaces; uid/gid 65534 inside with every capability dropped and no_new_privs; no
nested user namespaces (``--disable-userns``, bubblewrap >= 0.8, else without); a root
filesystem that holds only the interpreter's prefixes (venv and base install: binary, stdlib,
site-packages) and ``/usr/lib*`` read-only, a fresh ``/proc`` of its own PID namespace, a
minimal read-only ``/dev``; as the only writable place a **tmpfs of its own** of
``max_disk_bytes`` (``--size``: writing past it fails with ENOSPC; nothing of the run is on
the host's disk, so a caller killed mid-run leaves nothing behind), holding the program
(``main.py``, copied in read-only from a memfd: no host file, no chown); a network namespace
with only its own loopback (no route to the host's localhost, its abstract sockets or anywhere
else); a cleared environment (bwrap itself is started with the scrubbed one, so no process in
the sandbox has the caller's secrets in ``/proc/<pid>/environ``); ``--new-session`` (no
terminal injection); ``--die-with-parent``. The interpreter is the namespace's PID 1
(``--as-pid-1``): when it exits, or bwrap is killed, the kernel kills every process of the
run, so nothing outlives it and no grandchild holds the output pipes. ``isolation="bwrap"``.

The **seccomp filter** (classic BPF built here, ``bwrap --seccomp FD``; x86-64 and aarch64,
other architectures fail closed; a foreign-ABI syscall kills the process) refuses with EPERM:
keyrings (``keyctl``/``add_key``/``request_key``; only joining a fresh anonymous session
keyring is let through, which the wrapper does first, so the caller's inherited session
keyring is out of reach), io_uring, userfaultfd, ptrace and ``process_vm_*``, bpf,
perf_event_open, every mount call (old and new API), chroot/pivot_root, unshare/setns and
``clone`` with namespace flags (``clone3``: ENOSYS, libc falls back to ``clone``), kernel
modules, kexec, ``open_by_handle_at``/``name_to_handle_at``, fanotify, syslog, acct, quotactl,
swap, reboot, host/domain names, iopl/ioperm, memfd_secret, ``personality`` other than
PER_LINUX/PER_LINUX32/query, TIOCSTI/TIOCLINUX ioctls, and sockets of any family but AF_UNIX
(EAFNOSUPPORT: the network namespace has no interface anyway; unix sockets and socketpairs
stay for libraries that use them). It also kills (SIGSYS) a process that exits with a status
of 128-255: bwrap reports death by signal N as 128+N, so such statuses are kept for signals.

A root caller (CI, containers) gets the same: bwrap is started as uid 65534, directly when that
uid can read the interpreter, else after binding the interpreter's directories onto a staging
directory in a private mount namespace of our own (``unshare -m`` + ``setpriv``; the host's
mounts are never touched). Only when neither works does bwrap run as root with ``--cap-drop
ALL`` (``isolation="bwrap-root"``: same namespaces and filter, but the code's uid is root
outside them and the kernel applies no ``RLIMIT_NPROC`` to root). **``bwrap-root`` counts as
weak isolation**: it needs ``allow_weak_isolation`` like the modes below. Probes are re-run
until one succeeds (a failure is never kept; ``bwrap-root`` is re-probed after a minute).

Without bubblewrap ``run_python`` raises :class:`SandboxUnavailable` (it says how to install
it) unless ``allow_weak_isolation`` is set; then the weaker pre-bubblewrap layers run
(``isolation="namespaces-weak"``: ``unshare -n -m`` with the wrapper remounting everything
read-only but the temp dir, where the kernel permits; else ``"hook-only"``). Asking for
``network_isolation``/``filesystem_isolation="audit-hook"`` is such a request too. Weak modes
have no seccomp filter, no PID namespace (``os.pidfd_open`` + ``signal.pidfd_send_signal``
raise no audit event and can reach other processes of the caller's uid), no process-count
limit, their temp dir on the host's disk (``jzsandbox-<pid>-<pidns>-*``: dirs of dead callers are swept
by the next process's first run), and as root the child is root.

Limits (all modes unless said):

* **Wall clock** — enforced by the parent, which reads the pipes and reaps the child in its own
  thread (no reader threads) and never waits past the limit: on timeout bwrap (or the weak
  mode's process group) gets SIGKILL (``timed_out=True``, ``killed_by="timeout"``).
* **CPU seconds** — ``RLIMIT_CPU``; the wrapper's SIGXCPU handler exits at the soft limit; code
  that ignores SIGXCPU is killed at the hard limit (one second later). Both are
  ``killed_by="cpu"`` only when the CPU time the kernel reports for the run (``wait4``) reached
  the limit.
* **Memory** — where cgroup v2 is writable with the memory and pids controllers delegated
  (root, or a delegated systemd slice), each run gets a cgroup of its own (``memory.max`` =
  ``memory_bytes`` for all its processes and its tmpfs files, ``memory.swap.max`` = 0,
  ``pids.max``), removed afterwards; an OOM kill there is ``killed_by="memory"``
  (``memory_bound="cgroup"``). Otherwise the bound is ``RLIMIT_AS`` per process
  (``memory_bound="per-process"``): **one run may hold up to ``memory_bytes * max_processes``**
  (plus ``max_disk_bytes`` of tmpfs). Either way ``RLIMIT_AS`` applies per process too, and a
  ``MemoryError`` reaching the top is ``killed_by="memory"`` (exit code 86; code that raises
  one itself can only make its own run look failed). ``RLIMIT_FSIZE`` caps any file the code
  writes, ``RLIMIT_NOFILE`` open files, ``RLIMIT_CORE`` = 0.
* **Processes** — ``RLIMIT_NPROC`` = ``max_processes`` (threads count), set inside the run's own
  user namespace, where the kernel counts only that run's tasks (``bwrap`` only); ``pids.max``
  under a cgroup.
* **Output** — stdout and stderr are read up to ``max_output_bytes`` each; past that the run is
  killed and the result says ``truncated=True``, ``killed_by="output_limit"``.
* **Setup** — the wrapper reports on a pipe once it is ready to run the code (closed before the
  code runs); a run that never got there is ``killed_by="sandbox_setup"``.

``killed_by`` never comes from what the code prints: it is decided from the parent's timer and
output count, the ready pipe, the kernel's exit status, ``wait4`` CPU time and the cgroup's
``oom_kill`` count.

**The PEP 578 audit hook is cosmetic defence in depth, not a boundary.** It gives clear errors
for the common cases, and nothing more: PEP 578 says code that can corrupt interpreter memory
gets past it, and packages in the venv do exactly that without an audit event (numpy's
``__array_interface__`` reads and writes any address; pyarrow's ``foreign_buffer`` reads any).
It refuses: socket creation/connect/bind/lookups; ``subprocess``, ``os.system``, ``os.exec*``,
``os.fork``, ``os.forkpty``, ``os.posix_spawn*``, ``os.kill*``; raising resource limits; new
sub-interpreters; code-object construction; ``gc`` object introspection; changing the hook's
own functions; imports whose module name or file is not an exact ``str``; and importing C
modules that reach the OS or raw memory without an audit event — ``ctypes``/``_ctypes`` (a
stand-in ``ctypes`` answers ``c_long``/``sizeof``, all sympy needs at import — scipy, which
calls ``ctypes.cast`` at import, does not load), ``cffi``/``_cffi_backend`` (``dlopen(None)``
is libc), ``_posixsubprocess``, ``_socket``/``_ssl``, ``_sqlite3``, ``_dbm``/``_gdbm``,
``_posixshmem``/``_multiprocessing``, ``syslog``, ``readline``, the ``_test*`` modules — by
module name, last dotted component and the extension file's name. ``subprocess`` is
pre-imported with its ``fork_exec`` replaced. Writes outside the temp dir are refused (paths
resolved by the hook's own ``realpath`` from captured C functions; ``os.open`` of a directory
and ``dir_fd=`` are refused). The hook's state lives in default arguments holding only
immutable objects. The interpreter runs with ``-I -B``. The tests run every hostile program
with the hook switched off as well: the kernel layers alone must hold.

Not covered: the kernel itself (a kernel bug reachable through the allowed syscalls — file
systems, pipes, futexes, memory management — is an escape; the filter narrows the surface, it
does not remove it); CPU time beyond ``RLIMIT_CPU`` per process (no ``cpu.max``: forked
children each get the limit, within the wall clock); side channels and timing; the memory of
a run is per process where cgroup v2 is not available (see Memory); what the run reads is
whatever the interpreter's prefixes and ``/usr/lib*`` hold (world-readable files there are
readable); ``/proc`` shows the kernel's global files (``/proc/cpuinfo``, ``/proc/meminfo``,
load); weak modes, as listed above.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, TypeVar

_T = TypeVar("_T")
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
    if config["fresh_keyring"]:
        # a new, empty, anonymous session keyring (the only keyctl call the seccomp filter
        # lets through): the caller's inherited one is no longer reachable from this run
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(ctypes.c_long(config["fresh_keyring"]), ctypes.c_long(1), None) < 0 \
                and ctypes.get_errno() != 38:  # ENOSYS: a kernel without keyrings
            raise OSError(ctypes.get_errno(), "keyctl(KEYCTL_JOIN_SESSION_KEYRING) failed")
    if config["mount_ro"]:
        # never remount the caller's filesystems: only inside a mount namespace of our own
        if os.readlink("/proc/self/ns/mnt") == config["parent_mount_ns"]:
            raise RuntimeError("mount_ro outside a private mount namespace (run under unshare -m)")
        _read_only_mounts(root)
        os.chdir(root)  # the old cwd is the directory under the new bind mount: read-only
    for name in [m for m in sys.modules if m == "_ctypes" or m == "ctypes" or m.startswith("ctypes.")]:
        del sys.modules[name]  # used for keyctl(2)/mount(2); the code gets the stand-in below
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
        "_curses", "_curses_panel", "_cffi_backend", "cffi",
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
INSTALL_HINT = ("install bubblewrap >= 0.8 (for --size/--perms of the run's tmpfs): `make sandbox-tool` (as root "
                "it runs `apt-get install -y bubblewrap`; elsewhere ask for the Debian/Ubuntu package `bubblewrap`)")
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
    user namespace, so only its own tasks count; bubblewrap modes only; ``pids.max`` of the run's
    cgroup where it has one). ``memory_bytes``: the whole run's memory (``memory.max`` of its
    cgroup) where cgroup v2 is writable, else the address space of each of its processes
    (``RLIMIT_AS``: the run may then hold up to ``memory_bytes * max_processes``; the result's
    ``memory_bound`` says which). ``max_disk_bytes``: size of the run's writable directory (a
    tmpfs of its own, bubblewrap modes; it is memory, not disk, and counts in the cgroup).
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
    max_disk_bytes: int = 64 << 20


@dataclass(frozen=True)
class SandboxResult:
    """What happened. ``killed_by``: None | timeout | cpu | memory | output_limit | signal:NAME |
    sandbox_setup (the sandbox could not be prepared; the code did not run).

    ``isolation``: which boundary ran — ``bwrap`` (bubblewrap, the sandbox uid is unprivileged
    outside too), ``bwrap-root`` (bubblewrap started by root whose interpreter only root can
    read: the same namespaces and no capabilities, but the code's uid maps to root outside, so
    the kernel does not apply ``max_processes``), ``namespaces-weak`` (``unshare`` network/mount
    namespaces plus the audit hook), ``hook-only``. ``network_isolation``: netns | audit-hook;
    ``filesystem_isolation``: mount-ro | audit-hook. ``memory_bound``: ``cgroup`` (``memory_bytes``
    for the whole run) or ``per-process`` (``RLIMIT_AS`` per process)."""

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
    memory_bound: str = "per-process"

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


# ---------------------------------------------------------------- seccomp filter (classic BPF)

# Written here rather than generated with libseccomp: about forty lines, no dependency (the
# Debian python3-seccomp binding is for the system interpreter only, pyseccomp needs
# libseccomp.so.2 at run time), and every instruction is visible and tested. Syscall numbers
# per architecture (asm/unistd_64.h, asm-generic/unistd.h); tests compare them with libseccomp
# where it is installed. An architecture missing here has no filter: the sandbox fails closed.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {
    "x86_64": {
        "ioctl": 16, "socket": 41, "socketpair": 53, "clone": 56, "exit": 60, "ptrace": 101, "syslog": 103,
        "uselib": 134, "personality": 135, "pivot_root": 155, "chroot": 161, "acct": 163, "mount": 165,
        "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
        "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
        "quotactl": 179, "lookup_dcookie": 212, "exit_group": 231, "kexec_load": 246, "add_key": 248,
        "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "fanotify_init": 300,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310,
        "process_vm_writev": 311, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
        "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "clone3": 435, "mount_setattr": 442, "memfd_secret": 447,
    },
    "aarch64": {
        "lookup_dcookie": 18, "ioctl": 29, "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51,
        "quotactl": 60, "acct": 89, "personality": 92, "exit": 93, "exit_group": 94, "unshare": 97,
        "kexec_load": 104, "init_module": 105, "delete_module": 106, "syslog": 116, "ptrace": 117,
        "reboot": 142, "sethostname": 161, "setdomainname": 162, "socket": 198, "socketpair": 199,
        "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220, "swapon": 224, "swapoff": 225,
        "perf_event_open": 241, "fanotify_init": 262, "name_to_handle_at": 264, "open_by_handle_at": 265,
        "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "finit_module": 273, "bpf": 280,
        "userfaultfd": 282, "kexec_file_load": 294, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "clone3": 435, "mount_setattr": 442, "memfd_secret": 447,
    },
}
# refused with EPERM outright: keyrings, io_uring, userfaultfd, tracing and other processes'
# memory, BPF, perf, mounts and namespaces, kernel modules, kexec, file handles, host admin
SECCOMP_DENIED = (
    "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
    "ptrace", "process_vm_readv", "process_vm_writev", "bpf", "perf_event_open", "mount", "umount2",
    "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "chroot", "unshare", "setns", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "open_by_handle_at", "name_to_handle_at", "fanotify_init", "lookup_dcookie", "syslog",
    "uselib", "acct", "quotactl", "swapon", "swapoff", "reboot", "sethostname", "setdomainname",
    "memfd_secret", "iopl", "ioperm",
)
_CLONE_NAMESPACE_FLAGS = 0x00000080 | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 \
    | 0x20000000 | 0x40000000  # NEWTIME NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS, _EAFNOSUPPORT = 1, 38, 97
_AF_UNIX = 1
_PERSONALITY_ALLOWED = (0x0, 0x8, 0xFFFFFFFF)  # PER_LINUX, PER_LINUX32, query
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C  # push input into / control a terminal
_KEYCTL_JOIN_SESSION_KEYRING = 1


def _seccomp_program(machine: str) -> list[tuple[str, int, str | None, str | None]]:
    """The filter as (op, k, jump-if-true label, jump-if-false label); ``label:`` ops mark
    targets. Reads seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8*i (low word first)."""
    nr = _SYSCALLS[machine]

    def arg(i: int, high: bool = False) -> tuple[str, int, None, None]:
        return ("ld", 16 + 8 * i + (4 if high else 0), None, None)

    load_nr = ("ld", 0, None, None)
    prog: list[tuple[str, int, str | None, str | None]] = [
        ("ld", 4, None, None), ("jeq", _AUDIT_ARCH[machine], "native", None), ("ret", _RET_KILL_PROCESS, None, None),
        ("label:native", 0, None, None), load_nr,
    ]
    if machine == "x86_64":  # the x32 ABI: same arch value, numbers with bit 30 set
        prog += [("jge", 0x40000000, "eperm", None)]
    for name in SECCOMP_DENIED:
        if name in nr:  # iopl/ioperm/uselib exist on x86-64 only
            prog += [("jeq", nr[name], "eperm", None)]
    # clone3's flags live in memory the filter cannot read: ENOSYS, and libc falls back to clone
    prog += [("jeq", nr["clone3"], "enosys", None)]
    prog += [  # clone: no new namespaces
        ("jeq", nr["clone"], None, "after_clone"), arg(0), ("jset", _CLONE_NAMESPACE_FLAGS, "eperm", None),
        load_nr, ("label:after_clone", 0, None, None)]
    for call in ("socket", "socketpair"):  # AF_UNIX only (the network namespace has no interface anyway)
        prog += [("jeq", nr[call], None, f"after_{call}"), arg(0), ("jeq", _AF_UNIX, f"ok_{call}", "eafnosupport"),
                 (f"label:ok_{call}", 0, None, None), load_nr, (f"label:after_{call}", 0, None, None)]
    prog += [("jeq", nr["personality"], None, "after_personality"), arg(0)]
    prog += [("jeq", value, "ok_personality", None) for value in _PERSONALITY_ALLOWED]
    prog += [("ret", _RET_ERRNO | _EPERM, None, None), ("label:ok_personality", 0, None, None), load_nr,
             ("label:after_personality", 0, None, None)]
    prog += [("jeq", nr["ioctl"], None, "after_ioctl"), arg(1), ("jeq", _TIOCSTI, "eperm", None),
             ("jeq", _TIOCLINUX, "eperm", None), load_nr, ("label:after_ioctl", 0, None, None)]
    # keyrings: only joining a fresh anonymous session keyring (the wrapper does it first)
    prog += [("jeq", nr["keyctl"], None, "after_keyctl"), arg(0), ("jeq", _KEYCTL_JOIN_SESSION_KEYRING, None, "eperm"),
             arg(1), ("jeq", 0, None, "eperm"), arg(1, high=True), ("jeq", 0, "allow", "eperm"),
             ("label:after_keyctl", 0, None, None)]
    # exit statuses 128-255 are the code's own: bwrap reports death by signal N as 128+N, so
    # a program choosing such a status could pass for a signal. It is killed (SIGSYS) instead.
    for call in ("exit", "exit_group"):
        prog += [("jeq", nr[call], None, f"after_{call}"), arg(0), ("jset", 0x80, "kill", None), load_nr,
                 (f"label:after_{call}", 0, None, None)]
    prog += [("label:allow", 0, None, None), ("ret", _RET_ALLOW, None, None),
             ("label:eperm", 0, None, None), ("ret", _RET_ERRNO | _EPERM, None, None),
             ("label:enosys", 0, None, None), ("ret", _RET_ERRNO | _ENOSYS, None, None),
             ("label:eafnosupport", 0, None, None), ("ret", _RET_ERRNO | _EAFNOSUPPORT, None, None),
             ("label:kill", 0, None, None), ("ret", _RET_KILL_PROCESS, None, None)]
    return prog


def seccomp_filter(machine: str | None = None) -> bytes:
    """The run's seccomp filter as ``struct sock_filter[]`` (what ``bwrap --seccomp FD`` reads).
    Raises ``RuntimeError`` for an architecture without a syscall table (fail closed)."""
    import platform

    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise RuntimeError(f"no seccomp filter for architecture {machine!r} (known: {', '.join(_SYSCALLS)})")
    opcodes = {"ld": 0x20, "jeq": 0x15, "jge": 0x35, "jset": 0x45, "ret": 0x06}  # BPF_LD|W|ABS, JMP|K, RET|K
    program = _seccomp_program(machine)
    positions: dict[str, int] = {}
    count = 0
    for op, *_ in program:
        if op.startswith("label:"):
            positions[op[6:]] = count
        else:
            count += 1
    out = bytearray()
    index = 0
    for op, k, if_true, if_false in program:
        if op.startswith("label:"):
            continue

        def offset(label: str | None, index: int = index) -> int:
            jump = 0 if label is None else positions[label] - index - 1
            if not 0 <= jump <= 255:
                raise RuntimeError(f"seccomp filter: jump to {label} out of range")
            return jump

        out += struct.pack("=HBBI", opcodes[op], offset(if_true), offset(if_false), k)
        index += 1
    return bytes(out)


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


def _bwrap_run_args(prefix: tuple[str, ...], workdir: str, env: dict[str, str], *, disk_bytes: int,
                    code_fd: int, seccomp_fd: int) -> list[str]:
    """Per run: the environment, the seccomp filter, and the only writable place — a tmpfs of
    ``disk_bytes`` at ``workdir`` (nothing on the host's disk) holding the program, bound
    read-only from ``code_fd``; the root (bwrap's own tmpfs) is then made read-only."""
    args = list(prefix)
    for key, value in env.items():
        args += ["--setenv", key, value]
    return [*args, "--seccomp", str(seccomp_fd), "--size", str(disk_bytes), "--perms", "0700", "--tmpfs", workdir,
            "--ro-bind-data", str(code_fd), f"{workdir}/main.py", "--chdir", workdir, "--remount-ro", "/"]


def _memfd(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding ``data``, positioned at its start (for bwrap to read)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


# Root caller, interpreter only root can reach (e.g. pyenv under /root): in a private mount
# namespace of our own (the host's mounts are untouched), bind each interpreter directory onto
# an empty world-reachable stage directory, then drop to the sandbox uid and start bwrap, which
# binds the stage back to the original path.
_STAGE_SCRIPT = 'while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 85; shift 2; done; shift; exec "$@"'


_STAGE_ROOTS: dict[int, str] = {}  # per process id: a forked worker makes its own


def _stage_root() -> str:
    stage = _STAGE_ROOTS.get(os.getpid())
    if stage is None:
        # named after its owner's pid: a caller killed before atexit leaves it to the next sweep
        stage = tempfile.mkdtemp(prefix=f"jzsandbox-stage-{_owner_tag()}-")
        os.chmod(stage, 0o755)
        atexit.register(shutil.rmtree, stage, True)
        _STAGE_ROOTS[os.getpid()] = stage
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


# Probe results: a ``bwrap`` launch is kept for the process's life; ``bwrap-root`` (a better
# mode failed, perhaps for a passing reason) is probed again after a minute; a failed probe is
# never kept.
_BWRAP_LAUNCHES: dict[str, tuple[_Launch, float]] = {}
_BWRAP_ROOT_RECHECK_S = 60.0


def _bwrap_launch(python: str) -> tuple[_Launch | None, str]:
    """The bubblewrap setup that works here, or None and why not (see ``_probe_bwrap_launch``)."""
    cached = _BWRAP_LAUNCHES.get(python)
    if cached is not None and (cached[0].isolation == "bwrap"
                               or time.monotonic() - cached[1] < _BWRAP_ROOT_RECHECK_S):
        return cached[0], ""
    launch, why = _probe_bwrap_launch(python)
    if launch is not None:
        _BWRAP_LAUNCHES[python] = (launch, time.monotonic())
    return launch, why


def _probe_bwrap_launch(python: str) -> tuple[_Launch | None, str]:
    """Probe by running the real wrapper under each candidate. A root caller first drops to
    the sandbox uid (so the code is unprivileged outside the namespaces too, and
    ``RLIMIT_NPROC`` applies: the kernel skips it for uid 0): directly, else through a staged
    interpreter; only then bwrap as root."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return None, "`bwrap` is not on PATH"
    try:
        seccomp_filter()
    except RuntimeError as exc:
        return None, str(exc)
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


def _keep_successes(probe: Callable[..., _T | None]) -> Callable[..., _T | None]:
    """Memoise a probe's results except None (a failure): the next call probes again."""
    kept: dict[tuple[object, ...], _T] = {}

    @functools.wraps(probe)
    def remembered(*args: object) -> _T | None:
        if args not in kept:
            result = probe(*args)
            if result is None:
                return None
            kept[args] = result
        return kept[args]

    remembered.cache_clear = kept.clear  # type: ignore[attr-defined]
    return remembered


@_keep_successes
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


@_keep_successes
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
        if launch is not None and (launch.isolation == "bwrap" or limits.allow_weak_isolation):
            return launch
        if launch is not None:
            raise SandboxUnavailable(
                "bubblewrap runs here only as root (isolation 'bwrap-root': the code's uid is root outside "
                "its namespaces and no process limit applies), which counts as weak isolation: give uid "
                f"{SANDBOX_UID} read access to the interpreter or install setpriv (util-linux), or set "
                "sandbox.allow_weak_isolation: true (SandboxLimits(allow_weak_isolation=True))")
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
    _sweep_stale_dirs()
    bwrap = launch.isolation in ("bwrap", "bwrap-root")
    ready_read, ready_write = os.pipe()
    host_dir: str | None = None
    fds: list[int] = []
    cgroup: str | None = None
    try:
        if bwrap:
            # only inside the sandbox (a tmpfs there): nothing to chown, nothing left on the host
            workdir = f"/tmp/jzsandbox-{secrets.token_hex(6)}"
            fds = [_memfd("jzsandbox-main.py", code.encode("utf-8")), _memfd("jzsandbox-seccomp", seccomp_filter())]
        else:
            workdir = host_dir = tempfile.mkdtemp(prefix=f"jzsandbox-{_owner_tag()}-")
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as handle:
                handle.write(code)
        script = f"{workdir}/main.py"
        payload = json.dumps({"rlimits": _rlimits(limits, launch.process_limit), "mount_ro": launch.mount_ro,
                              "parent_mount_ns": _mount_namespace() if launch.mount_ro else None,
                              "audit_hook": audit_hook, "ready_fd": ready_write,
                              "fresh_keyring": _keyctl_number() if bwrap else 0})
        env = _child_env(workdir)
        prefix = list(launch.prefix)
        drop = launch.popen_drop
        if bwrap:
            prefix = _bwrap_run_args(launch.prefix, workdir, env, disk_bytes=limits.max_disk_bytes,
                                     code_fd=fds[0], seccomp_fd=fds[1])
            cgroup = _new_run_cgroup(limits)
            if cgroup is not None:
                # bwrap starts inside the run's cgroup (as root: moving needs it), then drops
                setpriv = shutil.which("setpriv")
                if drop and setpriv:
                    prefix = [setpriv, f"--reuid={launch.owner_uid}", f"--regid={launch.owner_uid}",
                              "--clear-groups", "--", *prefix]
                    drop = False
                if drop:  # cannot join after the drop: per-process bound only
                    _remove_cgroup(cgroup)
                    cgroup = None
                else:
                    prefix = ["/bin/sh", "-c", _JOIN_CGROUP_SCRIPT, "join-cgroup", cgroup, *prefix]
        argv = [*prefix, python or sys.executable, "-I", "-B", "-c", _WRAPPER, workdir, payload, script]
        user = {"user": launch.owner_uid, "group": launch.owner_uid, "extra_groups": []} if drop else {}
        started = time.monotonic()
        # bwrap itself gets the scrubbed environment too (nothing to read from /proc/<pid>/environ)
        proc = subprocess.Popen(
            argv, cwd="/" if bwrap else workdir, env=env, start_new_session=True,
            pass_fds=(ready_write, *fds, *launch.pass_fds),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **user,  # type: ignore[arg-type]
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
        oom_kills = _cgroup_oom_kills(cgroup) if cgroup is not None else 0
        return SandboxResult(
            stdout=stdout, stderr=stderr, exit_code=exit_code, timed_out=outcome.timed_out,
            killed_by=_killed_by(exit_code, outcome, limits.cpu_seconds, oom_kills), truncated=outcome.truncated,
            wall_s=round(wall, 4), network_isolation=launch.network_isolation,
            filesystem_isolation=launch.filesystem_isolation, isolation=launch.isolation,
            cpu_s=round(outcome.cpu_s, 3), memory_bound="cgroup" if cgroup is not None else "per-process",
        )
    finally:
        for fd in (ready_read, ready_write, *fds):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if host_dir is not None:
            shutil.rmtree(host_dir, ignore_errors=True)
        if cgroup is not None:
            _remove_cgroup(cgroup)


@lru_cache(maxsize=1)
def _keyctl_number() -> int:
    import platform

    return _SYSCALLS[platform.machine()]["keyctl"]


_STALE_DIR = re.compile(r"jzsandbox-(?:stage-)?(\d+)-(\d+)-")
_SWEPT: set[int] = set()


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _owner_tag() -> str:
    """``<pid>-<pid namespace>``: a dir is swept only by a process that can see whether its
    owner is alive (a /tmp shared with another container holds pids of another namespace)."""
    return f"{os.getpid()}-{_pid_namespace()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_dirs() -> None:
    """Once per process: remove ``jzsandbox-<pid>-<pidns>-*`` temp dirs (weak modes' work dirs, stage
    dirs) and run cgroups whose owning process is gone (a caller killed by SIGKILL)."""
    if os.getpid() in _SWEPT:
        return
    _SWEPT.add(os.getpid())
    places = [tempfile.gettempdir()]
    base = _cgroup_base()
    if base is not None:
        places.append(base)
    for place in places:
        try:
            entries = list(os.scandir(place))
        except OSError:
            continue
        for entry in entries:
            match = _STALE_DIR.match(entry.name)
            if (not match or int(match.group(2)) != _pid_namespace() or _pid_alive(int(match.group(1)))
                    or not entry.is_dir(follow_symlinks=False)):
                continue
            if place == tempfile.gettempdir():
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)


# ---------------------------------------------------------------- cgroup v2 (the run's memory and pids)

_JOIN_CGROUP_SCRIPT = 'echo $$ > "$1/cgroup.procs" || exit 85; shift; exec "$@"'


def _cgroup_base() -> str | None:
    """This process's cgroup v2 directory when per-run children can get memory and pids limits
    there (cgroup v2 mounted, both controllers enabled for children, writable), else None."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            own = next((line[3:].strip() for line in handle if line.startswith("0::")), None)
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return None
    point = next((f[4] for f in mounts if "-" in f and f[f.index("-") + 1] == "cgroup2"), None)
    if own is None or point is None:
        return None
    base = os.path.join(point, own.lstrip("/"))
    try:
        with open(os.path.join(base, "cgroup.subtree_control"), encoding="utf-8") as handle:
            enabled = set(handle.read().split())
    except OSError:
        return None
    if not {"memory", "pids"} <= enabled or not os.access(base, os.W_OK):
        return None
    return base if base in _CGROUP_JOIN_WORKS or _cgroup_join_works(base) else None


_CGROUP_JOIN_WORKS: set[str] = set()  # successes only: a failed probe is tried again next run


def _cgroup_join_works(base: str) -> bool:
    """Whether a child cgroup can be made here and a process started by us can move into it
    (the same shell step a run uses), checked once by doing it."""
    path = os.path.join(base, f"jzsandbox-{_owner_tag()}-probe-{secrets.token_hex(4)}")
    try:
        os.mkdir(path)
    except OSError:
        return False
    try:
        out = subprocess.run(["/bin/sh", "-c", _JOIN_CGROUP_SCRIPT, "join-cgroup", path, "cat", "/proc/self/cgroup"],
                             capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        joined = out.returncode == 0 and any(
            line.startswith("0::") and line.rstrip().endswith("/" + os.path.basename(path))
            for line in out.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        joined = False
    finally:
        _remove_cgroup(path)
    if joined:
        _CGROUP_JOIN_WORKS.add(base)
    return joined


def _new_run_cgroup(limits: SandboxLimits) -> str | None:
    """A fresh cgroup for one run: ``memory.max`` = ``memory_bytes`` (tmpfs files count too), no
    swap, ``pids.max`` = ``max_processes`` (+1 for bwrap's monitor); None where not possible."""
    base = _cgroup_base()
    if base is None:
        return None
    path = os.path.join(base, f"jzsandbox-{_owner_tag()}-{secrets.token_hex(6)}")
    try:
        os.mkdir(path)
        settings = [("memory.max", limits.memory_bytes), ("pids.max", limits.max_processes + 1)]
        if os.path.exists(os.path.join(path, "memory.swap.max")):
            settings.append(("memory.swap.max", 0))
        for name, value in settings:
            with open(os.path.join(path, name), "w", encoding="utf-8") as handle:
                handle.write(str(value))
    except OSError:
        _remove_cgroup(path)
        return None
    return path


def _cgroup_oom_kills(path: str) -> int:
    """``oom_kill`` from the run's ``memory.events`` (the kernel writes it; the code cannot)."""
    try:
        with open(os.path.join(path, "memory.events"), encoding="utf-8") as handle:
            events = dict(line.split() for line in handle if line.strip())
        return int(events.get("oom_kill", 0))
    except (OSError, ValueError):
        return 0


def _remove_cgroup(path: str) -> None:
    # the run's processes are gone (PID namespace init exited); give the kernel a moment
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.kill"), "w") as handle:
                handle.write("1")
            time.sleep(0.02)


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


def _killed_by(code: int | None, outcome: _Outcome, cpu_limit: int, oom_kills: int = 0) -> str | None:
    """Decided from what the code cannot write: the parent's own timer and output count, the
    ready pipe (closed before the code runs), the kernel's exit status (exit statuses 128-255
    are refused by the seccomp filter, so bwrap's 128+N is a real signal), the CPU time wait4
    reports, and the cgroup's ``oom_kill`` count. Never from the code's output."""
    if outcome.timed_out:
        return "timeout"
    if outcome.truncated:
        return "output_limit"
    if not outcome.ready:
        return "sandbox_setup"  # the wrapper never got to the code (bwrap or the wrapper failed)
    if oom_kills:
        return "memory"
    # CPU: the wrapper's SIGXCPU handler exits 87, a program that replaced the handler dies of
    # SIGKILL at the hard limit; either counts only with the CPU time spent (wait4: the code is
    # PID 1 of its namespace, so bwrap reaps it and the time reaches us). rusage is sampled at
    # ticks and reads up to ~10% below the exact runtime the rlimit uses: hence the margin.
    if code in (CPU_EXIT_CODE, -signal.SIGKILL, -signal.SIGXCPU) and outcome.cpu_s >= cpu_limit * 0.75:
        return "cpu"
    # The wrapper's exit for a MemoryError that reached the top (RLIMIT_AS). The code could
    # raise one itself: it can only make its own run look failed, never passed.
    if code == MEMORY_EXIT_CODE:
        return "memory"
    if code is not None and code < 0:
        sig = -code
        try:
            return f"signal:{signal.Signals(sig).name}"
        except ValueError:
            return f"signal:{sig}"
    return None
