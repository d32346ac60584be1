"""Fork-server worker of the sandbox (the trainer side is `_sandbox_pool`).

Run as `python -I -S _sandbox_worker.py SOCK_FD` (its settings come in the first frame,
not on the command line, so no job can read them from /proc): a long-lived, stdlib-only
interpreter that makes its jobs' memory cgroup, enters its own network namespace and a copy
of the view process's mount namespace once (a read-only view of the filesystem with homes,
the repo and the data hidden, holding the jobs' allow-list tree) and then serves jobs one
at a time. The same file run with the "view" role is that view process (`view_main`).

Jobs run under a *zygote* (`_sandbox_zygote`): PID 1 of its own PID / mount / IPC / UTS
namespaces, rooted in the allow-list tree (`pivot_root`), with no_new_privs and the seccomp
deny-list loaded once, a fresh and small interpreter. Per job the zygote forks one child,
which joins the job cgroup and drops to the worker's unprivileged uid (in a fresh scratch
directory, with rlimits) and runs the program; when
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
import select
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
    "x86_64": {"clone": 56, "mount_setattr": 442, "pivot_root": 155},
    "aarch64": {"clone": 220, "mount_setattr": 442, "pivot_root": 41},
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


# Calls that read or change what the page cache holds for a file other jobs also read.
PAGE_CACHE_CALLS = (
    "fadvise64",
    "fadvise64_64",
    "mincore",
    "readahead",
    "cachestat",
    "io_setup",
    "io_submit",
    "io_getevents",
    "io_pgetevents",
    "io_cancel",
    "io_destroy",
)
# fcntl: F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_SETLEASE,
# F_GETLEASE, F_NOTIFY
FCNTL_DENIED = (5, 6, 7, 36, 37, 38, 1024, 1025, 1026)
MADV_DENIED = (12, 20, 21)  # MADV_MERGEABLE, MADV_COLD, MADV_PAGEOUT
PR_SET_MEMORY_MERGE = 67
# numbers of the newer calls, for a libseccomp that does not know their names yet (the
# same on x86_64 and aarch64: both use the common table for calls added since 5.1)
_NEW_CALLS = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "mount_setattr": 442,
    "memfd_secret": 447,
    "cachestat": 451,
}


def _deny(f, sc, action, name: str, missing: list[str]) -> None:
    """Add `action` for syscall `name`; a name this arch lacks is skipped (it cannot be
    called), one libseccomp cannot resolve goes by number or into `missing`."""
    nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if nr == -1 and platform.machine() in _SYS:
        nr = _NEW_CALLS.get(name, -1)
    if nr == -1:
        if name not in ("fadvise64_64", "inotify_init"):  # absent on some arches by design
            missing.append(name)
        return
    if nr < 0:  # libseccomp's pseudo-number: no such call on this arch
        return
    f.add_rule(action, nr)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def build_seccomp_bpf(seccomp_dir: str) -> bytes:
    """Compile the deny-list with libseccomp (via pyseccomp) and return raw BPF bytes."""
    if seccomp_dir and seccomp_dir not in sys.path:
        sys.path.append(seccomp_dir)
    import errno

    import pyseccomp as sc

    deny = errno.EPERM
    missing: list[str] = []
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
        # kernel state that outlives a job or is shared with jobs running at the same time,
        # which honest programs never use: the page cache (drop or probe a page: fadvise,
        # mincore, readahead, cachestat, Linux AIO with RWF_NOWAIT), file locks (flock),
        # watches on files other jobs read (inotify, fanotify), secret memory, another
        # process's pages (process_madvise), machine-wide load, free memory and process
        # count (sysinfo; /proc shows none of them to a job)
        *PAGE_CACHE_CALLS,
        "flock",
        "inotify_init",
        "inotify_init1",
        "inotify_add_watch",
        "inotify_rm_watch",
        "fanotify_init",
        "fanotify_mark",
        "memfd_secret",
        "process_madvise",
        "sysinfo",
    ):
        _deny(f, sc, sc.ERRNO(deny), name, missing)
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

    # an `int` argument is compared on its low 32 bits, the ones the kernel reads: a raw
    # syscall can set the upper half to anything
    def int_is(i: int, value: int):
        return sc.Arg(i, sc.MASKED_EQ, 0xFFFFFFFF, value)

    f.add_rule(sc.ERRNO(deny), "prctl", int_is(0, PR_SET_PDEATHSIG))
    f.add_rule(sc.ERRNO(deny), "prctl", int_is(0, PR_SET_MEMORY_MERGE))
    f.add_rule(sc.ERRNO(deny), "ioctl", int_is(1, 0x5412))  # TIOCSTI
    # byte-range and open-file-description locks, leases and directory notifications are
    # seen by every process that opens the same file: fcntl's other commands stay
    for cmd in FCNTL_DENIED:
        f.add_rule(sc.ERRNO(deny), "fcntl", int_is(1, cmd))
    # preadv2 / pwritev2 say "no such call": their flags probe the page cache (RWF_NOWAIT
    # fails on a page that is not cached) or drop pages from it (RWF_DONTCACHE); glibc then
    # does a call without flags with preadv / pwritev, as on a kernel that lacks them
    for name in ("preadv2", "pwritev2"):
        f.add_rule(sc.ERRNO(errno.ENOSYS), name)
    # madvise: evicting pages (cold, pageout) and same-page merging (KSM) act on memory
    # other processes share; the advice an allocator gives (dontneed, free, ...) stays
    for advice in MADV_DENIED:
        f.add_rule(sc.ERRNO(deny), "madvise", int_is(2, advice))
    if missing:
        raise OSError(f"seccomp: cannot deny {', '.join(missing)} (libseccomp too old?)")
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


# ----------------------------------------------------------------------------- the job's view
# A job sees an allow-list of the filesystem and nothing else: the interpreter's install
# (its binary, libraries and standard library), the few system files the interpreter and
# its extension modules load, five device nodes, its own /proc and its scratch directory.
# The view process builds that tree once per pool, as *copies* on a tmpfs of its own:
# what a job reads there is in memory for good (no page of it is ever read from disk or
# dropped from the page cache) and no lookup of a missing name is remembered (tmpfs keeps
# no negative dentries), so reading it leaves no trace for a later job to time.
JOBROOT = "/tmp/.vgrout-root"  # in the view's mount namespace: the tree a job sees as /
SCRATCH_IN = "/tmp/.vgrout-scratch"  # the parent of every job's scratch dir, as jobs see it
SCRATCH = JOBROOT + SCRATCH_IN  # ... and where the worker mounts it
# parts of the standard library no grading run uses: its tests, GUI, installers, the static
# library for embedding, and third-party packages (never on a job's sys.path anyway)
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "site-packages")
DYNLOAD_SKIP = ("_test", "_xxtestfuzz", "xxlimited", "_ctypes_test", "_tkinter", "xxsubtype")
# what glibc loads at run time besides the libraries: the loader's cache of library paths,
# the local time zone, the C.UTF-8 locale of the workers' LANG (without it the interpreter
# starts in the C locale), and libgcc_s (dlopened to unwind a thread that calls pthread_exit)
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
LOCALE_DIRS = ("/usr/lib/locale/C.utf8", "/usr/lib/locale/C.UTF-8")
ON_DEMAND_LIBS = ("libgcc_s.so.1",)
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}


def allow_list() -> list[str]:
    """Absolute paths (files, or links to them) that make up a job's view of the system.

    The standard library of this interpreter (sys.path of `python -I -S`, minus
    STDLIB_SKIP, the static library dir `config-*` and bytecode for -O / -OO), the real
    interpreter binary, every shared library it or one of its kept extension modules
    loads, SYSTEM_FILES and the files of LOCALE_DIRS.
    """
    paths: set[str] = set()
    dynload: list[str] = []
    for top in sys.path:
        if not os.path.isdir(top):
            continue
        for d, dirs, files in os.walk(top):
            if d == top:
                dirs[:] = [n for n in dirs if n not in STDLIB_SKIP and not n.startswith("config-")]
            for n in files:
                p = os.path.join(d, n)
                if n.endswith((".opt-1.pyc", ".opt-2.pyc")):
                    continue
                if n.endswith(".so"):
                    if n.startswith(DYNLOAD_SKIP):
                        continue
                    dynload.append(p)
                paths.add(p)
    paths.add(os.path.realpath(sys.executable))
    paths.update(_loaded_libraries(dynload))
    paths.update(p for p in SYSTEM_FILES if os.path.lexists(p))
    for top in LOCALE_DIRS:
        paths.update(os.path.join(d, n) for d, _, files in os.walk(top) for n in files)
    return sorted(paths)


def _loaded_libraries(modules: list[str]) -> list[str]:
    """Paths of the shared objects this interpreter and `modules` load, as the dynamic
    loader named them: a forked child dlopens each module (and ON_DEMAND_LIBS) without
    running it and reports what dl_iterate_phdr lists."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            for m in [*modules, *ON_DEMAND_LIBS]:
                try:
                    ctypes.CDLL(m, mode=os.RTLD_LAZY | os.RTLD_LOCAL)
                except OSError:
                    pass  # a module whose libraries are missing cannot load for a job either
            names: list[bytes] = []

            class Info(ctypes.Structure):
                _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p)]

            @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Info), ctypes.c_size_t, ctypes.c_void_p)
            def each(info, size, data):
                if info.contents.name:
                    names.append(info.contents.name)
                return 0

            _libc.dl_iterate_phdr(each, None)
            data = b"\n".join(n for n in names if n.startswith(b"/"))
            while data:
                data = data[os.write(w, data) :]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return [n.decode("utf-8", "surrogateescape") for n in b"".join(chunks).split(b"\n") if n]


