"""The job side of the fork-server sandbox: the zygote's loop and each job's process.

Kept apart from `_sandbox_worker` (which needs ctypes, selectors, ...) and stdlib-only so
that the zygote, a fresh interpreter that runs this file's text, stays small: every job is
a fork of it, and a fork costs in proportion to what its parent has mapped and what the
child then touches (measured: a zygote running the whole worker module made each job
~0.5 ms dearer). Also home of the wire format both sides of every socket speak.
"""

from __future__ import annotations

import builtins
import gc
import json
import os
import resource
import signal
import socket
import struct
import sys

COMPILE_CACHE_MAX = 64 * 1024  # larger program texts are compiled by their own child
COMPILE_CACHE_SIZE = 16  # distinct program texts kept per zygote (oldest dropped first)
SHARED_CACHE_BYTES = 4 << 20  # source bytes of jobs' shared_code kept compiled per zygote
SHARED_ITEM_MAX = 256 << 10  # a longer shared text is compiled for its job only
MAX_FD = 1 << 16
WALL = 0x40000000  # waitpid's __WALL: children whatever their exit signal
NAMESPACE = "namespace"  # the wire's mode for a Job.namespaces entry among the shared code
AST_ONLY = 0x400  # compile()'s PyCF_ONLY_AST flag: parse without the `ast` module


# Imported once by the process jobs fork from (the zygote, or a plain-fork worker): what the
# benchmark's setup code and the solutions use (measured on the 1487 benchmark completions:
# typing, collections, heapq, math, bisect, functools, itertools, re, string, datetime) plus
# what every job's own start-up needs. Each extra module makes every fork dearer (page
# tables, copy-on-write), so rarely used ones (inspect, unittest, subprocess, decimal, ...)
# are left to the jobs that import them; trimming the list from 36 modules to these sped
# grading up ~5%. Not `threading` either, though every job's exit looks for it: once
# imported, each fork runs its at-fork hook in the child (measured: 0.4-0.5 ms per fork,
# ~7% of a typical grading run), and few programs start threads.
PREIMPORT = (
    "typing",
    "functools",
    "collections",
    "itertools",
    "heapq",
    "bisect",
    "string",
    "operator",
    "math",
    "datetime",
    "random",
    "re",
    "copy",
    "json",
    "traceback",
    "io",
    "atexit",
    "types",
)
# typing caches each subscription it has built (a miss makes new alias objects, ~40 us):
# the ones the benchmark's solutions write most (counted over its 1487 completions) are
# built once here instead of in every job
WARM_TYPING = ("List[List[int]]", "List[List[str]]", "List[float]", "List[bool]", "Optional[int]")


class CompileCache:
    """Program text -> code object, compiled once and inherited by every fork.

    Graders send the same harness text for every job (their arguments come on stdin), so
    after the first job no child compiles it again. Texts over COMPILE_CACHE_MAX bytes, or
    that fail to compile, give None: the child compiles them itself and a syntax error
    surfaces there as a traceback, exactly as without the cache. Compiled with
    dont_inherit, like a fresh interpreter: this module's own `from __future__` imports
    must not reach the program.
    """

    def __init__(self) -> None:
        self._code: dict[bytes, object] = {}

    def get(self, text: bytes):
        if len(text) > COMPILE_CACHE_MAX:
            return None
        hit = self._code.get(text)
        if hit is None:
            try:
                hit = compile(
                    text.decode("utf-8", "surrogateescape"), "<program>", "exec", dont_inherit=True
                )
            except Exception:  # noqa: BLE001 - reported by the child's own compile
                return None
            if len(self._code) >= COMPILE_CACHE_SIZE:
                self._code.pop(next(iter(self._code)))
            self._code[text] = hit
        return hit


