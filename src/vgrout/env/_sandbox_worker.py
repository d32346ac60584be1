"""Fork-server worker of the sandbox (the trainer side is `_sandbox_pool`).

Run as `python -I -S _sandbox_worker.py SOCK_FD` (its settings come in the first frame,
not on the command line, so no job can read them from /proc): a long-lived, stdlib-only
interpreter that enters its own network / mount namespaces once (a read-only view of the
filesystem with homes, the repo and the data hidden) and then serves jobs one at a time.

Jobs run under a *zygote* (`_sandbox_zygote`): PID 1 of its own PID / mount / IPC / UTS
namespaces, with no_new_privs and the seccomp deny-list loaded once, a fresh and small
interpreter. Per job the zygote forks one child, which drops to the worker's
unprivileged uid (in a fresh scratch directory, with rlimits) and runs the program; when
that child exits, the zygote SIGKILLs every other process in its namespace and reaps it
before it reports, so nothing a job started survives into the next one. Jobs never
overlap, cannot signal or trace the root zygote, cannot create SysV or POSIX IPC objects
(denied by seccomp) and see only their own scratch directory, so nothing one job leaves
behind is there for the next. A job that runs out of time or output is ended by killing
the zygote itself, which takes the whole namespace with it; the next job gets a new one.

Where a mechanism is unavailable (not root, no namespaces) it degrades to one plain fork
of the worker per job and reports the level it actually reached in its hello message;
the trainer logs it once.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import selectors
import shutil
import signal
import socket
import stat
import sys
import time

try:
    from . import _sandbox_zygote as zy
except ImportError:  # run as a script (-I leaves its folder off sys.path): load the sibling
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "_sandbox_zygote",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_zygote.py"),
    )
    zy = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(zy)

# the wire format (both ends of every socket) and the job side live in `_sandbox_zygote`
pack, unpack, recv_exact, recv_frame = zy.pack, zy.unpack, zy.recv_exact, zy.recv_frame
COMPILE_CACHE_MAX, NAMESPACE = zy.COMPILE_CACHE_MAX, zy.NAMESPACE

# ----------------------------------------------------------------------------- libc bits
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUSER = 0x20000000, 0x40000000, 0x10000000
CLONE_NEWCGROUP = 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_BIND, MS_REC = 32, 1024, 4096, 16384
MS_PRIVATE, MS_SHARED = 1 << 18, 1 << 20
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 1, 2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 22, 38
SECCOMP_MODE_FILTER = 2
_SYS = {
    "x86_64": {"clone": 56, "mount_setattr": 442},
    "aarch64": {"clone": 220, "mount_setattr": 442},
}

_libc = ctypes.CDLL(None, use_errno=True)
# A PyDLL keeps the GIL across the call: required around a raw clone(2).
_libc_gil = ctypes.PyDLL(None, use_errno=True)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def mount(
    src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    rc = _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(rc, f"mount {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(MNT_DETACH)), f"umount {target}")


def prctl(option: int, arg: int | ctypes._Pointer = 0) -> None:  # type: ignore[name-defined]
    a = arg if not isinstance(arg, int) else ctypes.c_ulong(arg)
    _check(
        _libc.prctl(
            ctypes.c_int(option), a, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
        ),
        "prctl",
    )


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def make_tree_readonly(root: str = "/") -> None:
    """Mark every mount under `root` read-only and nosuid (this mount namespace only)."""
    nr = _SYS.get(platform.machine(), {}).get("mount_setattr")
    if nr is not None:
        attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
        rc = _libc.syscall(
            ctypes.c_long(nr),
            ctypes.c_int(AT_FDCWD),
            root.encode(),
            ctypes.c_uint(AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if rc == 0:
            return
    # Older kernels: remount each mount point read-only, one by one (bind remount keeps it
    # per-mount, so the host's mounts are untouched).
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4].encode().decode("unicode_escape") for line in fh]
    for p in sorted(set(points), key=len):
        if p == root or p.startswith(root.rstrip("/") + "/"):
            try:
                mount(None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
            except OSError:
                pass


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def build_seccomp_bpf(seccomp_dir: str) -> bytes:
    """Compile the deny-list with libseccomp (via pyseccomp) and return raw BPF bytes."""
    if seccomp_dir and seccomp_dir not in sys.path:
        sys.path.append(seccomp_dir)
    import errno

    import pyseccomp as sc

    deny = errno.EPERM
    f = sc.SyscallFilter(sc.ALLOW)
    for name in (
        "ptrace",
        "mount",
        "umount2",
        "unshare",
        "setns",
        "pivot_root",
        "chroot",
        "keyctl",
        "add_key",
        "request_key",
        "bpf",
        "perf_event_open",
        "process_vm_readv",
        "process_vm_writev",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "open_by_handle_at",
        "name_to_handle_at",
        "userfaultfd",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "reboot",
        "swapon",
        "swapoff",
        "acct",
        "quotactl",
        "settimeofday",
        "clock_settime",
        "adjtimex",
        "clock_adjtime",
        "syslog",
        "fsopen",
        "fsmount",
        "fsconfig",
        "move_mount",
        "open_tree",
        "mount_setattr",
        "lookup_dcookie",
        "vhangup",
        "personality",
        "kcmp",
        "pidfd_getfd",
        # IPC objects outlive the process that made them: jobs share one IPC namespace
        # per zygote, so none may create (or attach to) any
        "shmget",
        "shmat",
        "shmctl",
        "msgget",
        "msgsnd",
        "msgrcv",
        "msgctl",
        "semget",
        "semop",
        "semtimedop",
        "semctl",
        "mq_open",
        "mq_unlink",
        "mq_timedsend",
        "mq_timedreceive",
        "mq_notify",
        "mq_getsetattr",
    ):
        try:
            f.add_rule(sc.ERRNO(deny), name)
        except Exception:  # noqa: BLE001 - a syscall this kernel/arch lacks
            pass
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    for flag in (
        CLONE_NEWNS,
        CLONE_NEWUTS,
        CLONE_NEWIPC,
        CLONE_NEWPID,
        CLONE_NEWNET,
        CLONE_NEWUSER,
        CLONE_NEWCGROUP,
    ):
        f.add_rule(sc.ERRNO(deny), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # glibc then falls back to clone(2)
    f.add_rule(sc.ERRNO(deny), "prctl", sc.Arg(0, sc.EQ, PR_SET_PDEATHSIG))
    f.add_rule(sc.ERRNO(deny), "ioctl", sc.Arg(1, sc.EQ, 0x5412))  # TIOCSTI
    fd = os.memfd_create("vgrout-bpf")
    with os.fdopen(fd, "w+b") as fh:
        f.export_bpf(fh)
        fh.flush()
        fh.seek(0)
        return fh.read()


def load_bpf(bpf: bytes) -> None:
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(
        _libc.prctl(
            ctypes.c_int(PR_SET_SECCOMP),
            ctypes.c_ulong(SECCOMP_MODE_FILTER),
            ctypes.byref(prog),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        ),
        "seccomp",
    )


def clone_process(flags: int) -> int:
    """fork(2) with namespace flags: one raw clone, framed by Python's own fork hooks."""
    nr = _SYS.get(platform.machine(), {}).get("clone")
    if nr is None:
        raise OSError(38, "raw clone unsupported on this architecture")
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = _libc_gil.syscall(
        ctypes.c_long(nr),
        ctypes.c_ulong(flags | signal.SIGCHLD),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_ulong(0),
    )
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