def _mirror(path: str, root: str) -> str:
    """Recreate `path` under `root`: each symlink met on the way becomes the same link
    there, the file it ends at is copied (mode and times kept: bytecode is checked against
    its source's mtime). Returns the real path copied."""
    cur, rest, hops = "/", [p for p in path.split("/") if p], 0
    while rest:
        name = rest.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, name)
        if os.path.islink(nxt):
            hops += 1
            if hops > 40:
                raise OSError(f"job view: too many links resolving {path}")
            target = os.readlink(nxt)
            os.makedirs(root + cur, mode=0o755, exist_ok=True)
            if not os.path.lexists(root + nxt):
                os.symlink(target, root + nxt)
            if target.startswith("/"):
                cur = "/"
            rest = [p for p in target.split("/") if p] + rest
            continue
        cur = nxt
    if os.path.isfile(cur) and not os.path.exists(root + cur):
        os.makedirs(root + os.path.dirname(cur), mode=0o755, exist_ok=True)
        shutil.copy2(cur, root + cur)
    return cur


def build_jobroot(paths: list[str]) -> tuple[int, int]:
    """Mount JOBROOT (a tmpfs), copy `paths` into it, add the device nodes, the mount
    points (/proc, the scratch parent) and links, then make it read-only for good (the
    superblock, not one mount). Returns (files, bytes) copied."""
    real = {os.path.realpath(p) for p in paths}
    size = sum(os.stat(p).st_size for p in real if os.path.isfile(p))
    os.makedirs(JOBROOT, mode=0o755)
    opts = f"size={(size >> 20) + 16}m,nr_inodes={len(paths) + 4096},mode=0755"
    mount("tmpfs", JOBROOT, "tmpfs", MS_NOSUID, opts)
    for p in paths:
        _mirror(p, JOBROOT)
    os.makedirs(JOBROOT + "/dev", mode=0o755)
    for name, (major, minor) in DEVICES.items():
        os.mknod(f"{JOBROOT}/dev/{name}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(f"{JOBROOT}/dev/{name}", 0o666)
    os.symlink("/proc/self/fd", JOBROOT + "/dev/fd")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{JOBROOT}/dev/{name}")
    os.makedirs(JOBROOT + "/proc", mode=0o555)
    os.makedirs(JOBROOT + SCRATCH_IN, mode=0o755)
    mount(None, JOBROOT, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    return len(real), size


def view_main(sock: socket.socket, cfg: dict) -> None:
    """The pool's view process: a mount namespace whose JOBROOT is every job's filesystem
    (and whose rest, read-only with homes, the repo and the data hidden, the workers'
    own). Workers join it once and take a copy; it only waits for the pool to close it."""
    notes: list[str] = []
    ok = False
    files = size = 0
    try:
        paths = allow_list()  # before the masks hide the install (it may live in a home)
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        files, size = build_jobroot(paths)
        mask_tree(cfg["masks"], cfg["keeps"])
        make_tree_readonly("/")
        ok = True
    except Exception as e:  # noqa: BLE001 - reported to the pool, which logs it
        notes.append(f"job view unavailable ({type(e).__name__}: {e})")
    sock.sendall(pack({"ok": ok, "notes": notes, "files": files, "bytes": size}, []))
    while sock.recv(1 << 12):
        pass


def mask_tree(masks: list[str], keeps: list[str]) -> None:
    """Cover `masks` (home, repo, data, temp dirs) with empty tmpfs and bind `keeps` (the
    interpreter's install) back where a mask hid them: the view of the workers themselves
    (jobs see JOBROOT only)."""
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


def join_view(pid: int) -> None:
    """Enter the view process's mount namespace, then take a private copy of it (the
    worker's scratch mounts stay its own; the JOBROOT tmpfs is shared, read-only)."""
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
    try:
        _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(CLONE_NEWNS)), "setns")
    finally:
        os.close(fd)
    unshare(CLONE_NEWNS)