def import_namespace(text: str, modname: str) -> dict | None:
    """The module namespace that running `text` in a fresh module `modname` leaves, or None
    when `text` is not only absolute imports of modules this process has already imported.

    Invariant: no module code runs. Every `import a.b` names a module in sys.modules, and
    every name of a `from m import ...` (a star: the names in m.__all__) is already an
    attribute of m, so the import system only looks names up (it imports a submodule
    only for a from-name that is not yet an attribute); `__future__` imports are refused
    (they would change how the rest of the program compiles).
    """
    try:
        tree = compile(text, "<setup>", "exec", AST_ONLY, dont_inherit=True)
        for st in tree.body:
            kind = type(st).__name__
            if kind == "Import" and all(a.name in sys.modules for a in st.names):
                continue
            if kind != "ImportFrom" or st.level or st.module in (None, "__future__"):
                return None
            mod = sys.modules.get(st.module)
            names = [a.name for a in st.names]
            if names == ["*"]:
                names = list(getattr(mod, "__all__", ()))
            if mod is None or not all(type(n) is str and hasattr(mod, n) for n in names):
                return None
        ns = {"__name__": modname, "__builtins__": builtins}
        known = len(sys.modules)
        exec(compile(text, "<setup>", "exec", dont_inherit=True), ns)
    except Exception:  # noqa: BLE001 - the program then runs the text itself
        return None
    return ns if len(sys.modules) == known else None


class SharedCodeCache:
    """A job's `shared_code` and `namespaces`, made once and kept across jobs:
    (source, filename, mode) -> code object, and (source, module name) -> namespace dict
    (the wire sends a namespace as a shared-code entry with mode NAMESPACE).

    Bounded by the total bytes of source kept (SHARED_CACHE_BYTES, least recently used
    dropped first; a source over SHARED_ITEM_MAX is never kept) because every fork copies
    the page tables of what the cache holds. A text that fails to compile (or a namespace
    `import_namespace` refuses) is left out: the program's own `compile` (or run of the
    text) then does exactly what it would have.
    """

    def __init__(self) -> None:
        self._made: dict[tuple[bytes, str, str], tuple[str, object]] = {}
        self._bytes = 0

    @staticmethod
    def _make(text: str, name: str, mode: str):
        if mode == NAMESPACE:
            return import_namespace(text, name)
        try:
            return compile(text, name, mode, dont_inherit=True)
        except Exception:  # noqa: BLE001 - the program's own compile reports it
            return None

    def lookup(self, names: list, sources: list[bytes]) -> tuple[dict, dict]:
        """({(source str, filename, mode): code}, {(source str, module name): namespace})."""
        code, spaces = {}, {}
        for (name, mode), src in zip(names, sources, strict=True):
            key = (src, str(name), str(mode))
            hit = self._made.pop(key, None)
            if hit is None:
                text = src.decode("utf-8", "surrogateescape")
                hit = (text, self._make(text, key[1], key[2]))
                if len(src) <= SHARED_ITEM_MAX:
                    self._bytes += len(src)
                    while self._bytes > SHARED_CACHE_BYTES and self._made:
                        old = next(iter(self._made))
                        self._bytes -= len(old[0])
                        del self._made[old]
            if len(src) <= SHARED_ITEM_MAX:
                self._made[key] = hit  # (re)inserted last: most recently used
            if hit[1] is None:
                continue
            if key[2] == NAMESPACE:
                spaces[(hit[0], key[1])] = hit[1]
            else:
                code[(hit[0], key[1], key[2])] = hit[1]
        return code, spaces


# ----------------------------------------------------------------------------- wire format
# A frame is: 8-byte big-endian payload length, then the payload. A payload is: 4-byte
# header length, a JSON header (which carries `sizes`, the byte length of each blob),
# then the blobs back to back. No pickle: the trainer never unpickles worker output.


def pack(header: dict, blobs: list[bytes]) -> bytes:
    """Encode one frame; `unpack(pack(h, b)[8:])` returns `(h | {"sizes": ...}, b)`."""
    head = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    payload = b"".join([struct.pack(">I", len(head)), head, *blobs])
    return struct.pack(">Q", len(payload)) + payload