# ----------------------------------------------------------------------------- the worker
SCRATCH = "/tmp/.vgrout-scratch"  # the worker's scratch tmpfs; each job gets a directory in it
JOB_NS = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
STRAGGLER_S = 0.2  # without a PID namespace: how long a job's pipes may outlive the job


def _error(why: str) -> tuple[dict, list[bytes]]:
    head = {"status": "sandbox_error", "returncode": None, "wall_s": 0.0, "files": []}
    return head, [b"", f"sandbox: {why}".encode(), b""]


class Zygote:
    """PID 1 of one set of job namespaces, running a worker's jobs one at a time.

    Started by `Worker`: a clone into fresh PID / mount / IPC / UTS namespaces mounts its
    /proc, sets its parent-death signal and no_new_privs, loads the seccomp deny-list and
    then execs a *fresh* interpreter (`ZYGOTE_BOOT`), which receives the source of
    `_sandbox_zygote` and runs its `zygote_main`. The exec matters: a fork of the worker
    would carry the worker's heap, where freed remains of earlier jobs' stdin (a plain
    grader's expected values, say) can linger, into every job forked later; a fresh
    interpreter has only ever seen program texts and limits.

    Per job the worker sends the child's four fds (stdin memfd, stdout, stderr and report
    pipes) with one byte, then a frame with the limits, the scratch directory, the program
    text and its shared code; the zygote answers with one frame `{"rc", "cpu"}` once the
    job's process and everything it started are gone.
    """

    def __init__(self, w: Worker):
        ours, theirs = socket.socketpair()
        try:
            pid = clone_process(JOB_NS)
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            ours.close()
            _exec_zygote(w, theirs.fileno())  # never returns
        theirs.close()
        self.pid, self.sock = pid, ours
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            ours.close()
            raise
        ours.settimeout(30.0)
        try:
            ours.sendall(pack({"uid": w.uid if w.level["uid_switch"] else None}, [w.source]))
            hello = recv_frame(ours)
        except (OSError, EOFError, ValueError) as e:
            hello = None
            why = repr(e)
        else:
            why = "it exited during set-up"
        if hello is None or not hello[0].get("ready"):
            self.kill()
            raise OSError(f"job namespaces could not be set up ({why}; see the worker's stderr)")

    def start(self, lim: dict, code: bytes, fds: list[int], workdir: str, shared) -> None:
        socket.send_fds(self.sock, [b"J"], fds)
        names, sources = shared
        self.sock.sendall(pack({"limits": lim, "dir": workdir, "shared": names}, [code, *sources]))

    def report(self) -> dict | None:
        """The finished job's {"rc", "cpu"}, or None if the zygote is gone."""
        try:
            msg = recv_frame(self.sock)
        except (OSError, EOFError, ValueError):
            return None
        return None if msg is None else msg[0]

    def kill(self) -> None:
        """End the zygote and, with it, every process in its namespace (waits for all)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.sock.close()
        os.close(self.pidfd)


class Worker:
    """State of one fork-server: its isolation level, seccomp program and job zygote."""

    def __init__(
        self, uid: int, seccomp_dir: str, masks: list[str], keeps: list[str], zygote: bool = True
    ):
        self.uid = uid
        self.level: dict[str, bool] = dict.fromkeys(
            ("netns", "mountns", "pidns", "ipcns", "uid_switch", "no_new_privs", "seccomp"), False
        )
        self.notes: list[str] = []
        self.bpf = b""
        self.cache = zy.CompileCache()  # these two are used without a zygote; a zygote
        self.shared = zy.SharedCodeCache()  # keeps its own
        # read before the view hides the repo: the zygote execs the real interpreter and is
        # handed the job side's source
        self.python = os.path.realpath(sys.executable)
        with open(zy.__file__, "rb") as fh:
            self.source = fh.read()
        self.zygote: Zygote | None = None
        self.scratch_ready = False  # SCRATCH mounted (the shared parent of the job tmpfs)
        self.jobs = 0
        root = os.geteuid() == 0
        try:
            self.bpf = build_seccomp_bpf(seccomp_dir)
        except Exception as e:  # noqa: BLE001 - report and go on without it
            self.notes.append(f"seccomp unavailable ({type(e).__name__}: {e})")
        if root:
            try:
                unshare(CLONE_NEWNET)
                self.level["netns"] = True
            except OSError as e:
                self.notes.append(f"netns unavailable ({e})")
            try:
                unshare(CLONE_NEWNS)
                self._build_view(masks, keeps)
                self.level["mountns"] = True
            except OSError as e:
                self.notes.append(f"mountns unavailable ({e})")
            self.level["uid_switch"] = True
        else:
            self.notes.append("not root: no namespaces, no uid switch (RLIMIT_NPROC per real uid)")
        self.level["no_new_privs"] = True
        self.level["seccomp"] = bool(self.bpf)
        self.use_zygote = self.level["mountns"] and zygote
        if self.level["mountns"] and not zygote:
            self.notes.append("job namespaces off (VGROUT_SANDBOX_ZYGOTE=0): plain fork per job")
        probe = self.run(
            {"limits": _PROBE_LIMITS, "read_files": []}, b"import os\nos.write(3,b'ok')", b""
        )
        if self.use_zygote and (probe[0]["status"] != "exited" or probe[1][2] != b"ok"):
            self.notes.append(f"job namespaces failed ({probe[1][1][-300:]!r}); plain fork per job")
            self._stop_zygote()
            self.use_zygote = False
        self.level["pidns"] = self.level["ipcns"] = self.use_zygote
        if not self.use_zygote:
            zy.preimport()  # jobs fork from this process itself

    def _build_view(self, masks: list[str], keeps: list[str]) -> None:
        """Read-only view of the filesystem with sensitive trees hidden; runs once per worker.

        Everything is read-only; `masks` (home, repo, data, temp dirs) are covered by empty
        tmpfs; `keeps` (the interpreter's install) are bound back where a mask hid them.
        """
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        os.makedirs(SCRATCH, mode=0o755)
        stash = []
        for i, k in enumerate(keeps):
            s = f"/tmp/.keep{i}"
            os.mkdir(s)
            mount(k, s, None, MS_BIND | MS_REC)
            stash.append((s, k))
        for m in masks:
            if os.path.isdir(m) and os.path.realpath(m) != "/tmp":
                mount("tmpfs", m, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for s, k in stash:
            if any(k == m or k.startswith(m.rstrip("/") + "/") for m in masks):
                os.makedirs(k, mode=0o755, exist_ok=True)
                mount(s, k, None, MS_BIND | MS_REC)
            umount(s)
        make_tree_readonly("/")

    # -- one job ------------------------------------------------------------------------
    def run(
        self, header: dict, code: bytes, stdin: bytes, sources: list[bytes] = ()
    ) -> tuple[dict, list[bytes]]:
        lim = header["limits"]
        shared = (header.get("shared", []), list(sources))
        t0 = time.monotonic()
        try:
            workdir = self._job_dir(lim)
        except OSError as e:
            return _error(f"no scratch directory: {e}")
        pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, report
        stdin_fd = os.memfd_create("stdin")
        view = memoryview(stdin)
        while view:
            view = view[os.write(stdin_fd, view) :]
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        theirs = [stdin_fd, *(w for _, w in pipes)]
        ours = [r for r, _ in pipes]
        try:
            if self.use_zygote:
                ended = self._run_in_zygote(lim, code, theirs, ours, workdir, t0, shared)
            else:
                ended = self._run_forked(lim, code, theirs, ours, workdir, t0, shared)
        finally:
            for fd in theirs + ours:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if isinstance(ended, str):
            self._drop_job_dir(workdir)
            return _error(ended)
        bufs, timed_out, over, rc, cpu = ended
        # every process of the job is gone: its scratch can be read and removed safely
        files = _read_files(workdir, header["read_files"], lim["output_bytes"])
        self._drop_job_dir(workdir)
        if self.level["netns"] and self._stray_unix_sockets():
            # the next jobs get a new, empty network namespace (and so a new zygote)
            self._stop_zygote()
            unshare(CLONE_NEWNET)
        err = bytes(bufs[1])
        if timed_out:
            status = "timeout"
        elif over:
            status = "output_limit"
        elif rc is not None and rc < 0:
            # the CPU limit's soft SIGXCPU, or its hard SIGKILL when the program ignores
            # SIGXCPU: recognise the latter by the CPU time spent
            cpu_out = -rc == signal.SIGXCPU or (
                -rc == signal.SIGKILL and cpu >= float(lim["cpu_s"])
            )
            status = "timeout" if cpu_out else "signaled"
        elif b"MemoryError" in err[-2000:]:
            status = "memory"
        else:
            status = "exited"
        names = list(files)
        head = {"status": status, "returncode": rc, "wall_s": time.monotonic() - t0, "files": names}
        return head, [bytes(bufs[0]), err, bytes(bufs[2]), *(files[n] for n in names)]

    def _run_in_zygote(self, lim, code, theirs, ours, workdir, t0, shared):
        """One job under the zygote: (bufs, timed_out, over, rc, cpu), or an error string."""
        for attempt in (1, 2):  # a zygote that died between jobs is replaced once
            try:
                if self.zygote is None:
                    self.zygote = Zygote(self)
                z = self.zygote
                z.start(lim, code, theirs, workdir, shared)
                break
            except OSError as e:
                self._stop_zygote()
                if attempt == 2:
                    return f"job namespaces: {e}"
        for fd in theirs:
            os.close(fd)
        theirs.clear()
        bufs, timed_out, over, done = _collect(ours, lim, t0, [z.sock.fileno(), z.pidfd])
        rep = z.report() if done else None
        if rep is None:
            # out of time or output (or the zygote died): ending the zygote ends the job
            self._stop_zygote()
            if not done:
                return bufs, timed_out, over, -signal.SIGKILL, 0.0
            return "the job's namespace ended unexpectedly"
        if "error" in rep:
            return str(rep["error"])
        return bufs, timed_out, over, rep["rc"], float(rep["cpu"])

    def _run_forked(self, lim, code, theirs, ours, workdir, t0, shared):
        """One job as a plain fork of the worker (no PID namespace: the degraded level)."""
        program = self.cache.get(code)
        compiled, namespaces = self.shared.lookup(*shared)
        try:
            pid = os.fork()
        except OSError as e:
            return f"fork failed: {e}"
        if pid == 0:
            uid = self.uid if self.level["uid_switch"] else None
            zy.job_main(
                lim, program or code, compiled, namespaces, theirs, workdir, uid, self._harden
            )
        for fd in theirs:
            os.close(fd)
        theirs.clear()
        pidfd = os.pidfd_open(pid)
        try:
            bufs, timed_out, over, done = _collect(ours, lim, t0, [pidfd])
        finally:
            os.close(pidfd)
        if not done:
            _kill(pid)
        rc, cpu = None, 0.0
        try:
            _, wstatus, ru = os.wait4(pid, 0)
            rc = os.waitstatus_to_exitcode(wstatus)
            cpu = ru.ru_utime + ru.ru_stime
        except ChildProcessError:
            pass
        _killpg(pid)
        if self.level["uid_switch"]:
            _kill_uid(self.uid)  # the uid is this worker's alone: a setsid escape goes too
        return bufs, timed_out, over, rc, cpu

    def _harden(self) -> None:
        """What a plain fork's job sets up itself (a zygote's jobs inherit it)."""
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if self.bpf:
            load_bpf(self.bpf)

    def _stop_zygote(self) -> None:
        if self.zygote is not None:
            self.zygote.kill()
            self.zygote = None

    def _job_dir(self, lim: dict) -> str:
        """A fresh, empty directory owned by the job's uid: with a mount namespace, the root
        of a tmpfs of its own (sized for the job's file-size limit, 4096 inodes, noatime),
        mounted under SCRATCH, which is a shared mount so that the zygote's copy of it sees
        the new tmpfs; without one, a temp dir. Nothing on it (not even its inode counter)
        is left for the next job: `_drop_job_dir` unmounts it."""
        if not self.level["mountns"]:
            import tempfile

            d = tempfile.mkdtemp(prefix="vgrout-sbx-")
            if os.geteuid() == 0:
                os.chown(d, self.uid, self.uid)
            return d
        if not self.scratch_ready:
            opts = "size=64k,nr_inodes=1024,mode=0755"
            mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOATIME, opts)
            mount(None, SCRATCH, None, MS_SHARED)
            self.scratch_ready = True
        self.jobs += 1
        d = f"{SCRATCH}/{self.jobs}"
        os.mkdir(d, 0o755)
        size, uid = int(lim["fsize_mb"]) + 1, self.uid
        opts = f"size={size}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}"
        try:
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOATIME, opts)
        except OSError:
            os.rmdir(d)
            raise
        return d

    def _drop_job_dir(self, d: str) -> None:
        """Remove a job's scratch (all of its processes are gone by now)."""
        if self.level["mountns"]:
            umount(d)
            os.rmdir(d)
            return
        try:
            shutil.rmtree(d, ignore_errors=True)
        except RecursionError:  # a tree nested deeper than rmtree's recursion can walk
            import subprocess

            subprocess.run(["rm", "-rf", "--one-file-system", d], check=False)

    def _stray_unix_sockets(self) -> bool:
        """Whether a named (abstract or path) unix socket exists in this network namespace.

        Between jobs there should be none: a socket the job bound and then kept alive after
        its death (an fd of itself in flight in its own queue, say) would carry data to the
        next job. /proc/net/unix lists them; a line with a path column is a named socket.
        """
        with open("/proc/net/unix", "rb") as fh:
            return any(len(line.split()) > 7 for line in fh.read().splitlines()[1:])


def _collect(fds: list[int], lim: dict, t0: float, done_fds: list[int]):
    """Read the three pipes until the job is over, its output overflows, or time runs out.

    The job is over once one of `done_fds` is readable (the job's pidfd, or the zygote's
    report or pidfd) and the pipes are at EOF, or STRAGGLER_S after that when a process
    that outlived the job (possible only without a PID namespace) still holds a pipe.
    Returns (bufs, timed_out, over, done).
    """
    cap = int(lim["output_bytes"])
    bufs = [bytearray(), bytearray(), bytearray()]
    sel = selectors.DefaultSelector()
    for fd in done_fds:
        sel.register(fd, selectors.EVENT_READ, -1)
    for i, fd in enumerate(fds):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, i)
    deadline = t0 + float(lim["wall_s"])
    timed_out = over = False
    done_at = None
    open_fds = len(fds)
    while not over:
        now = time.monotonic()
        if done_at is not None and (open_fds == 0 or now - done_at > STRAGGLER_S):
            break
        if now >= deadline:
            timed_out = done_at is None
            break
        for key, _ in sel.select(timeout=deadline - now if done_at is None else 0.05):
            if key.data == -1:
                if done_at is None:
                    done_at = time.monotonic()
                    for fd in done_fds:
                        sel.unregister(fd)
                continue
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fd)
                open_fds -= 1
                continue
            buf = bufs[key.data]
            buf += chunk
            if len(buf) > cap:
                del buf[cap:]
                over = True
    sel.close()
    return bufs, timed_out, over, done_at is not None and not over