def pivot_into(root: str) -> None:
    """Make `root` this mount namespace's / and drop the old root from it altogether."""
    nr = _SYS.get(platform.machine(), {}).get("pivot_root")
    if nr is None:
        raise OSError(38, "pivot_root unsupported on this architecture")
    os.chdir(root)
    _check(_libc.syscall(ctypes.c_long(nr), b".", b"."), "pivot_root")
    umount(".")  # the old root, stacked on the new one by pivot_root(".", ".")
    os.chdir("/")


# ----------------------------------------------------------------------------- memory per job
CGROUP_PREFIX = "vgrout-job-"  # + the job uid: one cgroup per worker, for its jobs only
# what a job may leave charged to its cgroup after all its processes are gone (per-CPU
# charge caches hold up to 64 pages each) before the worker gives the next job a new one
CGROUP_LEFTOVER = 4 << 20
UNLIMITED = 1 << 40  # (in MB) a new cgroup's limit


def memcg_parent(override: str | None = None) -> tuple[str | None, str]:
    """(the directory under which per-job memory cgroups are made, "") or (None, why not).

    `override` (VGROUT_SANDBOX_CGROUP) names it outright. Otherwise it is this process's
    own cgroup: in the cgroup v1 memory hierarchy, or in cgroup v2 when the memory
    controller is enabled for its children (a v2 cgroup that holds processes, like the
    trainer's, cannot enable it: the trainer must then run in a delegated cgroup).
    """
    if override:
        return (override, "") if os.path.isdir(override) else (None, f"{override} is no cgroup")
    try:
        with open("/proc/self/cgroup") as fh:
            lines = [ln.rstrip("\n").split(":", 2) for ln in fh if ln.count(":") >= 2]
        with open("/proc/self/mountinfo") as fh:
            mounts = [ln.split() for ln in fh]
    except OSError as e:
        return None, f"cgroups unreadable ({e})"
    v1 = next((p for _, ctl, p in lines if "memory" in ctl.split(",")), None)
    for m in mounts:
        sep = m.index("-")
        fstype, opts = m[sep + 1], m[sep + 3].split(",")
        if v1 is not None and fstype == "cgroup" and "memory" in opts:
            return os.path.join(m[4], os.path.relpath(v1, m[3])), ""
        if v1 is None and fstype == "cgroup2":
            v2 = next((p for h, ctl, p in lines if h == "0" and ctl == ""), None)
            if v2 is None:
                break
            d = os.path.normpath(os.path.join(m[4], os.path.relpath(v2, m[3])))
            try:
                with open(os.path.join(d, "cgroup.subtree_control")) as fh:
                    if "memory" in fh.read().split():
                        return d, ""
            except OSError:
                pass
            return None, (
                f"cgroup v2: the memory controller is not enabled for children of {d} (a "
                "cgroup with processes cannot hand it down); run the trainer in a delegated "
                "cgroup, or set VGROUT_SANDBOX_CGROUP to an empty cgroup with +memory in its "
                "cgroup.subtree_control"
            )
    return None, "no memory cgroup hierarchy mounted"