def unpack(payload: bytes) -> tuple[dict, list[bytes]]:
    """Decode a payload (a frame without its 8-byte length)."""
    (hlen,) = struct.unpack(">I", payload[:4])
    header = json.loads(payload[4 : 4 + hlen])
    blobs, at = [], 4 + hlen
    for n in header["sizes"]:
        blobs.append(payload[at : at + n])
        at += n
    if at != len(payload):
        raise ValueError(f"sandbox frame: {len(payload) - at} trailing bytes")
    return header, blobs


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Read exactly n bytes, or None on a clean EOF before the first byte."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if buf:
                raise EOFError("sandbox frame cut short")
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[dict, list[bytes]] | None:
    head = recv_exact(sock, 8)
    if head is None:
        return None
    (n,) = struct.unpack(">Q", head)
    body = recv_exact(sock, n)
    if body is None:
        raise EOFError("sandbox frame cut short")
    return unpack(body)


# ----------------------------------------------------------------------------- the zygote
def zygote_main(sock: socket.socket, cfg: dict) -> None:
    """PID 1 of the job namespaces, after exec: run jobs one at a time. Never returns.

    Invariant kept between jobs: when a job's report is sent, no process other than this
    one exists in the namespace (the job's process was waited for, then every other
    process was SIGKILLed and reaped until kill(-1) found none), so a job can leave
    nothing running for the next, and the namespace's last PID is rewound to 1, so the
    next job's PIDs say nothing about what the one before it did. This process stays root,
    so jobs (another uid, and seccomp forbids ptrace and process_vm_*) can neither signal
    nor inspect it. It never reads a job's stdin: that goes from the worker to the job in
    a memfd.
    """
    try:
        occupy_low_fds()
        # rewound after every job, so each job is PID 2 whatever the one before it spawned
        # (opened before exec: the /proc that jobs see has no /proc/sys)
        last_pid = cfg["last_pid_fd"]
        if not os.pread(last_pid, 32, 0).strip().isdigit():
            raise OSError(f"fd {last_pid} is not this namespace's ns_last_pid")
        preimport()
        gc.freeze()
        sock.sendall(pack({"ready": True}, []))
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(2, f"vgrout sandbox: zygote start failed: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(125)
    uid, cgroup_fd = cfg["uid"], cfg.get("cgroup_fd")
    cache, shared = CompileCache(), SharedCodeCache()
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(sock, 1, 4)
            msg = recv_frame(sock) if len(fds) == 4 else None
        except (OSError, EOFError, ValueError):
            msg = None
        if msg is None:  # the worker is gone (or spoke nonsense): so is this namespace
            os._exit(0)
        head, (code, *sources) = msg
        program = cache.get(code)
        compiled, namespaces = shared.lookup(head["shared"], sources)
        gc.freeze()  # all it holds goes to the permanent generation: jobs never collect it
        try:
            pid = os.fork()
        except OSError as e:
            pid, rep = -1, {"error": f"fork failed: {e}"}
        if pid == 0:
            lim, where = head["limits"], head["dir"]
            job_main(lim, program or code, compiled, namespaces, fds, where, uid, cgroup_fd)
        for fd in fds:
            os.close(fd)
        if pid > 0:
            _, wstatus, ru = os.wait4(pid, 0)
            _reap_namespace()
            os.pwrite(last_pid, b"1", 0)
            rep = {"rc": os.waitstatus_to_exitcode(wstatus), "cpu": ru.ru_utime + ru.ru_stime}
        try:
            sock.sendall(pack(rep, []))
        except OSError:
            os._exit(0)


def preimport() -> None:
    """Import PREIMPORT (and warm typing's cache) once, in the process that jobs fork from."""
    for name in PREIMPORT:
        try:
            __import__(name)
        except ImportError:
            pass
    typing = sys.modules.get("typing")
    for expr in WARM_TYPING if typing else ():
        eval(expr, dict(vars(typing)))


def occupy_low_fds() -> None:
    """Keep fds 0-3 open (on /dev/null where free) so every fd made later lands at 4 or above."""
    while True:
        fd = os.open(os.devnull, os.O_RDWR)
        if fd >= 3:
            if fd > 3:
                os.close(fd)
            return


def _reap_namespace() -> None:
    """As PID 1 of a PID namespace: SIGKILL every other process in it and reap them all.

    kill(-1) from a namespace's init reaches every other process of the namespace; a
    process cannot finish forking once SIGKILL is pending, and orphans are reparented to
    this process, so when kill(-1) finds nobody and no child is left, the namespace holds
    only this process.
    """
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return
        while True:
            try:
                os.waitpid(-1, WALL)
            except ChildProcessError:
                break


# ----------------------------------------------------------------------------- the job
def job_main(
    lim: dict,
    code,
    compiled: dict,
    namespaces: dict,
    fds: list[int],
    workdir: str,
    uid: int | None,
    cgroup_fd: int | None = None,
    harden=None,
    root: str | None = None,
) -> None:
    """The job's process: memory cgroup, root, scratch, fds, session, limits, uid; then the
    program. Never returns.

    `cgroup_fd`: the `cgroup.procs` of the job's memory cgroup, joined first (while this
    process is still root), so everything the job does is charged there. `root`: the
    directory to chroot into (a plain fork of the worker; a zygote has pivoted into it
    already), before `workdir` is entered. Under a zygote, no_new_privs and seccomp are
    inherited from it (and the zygote's death takes its whole PID namespace along); a
    plain fork of the worker passes `harden`, which sets them and the parent-death signal
    up last.
    """
    try:
        if cgroup_fd is not None:
            os.write(cgroup_fd, b"0")
        if root is not None:
            os.chroot(root)
        os.chdir(workdir)
        for i, fd in enumerate(fds):  # stdin, stdout, stderr, report -> 0..3 (all are >= 4)
            os.dup2(fd, i)
        os.closerange(4, MAX_FD)
        os.setsid()
        mb = 1 << 20
        R = resource
        R.setrlimit(R.RLIMIT_AS, (int(lim["mem_mb"]) * mb,) * 2)
        R.setrlimit(R.RLIMIT_CPU, (int(lim["cpu_s"]), int(lim["cpu_s"]) + 1))
        R.setrlimit(R.RLIMIT_FSIZE, (int(lim["fsize_mb"]) * mb,) * 2)
        R.setrlimit(R.RLIMIT_NOFILE, (int(lim["nofile"]),) * 2)
        R.setrlimit(R.RLIMIT_NPROC, (int(lim["nproc"]),) * 2)
        R.setrlimit(R.RLIMIT_CORE, (0, 0))
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        if harden is not None:
            harden()
    except BaseException as e:  # noqa: BLE001 - tell the worker and leave
        try:
            os.write(2, f"sandbox setup failed: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(125)
    _exec_program(code, compiled, namespaces)


def _exec_program(code, compiled: dict, namespaces: dict) -> None:
    """Run `code` (source bytes or a code object) as __main__ in a fresh module, with the
    job's precompiled shared code as `__vgrout_compiled__` and its ready namespaces as
    `__vgrout_namespaces__`, then exit like a fresh interpreter would."""
    import atexit
    import io
    import traceback
    import types

    exit_ = os._exit
    atexit._clear()
    sys.argv = ["-c"]
    sys.stdin = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8"
    )
    out = sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8"
    )
    err = sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, out, err
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    main.__dict__["__vgrout_compiled__"] = compiled
    main.__dict__["__vgrout_namespaces__"] = namespaces
    sys.modules["__main__"] = main
    rc = 0
    try:
        if isinstance(code, bytes):
            # dont_inherit: this module's `from __future__ import annotations` must not leak
            # into the program (lazy annotations would hide NameErrors a plain run raises)
            code = compile(
                code.decode("utf-8", "surrogateescape"), "<program>", "exec", dont_inherit=True
            )
        exec(code, main.__dict__)
    except SystemExit as e:
        rc = _exit_code(e)
    except BaseException:  # noqa: BLE001 - a crashing program exits 1 with its traceback
        traceback.print_exc()
        rc = 1
    try:
        th = sys.modules.get("threading")
        if th is not None:
            th._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as e:
        rc = _exit_code(e)
    except BaseException:  # noqa: BLE001
        pass
    for s in (out, err):
        try:
            s.flush()
        except BaseException:  # noqa: BLE001 - a closed or broken stream
            pass
    exit_(rc)


def _exit_code(e: SystemExit) -> int:
    c = e.code
    if c is None:
        return 0
    if isinstance(c, int):
        return c & 0xFF
    try:
        print(c, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass
    return 1