_PROBE_LIMITS = {
    "wall_s": 10.0,
    "cpu_s": 5,
    "mem_mb": 1024,
    "fsize_mb": 1,
    "nofile": 64,
    "nproc": 64,
    "output_bytes": 4096,
}


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int) -> None:
    """SIGKILL a job process and its group (it may not have reached setsid yet)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _killpg(pid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as `uid` (without a PID namespace, where processes of
    a job can leave its process group): a helper takes the uid and calls kill(-1), which
    reaches every process of that uid but itself in one pass (a process with SIGKILL
    pending cannot finish a fork). Not looped until ESRCH: outside a PID namespace the
    killed are reaped by the host's init, and zombies still count as found."""
    try:
        pid = os.fork()
    except OSError:
        return
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(2):
                os.kill(-1, signal.SIGKILL)
        except BaseException:  # noqa: BLE001 - ESRCH: nobody to kill
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def _read_files(scratch: str, names: list[str], cap: int) -> dict[str, bytes]:
    """Read back regular files from scratch without following links (root reads them)."""
    out: dict[str, bytes] = {}
    for name in names:
        parts = [p for p in name.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            continue
        fd = None
        try:
            fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
            for p in parts[:-1]:
                nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            try:
                if stat.S_ISREG(os.fstat(ffd).st_mode):
                    chunks, left = [], cap
                    while left > 0:
                        c = os.read(ffd, min(left, 1 << 20))
                        if not c:
                            break
                        chunks.append(c)
                        left -= len(c)
                    out[name] = b"".join(chunks)
            finally:
                os.close(ffd)
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    return out


# ----------------------------------------------------------------------------- starting a zygote
# The zygote's first code after exec: read one frame (settings, then this module's source)
# from the socket fd in argv[1], run the source as a module, hand over to zygote_main.
ZYGOTE_BOOT = """
import json, socket, struct, sys
s = socket.socket(fileno=int(sys.argv[1]))
def take(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit(0)
        b += c
    return b
p = take(struct.unpack(">Q", take(8))[0])
h = struct.unpack(">I", p[:4])[0]
cfg = json.loads(p[4 : 4 + h])
g = {"__name__": "vgrout_sandbox_zygote"}
exec(compile(p[4 + h :], "_sandbox_zygote.py", "exec"), g)
del p
g["zygote_main"](s, cfg)
"""


def _exec_zygote(w: Worker, fd: int) -> None:
    """In the clone: /proc, hostname, parent-death signal, no_new_privs, seccomp (all kept
    across exec), then a fresh interpreter runs ZYGOTE_BOOT. Never returns."""
    try:
        os.closerange(3, fd)  # the worker's socket to the trainer, and anything else
        os.closerange(fd + 1, zy.MAX_FD)
        os.set_inheritable(fd, True)
        # hidepid=2: a job sees only its own uid's processes, not the zygote (whose /proc
        # entries would count up every job it has run)
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
        socket.sethostname("sandbox")
        os.chdir("/")
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the worker gone: everything here goes
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if w.bpf:
            load_bpf(w.bpf)
        # the worker's own environment is the pool's scrubbed one: the zygote inherits it
        os.execv(w.python, [w.python, "-I", "-S", "-c", ZYGOTE_BOOT, str(fd)])
    except BaseException as e:  # noqa: BLE001 - tell the worker (via its stderr) and leave
        try:
            os.write(2, f"vgrout sandbox: zygote set-up failed: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(125)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    zy.occupy_low_fds()
    init = recv_frame(sock)
    if init is None:
        return
    cfg = init[0]
    w = Worker(int(cfg["uid"]), cfg["seccomp_dir"], cfg["masks"], cfg["keeps"], cfg["zygote"])
    gc.freeze()  # keep the collector off the inherited heap: fewer copy-on-write faults per fork
    sock.sendall(pack({"level": w.level, "notes": w.notes, "pid": os.getpid()}, []))
    while True:
        msg = recv_frame(sock)
        if msg is None:
            return
        header, (code, stdin, *sources) = msg
        try:
            head, blobs = w.run(header, code, stdin, sources)
        except Exception as e:  # noqa: BLE001 - a clear error outcome, and a clean restart
            w._stop_zygote()
            head, blobs = _error(f"worker: {type(e).__name__}: {e}")
        sock.sendall(pack(head, blobs))


if __name__ == "__main__":
    main()