class JobCgroup:
    """The memory cgroup a worker's jobs run in, one job at a time (cgroup v1 or v2).

    Opened while the worker still sees the host's cgroup filesystem: it keeps a handle on
    the parent directory and on each file it needs, so it works on from inside the view.
    Per job the worker sets the limit and the job's process joins (it writes "0" to
    `procs` before it drops root), so everything the job starts, maps, writes to tmpfs or
    holds in memfds or pipes is charged here; at the limit the kernel's OOM killer ends a
    process of the job (cgroup v2: all of them, memory.oom.group). After the job, charges
    it left behind (CGROUP_LEFTOVER) get the next job a new cgroup.
    """

    def __init__(self, parent: str, uid: int):
        self.uid, self.name = uid, ""
        self.parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        self.limit_mb = UNLIMITED
        self.fds: dict[str, int] = {}
        try:
            self._open()
        except OSError:
            self.close()
            raise

    def _open(self) -> None:
        # a random suffix, not a count: a job reads its cgroup's name in /proc/self/cgroup,
        # and whether the job before it forced a renewal must not show there
        self.name = f"{CGROUP_PREFIX}{self.uid}-{os.urandom(6).hex()}"
        os.mkdir(self.name, 0o755, dir_fd=self.parent_fd)
        d = self.fds["dir"] = os.open(
            self.name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.parent_fd
        )
        try:
            names = set(os.listdir(d))
            self.v2 = "memory.max" in names
            want = (
                {
                    "limit": "memory.max",
                    "swap": "memory.swap.max",
                    "events": "memory.events",
                    "usage": "memory.current",
                    "procs": "cgroup.procs",
                }
                if self.v2
                else {
                    "limit": "memory.limit_in_bytes",
                    "swap": "memory.memsw.limit_in_bytes",
                    "events": "memory.oom_control",
                    "usage": "memory.usage_in_bytes",
                    "procs": "cgroup.procs",
                }
            )
            if want["limit"] not in names:
                raise OSError(f"no memory controller in {self.name}")
            for key, fname in want.items():
                if fname in names:
                    mode = os.O_RDONLY if key in ("events", "usage") else os.O_WRONLY
                    self.fds[key] = os.open(fname, mode | os.O_CLOEXEC, dir_fd=d)
            if self.v2:
                if "swap" in self.fds:
                    os.write(self.fds.pop("swap"), b"0")
                if "memory.oom.group" in names:
                    with open(os.open("memory.oom.group", os.O_WRONLY, dir_fd=d), "wb") as fh:
                        fh.write(b"1")
        except OSError:
            self._close_files()
            raise
        self.limit_mb = UNLIMITED

    @property
    def procs(self) -> int:
        return self.fds["procs"]

    def set_limit(self, mb: int) -> None:
        """Bound the next job's memory (all its processes, tmpfs pages and kernel memory)."""
        if mb == self.limit_mb:
            return
        value = b"%d" % (mb << 20)
        order = ["limit", "swap"] if mb < self.limit_mb else ["swap", "limit"]
        for key in order:  # v1 keeps memory+swap >= memory at every step
            if key in self.fds:
                os.write(self.fds[key], value)
        self.limit_mb = mb

    def oom_kills(self) -> int:
        text = os.pread(self.fds["events"], 4096, 0).decode()
        return next(
            (int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("oom_kill ")), 0
        )

    def usage(self) -> int:
        return int(os.pread(self.fds["usage"], 64, 0))

    def members(self) -> list[int]:
        """Its processes (not those already exiting), as pids of the worker's namespace.
        Opened afresh each time: cgroup v1 hands one open file the same cached list for a
        second."""
        fd = os.open("cgroup.procs", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fds["dir"])
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return [int(p) for p in b"".join(chunks).split()]

    def renew(self) -> None:
        """A fresh cgroup for the next job (this one has no process left: removing it hands
        what is still charged to it up to the parent)."""
        self._close_files()
        old = self.name
        self._open()
        os.rmdir(old, dir_fd=self.parent_fd)

    def _close_files(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def close(self, remove: bool = True) -> None:
        self._close_files()
        if remove:
            try:
                os.rmdir(self.name, dir_fd=self.parent_fd)
            except OSError:
                pass
        os.close(self.parent_fd)


# ----------------------------------------------------------------------------- the worker
JOB_NS = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
PROC_OPTS = "hidepid=2,subset=pid"  # a job's /proc: its own processes' entries, nothing else
LAST_PID_FD = 3  # the zygote's handle on its namespace's ns_last_pid
LEVELS = (
    "netns",
    "mountns",
    "allowlist_fs",
    "pidns",
    "ipcns",
    "uid_switch",
    "no_new_privs",
    "seccomp",
    "memcg",
)
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
            cfg = {
                "uid": w.uid if w.level["uid_switch"] else None,
                "cgroup_fd": w.cgroup.procs if w.cgroup is not None else None,
                "last_pid_fd": LAST_PID_FD,
            }
            ours.sendall(pack(cfg, [w.source]))
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
    """State of one fork-server: its isolation level, seccomp program, memory cgroup and
    job zygote."""

    def __init__(
        self,
        uid: int,
        seccomp_dir: str,
        view: int | None,
        cgroup_parent: str | None,
        zygote: bool = True,
    ):
        self.uid = uid
        self.level: dict[str, bool] = dict.fromkeys(LEVELS, False)
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
        self.proc_ready = False  # JOBROOT/proc mounted (for plain-fork jobs)
        self.jobs = 0
        self.cgroup: JobCgroup | None = None
        root = os.geteuid() == 0
        try:
            self.bpf = build_seccomp_bpf(seccomp_dir)
        except Exception as e:  # noqa: BLE001 - report and go on without it
            self.notes.append(f"seccomp unavailable ({type(e).__name__}: {e})")
        if root:
            # while this process still sees the host's cgroup filesystem
            parent, why = (cgroup_parent, "") if cgroup_parent else memcg_parent()
            try:
                if parent is None:
                    raise OSError(why)
                self.cgroup = JobCgroup(parent, uid)
                self.level["memcg"] = True
            except OSError as e:
                self.notes.append(
                    f"no memory cgroup per job ({e}): memory is bounded per process only "
                    "(RLIMIT_AS), not per job"
                )
            try:
                unshare(CLONE_NEWNET)
                self.level["netns"] = True
            except OSError as e:
                self.notes.append(f"netns unavailable ({e})")
            if view is not None:
                try:
                    join_view(view)
                    self.level["mountns"] = self.level["allowlist_fs"] = True
                except OSError as e:
                    self.notes.append(f"mountns unavailable ({e})")
            self.level["uid_switch"] = True
        else:
            self.notes.append(
                "not root: no namespaces, no uid switch, no per-job memory cgroup, the whole "
                "filesystem readable (RLIMIT_NPROC per real uid)"
            )
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

    # -- one job ------------------------------------------------------------------------
    def run(
        self, header: dict, code: bytes, stdin: bytes, sources: list[bytes] = ()
    ) -> tuple[dict, list[bytes]]:
        lim = header["limits"]
        shared = (header.get("shared", []), list(sources))
        t0 = time.monotonic()
        ooms = 0
        if self.cgroup is not None:
            try:
                if self.cgroup.usage() > CGROUP_LEFTOVER:
                    # what the last job left still counts: start afresh (and with a new
                    # zygote: the old one holds the old cgroup's handle)
                    self._stop_zygote()
                    self.cgroup.renew()
                self.cgroup.set_limit(int(lim["mem_mb"]))
                ooms = self.cgroup.oom_kills()
            except OSError as e:
                return _error(f"memory cgroup: {e}")
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
        oom_killed = self.cgroup is not None and self.cgroup.oom_kills() > ooms
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
            if -rc == signal.SIGKILL and oom_killed:
                status = "memory"  # the job's cgroup ran out: the kernel killed it
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
                z.start(lim, code, theirs, self._inside(workdir), shared)
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
        if self.level["allowlist_fs"] and not self.proc_ready:
            # the job's /proc: its own processes only (hidepid), nothing machine-wide
            mount("proc", JOBROOT + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, PROC_OPTS)
            self.proc_ready = True
        program = self.cache.get(code)
        compiled, namespaces = self.shared.lookup(*shared)
        try:
            pid = os.fork()
        except OSError as e:
            return f"fork failed: {e}"
        if pid == 0:
            uid = self.uid if self.level["uid_switch"] else None
            zy.job_main(
                lim,
                program or code,
                compiled,
                namespaces,
                theirs,
                self._inside(workdir),
                uid,
                self.cgroup.procs if self.cgroup is not None else None,
                self._harden,
                JOBROOT if self.level["allowlist_fs"] else None,
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
        # every process the job started is in its cgroup: hold each by a pidfd, so that
        # after the kills the worker can wait until each has really exited
        held = _pidfds(self.cgroup.members()) if self.cgroup is not None else []
        _killpg(pid)
        if self.level["uid_switch"]:
            _kill_uid(self.uid)  # the uid is this worker's alone: a setsid escape goes too
        _wait_exited(held, 1.0)
        return bufs, timed_out, over, rc, cpu

    def _inside(self, workdir: str) -> str:
        """A scratch dir's path as the job sees it (under JOBROOT, its root)."""
        return workdir[len(JOBROOT) :] if self.level["allowlist_fs"] else workdir

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


def _pidfds(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            out.append(os.pidfd_open(p))
        except ProcessLookupError:
            pass
    return out


def _wait_exited(pidfds: list[int], timeout: float) -> None:
    """Wait until every process held by `pidfds` has exited (a pidfd turns readable then),
    at most `timeout` seconds; closes them."""
    end = time.monotonic() + timeout
    try:
        for fd in pidfds:
            left = end - time.monotonic()
            if left > 0:
                select.select([fd], [], [], left)
    finally:
        for fd in pidfds:
            os.close(fd)


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
    """In the clone: the job root, /proc, hostname, parent-death signal, no_new_privs,
    seccomp (all kept across exec), then a fresh interpreter runs ZYGOTE_BOOT. Never
    returns."""
    try:
        keep = {fd, *((w.cgroup.procs,) if w.cgroup is not None else ())}
        lows, highs = [3, *sorted(k + 1 for k in keep)], [*sorted(keep), zy.MAX_FD]
        for lo, hi in zip(lows, highs, strict=True):
            os.closerange(lo, hi)  # the worker's socket to the trainer, and anything else
        for k in keep:
            os.set_inheritable(k, True)
        pivot_into(JOBROOT)  # from here on, only the allow-list exists
        # the zygote rewinds the namespace's last PID after every job through this fd;
        # then /proc is mounted afresh for the jobs with only the processes' own entries
        # (subset=pid: no machine-wide counters) of their own uid (hidepid=2: not the
        # zygote, whose entries would count up every job it has run)
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        last = os.open("/proc/sys/kernel/ns_last_pid", os.O_RDWR)
        if last != LAST_PID_FD:
            os.dup2(last, LAST_PID_FD)
            os.close(last)
        os.set_inheritable(LAST_PID_FD, True)
        umount("/proc")
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, PROC_OPTS)
        socket.sethostname("sandbox")
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
    if cfg.get("role") == "view":
        return view_main(sock, cfg)
    w = Worker(int(cfg["uid"]), cfg["seccomp_dir"], cfg["view"], cfg["cgroup"], cfg["zygote"])
    gc.freeze()  # keep the collector off the inherited heap: fewer copy-on-write faults per fork
    sock.sendall(pack({"level": w.level, "notes": w.notes, "pid": os.getpid()}, []))
    try:
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
    finally:
        w._stop_zygote()  # its namespace, and every process of a job, are gone after this
        if w.cgroup is not None:
            w.cgroup.close()


if __name__ == "__main__":
    main()
